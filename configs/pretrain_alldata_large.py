"""`config/pretrain-alldata-large-16gpu.json`: all data, UNITER-large.

The same config as `configs/pretrain_alldata_base.py:large` (the values live
there, next to the base ones); this file keeps the official setup's name.
Variants: `runlocal`, a tiny synthetic smoke run.
"""

from configs import common
from configs import pretrain_alldata_base


def get_config(arg=None):
  variant = common.parse_arg(arg, runlocal=False)
  return pretrain_alldata_base.build(large=True, runlocal=variant.runlocal)
