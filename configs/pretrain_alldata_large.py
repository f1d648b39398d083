"""`config/pretrain-alldata-large-16gpu.json`: all data, UNITER-large.

Variant `runlocal`: tiny synthetic smoke run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import pretrain_alldata_base  # pylint: disable=g-import-not-at-top,wrong-import-position
from uniter_jax.model import config as model_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  c = pretrain_alldata_base.alldata(common.base_config())
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
  if arg == "runlocal":
    common.runlocal(c)
  return c
