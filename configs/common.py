"""Shared defaults of the pretraining configs (official UNITER values).

Every field is documented here once; the per-setup files in `configs/`
only change what their official JSON config changes. Any field can be
overridden on the command line (`--config.train.learning_rate=1e-4`); the
config is locked, so a misspelt field is an error.

Variants (`--config configs/X.py:large,runlocal`) are parsed by `parse_arg`
here, so every file accepts the same syntax and rejects the same mistakes.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from uniter_jax.model import config as model_config

# Official mix ratios, [itm, mlm, mrfr, mrckl] per dataset
# (config/pretrain-alldata-*.json).
PRETRAIN_TASKS = ("itm", "mlm", "mrfr", "mrckl")

# Logical axis -> mesh axes. Params: embed/mlp/heads/vocab; activations:
# act_*. Data parallel and FSDP are mesh shapes, not code paths.
LOGICAL_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("vocab", "tensor"),
    ("img_feat", None),
    ("layers", None),
)


# Spellings accepted for a boolean `key=value` variant.
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config file's variant string (`file.py:<arg>`) against defaults.

  `arg` is a comma-separated list of bare words and `key=value` pairs, e.g.
  "runlocal" or "large,runlocal". A bare word sets a boolean default to
  True; `key=value` converts `value` to the type of `defaults[key]` (bool
  takes true/false, 1/0, yes/no, on/off; int, float and str as Python
  converts them). None or "" gives the defaults.

  Why: comparing `arg` by hand let a misspelt variant (`:runlcoal`) fall
  through to the default config and run hours of the wrong thing, and could
  not combine variants. Here an unknown word or key, a bare word whose
  default is not a bool, or a value that does not convert raises ValueError
  listing the known variants, before anything runs.

  Args:
    arg: the text after ':' in `--config`, or None when there is none.
    **defaults: every variant the file knows, with its default value (bool,
      int, float or str).

  Returns:
    A locked ConfigDict of every default, updated from `arg`; a misspelt
    attribute read in the config file is an error too.
  """
  for key, value in defaults.items():
    if not isinstance(value, (bool, int, float, str)):
      raise TypeError(f"parse_arg default {key}={value!r}: expected a bool, "
                      "int, float or str")
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      where = f" in {arg!r}" if item != arg.strip() else ""
      raise ValueError(f"unknown config variant {item!r}{where}; known "
                       f"variants: {_known(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config variant {key!r} needs a value "
                         f"({key}=<{type(default).__name__}>); known "
                         f"variants: {_known(defaults)}")
      out[key] = True
      continue
    out[key] = _convert(key, text.strip(), default, defaults)
  out.lock()
  return out


def _convert(key: str, text: str, default: Any, defaults) -> Any:
  """`text` as the type of `default`, or a ValueError naming the variant."""
  try:
    if isinstance(default, bool):
      if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
      raise ValueError(text)
    return type(default)(text)
  except ValueError:
    raise ValueError(f"config variant {key}={text!r}: expected a "
                     f"{type(default).__name__}; known variants: "
                     f"{_known(defaults)}") from None


def _known(defaults) -> str:
  if not defaults:
    return "none (this config has no variants)"
  return ", ".join(k if isinstance(v, bool) else f"{k}=<{type(v).__name__}>"
                   for k, v in sorted(defaults.items()))


def dataset(text: str, val_text: str = "", *, tasks=PRETRAIN_TASKS,
            mix_ratio=(1, 1, 1, 1), split: str = "train",
            val_split: str = "val") -> ml_collections.ConfigDict:
  """One pretraining dataset: its TFDS text dataset, tasks and mix ratio."""
  d = ml_collections.ConfigDict()
  d.text = text            # tfds name "builder/config:version"
  d.split = split
  d.val_text = val_text or text
  d.val_split = val_split  # "" disables validation on this dataset
  d.tasks = tuple(tasks)
  d.mix_ratio = tuple(mix_ratio)
  return d


def base_config() -> ml_collections.ConfigDict:
  """All fields, with the official pretraining defaults."""
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | eval
  c.seed = 42

  # --- model ---------------------------------------------------------------
  c.model = model_config.base()
  c.model.dtype = "bfloat16"   # the official runs used fp16 (apex O2)
  # "pretrain", or "pretrain-vcr" (VCR 2nd stage: 4 types, +81 words).
  c.model_task = "pretrain"
  # Initial weights: official .pt, converted dir, or "" for random init.
  c.init_checkpoint = ""
  c.init_checkpoint_task = "pretrain"

  # --- data ----------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "~/tensorflow_datasets"
  # Build the synthetic corpus into data_dir when missing (demo only).
  c.data.synthetic = ""        # "" or a synthetic preset: "default", "tiny"
  c.data.max_txt_len = 60       # training drops longer texts (official)
  # Held-out data keep texts up to this many tokens (-1: all), as the
  # official evaluation reads its dbs without a limit.
  c.data.eval_max_txt_len = -1
  c.data.conf_th = 0.2
  c.data.min_bb = 10
  c.data.max_bb = 100
  c.data.num_bb = -1           # >0: fixed region count (conf_th -1 dbs)
  # Global batch sizes are multiples of this and of the data-parallel
  # device count (0: the device count alone).
  c.data.batch_multiple = 0
  c.data.max_buckets = 32       # <=10% padding on dynamic 10..100 regions
  c.data.target_padding = 0.10
  # Input worker processes per host (reading, joining, task ops and
  # collation outside the training process; shared out over the training
  # datasets), each with num_threads threads. -1: chosen from the host's
  # cores (none up to 4 cores, else cores - 2, at most 32); 0: threads in
  # the training process only.
  c.data.num_workers = -1
  # Region features in the batch: "auto" sends the stored float16 when the
  # model computes in bfloat16/float16 (widened on the device: the same
  # values, half the bytes), float32 otherwise; or "float32" / "float16".
  c.data.img_feat_dtype = "auto"
  c.data.num_threads = 2
  c.data.prefetch = 4
  c.datasets = ml_collections.ConfigDict()

  # --- optimisation --------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  # Per-device token budget incl. padding (official `train_batch_size`);
  # the global batch holds token_budget x data-parallel devices tokens.
  c.train.token_budget = 10240
  c.train.gradient_accumulation_steps = 2
  c.train.learning_rate = 5e-5
  c.train.warmup_steps = 10000
  c.train.num_train_steps = 200000
  c.train.weight_decay = 0.01
  c.train.betas = (0.9, 0.98)
  c.train.adam_eps = 1e-6
  c.train.grad_norm = 5.0      # global-norm clipping; <= 0 disables
  # Learning-rate multiplier on the parameters matching `lr_mul_params`
  # (globs over '/'-joined Flax paths); the official VQA finetuning trains
  # its new head `vqa_output` at 10x the base rate.
  c.train.lr_mul = 1.0
  c.train.lr_mul_params = ()
  # The official code sums gradients over accumulation steps and over GPUs
  # (each a per-micro-batch mean); True reproduces that scale (it matters
  # for clipping), False uses the mean over the global batch.
  c.train.sum_grads = True
  c.train.mlm_prob = 0.15
  c.train.mrm_prob = 0.15
  c.train.itm_neg_prob = 0.5
  c.train.itm_ot_lambda = 0.1
  # Multiplier on each task's loss before its gradient is taken. The
  # official recipe weights every task 1.0 (the official configs keep that);
  # the demo lowers MLM and MRFR, whose gradients are ~10x ITM's at a random
  # initialisation and would otherwise dominate the shared Adam statistics.
  c.train.loss_weights = ml_collections.ConfigDict(
      {"mlm": 1.0, "mrfr": 1.0, "mrc": 1.0, "mrckl": 1.0, "itm": 1.0})
  c.train.ot = ml_collections.ConfigDict()
  c.train.ot.solver = "sinkhorn"   # sinkhorn (OTT-JAX) | ipot (official)
  c.train.ot.epsilon = 0.05
  c.train.ot.num_iters = 50

  # --- devices ---------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1   # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.logical_axis_rules = LOGICAL_AXIS_RULES
  c.distributed = ml_collections.ConfigDict()
  # Call jax.distributed.initialize(); empty fields are auto-detected
  # (TPU pods, SLURM) or taken from JAX_COORDINATOR_ADDRESS etc.
  c.distributed.enabled = False
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = -1
  c.distributed.process_id = -1
  # run.py runs each process under a small supervisor (Linux) that turns a
  # dead peer's native abort into one line (uniter_jax/supervisor.py).
  c.distributed.supervise = True

  # --- logging, evaluation, checkpoints ---------------------------------------
  c.log_every_steps = 100
  c.eval = ml_collections.ConfigDict()
  # The schedule of every evaluator that sets no `every_steps` of its own
  # (official valid_steps).
  c.eval.every_steps = 5000
  # Evaluators by type (uniter_jax.evaluators): each entry's `type` names
  # one, its other fields are options; `every_steps` (None: eval.every_steps)
  # N > 0 runs it every N updates and after the last, 0 only after the
  # last, < 0 never.
  c.evals = ml_collections.ConfigDict()
  c.evals.val = evaluator("task_metrics", max_batches=50)  # -1: whole split
  c.evals.loss_curves = evaluator("loss_curves", every_steps=0)
  c.evals.wra_plan = evaluator("wra_plan", every_steps=0)
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 5000
  c.checkpoint.keep = 3
  return c


def evaluator(kind: str, every_steps: int | None = None,
              **options) -> ml_collections.ConfigDict:
  """One `config.evals` entry: evaluator `kind` with its options.

  `every_steps` stays overridable on the command line even when None (the
  default schedule, `config.eval.every_steps`).
  """
  e = ml_collections.ConfigDict()
  e.type = kind
  e.every_steps = (ml_collections.config_dict.placeholder(int)
                   if every_steps is None else every_steps)
  e.update(options)
  return e


def finetune_config(model_task: str, task: str, text: str, *,
                    val_text: str = "", split: str = "train",
                    val_split: str = "val",
                    name: str = "") -> ml_collections.ConfigDict:
  """The shared fields of a finetuning run (official `train_*.py` values).

  One dataset (`config.datasets.<name>`, default the task's name) trains
  the head `model_task` with task `task`; `config.evals.val` reports the
  task's metrics on the whole held-out split. Each `configs/finetune_*.py`
  then sets its official `train-*.json` values and its evaluator.
  """
  c = base_config()
  c.model_task = model_task
  c.model.dtype = "bfloat16"
  c.init_checkpoint = ""       # e.g. uniter-base.pt (official pretrained)
  c.init_checkpoint_task = "pretrain"
  c.datasets[name or task] = dataset(text, val_text, tasks=(task,),
                                     mix_ratio=(1,), split=split,
                                     val_split=val_split)
  # Finetuning configs keep the official optimizer but log and evaluate
  # on their own schedules.
  c.train.betas = (0.9, 0.98)
  c.train.grad_norm = 2.0
  c.train.gradient_accumulation_steps = 1
  c.train.loss_weights = ml_collections.ConfigDict({task: 1.0})
  c.log_every_steps = 100
  c.eval.every_steps = 500
  c.evals.val = evaluator("task_metrics", max_batches=-1)
  del c.evals["wra_plan"]      # a pretraining plot
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2
  return c


def demo_sized_synthetic(c: ml_collections.ConfigDict, preset: str
                         ) -> ml_collections.ConfigDict:
  """The README demo's model size and the synthetic corpus of `preset`.

  What every finetuning config's `:synthetic` variant shares: the demo's
  model (`configs/demo.py`: hidden 128, 2 layers, 8 heads, no dropout, the
  synthetic vocabulary), so the demo's pretraining run initialises it;
  the synthetic corpus built into /tmp on first use; the demo's region
  rule (the synthetic images hold 6-36 regions, fewer than the official
  10..100); one input thread; no initial checkpoint unless given.
  """
  c.model.update(DEMO_MODEL)
  c.model.vocab_size = -1
  c.model.dtype = "float32"
  c.init_checkpoint = ""   # e.g. the demo's workdir or its export_flax/
  c.data.synthetic = preset
  c.data.data_dir = "/tmp/uniter_jax_data"
  c.data.min_bb = 6
  c.data.num_threads = 1
  return c


# The demo's model (`configs/demo.py`). 8 heads of 16 dims: with 4 heads of
# 32 the model often learned to match only some of the 12 object classes
# within 3000 updates and stalled near 0.8 ITM accuracy (docs/training.md,
# "The demo"). No dropout: a small model on a small corpus learns
# image-text matching sooner without it.
DEMO_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                  intermediate_size=256, max_position_embeddings=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a smoke run on the synthetic corpus (any machine)."""
  c.model.update(model_config.tiny().to_dict())
  c.model.vocab_size = -1   # the synthetic corpus vocabulary
  c.model.max_position_embeddings = 64
  c.model.dtype = "float32"
  c.init_checkpoint = ""
  c.data.synthetic = "tiny"
  c.data.data_dir = "/tmp/uniter_jax_data"
  c.data.max_buckets = 2
  text = "uniter_synthetic_text/tiny:1.0.0"
  for name in list(c.datasets.keys()):
    c.datasets[name].text = text
    c.datasets[name].val_text = text
  c.train.token_budget = 512
  c.train.gradient_accumulation_steps = 1
  c.train.num_train_steps = 10
  c.train.warmup_steps = 2
  c.log_every_steps = 5
  c.eval.every_steps = 10
  c.evals.val.max_batches = 2
  c.checkpoint.every_steps = 10
  return c
