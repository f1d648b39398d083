"""`config/pretrain-vcr-base-4gpu.json`: second-stage pretraining on VCR.

MLM / MRFR / MRC-kl (no ITM) from `uniter-base.pt`, with the VCR type table
(4 rows) and 81 extra word ids, as the official `UniterForPretrainingForVCR`.
Variants (combinable, `configs/pretrain_vcr_base.py:large,runlocal`):
`large` is `config/pretrain-vcr-large-4gpu.json`: UNITER-large from
`uniter-large.pt` (mix 10/1/1); `runlocal` is a tiny synthetic smoke run of
the same model surgery (with `large` it keeps the large mix, the model
shrinks to the tiny one all the same).

Needs a VCR text dataset with `txt_type_ids`; data_prep has no VCR builder
yet (see docs/training.md), so only `runlocal` runs today.
"""

from configs import common
from uniter_jax.model import config as model_config


def get_config(arg=None):
  variant = common.parse_arg(arg, large=False, runlocal=False)
  c = common.base_config()
  c.model_task = "pretrain-vcr"
  c.init_checkpoint = "uniter-base.pt"
  c.init_checkpoint_task = "pretrain"
  mix = (2, 1, 1)
  if variant.large:
    c.model.update(model_config.large().to_dict())
    c.model.dtype = "bfloat16"
    c.init_checkpoint = "uniter-large.pt"
    mix = (10, 1, 1)
  c.datasets.vcr = common.dataset("uniter_txt_db/vcr_train:1.0.0",
                                  "uniter_txt_db/vcr_val:1.0.0",
                                  tasks=("mlm", "mrfr", "mrckl"),
                                  mix_ratio=mix)
  c.data.max_txt_len = 220
  c.train.token_budget = 6144
  c.train.gradient_accumulation_steps = 4
  c.train.learning_rate = 3e-5
  c.train.warmup_steps = 4500
  c.train.num_train_steps = 45000
  c.train.grad_norm = -1.0
  c.eval.every_steps = 2000
  c.checkpoint.every_steps = 2000
  if variant.runlocal:
    common.runlocal(c)
  return c
