"""Retrieval evaluation throughput: text-image pairs scored per second.

The JAX side is the project's evaluation path,
`uniter_jax.evaluators.retrieval.score_matrix` (the function the
`retrieval` evaluator calls): it builds the text and image bin tables, puts
them on the devices, and scores every text x image pair in batches of
`--batch_size` rows, jitted, with the ranking head (`rank_output`).
The PyTorch side is the reference head (`tests/torch_ref`
`UniterForImageTextRetrieval.forward(compute_loss=False)`, eval mode,
`no_grad`) on the same converted weights, fed as the official evaluation
feeds it (`ItmEvalDataset`): per text, the text against a mini-batch of
`--torch_batch_size` images, packed with `gather_index`. Its batches are built
before timing (the official loader builds them in worker processes), so
the PyTorch figure is its model time only; the JAX figure is the whole
`score_matrix` call (tables, transfers and all batches). Both fp32 by
default, full rows (`--txt_len` tokens with [CLS]/[SEP], `--regions`
regions, no padding) unless `--random_lengths`.

  python benchmarks/bench_retrieval.py          # UNITER-base, 4 x 64 pairs
  python benchmarks/bench_retrieval.py --model tiny # smoke check
  # A full Flickr30K-test-sized run (5000 x 1000 = 5M pairs) on a GPU:
  python benchmarks/bench_retrieval.py --texts 5000 --images 1000 \
      --random_lengths --txt_len 40 --regions 100 --dtype bfloat16 \
      --batch_size 1024 --no_torch --repeats 1

It also prints the projection for the Flickr30K test set (1000 images x
5000 captions) on one H100 from the analytic forward FLOPs of a pair
(`bench_train.step_flops`, the formula in docs/benchmarks.md) at the MFU
the GPU train benchmark targets (`--mfu`, 50% of `--peak_tflops` 989,
H100 SXM dense bf16), for a few padded shapes.

Timing: `--warmup` untimed calls of each (the first JAX one compiles),
then `--repeats` timed calls of each implementation in turns (A B A B),
median reported.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "tests"),
           os.path.dirname(os.path.abspath(__file__))):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import bench_train as bt  # pylint: disable=g-import-not-at-top,wrong-import-position

FLICKR_TEST = (5000, 1000)   # captions, images
# Padded (Lt, Li) shapes for the projection: short captions with the
# official 36-region setting, a typical dynamic-region bin, the worst case
# (every pair padded to 60 + 2 tokens and 100 regions).
PROJECTION_SHAPES = ((20, 36), (32, 64), (62, 100))


def make_pairs(n_txt: int, n_img: int, txt_len: int, regions: int,
               vocab: int, random_lengths: bool, seed: int = 0):
  """Texts (token ids with [CLS]/[SEP]) and images (fp16 features, boxes)."""
  rng = np.random.default_rng(seed)
  t_lens = (rng.integers(8, txt_len + 1, n_txt) if random_lengths
            else np.full(n_txt, txt_len))
  i_lens = (rng.integers(10, regions + 1, n_img) if random_lengths
            else np.full(n_img, regions))
  texts = []
  for n in t_lens:
    ids = rng.integers(1000 if vocab > 2000 else 4, vocab, n).astype(np.int32)
    ids[0], ids[-1] = (101, 102) if vocab > 2000 else (1, 2)
    texts.append(ids)
  images = [{"img_feat": rng.normal(size=(n, 2048)).astype(np.float16),
             "img_pos_feat": rng.uniform(size=(n, 7)).astype(np.float32)}
            for n in i_lens]
  return texts, images


def eval_context(net):
  """An `EvalContext` over all local devices (data parallel), as the
  trainer builds it, with only what `score_matrix` reads."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from uniter_jax import evaluators  # pylint: disable=g-import-not-at-top
  from uniter_jax.train import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {"data": -1, "fsdp": 1, "tensor": 1}))
  return evaluators.EvalContext(
      model=net, tasks={}, key_task={}, datasets={}, train_datasets={},
      mesh=mesh, put=functools.partial(sharding.to_global, mesh=mesh),
      replicated=sharding.replicated(mesh),
      batch_multiple=sharding.batch_size_multiple(mesh), meta={},
      workdir="", config=None)


def torch_batches(texts, images, batch_size):
  """Official evaluation batches: per text, the text against `batch_size`
  images at a time (static layout converted by `static_to_packed`)."""
  import torch_ref as R  # pylint: disable=g-import-not-at-top
  out = []
  li = max(len(im["img_feat"]) for im in images)
  for t in texts:
    for lo in range(0, len(images), batch_size):
      chunk = images[lo:lo + batch_size]
      b = len(chunk)
      batch = {"input_ids": np.tile(t, (b, 1)),
               "img_feat": np.zeros((b, li, 2048), np.float32),
               "img_pos_feat": np.zeros((b, li, 7), np.float32),
               "txt_lens": np.full(b, len(t), np.int32),
               "num_bbs": np.zeros(b, np.int32)}
      for r, im in enumerate(chunk):
        n = len(im["img_feat"])
        batch["img_feat"][r, :n] = im["img_feat"]
        batch["img_pos_feat"][r, :n] = im["img_pos_feat"]
        batch["num_bbs"][r] = n
      out.append(R.static_to_packed(batch))
  return out


def projection(models, mfu: float, peak_tflops: float) -> list[str]:
  """Lines: Flickr30K test on one GPU at `mfu` x `peak_tflops`, per
  model config in `models` ({name: config dict})."""
  n_txt, n_img = FLICKR_TEST
  pairs = n_txt * n_img
  rate = mfu * peak_tflops * 1e12
  lines = [f"projection, Flickr30K test ({n_txt} captions x {n_img} images "
           f"= {pairs / 1e6:.0f}M pairs), one GPU at {100 * mfu:.0f}% of "
           f"{peak_tflops:.0f} TFLOP/s (bf16):"]
  for (name, mcfg), (lt, li) in ((m, s) for m in models.items()
                                 for s in PROJECTION_SHAPES):
    f = bt.step_flops(mcfg, 1, lt, li, "itm", 0)["forward"]
    lines.append(f"  UNITER-{name:5s} padded Lt={lt:3d} Li={li:3d}: "
                 f"{f / 1e9:6.2f} GFLOP/pair"
                 f" -> {pairs * f / 1e15:6.1f} PFLOP -> "
                 f"{pairs * f / rate:6.0f} s ({pairs * f / rate / 60:.1f} "
                 "min)")
  return lines


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", choices=("base", "large", "tiny"),
                  default="base")
  ap.add_argument("--texts", type=int, default=4)
  ap.add_argument("--images", type=int, default=64)
  ap.add_argument("--txt_len", type=int, default=20,
                  help="tokens per text incl. [CLS]/[SEP] (the maximum with "
                  "--random_lengths)")
  ap.add_argument("--regions", type=int, default=36)
  ap.add_argument("--random_lengths", action="store_true",
                  help="texts 8..txt_len tokens, images 10..regions regions")
  # 64 rows a batch for both by default: on this CPU both run faster with
  # batches of 64 than of 256 rows (cache); the evaluator's and the official
  # default, 400, is for GPUs.
  ap.add_argument("--batch_size", type=int, default=64,
                  help="JAX rows per batch (evaluator option batch_size)")
  ap.add_argument("--torch_batch_size", type=int, default=64,
                  help="PyTorch: images per batch of one text (official "
                  "inf_minibatch_size)")
  ap.add_argument("--text_bins", type=int, default=3)
  ap.add_argument("--image_bins", type=int, default=3)
  ap.add_argument("--dtype", default="float32",
                  help="JAX compute dtype (PyTorch stays fp32)")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no_torch", action="store_true")
  ap.add_argument("--torch_threads", type=int, default=0)
  ap.add_argument("--mfu", type=float, default=0.5)
  ap.add_argument("--peak_tflops", type=float, default=989.0)
  args = ap.parse_args()

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch_ref as R  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from uniter_jax import convert  # pylint: disable=g-import-not-at-top
  from uniter_jax import model as um  # pylint: disable=g-import-not-at-top
  from uniter_jax.evaluators import retrieval  # pylint: disable=g-import-not-at-top
  if args.torch_threads > 0:
    torch.set_num_threads(args.torch_threads)

  rcfg = {"base": R.base_config, "large": R.large_config,
          "tiny": R.tiny_config}[args.model]()
  fcfg = um.config.from_official_dict(rcfg.to_dict())
  fcfg.dtype = args.dtype
  mcfg = dict(fcfg.to_dict())
  torch.manual_seed(0)
  ref = R.UniterForImageTextRetrieval(rcfg).eval()
  ref.init_output()
  params = convert.torch_to_flax(
      {k: v.detach().numpy() for k, v in ref.state_dict().items()}, "itm",
      fcfg)
  net = um.build_model("itm", fcfg)
  texts, images = make_pairs(args.texts, args.images, args.txt_len,
                             args.regions, rcfg.vocab_size,
                             args.random_lengths)
  n_pairs = len(texts) * len(images)
  ctx = eval_context(net)
  plan = retrieval.pair_plan([len(t) for t in texts],
                             [len(im["img_feat"]) for im in images],
                             batch_size=args.batch_size,
                             batch_multiple=ctx.batch_multiple,
                             text_bins=args.text_bins,
                             image_bins=args.image_bins)
  padded_flops = sum(
      len(b.texts) * bt.step_flops(mcfg, 1, plan.text_slots[b.text_bin],
                                   plan.image_slots[b.image_bin], "itm",
                                   0)["forward"] for b in plan.batches)
  print(f"UNITER-{args.model} retrieval scoring, {len(texts)} texts x "
        f"{len(images)} images = {n_pairs} pairs, "
        + ("random lengths up to " if args.random_lengths else "")
        + f"Lt={args.txt_len} Li={args.regions}; JAX {args.dtype}, "
        f"batches of up to {args.batch_size} rows, on {jax.device_count()} "
        f"{jax.default_backend()} device(s) (jax {jax.__version__})"
        + ("" if args.no_torch else
           f", PyTorch fp32, per text up to {args.torch_batch_size} images "
           f"a batch (torch {torch.__version__}, {torch.get_num_threads()} "
           "threads)")
        + f"; CPU cores {os.cpu_count()}")
  print(f"JAX plan: {len(plan.batches)} batches in "
        f"{len(plan.text_slots)} x {len(plan.image_slots)} shapes, "
        f"{padded_flops / n_pairs / 1e9:.2f} GFLOP/pair forward (analytic, "
        "padded)")

  params = jax.device_put(params)
  holder = {}

  def run_jax():
    with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(
        common.LOGICAL_AXIS_RULES):
      holder["jax"] = retrieval.score_matrix(
          ctx, params, texts, images, score="rank",
          batch_size=args.batch_size, text_bins=args.text_bins,
          image_bins=args.image_bins)

  fns = {"jax": run_jax}
  if not args.no_torch:
    packed = torch_batches(texts, images, args.torch_batch_size)

    def run_torch():
      with torch.no_grad():
        holder["torch"] = torch.cat([ref(b, compute_loss=False)[:, 0]
                                     for b in packed]).numpy()
    fns["pytorch"] = run_torch
  # Warm-up: the JAX call compiles (timed apart); PyTorch runs once too.
  for name, fn in fns.items():
    for w in range(args.warmup):
      t0 = time.perf_counter()
      fn()
      print(f"{name} warm-up call {w + 1}"
            + (" (compile + run)" if name == "jax" and w == 0 else "")
            + f": {time.perf_counter() - t0:.1f} s")
  times, _ = bt.time_interleaved(fns, 0, args.repeats)
  rows = {}
  for name, runs in times.items():
    med = statistics.median(runs)
    rows[name] = n_pairs / med
    print(f"{name:8s} {med:8.3f} s  {n_pairs / med:9.1f} pairs/s  "
          f"runs {[round(r, 3) for r in runs]}"
          + (f"  {padded_flops / med / 1e9:7.1f} GFLOP/s (JAX padded "
             "analytic)" if name == "jax" else ""))
  if "pytorch" in rows:
    want = holder["torch"].reshape(len(texts), len(images))
    err = float(np.max(np.abs(holder["jax"] - want))
                / max(np.max(np.abs(want)), 1e-30))
    print(f"JAX / PyTorch pairs per second: {rows['jax'] / rows['pytorch']:.2f}"
          f"x (scores agree: max rel err {err:.1e})")
  official = {n: dict(um.config.from_official_dict(c().to_dict()))
              for n, c in (("base", R.base_config),
                           ("large", R.large_config))}
  for line in projection(official, args.mfu, args.peak_tflops):
    print(line)


if __name__ == "__main__":
  main()
