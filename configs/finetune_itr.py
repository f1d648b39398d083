"""Image-text retrieval finetuning with online hard negatives.

Official configs `config/train-itm-flickr-base-16gpu-hn.json` (default),
`train-itm-flickr-large-16gpu-hn.json` (`large`),
`train-itm-coco-base-16gpu-hn.json` (`coco`) and
`train-itm-coco-large-16gpu-hn.json` (`coco,large`):

  python run.py --config configs/finetune_itr.py:flickr --workdir W \
      --config.data.data_dir=/data/tfds --config.init_checkpoint=uniter-base.pt

Trains the task `itr` (uniter_jax/tasks/itr.py: 399 random negatives per
anchor scored without gradients, the 31 hardest trained with the margin
0.2 hinge) on the official txt_db built with data_prep (names below),
reports the itr loss on a few held-out batches and the full retrieval
evaluation (every text x every image, IR/TR R@1/5/10) of the val split
every 500 updates (COCO large: at the end only, as its `full_val: false`),
then of val and test at the end, with the top-10 lists in
`results/itr_<dataset>_<split>_step<N>.json` (evaluator `retrieval`).

Variants (combinable, `configs/finetune_itr.py:coco,large`):
- `flickr` (default) or `coco`: the dataset;
- `large`: UNITER-large;
- `zero_shot`: no training; `mode=eval` of `init_checkpoint` (a pretraining
  checkpoint) ranked by its ITM match logit, on val and test;
- `runlocal`: a 6-update smoke run of a tiny model on the tiny synthetic
  captions (any machine);
- `synthetic`: a few hundred CPU updates of the README demo's model size on
  the demo synthetic captions; start it from the demo's pretraining run
  with `--config.init_checkpoint=/tmp/uniter-demo`.

Data (tfds names; override with `--config.datasets.<name>.text=...`):
`uniter_txt_db/itm_flickr30k_{train,val,test}:1.0.0` and
`uniter_txt_db/itm_coco_{train,restval,val,test}:1.0.0`, splits `train`
(train and restval), `val` and `test`; the Karpathy-split captions from the
raw annotations (`uniter_karpathy_captions/<name>`) work the same way.
"""

from configs import common
from uniter_jax.model import config as model_config

TXT_DB = "uniter_txt_db/itm_{}:1.0.0"
# Per dataset: training txt_dbs (config dataset name -> db) with their mix
# ratios, the val and test dbs. COCO trains on train + restval; the
# official code concatenates them, so updates draw from each in proportion
# to its size (mix ratio -1: by example count).
DATASETS = {
    "flickr": {"train": {"flickr": ("flickr30k_train", 1)},
               "val": "flickr30k_val", "test": "flickr30k_test"},
    "coco": {"train": {"coco": ("coco_train", -1),
                       "coco_restval": ("coco_restval", -1)},
             "val": "coco_val", "test": "coco_test"},
}
# One example = a caption with 2 x (1 + negative_size) rows; the official
# per-GPU step holds one text- and one image-anchored sample. The training
# rows hold at most 60 + 2 text tokens and 100 regions, and a device's rows
# are whole examples (rounded down), so a budget of 800 rows of up to 250
# tokens still gives one example per device for training, while the
# held-out splits, which keep texts of any length (data.eval_max_txt_len),
# fit too.
ROW_TOKENS = 250


def get_config(arg=None):
  variant = common.parse_arg(arg, flickr=False, coco=False, large=False,
                             runlocal=False, synthetic=False,
                             zero_shot=False)
  if variant.flickr and variant.coco:
    raise ValueError("configs/finetune_itr.py: choose one dataset, `flickr` "
                     "or `coco`")
  if variant.runlocal and variant.synthetic:
    raise ValueError("configs/finetune_itr.py: `runlocal` and `synthetic` "
                     "are two sizes of the synthetic run; choose one")
  name = "coco" if variant.coco else "flickr"
  spec = DATASETS[name]
  (main, (train_db, ratio)), *others = spec["train"].items()

  c = common.finetune_config("itm", "itr", TXT_DB.format(train_db),
                             val_text=TXT_DB.format(spec["val"]),
                             val_split="val", name=main)
  c.datasets[main].mix_ratio = (ratio,)
  for other, (db, r) in others:
    c.datasets[other] = common.dataset(TXT_DB.format(db), tasks=("itr",),
                                       mix_ratio=(r,), val_split="")
  # Official region rule: dynamic 10..100 boxes above confidence 0.2 (the
  # json's num_bb 36 applies only to fixed-count dbs, conf_th -1).
  c.data.conf_th = 0.2
  c.data.min_bb = 10
  c.data.max_bb = 100
  c.data.num_bb = -1
  c.data.max_txt_len = 60
  # One shape: every negative fits every example's rows, so negatives come
  # from the whole split as in the official sampler (with more shapes they
  # would be drawn among those that fit the example's shape).
  c.data.max_buckets = 1
  # A device's batch holds 800 rows of up to 162 tokens (~650 MB of fp32
  # features); fewer batches in flight keep the host's memory in bounds.
  c.data.prefetch = 2
  c.model.hidden_dropout_prob = 0.1      # official `dropout` (set_dropout)
  c.model.attention_probs_dropout_prob = 0.1
  c.init_checkpoint = "uniter-large.pt" if variant.large else "uniter-base.pt"
  c.seed = 42
  c.train.negative_size = 399            # random candidates per anchor
  c.train.hard_neg_size = 31             # the hardest of them, trained on
  c.train.margin = 0.2
  c.train.token_budget = 2 * (1 + c.train.negative_size) * ROW_TOKENS
  c.train.gradient_accumulation_steps = 8   # official train_batch_size
  c.train.sum_grads = True               # Horovod sums over GPUs and steps
  c.train.learning_rate = 3e-5 if (variant.coco and variant.large) else 5e-5
  c.train.num_train_steps = 5000
  c.train.warmup_steps = 500
  c.train.weight_decay = 0.01
  c.train.betas = (0.9, 0.98)
  c.train.grad_norm = 2.0
  if variant.large:
    c.model.update(model_config.large().to_dict())
    c.model.hidden_dropout_prob = c.model.attention_probs_dropout_prob = 0.1
    c.model.dtype = "bfloat16"
  c.eval.every_steps = 500               # official valid_steps
  c.checkpoint.every_steps = 500
  # The itr loss and sampled R@1 on a few held-out batches (the official
  # `validate` scores each val text against 400 fixed images instead).
  c.evals.val.max_batches = 20
  full_val = not (variant.coco and variant.large)   # official full_val
  c.evals.retrieval = common.evaluator(
      "retrieval", every_steps=None if full_val else 0, batch_size=400)
  c.evals.retrieval_test = common.evaluator(
      "retrieval", every_steps=0, split="test",
      text=TXT_DB.format(spec["test"]), batch_size=400)

  if variant.runlocal:
    _synthetic(c, "tiny")
    c.model.update(model_config.tiny().to_dict())
    c.model.vocab_size = -1
    c.model.max_position_embeddings = 64
    c.model.dtype = "float32"
    c.mesh.data = 1   # the tiny split fills no batch spread over devices
    # 8 images per split: 7 negatives of each kind, the 3 hardest trained.
    c.train.negative_size = 7
    c.train.hard_neg_size = 3
    c.train.token_budget = 2048          # 3 examples of 16 rows
    c.train.gradient_accumulation_steps = 1
    c.train.num_train_steps = 6
    c.train.warmup_steps = 2
    c.log_every_steps = 2
    c.eval.every_steps = 6
    c.checkpoint.every_steps = 3
    c.evals.val.max_batches = 2
    c.evals.retrieval.text_bins = c.evals.retrieval.image_bins = 1
  elif variant.synthetic:
    _synthetic(c, "demo")
    # The demo's model, so the README demo's pretraining run loads into it.
    common.demo_sized_synthetic(c, "demo")
    c.data.num_threads = 1
    c.train.negative_size = 31
    c.train.hard_neg_size = 7
    c.train.token_budget = 8192          # 4 examples of 64 rows
    c.train.gradient_accumulation_steps = 1
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 30
    c.train.num_train_steps = 300
    c.log_every_steps = 25
    c.eval.every_steps = 100
    c.checkpoint.every_steps = 100
    c.evals.retrieval.text_bins = c.evals.retrieval.image_bins = 2

  if variant.zero_shot:
    # Evaluate the pretraining checkpoint as it is: the ITM match logit.
    c.mode = "eval"
    del c.evals["val"]
    del c.evals["loss_curves"]   # nothing is trained
    for ev in ("retrieval", "retrieval_test"):
      if ev in c.evals:
        c.evals[ev].score = "itm"
  return c


def _synthetic(c, preset: str) -> None:
  """Points the run at the synthetic captions of `preset` (train, val;
  `run.py` builds them on first use)."""
  text = f"uniter_synthetic_text/{preset}:1.0.0"
  c.data.synthetic = preset
  c.data.data_dir = "/tmp/uniter_jax_data"
  # The synthetic images hold fewer regions than the official 10..100.
  c.data.min_bb = 6
  c.init_checkpoint = ""
  for name in list(c.datasets.keys()):
    del c.datasets[name]
  c.datasets.synthetic = common.dataset(text, tasks=("itr",), mix_ratio=(1,))
  del c.evals["retrieval_test"]   # the synthetic captions have no test split
