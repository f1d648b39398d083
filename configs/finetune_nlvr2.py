"""NLVR2 finetuning: `config/train-nlvr2-base-1gpu.json` and `-large-2gpu`.

  python run.py --config configs/finetune_nlvr2.py --workdir W \
      --config.data.data_dir=/data/tfds --config.init_checkpoint=uniter-base.pt

Trains the task `nlvr2` (uniter_jax/tasks/nlvr2.py) on the official txt_db
of NLVR2 built with data_prep (names below), evaluates accuracy and
consistency on dev and test1 every 500 updates and writes the prediction
files `results/nlvr2_<split>_step<N>.csv` (evaluator `nlvr2`).

Variants (combinable, `configs/finetune_nlvr2.py:triplet,large`):
- the head, at most one of `attn` (official `paired-attn`, the default,
  which both official configs train), `paired` and `triplet`;
- `large`: `train-nlvr2-large-2gpu.json` (UNITER-large);
- `runlocal`: a 6-update smoke run of a tiny model on the tiny synthetic
  NLVR2 dataset (any machine);
- `synthetic`: a few hundred CPU updates of the README demo's model size on
  the demo synthetic NLVR2 dataset; start it from the demo's pretraining
  run with `--config.init_checkpoint=/tmp/uniter-demo`.
"""

from configs import common
from uniter_jax.model import config as model_config

HEADS = {"attn": "nlvr2-attn", "paired": "nlvr2-paired",
         "triplet": "nlvr2-triplet"}
TXT_DB = "uniter_txt_db/nlvr2_{}:1.0.0"


def get_config(arg=None):
  variant = common.parse_arg(arg, paired=False, triplet=False, attn=False,
                             large=False, runlocal=False, synthetic=False)
  chosen = [name for name in HEADS if variant[name]]
  if len(chosen) > 1:
    raise ValueError(f"configs/finetune_nlvr2.py: choose one head of "
                     f"{sorted(HEADS)}, got {chosen}")
  if variant.runlocal and variant.synthetic:
    raise ValueError("configs/finetune_nlvr2.py: `runlocal` and `synthetic` "
                     "are two sizes of the synthetic run; choose one")
  head = HEADS[chosen[0] if chosen else "attn"]

  c = common.finetune_config(head, "nlvr2", TXT_DB.format("train"),
                             val_text=TXT_DB.format("dev"), val_split="dev")
  # Official region rule: dynamic 10..100 boxes above confidence 0.2 (the
  # json's num_bb 36 applies only to fixed-count dbs, conf_th -1).
  c.data.conf_th = 0.2
  c.data.min_bb = 10
  c.data.max_bb = 100
  c.data.num_bb = -1
  c.data.max_txt_len = 60
  c.model.hidden_dropout_prob = 0.1      # official `dropout` (set_dropout)
  c.model.attention_probs_dropout_prob = 0.1
  c.train.betas = (0.9, 0.98)
  c.train.weight_decay = 0.01
  c.train.grad_norm = 2.0
  if variant.large:
    c.model.update(model_config.large().to_dict())
    c.model.hidden_dropout_prob = c.model.attention_probs_dropout_prob = 0.1
    c.model.dtype = "bfloat16"
    c.init_checkpoint = "uniter-large.pt"
    c.seed = 24
    # 2 GPUs x 5120 tokens, 2 accumulation steps.
    c.train.token_budget = 5120
    c.train.gradient_accumulation_steps = 2
    c.train.learning_rate = 2e-5
    c.train.num_train_steps = 5000
    c.train.warmup_steps = 500
  else:
    c.init_checkpoint = "uniter-base.pt"
    c.seed = 77
    # 1 GPU x 10240 tokens.
    c.train.token_budget = 10240
    c.train.gradient_accumulation_steps = 1
    c.train.learning_rate = 3e-5
    c.train.num_train_steps = 8000
    c.train.warmup_steps = 800
  c.eval.every_steps = 500               # official valid_steps
  c.checkpoint.every_steps = 500
  # Official validation reports dev and test1 at every evaluation; the
  # `nlvr2` evaluator yields the loss too, so the generic per-batch pass
  # over dev (`task_metrics`) would only repeat it.
  del c.evals["val"]
  c.evals.nlvr2 = common.evaluator("nlvr2", splits=("test1",),
                                   texts=(TXT_DB.format("test1"),))

  if variant.runlocal:
    _synthetic(c, "tiny")
    c.model.update(model_config.tiny().to_dict())
    c.model.vocab_size = -1
    c.model.max_position_embeddings = 64
    c.model.dtype = "float32"
    c.mesh.data = 1   # the tiny split fills no batch spread over devices
    c.data.max_buckets = 2
    c.train.token_budget = 512
    c.train.gradient_accumulation_steps = 1
    c.train.num_train_steps = 6
    c.train.warmup_steps = 2
    c.log_every_steps = 2
    c.eval.every_steps = 6
    c.checkpoint.every_steps = 3
  elif variant.synthetic:
    _synthetic(c, "demo")
    # The demo's model, so the README demo's pretraining run loads into it.
    common.demo_sized_synthetic(c, "demo")
    c.data.max_buckets = 2
    c.data.num_threads = 1
    c.train.token_budget = 2048
    c.train.gradient_accumulation_steps = 1
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 30
    c.train.num_train_steps = 300
    c.train.grad_norm = 2.0
    c.log_every_steps = 25
    c.eval.every_steps = 100
    c.checkpoint.every_steps = 100
  return c


def _synthetic(c, preset: str) -> None:
  """Points the run at synthetic NLVR2 preset `preset` (train, val, test;
  `run.py` builds it on first use)."""
  text = f"uniter_synthetic_nlvr2/{preset}:1.0.0"
  c.data.synthetic = preset
  c.data.data_dir = "/tmp/uniter_jax_data"
  # The synthetic images hold fewer regions than the official 10..100.
  c.data.min_bb = 6
  c.init_checkpoint = ""
  ds = c.datasets.nlvr2
  ds.text, ds.val_text, ds.val_split = text, text, "val"
  c.evals.nlvr2.splits = ("test",)
  c.evals.nlvr2.texts = ()
