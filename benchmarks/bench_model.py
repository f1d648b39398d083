"""Forward+backward time of UNITER-base, Flax vs the PyTorch reference.

One MLM training step's forward and backward (dropout on, fp32) on one batch
of B=16, Lt=40 text tokens and Li=36 regions, on this machine's CPU. Both
models get the same weights (converted) and the same batch; the figure is
the median of repeated runs after warm-up, and the ratio is printed.

  python benchmarks/bench_model.py [--repeats 5] [--config base|tiny]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch_ref as R  # pylint: disable=g-import-not-at-top,wrong-import-position
from uniter_jax import convert  # pylint: disable=wrong-import-position
from uniter_jax import model as um  # pylint: disable=wrong-import-position


def make_batch(b, lt, li, vocab, n_masked, seed=0):
  rng = np.random.default_rng(seed)
  batch = R.random_static_batch(seed, [lt] * b, [li] * b, lt, li, vocab)
  pos = np.stack([np.sort(rng.choice(np.arange(1, lt - 1), n_masked,
                                     replace=False)) for _ in range(b)])
  labels = np.full((b, lt), -1, np.int64)
  targets = rng.integers(1, vocab, size=(b, n_masked))
  np.put_along_axis(labels, pos, targets, axis=1)
  return batch, pos.astype(np.int32), targets.astype(np.int32), labels


def time_fn(fn, repeats):
  fn()
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="base", choices=["base", "tiny"])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--txt_len", type=int, default=40)
  ap.add_argument("--num_regions", type=int, default=36)
  args = ap.parse_args()

  rcfg = R.base_config() if args.config == "base" else R.tiny_config()
  b, lt, li = args.batch, args.txt_len, args.num_regions
  n_masked = max(1, round(0.15 * lt))
  batch, pos, targets, labels = make_batch(b, lt, li, rcfg.vocab_size,
                                           n_masked)

  torch.manual_seed(0)
  ref = R.UniterForPretraining(rcfg).train()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  fcfg = um.config.from_official_dict(rcfg.to_dict())
  params = jax.tree_util.tree_map(
      jnp.asarray, convert.torch_to_flax(sd, "pretrain", fcfg))
  net = um.build_model("pretrain", fcfg)

  # ---- Flax -------------------------------------------------------------
  fbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  fbatch["mlm_positions"] = jnp.asarray(pos)
  ftargets = jnp.asarray(targets)

  def loss_fn(p, bt, key):
    out = net.apply({"params": p}, bt, "mlm", deterministic=False,
                    rngs={"dropout": key})
    logits = out["mlm_logits"].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, ftargets).mean()

  step = jax.jit(jax.value_and_grad(loss_fn))
  key = jax.random.key(0)

  def run_flax():
    loss, grads = step(params, fbatch, key)
    jax.block_until_ready(grads)
    return loss

  # ---- PyTorch reference -------------------------------------------------
  packed = R.static_to_packed(batch)
  packed["txt_labels"] = torch.as_tensor(labels)

  def run_torch():
    ref.zero_grad(set_to_none=True)
    loss = ref(packed, "mlm", compute_loss=True).mean()
    loss.backward()
    return loss

  print(f"UNITER-{args.config} MLM forward+backward, fp32, dropout on, "
        f"B={b}, Lt={lt}, Li={li}, {n_masked} masked tokens per row; "
        f"CPU cores: {os.cpu_count()}, torch threads: "
        f"{torch.get_num_threads()}, jax {jax.__version__}, "
        f"torch {torch.__version__}")
  tf, all_f = time_fn(run_flax, args.repeats)
  tt, all_t = time_fn(run_torch, args.repeats)
  print(f"flax    median {tf:.3f} s  runs {[round(x, 3) for x in all_f]}")
  print(f"pytorch median {tt:.3f} s  runs {[round(x, 3) for x in all_t]}")
  print(f"speed-up flax vs pytorch: {tt / tf:.2f}x "
        f"({'flax faster' if tf < tt else 'pytorch faster'})")


if __name__ == "__main__":
  main()
