"""VQA finetuning: `config/train-vqa-base-4gpu.json` (and `-large-8gpu`).

  python run.py --config configs/finetune_vqa.py --workdir W \
      --config.init_checkpoint=uniter-base.pt

Trains the `vqa` head (3129 soft-scored answers, `vqa_output` at 10x the
learning rate) on the official txt_dbs converted by data_prep, evaluates the
VQA score on `vqa_devval` every 500 updates and writes its predictions
(`<workdir>/results/`). The VQA server's `results.json` for test-dev /
test-std comes from the `vqa_test` evaluator, off during training (the
official code predicts the test set separately, `inf_vqa.py`):

  python run.py --config configs/finetune_vqa.py --workdir W \
      --config.mode=eval --config.evals.vqa_test.every_steps=0

Expected tfds names (`python -m data_prep txt_db ... --name <db> --task vqa`,
docs/finetuning.md): `uniter_txt_db/vqa_train`, `vqa_trainval`, `vqa_vg`
(split "train"), `uniter_txt_db/vqa_devval` (split "val") and
`uniter_txt_db/vqa_test` (split "test", unlabelled), each `:1.0.0`, on the
image stores `uniter_img_db/coco_train2014`, `coco_val2014`, `vg`,
`coco_test2015`.

Variants (combinable, `configs/finetune_vqa.py:large,runlocal`):
`large` is `config/train-vqa-large-8gpu.json` (UNITER-large); `runlocal` a
6-update smoke run of a tiny model on `uniter_synthetic_vqa/tiny:1.0.0`;
`synthetic` the demo-sized model (that of `configs/demo.py`, so the README
demo's `export_flax/` or workdir initialises it) finetuned for a few hundred
CPU updates on `uniter_synthetic_vqa/demo:1.0.0`.
"""

from configs import common
from uniter_jax.model import config as model_config

# The official training set: three txt_dbs read as one concatenation
# (ConcatDatasetWithLens), each with its own image db.
TRAIN_DBS = ("vqa_train", "vqa_trainval", "vqa_vg")
VAL_DB = "vqa_devval"
TEST_DB = "vqa_test"
HEAD_PARAMS = ("vqa_output/*",)


def _txt(name: str) -> str:
  return f"uniter_txt_db/{name}:1.0.0"


def official(c, *, large: bool):
  """The official `train-vqa-*.json` values (besides the data)."""
  if large:
    c.model.update(model_config.large().to_dict())
    c.init_checkpoint = "uniter-large.pt"
    c.train.token_budget = 3072           # train_batch_size, per GPU (8)
    c.train.gradient_accumulation_steps = 4
    c.train.learning_rate = 5e-5
    c.train.num_train_steps = 5000
    c.train.warmup_steps = 500
  else:
    c.init_checkpoint = "uniter-base.pt"
    c.train.token_budget = 5120           # train_batch_size, per GPU (4)
    c.train.gradient_accumulation_steps = 5
    c.train.learning_rate = 8e-5
    c.train.num_train_steps = 6000
    c.train.warmup_steps = 600
  c.model.dtype = "bfloat16"              # official fp16 (apex O2)
  c.init_checkpoint_task = "pretrain"
  # set_dropout(model, 0.1): every dropout of the model.
  c.model.hidden_dropout_prob = 0.1
  c.model.attention_probs_dropout_prob = 0.1
  c.train.lr_mul = 10.0                   # vqa_output param groups
  c.train.lr_mul_params = HEAD_PARAMS
  c.train.betas = (0.9, 0.98)
  c.train.weight_decay = 0.01
  c.train.grad_norm = 2.0
  c.seed = 42
  c.data.max_txt_len = 60
  c.data.conf_th = 0.2                    # dynamic regions: 10..100 by conf
  c.data.max_bb = 100
  c.data.min_bb = 10
  c.data.num_bb = -1                      # num_bb 36 only applies at conf_th -1
  c.eval.every_steps = 500                # valid_steps
  c.checkpoint.every_steps = 500
  return c


def get_config(arg=None):
  variant = common.parse_arg(arg, large=False, runlocal=False,
                             synthetic=False)
  c = common.finetune_config("vqa", "vqa", _txt(TRAIN_DBS[0]),
                             val_text=_txt(VAL_DB), split="train",
                             val_split="val", name=TRAIN_DBS[0])
  # The official loader concatenates the three dbs, so each contributes in
  # proportion to its size; here one db is drawn per update, with
  # probability proportional to its example count (mix_ratio -1).
  c.datasets[TRAIN_DBS[0]].mix_ratio = (-1,)
  for name in TRAIN_DBS[1:]:
    c.datasets[name] = common.dataset(_txt(name), tasks=("vqa",),
                                      mix_ratio=(-1,), val_split="")
  official(c, large=variant.large)
  # The exact evaluator reads every devval question once; the per-batch
  # task_metrics of finetune_config would read them all a second time.
  del c.evals["val"]
  c.evals.vqa = common.evaluator("vqa_predictions")
  c.evals.vqa_test = common.evaluator(
      "vqa_predictions", every_steps=-1, val=False, test_split="test",
      test_text=_txt(TEST_DB))
  if variant.synthetic:
    synthetic(c, "demo")
    _one_dataset(c, "uniter_synthetic_vqa/demo:1.0.0")
  if variant.runlocal:
    runlocal(c, keep_model=variant.synthetic)
    _one_dataset(c, "uniter_synthetic_vqa/tiny:1.0.0")
  return c


def _one_dataset(c, text: str):
  """Replaces the official dbs with one synthetic VQA dataset."""
  for name in list(c.datasets.keys()):
    del c.datasets[name]
  c.datasets.vqa = common.dataset(text, tasks=("vqa",), mix_ratio=(1,))
  c.evals.vqa_test.test_text = ""   # the same dataset's "test" split
  # The synthetic test split is unlabelled, as VQA's: predictions only.
  c.evals.vqa_test.every_steps = 0


def synthetic(c, preset: str):
  """The demo-sized model and a few hundred CPU updates on synthetic data
  (from the README demo's checkpoint, or from scratch); the caller names
  the dataset. Shared with `configs/finetune_ve.py`."""
  common.demo_sized_synthetic(c, preset)
  c.data.max_buckets = 1
  c.mesh.data = 1
  c.train.token_budget = 2048
  c.train.gradient_accumulation_steps = 1
  c.train.learning_rate = 2e-4
  c.train.warmup_steps = 40
  c.train.num_train_steps = 400
  c.log_every_steps = 25
  c.eval.every_steps = 100
  c.checkpoint.every_steps = 200
  return c


def runlocal(c, keep_model: bool = False):
  """A 6-update smoke run on the tiny synthetic preset (any machine); the
  caller names the dataset. `keep_model`: keep the model (the `synthetic`
  variant's) instead of the tiny one."""
  if not keep_model:
    c.model.update(model_config.tiny().to_dict())
    c.model.vocab_size = -1
    c.model.max_position_embeddings = 64
    c.model.dtype = "float32"
  c.init_checkpoint = ""
  c.data.synthetic = "tiny"
  c.data.data_dir = "/tmp/uniter_jax_data"
  c.data.max_buckets = 2
  c.mesh.data = 1   # the tiny set fills no batch spread over many devices
  c.train.token_budget = 512
  c.train.gradient_accumulation_steps = 1
  c.train.num_train_steps = 6
  c.train.warmup_steps = 2
  c.log_every_steps = 2
  c.eval.every_steps = 6
  c.checkpoint.every_steps = 3
  return c
