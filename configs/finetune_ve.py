"""SNLI-VE finetuning: `config/train-ve-base-2gpu.json` (and `-large-4gpu`).

  python run.py --config configs/finetune_ve.py --workdir W \
      --config.init_checkpoint=uniter-base.pt

Trains the `ve` head (the VQA head with 3 answers: contradiction,
entailment, neutral; the same BCE x 3 loss, no head learning-rate
multiplier) and, every 500 updates, reports the accuracy on dev and test
and writes both prediction files (`<workdir>/results/`), as the official
`train_ve.py` does.

Expected tfds names (`python -m data_prep txt_db ... --name <db> --task ve`,
docs/finetuning.md): `uniter_txt_db/ve_train:1.0.0` (split "train"),
`uniter_txt_db/ve_dev:1.0.0` (split "val"), `uniter_txt_db/ve_test:1.0.0`
(split "test"), all on the image store `uniter_img_db/flickr30k:1.0.0`.

Variants (combinable, `configs/finetune_ve.py:large,runlocal`): `large` is
`config/train-ve-large-4gpu.json` (UNITER-large); `runlocal` a 6-update
smoke run of a tiny model on `uniter_synthetic_ve/tiny:1.0.0`; `synthetic`
the demo-sized model (that of `configs/demo.py`, so the README demo's
checkpoint initialises it) finetuned for a few hundred CPU updates on
`uniter_synthetic_ve/demo:1.0.0`.
"""

from configs import common
from configs import finetune_vqa
from uniter_jax.model import config as model_config


def _txt(name: str) -> str:
  return f"uniter_txt_db/{name}:1.0.0"


def official(c, *, large: bool):
  """The official `train-ve-*.json` values (besides the data)."""
  if large:
    c.model.update(model_config.large().to_dict())
    c.init_checkpoint = "uniter-large.pt"
    c.train.token_budget = 4096           # train_batch_size, per GPU (4)
    c.train.gradient_accumulation_steps = 2
    c.train.learning_rate = 3e-5
  else:
    c.init_checkpoint = "uniter-base.pt"
    c.train.token_budget = 4096           # train_batch_size, per GPU (2)
    c.train.gradient_accumulation_steps = 4
    c.train.learning_rate = 8e-5
  c.train.num_train_steps = 4000
  c.train.warmup_steps = 400
  c.model.dtype = "bfloat16"              # official fp16 (apex O2)
  c.init_checkpoint_task = "pretrain"
  c.model.hidden_dropout_prob = 0.1       # set_dropout(model, 0.1)
  c.model.attention_probs_dropout_prob = 0.1
  c.train.lr_mul = 1.0                    # plain build_optimizer
  c.train.lr_mul_params = ()
  c.train.betas = (0.9, 0.98)
  c.train.weight_decay = 0.01
  c.train.grad_norm = 2.0
  c.seed = 42
  c.data.max_txt_len = 60
  c.data.conf_th = 0.2
  c.data.max_bb = 100
  c.data.min_bb = 10
  c.data.num_bb = -1                      # num_bb 36 only applies at conf_th -1
  c.eval.every_steps = 500                # valid_steps
  c.checkpoint.every_steps = 500
  return c


def get_config(arg=None):
  variant = common.parse_arg(arg, large=False, runlocal=False,
                             synthetic=False)
  c = common.finetune_config("ve", "ve", _txt("ve_train"),
                             val_text=_txt("ve_dev"), split="train",
                             val_split="val")
  official(c, large=variant.large)
  # The exact evaluator reads every dev pair once; the per-batch
  # task_metrics of finetune_config would read them all a second time.
  del c.evals["val"]
  c.evals.ve = common.evaluator("ve_predictions", test_split="test",
                                test_text=_txt("ve_test"))
  if variant.synthetic:
    finetune_vqa.synthetic(c, "demo")
    _synthetic_data(c, "demo")
  if variant.runlocal:
    finetune_vqa.runlocal(c, keep_model=variant.synthetic)
    _synthetic_data(c, "tiny")
  return c


def _synthetic_data(c, preset: str):
  """The synthetic SNLI-VE set in place of the official dbs (its test
  split is labelled, as SNLI-VE's)."""
  text = f"uniter_synthetic_ve/{preset}:1.0.0"
  c.datasets.ve.text = c.datasets.ve.val_text = text
  c.evals.ve.test_text = ""
