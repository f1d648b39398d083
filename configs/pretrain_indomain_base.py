"""`config/pretrain-indomain-base-8gpu.json`: COCO + VG, UNITER-base.

  python run.py --config configs/pretrain_indomain_base.py --workdir W \
      --config.data.data_dir=/data/tfds --config.init_checkpoint=uniter-base-init.pt

Expects TFDS text datasets built with data_prep from the official pretraining
txt_dbs (names below; change them with --config.datasets.coco.text=...).
Variants: `runlocal` runs the same tasks on the tiny synthetic corpus. There
is no `large`: the official code has no in-domain UNITER-large config.
"""

from configs import common


def get_config(arg=None):
  variant = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  c.init_checkpoint = "uniter-base-init.pt"
  c.datasets.coco = common.dataset("uniter_txt_db/pretrain_coco_train:1.0.0",
                                   "uniter_txt_db/pretrain_coco_val:1.0.0",
                                   mix_ratio=(2, 2, 1, 1))
  c.datasets.vg = common.dataset("uniter_txt_db/pretrain_vg_train:1.0.0",
                                 "uniter_txt_db/pretrain_vg_val:1.0.0",
                                 mix_ratio=(2, 2, 1, 1))
  c.train.token_budget = 10240
  c.train.gradient_accumulation_steps = 2
  c.train.learning_rate = 5e-5
  c.train.warmup_steps = 10000
  c.train.num_train_steps = 200000
  c.eval.every_steps = 5000
  c.checkpoint.every_steps = 5000
  if variant.runlocal:
    common.runlocal(c)
  return c
