"""WRA (word-region alignment) forward+backward timings and Sinkhorn study.

    python benchmarks/bench_wra.py            # timings, B=32 Lt=60 Li=36 H=768
    python benchmarks/bench_wra.py --study    # epsilon / iteration table
    python benchmarks/bench_wra.py --matmuls  # the cost's three matmuls alone

Timings (one process, interleaved rounds, medians): the WRA loss
``wra_loss(wra_distance(txt, img))`` and its gradient w.r.t. both inputs for
(a) OTT-JAX Sinkhorn with the default ``OTConfig``, (b) IPOT in JAX, (c) the
PyTorch transcription of the official IPOT (tests/torch_objectives_ref.py),
plus (a) with a single Sinkhorn iteration, i.e. the cosine cost and its
two backward matmuls that every method pays. Torch is
timed with 1 and 2 threads and with flush-to-zero of denormals on and off
(IPOT's plan entries decay into denormals on CPU); the fastest torch
configuration is the baseline for the ratios.

The study compares Sinkhorn settings with IPOT on synthetic, structured
embeddings (shared concepts plus a common direction, as contextual states
have): distances of matched / mismatched pairs, their separation (AUC and
d'), the marginal error, the distance gap to IPOT and the cosine between the
Sinkhorn and IPOT gradients.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from uniter_jax import ot  # pylint: disable=wrong-import-position

B, LT, LI, H = 32, 60, 36, 768


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  txt = r.standard_normal((B, LT, H)).astype(np.float32)
  img = r.standard_normal((B, LI, H)).astype(np.float32)
  tl = r.integers(10, LT + 1, B)
  il = r.integers(10, LI + 1, B)
  tv = np.arange(LT)[None] < tl[:, None]
  iv = np.arange(LI)[None] < il[:, None]
  targets = (r.random(B) < 0.5).astype(np.int32)
  return txt, img, tv, iv, targets


def _time_interleaved(fns, rounds):
  """Median and min milliseconds per function, rounds interleaved."""
  for f in fns.values():  # compile / warm up
    f()
    f()
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  return ({k: 1e3 * float(np.median(v)) for k, v in times.items()},
          {k: 1e3 * float(np.min(v)) for k, v in times.items()})


def timings(rounds: int):
  import torch  # pylint: disable=g-import-not-at-top
  import torch_objectives_ref as ref  # pylint: disable=g-import-not-at-top

  txt, img, tv, iv, targets = _inputs()
  jt, ji = jnp.asarray(txt), jnp.asarray(img)

  def jax_fn(cfg):
    f = jax.jit(jax.value_and_grad(
        lambda a, b: ot.wra_loss(ot.wra_distance(a, b, tv, iv, cfg), targets),
        argnums=(0, 1)))
    return lambda: jax.block_until_ready(f(jt, ji))

  tt = torch.tensor(txt, requires_grad=True)
  ti = torch.tensor(img, requires_grad=True)
  tpad, ipad = torch.from_numpy(~tv), torch.from_numpy(~iv)
  ttg = torch.from_numpy(targets)

  def torch_fn(threads, ftz):
    def run():
      torch.set_num_threads(threads)
      torch.set_flush_denormal(ftz)
      tt.grad = ti.grad = None
      loss = ref.wra_loss(ref.ot_distance(tt, ti, tpad, ipad), ttg)
      loss.backward()
    return run

  fns = {
      "(a) OTT Sinkhorn, default OTConfig": jax_fn(ot.OTConfig()),
      "(b) IPOT, JAX": jax_fn(ot.OTConfig(solver="ipot")),
      "    same, 1 Sinkhorn iteration (cost floor)":
          jax_fn(ot.OTConfig(num_iters=1)),
  }
  for ftz in (False, True):
    fns[f"(c) IPOT, torch official, 1 thr, ftz={ftz}"] = torch_fn(1, ftz)

  def torch_floor():
    torch.set_num_threads(1)
    tt.grad = ti.grad = None
    ref.cosine_cost(tt, ti).sum().backward()

  fns["    torch cosine cost only, 1 thr (its floor)"] = torch_floor
  med, best = _time_interleaved(fns, rounds)
  # Two torch threads last and apart: on a loaded 2-core machine their
  # spinning OpenMP workers would slow whatever runs next.
  extra = {f"(c) IPOT, torch official, 2 thr, ftz={ftz}": torch_fn(2, ftz)
           for ftz in (False, True)}
  med2, best2 = _time_interleaved(extra, max(3, rounds // 4))
  med.update(med2)
  best.update(best2)
  torch.set_num_threads(1)
  torch_keys = [k for k in med if k.startswith("(c)")]
  floor_j = med["    same, 1 Sinkhorn iteration (cost floor)"]
  floor_t = med["    torch cosine cost only, 1 thr (its floor)"]
  base_key = min(torch_keys, key=med.get)
  base = med[base_key]
  print(f"WRA fwd+bwd, B={B} Lt={LT} Li={LI} H={H}, float32, "
        f"{os.cpu_count()} CPUs; median (min) of {rounds} interleaved rounds")
  print(f"OTConfig() = {ot.OTConfig()}")
  for k, v in med.items():
    print(f"  {k:45s} {v:8.2f} ms ({best[k]:7.2f})  "
          f"torch-baseline/this = {base / v:5.2f}x")
  print(f"baseline: fastest torch configuration (median): {base_key.strip()}")
  a = med["(a) OTT Sinkhorn, default OTConfig"]
  print(f"Sinkhorn speed-up vs official IPOT (torch): {base / a:.2f}x; "
        f"vs JAX IPOT: {med['(b) IPOT, JAX'] / a:.2f}x; "
        f"solver overhead above the cost floor: "
        f"{a - med['    same, 1 Sinkhorn iteration (cost floor)']:.2f} ms")
  print(f"solver part only (total - own cost floor): Sinkhorn "
        f"{a - floor_j:.2f} ms vs official IPOT {base - floor_t:.2f} ms = "
        f"{(base - floor_t) / max(a - floor_j, 1e-9):.1f}x")
  print(f"by min times: Sinkhorn vs official IPOT (torch, same config): "
        f"{best[base_key] / best['(a) OTT Sinkhorn, default OTConfig']:.2f}x")


def _structured(seed, b=64, noise=1.0, match_frac=0.3, n_concepts=200):
  """Matched pairs share concepts between text and regions; mismatched don't."""
  r = np.random.default_rng(seed)
  concepts = r.standard_normal((n_concepts, H)).astype(np.float32)
  common = 1.5 * r.standard_normal(H).astype(np.float32)
  txt = r.standard_normal((b, LT, H)).astype(np.float32)
  img = r.standard_normal((b, LI, H)).astype(np.float32)
  tl = r.integers(12, LT + 1, b)
  il = r.integers(10, LI + 1, b)
  tg = (r.random(b) < 0.5).astype(np.int32)
  for i in range(b):
    ci = r.integers(0, n_concepts, il[i])
    img[i, :il[i]] = concepts[ci] + common + noise * r.standard_normal(
        (il[i], H))
    pool = ci if tg[i] else r.integers(0, n_concepts, il[i])
    ct = np.where(r.random(tl[i]) < match_frac, r.choice(pool, tl[i]),
                  r.integers(0, n_concepts, tl[i]))
    txt[i, :tl[i]] = concepts[ct] + common + noise * r.standard_normal(
        (tl[i], H))
  tv = np.arange(LT)[None] < tl[:, None]
  iv = np.arange(LI)[None] < il[:, None]
  return txt, img, tv, iv, tg


def study():
  for noise in (1.0, 0.5):
    txt, img, tv, iv, tg = _structured(0, noise=noise)
    cost = ot.cosine_cost(txt, img)
    cm = np.asarray(cost)[tv[:, :, None] & iv[:, None, :]]
    print(f"\nnoise={noise}: valid cost mean {cm.mean():.3f} std "
          f"{cm.std():.3f} range [{cm.min():.3f}, {cm.max():.3f}]")

    def run(cfg):
      f = jax.jit(lambda a, b: ot.wra_distance(a, b, tv, iv, cfg))
      g = jax.jit(jax.grad(
          lambda a, b: ot.wra_loss(ot.wra_distance(a, b, tv, iv, cfg), tg),
          argnums=(0, 1)))
      d = np.asarray(f(txt, img))
      gv = np.concatenate([np.asarray(x).ravel() for x in g(txt, img)])
      if cfg.solver == "ipot":
        plan = np.asarray(ot.ipot_plan(cost, tv, iv))
      else:
        plan = np.asarray(ot.sinkhorn_plan(cost, tv, iv, cfg))
      err = max(
          np.abs(plan.sum(2) - tv / tv.sum(1, keepdims=True)).sum(1).max(),
          np.abs(plan.sum(1) - iv / iv.sum(1, keepdims=True)).sum(1).max())
      return d, gv, err

    def sep(d):
      p, n = d[tg == 1], d[tg == 0]
      auc = (n[None, :] > p[:, None]).mean()
      dp = (n.mean() - p.mean()) / np.sqrt((p.var() + n.var()) / 2)
      return p.mean(), n.mean(), auc, dp

    d0, g0, e0 = run(ot.OTConfig(solver="ipot"))
    p, n, auc, dp = sep(d0)
    print(f"  {'IPOT (official)':22s} pos {p:.4f} neg {n:.4f} AUC {auc:.3f} "
          f"d' {dp:5.2f} marg.err {e0:.1e}")
    for eps in (0.02, 0.03, 0.05, 0.1):
      for it in (10, 20, 50, 100):
        d, gv, e = run(ot.OTConfig(epsilon=eps, num_iters=it))
        p, n, auc, dp = sep(d)
        cos = gv @ g0 / np.linalg.norm(gv) / np.linalg.norm(g0)
        print(f"  eps {eps:.2f} iters {it:3d}      pos {p:.4f} neg {n:.4f} "
              f"AUC {auc:.3f} d' {dp:5.2f} marg.err {e:.1e} "
              f"|d-ipot| {np.abs(d - d0).max():.4f} grad-cos {cos:.3f} "
              f"finite {np.isfinite(gv).all()}")


def matmuls(rounds):
  """The three batched matmuls every WRA method pays, XLA vs torch.

  Forward similarity ``x y^T`` and the two backward products ``P y`` and
  ``P^T x`` (fp32, B=32, Lt=60, Li=36, H=768), as one jitted function and as
  three ``torch.bmm`` calls with 1 and 2 threads.
  """
  import torch  # pylint: disable=g-import-not-at-top
  r = np.random.default_rng(0)
  x = r.standard_normal((B, LT, H)).astype(np.float32)
  y = r.standard_normal((B, LI, H)).astype(np.float32)
  p = r.random((B, LT, LI)).astype(np.float32)

  @jax.jit
  def three(x, y, p):
    return (jnp.einsum("bmh,bnh->bmn", x, y),
            jnp.einsum("bmn,bnh->bmh", p, y),
            jnp.einsum("bmn,bmh->bnh", p, x))

  xj, yj, pj = (jnp.asarray(a) for a in (x, y, p))
  tx, ty, tp = (torch.from_numpy(a) for a in (x, y, p))

  def torch_three(threads):
    def f():
      torch.set_num_threads(threads)
      return (torch.bmm(tx, ty.transpose(1, 2)), torch.bmm(tp, ty),
              torch.bmm(tp.transpose(1, 2), tx))
    return f

  fns = {"XLA (jit), 3 batched matmuls": lambda: jax.block_until_ready(
      three(xj, yj, pj)),
         "torch.bmm x3, 1 thread": torch_three(1),
         "torch.bmm x3, 2 threads": torch_three(2)}
  med, best = _time_interleaved(fns, rounds)
  flop = 3 * 2 * B * LT * LI * H
  print(f"cost matmuls, B={B} Lt={LT} Li={LI} H={H} fp32 ({flop / 1e6:.0f} "
        f"MFLOP); median (min) of {rounds} interleaved rounds")
  for k in fns:
    print(f"  {k:32s} {med[k]:6.2f} ms ({best[k]:6.2f})  "
          f"{flop / med[k] / 1e6:6.1f} GFLOP/s")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--study", action="store_true",
                      help="print the epsilon/iteration study instead")
  parser.add_argument("--matmuls", action="store_true",
                      help="time only the cost's three matmuls, XLA vs torch")
  parser.add_argument("--rounds", type=int, default=20)
  args = parser.parse_args()
  if args.study:
    study()
  elif args.matmuls:
    matmuls(args.rounds)
  else:
    timings(args.rounds)


if __name__ == "__main__":
  main()
