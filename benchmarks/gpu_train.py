"""Train-step throughput and MFU of UNITER on one accelerator (bf16 compute).

Prepared for an H100: UNITER-base, the project's train step
(`uniter_jax.train.step.train_step`, jitted with the state donated, the
official in-domain optimizer: clipping 5.0, AdamW eps 1e-6 betas
(0.9, 0.98) wd 0.01; accumulation `--accum`, default 1 so every step
updates; the official in-domain runs use 2), float32 params
and optimizer state, `--dtype` compute (bfloat16 by default), dropout on.
Batches fill the official per-device token budget (10240 tokens incl.
padding, `B * (Lt + Li)`) in several bucket shapes, with full rows.

For every variant x task x shape it prints compile time, ms/step,
examples/s, tokens/s, achieved TFLOP/s and MFU = analytic model FLOPs
(`bench_train.step_flops`) / step time / `--peak_tflops` (989: H100 SXM
dense bf16), then each variant's MFU over the bucket mix (one step of each
shape) and whether the >= 50% target is met. `compile` is the
ahead-of-time compile; `xla/an` is XLA's own FLOP count of the compiled step
(all ops, heads at every gathered slot, optimizer, remat recomputation)
over the analytic count, a check on the latter; with `+scan` XLA counts the
scanned layer body once, so that ratio is far below 1 and means nothing.

Variants (`--variants`, comma separated): an attention implementation,
`cudnn` (jax.nn.dot_product_attention with implementation="cudnn": cuDNN's
fused attention, NVIDIA GPUs and bf16/fp16 only), `fused` (the same call,
XLA choosing the implementation) or `explicit` (softmax with attention
dropout 0.1, as the official model trains), optionally followed by `+scan`
(nn.scan over layers) and `+remat=<none|minimal|save_qkv_proj|full>`.
`cudnn` and `fused` have no attention-probability dropout (the public JAX
call takes no dropout), so that rate is set to 0 for them (the dropout-free
configuration; hidden dropout stays 0.1); the official-dropout
configuration is `explicit`.

  python benchmarks/gpu_train.py            # about 4-6 min on an H100
  python benchmarks/gpu_train.py --variants fused+scan,fused+remat=minimal
  python benchmarks/gpu_train.py --smoke    # tiny model, any CPU

Timing: the step is compiled ahead of time, then `--warmup` untimed steps,
then `--repeats` timed blocks of `--steps` steps each (one device sync per
block; the median block is reported). A time budget (`--time_budget_s`)
stops starting new measurements so the whole run stays within a few
minutes; skipped ones are listed. `--profile_dir DIR` also writes a
profiler trace of the first measurement's timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train as bt  # pylint: disable=g-import-not-at-top,wrong-import-position
from uniter_jax import model as um  # pylint: disable=g-import-not-at-top,wrong-import-position

H100_BF16_DENSE_TFLOPS = 989.0
# B x Lt x Li, each B * (Lt + Li) = 10240 (the official per-device budget).
DEFAULT_SHAPES = "128x24x56,80x40x88,64x60x100"
SMOKE_SHAPES = "4x8x6,2x12x10"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
  out = []
  for item in text.split(","):
    try:
      b, lt, li = (int(x) for x in item.lower().split("x"))
    except ValueError:
      raise ValueError(f"--shapes: {item!r} is not BxLtxLi, e.g. 128x24x56"
                       ) from None
    out.append((b, lt, li))
  return out


def parse_variant(text: str) -> dict:
  """'fused+scan+remat=minimal' -> model config overrides."""
  parts = text.split("+")
  if parts[0] not in ("cudnn", "fused", "explicit"):
    raise ValueError(f"--variants: {text!r} must start with 'cudnn', "
                     "'fused' or 'explicit'")
  v = {"attention_impl": parts[0], "scan_layers": False,
       "remat_policy": "none"}
  for p in parts[1:]:
    if p == "scan":
      v["scan_layers"] = True
    elif p.startswith("remat="):
      v["remat_policy"] = p.split("=", 1)[1]
    else:
      raise ValueError(f"--variants: unknown modifier {p!r} in {text!r}; "
                       "expected 'scan' or 'remat=<policy>'")
  return v


def model_config(args, variant: dict):
  cfg = um.config.tiny() if args.smoke else um.config.base()
  cfg.dtype = args.dtype
  cfg.update(variant)
  if variant["attention_impl"] in ("cudnn", "fused"):
    cfg.attention_probs_dropout_prob = 0.0
  um.config.validate(cfg)
  return cfg


def peak_bytes(device) -> float | None:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return float(stats["peak_bytes_in_use"])


def measure(args, cfg, params, tcfg, task, shape, profile_dir: str = ""
            ) -> dict:
  """Compiles and times the train step on one bucket shape."""
  b, lt, li = shape
  mcfg = cfg.to_dict()
  net = um.build_model("pretrain", cfg)
  batch = bt.make_batch(task, b, lt, li, mcfg["vocab_size"], mcfg["img_dim"],
                        mcfg["img_label_dim"], seed=b * 1000 + lt)
  flops = bt.step_flops(mcfg, b, lt, li, task,
                        b * bt.n_masked_per_row(lt, li, task),
                        wra=args.wra and task == "itm")["train"]
  tokens = bt.real_tokens(batch)
  fbatch = jax.device_put(bt.flax_batch(batch, task))
  # The step donates its state: give it its own copy of the params.
  step, state = bt.make_flax_step(net, jax.tree_util.tree_map(jnp.copy,
                                                              params),
                                  tcfg, task, wra=args.wra)
  step, compile_s, xla_flops = bt.compile_step(step, state, fbatch)
  for _ in range(max(args.warmup, 1)):
    state, m = step(state, fbatch)
  jax.block_until_ready(state)
  blocks = []
  if profile_dir:
    jax.profiler.start_trace(profile_dir)
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, m = step(state, fbatch)
    jax.block_until_ready(state)
    blocks.append((time.perf_counter() - t0) / args.steps)
  if profile_dir:
    jax.profiler.stop_trace()
  if int(state.bad_step) >= 0 or not bool(jnp.isfinite(m["loss"])):
    raise FloatingPointError(f"non-finite loss/grad for {task} {shape}")
  sec = statistics.median(blocks)
  del state
  return {"compile_s": compile_s, "sec": sec, "flops": flops,
          "xla_flops": xla_flops,
          "tokens": tokens, "examples": b, "loss": float(m["loss"]),
          "peak": peak_bytes(jax.devices()[0])}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variants", default="cudnn,fused,explicit")
  ap.add_argument("--tasks", default="mlm",
                  help=f"comma separated, of {bt.TASKS}")
  ap.add_argument("--wra", action="store_true", help="ITM with WRA")
  ap.add_argument("--shapes", default=None,
                  help=f"BxLtxLi list (default {DEFAULT_SHAPES})")
  ap.add_argument("--dtype", default="bfloat16",
                  choices=["bfloat16", "float32"])
  ap.add_argument("--peak_tflops", type=float,
                  default=H100_BF16_DENSE_TFLOPS)
  ap.add_argument("--accum", type=int, default=1,
                  help="gradient accumulation (optax.MultiSteps) as in the "
                  "official configs (2 in-domain); timed per micro-step")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--time_budget_s", type=float, default=None,
                  help="start no new measurement after this many seconds "
                  "(default 240; none with --smoke)")
  ap.add_argument("--profile_dir", default="",
                  help="write a jax.profiler trace of the first "
                  "measurement's timed steps here (view in TensorBoard or "
                  "Perfetto)")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny model, tiny shapes, few steps: checks that the "
                  "script runs (e.g. on a CPU); its figures mean nothing")
  args = ap.parse_args()
  if args.smoke:
    args.steps, args.repeats, args.warmup = 2, 2, 1
    if args.shapes is None:
      args.shapes = SMOKE_SHAPES
  if args.time_budget_s is None:
    args.time_budget_s = float("inf") if args.smoke else 240.0
  shapes = parse_shapes(args.shapes or DEFAULT_SHAPES)
  variants = [(v, parse_variant(v)) for v in args.variants.split(",")]
  if jax.default_backend() != "gpu":
    dropped = [v for v, var in variants if var["attention_impl"] == "cudnn"]
    variants = [(v, var) for v, var in variants
                if var["attention_impl"] != "cudnn"]
    if dropped:
      print(f"skipped {', '.join(dropped)}: cuDNN attention needs an NVIDIA "
            f"GPU; this backend is {jax.default_backend()!r}")
    if not variants:
      ap.error("--variants: nothing left to run on this backend")
  tasks = args.tasks.split(",")
  for t in tasks:
    if t not in bt.TASKS:
      ap.error(f"--tasks: unknown task {t!r}; expected one of {bt.TASKS}")
  if args.accum > 1 and args.steps % args.accum:
    ap.error(f"--steps {args.steps} must be a multiple of --accum "
             f"{args.accum} so every timed block holds whole updates")
  tcfg = bt.train_config(accum=args.accum)

  dev = jax.devices()[0]
  start = time.perf_counter()
  print(f"UNITER-{'tiny (smoke)' if args.smoke else 'base'} train step, "
        f"{args.dtype} compute, float32 params/optimizer, dropout on; "
        f"clip {tcfg.grad_norm}, AdamW eps {tcfg.adam_eps} betas "
        f"{tuple(tcfg.betas)} wd {tcfg.weight_decay}; accumulation "
        f"{args.accum} (figures per micro-step)")
  print(f"device {dev.device_kind} ({jax.default_backend()}, "
        f"{jax.device_count()} visible, using 1); jax {jax.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"MFU = analytic model FLOPs / step time / {args.peak_tflops:g} "
        f"TFLOP/s; {args.repeats} blocks of {args.steps} steps after "
        f"{args.warmup} warm-up steps (median block)")
  print()
  head = (f"{'variant':<26} {'task':<5} {'B x Lt x Li':<13} {'compile':>8} "
          f"{'ms/step':>8} {'ex/s':>8} {'tok/s':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>8} {'xla/an':>6}")
  print(head)
  print("-" * len(head))
  results, skipped = {}, []
  for vname, variant in variants:
    cfg = model_config(args, variant)
    net = um.build_model("pretrain", cfg)
    params = um.init_params(net, jax.random.key(0))
    for task in tasks:
      for shape in shapes:
        label = f"{vname} {task} {shape}"
        if time.perf_counter() - start > args.time_budget_s:
          skipped.append(label)
          continue
        r = measure(args, cfg, params, tcfg, task, shape,
                    profile_dir=args.profile_dir if not results else "")
        results[(vname, task, shape)] = r
        tflops = r["flops"] / r["sec"] / 1e12
        peak = "" if r["peak"] is None else f"{r['peak'] / 2**30:8.1f}"
        ratio = ("" if not r["xla_flops"] else
                 f"{r['xla_flops'] / r['flops']:6.2f}")
        print(f"{vname:<26} {task:<5} {'x'.join(map(str, shape)):<13} "
              f"{r['compile_s']:7.1f}s {1e3 * r['sec']:8.2f} "
              f"{r['examples'] / r['sec']:8.0f} {r['tokens'] / r['sec']:9.0f} "
              f"{tflops:8.1f} {100 * tflops / args.peak_tflops:5.1f}% "
              f"{peak:>8} {ratio:>6}",
              flush=True)
    del params

  print()
  print("bucket mix (one step of each shape):")
  best = None
  for vname, _ in variants:
    for task in tasks:
      rs = [results[k] for k in results if k[0] == vname and k[1] == task]
      if not rs:
        continue
      sec = sum(r["sec"] for r in rs)
      mfu = sum(r["flops"] for r in rs) / sec / (args.peak_tflops * 1e12)
      tok = sum(r["tokens"] for r in rs) / sec
      note = "" if len(rs) == len(shapes) else (
          f"  (only {len(rs)} of {len(shapes)} shapes)")
      print(f"  {vname:<26} {task:<5} MFU {100 * mfu:5.1f}%  "
            f"{tok:9.0f} tokens/s{note}")
      if best is None or mfu > best[0]:
        best = (mfu, vname, task)
  if best is not None:
    print(f"best: {best[1]} ({best[2]}) at {100 * best[0]:.1f}% MFU; target "
          f">= 50%: {'met' if best[0] >= 0.5 else 'NOT met'}")
  if skipped:
    print(f"skipped (time budget {args.time_budget_s:g} s): {skipped}")
  print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
