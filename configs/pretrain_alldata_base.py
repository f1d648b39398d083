"""`config/pretrain-alldata-base-8gpu.json`: COCO + VG + CC + SBU, base.

Official mix ratios [itm, mlm, mrfr, mrckl]: coco 6/8/4/4, vg 9/12/6/6,
cc 9/12/6/6, sbu 6/8/4/4. Variant `runlocal`: tiny synthetic smoke run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position

MIX = {"coco": (6, 8, 4, 4), "vg": (9, 12, 6, 6), "cc": (9, 12, 6, 6),
       "sbu": (6, 8, 4, 4)}


def alldata(c):
  for name, mix in MIX.items():
    c.datasets[name] = common.dataset(
        f"uniter_txt_db/pretrain_{name}_train:1.0.0",
        f"uniter_txt_db/pretrain_{name}_val:1.0.0", mix_ratio=mix)
  return c


def get_config(arg=None):
  c = alldata(common.base_config())
  c.init_checkpoint = "uniter-base-init.pt"
  c.train.token_budget = 10240
  c.train.gradient_accumulation_steps = 6
  c.train.learning_rate = 5e-5
  c.train.warmup_steps = 10000
  c.train.num_train_steps = 200000
  c.eval.every_steps = 5000
  c.checkpoint.every_steps = 5000
  if arg == "runlocal":
    common.runlocal(c)
  return c
