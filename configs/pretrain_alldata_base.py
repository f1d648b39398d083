"""`config/pretrain-alldata-base-8gpu.json`: COCO + VG + CC + SBU, base.

Official mix ratios [itm, mlm, mrfr, mrckl]: coco 6/8/4/4, vg 9/12/6/6,
cc 9/12/6/6, sbu 6/8/4/4.

Variants (combinable, `configs/pretrain_alldata_base.py:large,runlocal`):
`large` is `config/pretrain-alldata-large-16gpu.json` (UNITER-large, the
same config as `configs/pretrain_alldata_large.py`); `runlocal` is a tiny
synthetic smoke run.
"""

from configs import common
from uniter_jax.model import config as model_config

MIX = {"coco": (6, 8, 4, 4), "vg": (9, 12, 6, 6), "cc": (9, 12, 6, 6),
       "sbu": (6, 8, 4, 4)}


def alldata(c):
  for name, mix in MIX.items():
    c.datasets[name] = common.dataset(
        f"uniter_txt_db/pretrain_{name}_train:1.0.0",
        f"uniter_txt_db/pretrain_{name}_val:1.0.0", mix_ratio=mix)
  return c


def build(*, large: bool = False, runlocal: bool = False):
  """The all-data setup; base and large share it so they cannot drift apart.

  Both official all-data configs use the same datasets and mixes; they
  differ only in model size, initial checkpoint, batch and schedule.
  """
  c = alldata(common.base_config())
  if large:
    c.model.update(model_config.large().to_dict())
    c.model.dtype = "bfloat16"
    c.init_checkpoint = "uniter-large-init.pt"
    c.train.token_budget = 6144
    c.train.gradient_accumulation_steps = 4
    c.train.learning_rate = 5e-5
    c.train.warmup_steps = 10000
    c.train.num_train_steps = 500000
    c.eval.every_steps = 10000
    c.checkpoint.every_steps = 10000
  else:
    c.init_checkpoint = "uniter-base-init.pt"
    c.train.token_budget = 10240
    c.train.gradient_accumulation_steps = 6
    c.train.learning_rate = 5e-5
    c.train.warmup_steps = 10000
    c.train.num_train_steps = 200000
    c.eval.every_steps = 5000
    c.checkpoint.every_steps = 5000
  if runlocal:
    common.runlocal(c)
  return c


def get_config(arg=None):
  variant = common.parse_arg(arg, large=False, runlocal=False)
  return build(large=variant.large, runlocal=variant.runlocal)
