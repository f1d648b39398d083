"""Train-step throughput of UNITER: the Flax trainer's step vs PyTorch (CPU).

One full optimizer step (forward, backward, global-norm clipping and the
AdamW update of the official in-domain pretraining config; dropout on,
float32) on one batch, timed for both implementations in the same run:

- Flax: `uniter_jax.train.step.train_step` (the function `run.py`
  trains with), jitted with the train state donated, on one device, with
  `optim.make_optimizer(configs/pretrain_indomain_base.train)`.
  Gradient accumulation is set to 1 so every timed step applies an update.
- PyTorch: the reference `tests/torch_ref.UniterForPretraining` with the
  same weights (converted) and batch: `forward(compute_loss=True)`,
  `.mean().backward()`, `clip_grad_norm_(5.0)`, `torch.optim.AdamW`
  (eps 1e-6, betas (0.9, 0.98), weight decay 0.01 except the official
  no-decay names), learning rate set per step from the same schedule.

It prints examples/s, tokens/s (real tokens: `attn_masks.sum()`), and the
model FLOPs utilisation (MFU) from the analytic count of `step_flops`
divided by (a) a matmul rate measured in the same run (the faster of a
jitted JAX and a PyTorch 2048^3 float32 matmul on this machine) and (b)
`--peak_tflops` if given. The Flax step is compiled ahead of time (compile
time printed apart). Figures are the median of `--repeats` steps after
`--warmup` untimed steps; after the warm-up the two implementations take
turns step by step, so both see the same background load on a shared
machine.

  python benchmarks/bench_train.py                 # UNITER-base, MLM
  python benchmarks/bench_train.py --task itm      # ITM (no WRA)
  python benchmarks/bench_train.py --task itm --wra   # Flax adds WRA
  python benchmarks/bench_train.py --config tiny --repeats 2   # smoke

`step_flops` and `make_batch` are shared with `benchmarks/gpu_train.py`;
this module imports PyTorch only when the reference is run.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "tests")):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

TASKS = ("mlm", "itm", "mrfr", "mrckl")
MASK_PROB = 0.15


# ----------------------------------------------------------------------------
# Analytic FLOP count.
# ----------------------------------------------------------------------------
def step_flops(cfg: Mapping[str, Any], batch_size: int, txt_len: int,
               num_regions: int, task: str, n_slots: int,
               wra: bool = False) -> dict[str, float]:
  """Matmul FLOPs of one training step (forward + backward) of UNITER.

  Counts 2 FLOPs per multiply-add of every matmul the model needs; no
  elementwise work (LayerNorm, GELU, softmax, dropout, embedding gathers,
  the optimizer update). With B rows, L = Lt + Li tokens per row, hidden
  H, intermediate I, N layers:

    encoder   B * N * [2*L*H*(4H + 2I) + 4*L^2*H]
              (Q, K, V and output projections 8*L*H^2, the two FFN
              matmuls 4*L*H*I, scores Q K^T and probs V 2*L^2*H each)
    img_in    B * 2*Li*(D_img + 7)*H   (img_linear, pos_linear)
    head      mlm:   S * (2H^2 + 2*H*V)    (transform, tied decoder)
              mrfr:  S * (2H^2 + 2*H*D_img)
              mrckl: S * (2H^2 + 2*H*C)    (2-layer region classifier)
              itm:   B * (2H^2 + 4H)       (pooler, 2-way output)
                     + B * 2*Lt*Li*H with WRA (the cosine cost matrix;
                     the Sinkhorn iterations are matrix-vector work and
                     not counted)
    forward   encoder + img_in + head
    train     3 * (encoder + head) + 2 * img_in

  S is the number of masked tokens / regions that carry a loss (the real
  ones: the Flax model evaluates its head at a fixed number of gathered
  slots >= S, which is not counted as useful work). The backward pass costs
  two forward passes (input and weight gradients), except for the input
  layers on data (img_linear, pos_linear), which need the weight gradient
  only. Shapes are the static (padded) ones, so padding counts as work; the
  benchmarks use full rows (no padding).

  Args:
    cfg: model config with hidden_size, intermediate_size,
      num_hidden_layers, vocab_size, img_dim, img_label_dim.
    batch_size, txt_len, num_regions: B, Lt, Li.
    task: 'mlm', 'itm', 'mrfr', 'mrc' or 'mrckl'.
    n_slots: S, masked tokens (mlm) or regions (mrfr/mrc/mrckl) in the
      whole batch; ignored for itm.
    wra: ITM with word-region alignment.

  Returns:
    {'encoder', 'img_in', 'head', 'forward', 'train'} in FLOPs.
  """
  h, i = cfg["hidden_size"], cfg["intermediate_size"]
  n = cfg["num_hidden_layers"]
  d_img = cfg["img_dim"]
  b, lt, li = batch_size, txt_len, num_regions
  l = lt + li
  encoder = b * n * (2 * l * h * (4 * h + 2 * i) + 4 * l * l * h)
  img_in = b * 2 * li * (d_img + 7) * h
  if task == "mlm":
    head = n_slots * (2 * h * h + 2 * h * cfg["vocab_size"])
  elif task == "mrfr":
    head = n_slots * (2 * h * h + 2 * h * d_img)
  elif task in ("mrc", "mrckl"):
    head = n_slots * (2 * h * h + 2 * h * cfg["img_label_dim"])
  elif task == "itm":
    head = b * (2 * h * h + 4 * h) + (b * 2 * lt * li * h if wra else 0)
  else:
    raise ValueError(f"step_flops: unknown task {task!r}; expected one of "
                     f"{TASKS}")
  return {"encoder": float(encoder), "img_in": float(img_in),
          "head": float(head), "forward": float(encoder + img_in + head),
          "train": float(3 * (encoder + head) + 2 * img_in)}


# ----------------------------------------------------------------------------
# A batch in the static layout, with the pretraining fields of `task`.
# ----------------------------------------------------------------------------
def n_masked_per_row(txt_len: int, num_regions: int, task: str) -> int:
  """Masked positions per row: 15% of the text (without CLS/SEP) or regions."""
  if task == "mlm":
    return max(1, round(MASK_PROB * (txt_len - 2)))
  if task in ("mrfr", "mrc", "mrckl"):
    return max(1, round(MASK_PROB * num_regions))
  return 0


def make_batch(task: str, batch_size: int, txt_len: int, num_regions: int,
               vocab_size: int, img_dim: int, img_label_dim: int,
               seed: int = 0) -> dict[str, np.ndarray]:
  """Full rows (no padding): `[CLS w.. SEP]` text and `num_regions` regions.

  MLM masks a fixed 15% of each row's words (labels random ids); MRFR/MRC
  mask 15% of the regions (features zeroed, targets the originals / random
  soft labels); ITM draws 0/1 targets. Also holds `txt_lens`/`num_bbs`.
  """
  rng = np.random.default_rng(seed)
  b, lt, li = batch_size, txt_len, num_regions
  ids = rng.integers(1000 if vocab_size > 2000 else 1, vocab_size, (b, lt))
  ids[:, 0], ids[:, -1] = (101, 102) if vocab_size > 2000 else (1, 2)
  batch = {
      "input_ids": ids.astype(np.int32),
      "position_ids": np.tile(np.arange(lt, dtype=np.int32), (b, 1)),
      "img_feat": rng.normal(size=(b, li, img_dim)).astype(np.float32),
      "img_pos_feat": rng.uniform(size=(b, li, 7)).astype(np.float32),
      "attn_masks": np.ones((b, lt + li), np.int32),
      "txt_lens": np.full((b,), lt, np.int32),
      "num_bbs": np.full((b,), li, np.int32),
  }
  k = n_masked_per_row(lt, li, task)
  if task == "mlm":
    labels = np.full((b, lt), -1, np.int32)
    for r in range(b):
      pos = rng.choice(np.arange(1, lt - 1), k, replace=False)
      labels[r, pos] = batch["input_ids"][r, pos]
      batch["input_ids"][r, pos] = 103 if vocab_size > 2000 else 3
    batch["txt_labels"] = labels
  elif task in ("mrfr", "mrc", "mrckl"):
    masks = np.zeros((b, li), bool)
    for r in range(b):
      masks[r, rng.choice(li, k, replace=False)] = True
    batch["img_masks"] = masks
    batch["feat_targets"] = batch["img_feat"].copy()
    batch["img_feat"] = np.where(masks[..., None], 0.0,
                                 batch["img_feat"]).astype(np.float32)
    logits = rng.normal(size=(b, li, img_label_dim))
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    batch["label_targets"] = (soft / soft.sum(-1, keepdims=True)).astype(
        np.float32)
  elif task == "itm":
    batch["targets"] = rng.integers(0, 2, b).astype(np.int32)
  else:
    raise ValueError(f"make_batch: unknown task {task!r}; expected one of "
                     f"{TASKS}")
  return batch


def make_task(name: str, tcfg=None, wra: bool = False):
  """The registered task `name` as the trainer builds it (WRA on ITM only
  when `wra`; OT settings from `tcfg.ot`)."""
  from uniter_jax import tasks  # pylint: disable=g-import-not-at-top
  opts = {"mlm_prob": MASK_PROB, "mrm_prob": MASK_PROB}
  if name == "itm":
    opts["itm_ot_lambda"] = (tcfg.itm_ot_lambda if wra and tcfg is not None
                             else 0.0)
    if tcfg is not None:
      ot = tcfg.ot
      opts["ot"] = ot_lib.OTConfig(solver=ot.solver, epsilon=ot.epsilon,
                                   num_iters=ot.num_iters)
  return tasks.make_task(name, **opts)


def flax_batch(batch: Mapping[str, np.ndarray], task: str) -> dict:
  """The batch as the trainer feeds it: the task's batch ops (gathered
  masked positions) applied."""
  out = dict(batch)
  for op in make_task(task).batch_ops():
    out = op(out)
  return {k: jnp.asarray(v) for k, v in out.items()
          if k not in ("txt_lens", "num_bbs")}


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
  return int(np.asarray(batch["attn_masks"]).sum())


# ----------------------------------------------------------------------------
# The Flax step (the project's trainer step).
# ----------------------------------------------------------------------------
def train_config(accum: int = 1):
  """`config.train` of the official in-domain base setup, accumulation set."""
  from configs import pretrain_indomain_base  # pylint: disable=g-import-not-at-top
  tcfg = pretrain_indomain_base.get_config().train
  tcfg.gradient_accumulation_steps = accum
  return tcfg


def make_flax_step(net, params, tcfg, task: str, seed: int = 0,
                   wra: bool = False) -> tuple[Callable, Any]:
  """(jitted donated step, initial TrainState) as `trainer` builds them:
  `uniter_jax.train.step.train_step` with the registered task."""
  from uniter_jax.train import optim  # pylint: disable=g-import-not-at-top
  from uniter_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  tx = optim.make_optimizer(tcfg, params)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  state = step_lib.create_state(params, tx, jax.random.key(seed))
  step = jax.jit(functools.partial(step_lib.train_step, model=net,
                                   task=make_task(task, tcfg, wra),
                                   grad_scale=1.0),
                 donate_argnums=(0,))
  return step, state


def compile_step(step, state, batch) -> tuple[Callable, float, float | None]:
  """AOT-compiles a jitted step: (executable, seconds, XLA's FLOP count).

  XLA's count (`cost_analysis`) covers every op, elementwise and optimizer
  work included, and the heads at all gathered slots; it is printed next
  to the analytic count as a check, never used for MFU.
  """
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  seconds = time.perf_counter() - t0
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
  except Exception:  # pylint: disable=broad-except
    xla_flops = None
  return compiled, seconds, xla_flops


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int
               ) -> tuple[float, list[float], list[float]]:
  """(median, timed runs, warm-up runs) in seconds."""
  warm = []
  for _ in range(warmup):
    t0 = time.perf_counter()
    fn()
    warm.append(time.perf_counter() - t0)
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    runs.append(time.perf_counter() - t0)
  return statistics.median(runs), runs, warm


def time_interleaved(fns: Mapping[str, Callable[[], Any]], warmup: int,
                     repeats: int) -> tuple[dict[str, list[float]],
                                            dict[str, list[float]]]:
  """Warms each fn up, then times them in turns (A B A B ...).

  Taking turns exposes every implementation to the same background load
  on a shared machine. Returns (timed runs, warm-up runs) per name.
  """
  warm = {k: [] for k in fns}
  for k, fn in fns.items():
    for _ in range(warmup):
      t0 = time.perf_counter()
      fn()
      warm[k].append(time.perf_counter() - t0)
  runs = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      runs[k].append(time.perf_counter() - t0)
  return runs, warm


def matmul_rate(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """FLOP/s of an n^3 float32 matmul in JAX (jit) and PyTorch, median."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  med, _, _ = time_calls(lambda: f(x).block_until_ready(), 2, repeats)
  out = {"jax": 2.0 * n ** 3 / med}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return out
  xt = torch.from_numpy(np.array(x))
  with torch.no_grad():
    med, _, _ = time_calls(lambda: xt @ xt, 2, repeats)
  out["torch"] = 2.0 * n ** 3 / med
  return out


# ----------------------------------------------------------------------------
# The PyTorch reference step.
# ----------------------------------------------------------------------------
def make_torch_step(ref, packed, task: str, tcfg) -> Callable[[], float]:
  """The official-style update on `ref` (dropout on); returns the loss."""
  import torch  # pylint: disable=g-import-not-at-top
  from uniter_jax.train import optim  # pylint: disable=g-import-not-at-top
  decay, no_decay = [], []
  for name, p in ref.named_parameters():
    (no_decay if any(nd in name for nd in optim.NO_DECAY) else
     decay).append(p)
  opt = torch.optim.AdamW(
      [{"params": decay, "weight_decay": tcfg.weight_decay},
       {"params": no_decay, "weight_decay": 0.0}],
      lr=tcfg.learning_rate, betas=tuple(tcfg.betas), eps=tcfg.adam_eps)
  ref.train()
  counter = [0]

  def step() -> float:
    lr = float(optim.learning_rate_at(tcfg, counter[0]))
    for g in opt.param_groups:
      g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    out = ref(packed, task, compute_loss=True)
    loss = (out[0] if task == "itm" else out).mean()
    loss.backward()
    if tcfg.grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(ref.parameters(), tcfg.grad_norm)
    opt.step()
    counter[0] += 1
    return float(loss.detach())

  return step


# ----------------------------------------------------------------------------
def _row(name, med, runs, b, tokens, flops, rates):
  cells = [f"{name:<8}", f"{med:8.3f}", f"{b / med:8.2f}",
           f"{tokens / med:9.0f}", f"{flops / med / 1e9:8.1f}"]
  cells += [f"{100 * flops / med / r:6.1f}%" for r in rates]
  return "  ".join(cells) + f"   runs {[round(x, 3) for x in runs]}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="base", choices=["base", "tiny"])
  ap.add_argument("--task", default="mlm", choices=TASKS)
  ap.add_argument("--wra", action="store_true",
                  help="ITM with word-region alignment (Flax only; the "
                  "PyTorch reference has no WRA and runs plain ITM)")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--txt_len", type=int, default=40)
  ap.add_argument("--num_regions", type=int, default=36)
  ap.add_argument("--repeats", type=int, default=2,
                  help="timed steps per implementation (median reported)")
  ap.add_argument("--warmup", type=int, default=1,
                  help="untimed steps first (Flax's first one compiles)")
  ap.add_argument("--peak_tflops", type=float, default=0.0,
                  help="peak FLOP/s of this machine in TFLOP/s, for an MFU "
                  "column against it (0: only the measured matmul rate)")
  ap.add_argument("--torch_threads", type=int, default=0,
                  help="torch.set_num_threads (0: PyTorch's default)")
  ap.add_argument("--no_torch", action="store_true",
                  help="time the Flax step only")
  args = ap.parse_args()
  if args.wra and args.task != "itm":
    ap.error("--wra needs --task itm")

  import torch  # pylint: disable=g-import-not-at-top
  import torch_ref as R  # pylint: disable=g-import-not-at-top
  if args.torch_threads > 0:
    torch.set_num_threads(args.torch_threads)
  from uniter_jax import convert  # pylint: disable=g-import-not-at-top
  from uniter_jax import model as um  # pylint: disable=g-import-not-at-top
  from uniter_jax import ot as ot_lib  # pylint: disable=g-import-not-at-top

  rcfg = R.base_config() if args.config == "base" else R.tiny_config()
  b, lt, li = args.batch, args.txt_len, args.num_regions
  tcfg = train_config(accum=1)
  fcfg = um.config.from_official_dict(rcfg.to_dict())
  mcfg = dict(fcfg.to_dict())
  batch = make_batch(args.task, b, lt, li, mcfg["vocab_size"],
                     mcfg["img_dim"], mcfg["img_label_dim"])
  n_slots = b * n_masked_per_row(lt, li, args.task)
  tokens = real_tokens(batch)
  flops = step_flops(mcfg, b, lt, li, args.task, n_slots, wra=args.wra)

  torch.manual_seed(0)
  ref = R.UniterForPretraining(rcfg)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  params = convert.torch_to_flax(sd, "pretrain", fcfg)
  net = um.build_model("pretrain", fcfg)
  fbatch = flax_batch(batch, args.task)
  slots = {"mlm": "mlm_positions", "mrfr": "mrm_positions",
           "mrckl": "mrm_positions"}.get(args.task)

  task_name = args.task + (" + WRA (Flax only)" if args.wra else "")
  print(f"UNITER-{args.config} train step ({task_name}): forward, backward, "
        f"clip {tcfg.grad_norm}, AdamW (eps {tcfg.adam_eps}, betas "
        f"{tuple(tcfg.betas)}, wd {tcfg.weight_decay}); fp32, dropout on")
  print(f"batch B={b} Lt={lt} Li={li} (full rows, {tokens} real tokens)"
        + (f", {n_slots} masked positions" if n_slots else "")
        + (f" (Flax head runs at {b * fbatch[slots].shape[1]} gathered "
           "slots)" if slots else ""))
  print(f"CPU cores {os.cpu_count()}, torch threads "
        f"{torch.get_num_threads()}, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}")
  print(f"analytic model FLOPs per step: {flops['train'] / 1e9:.1f} GFLOP "
        f"(forward {flops['forward'] / 1e9:.1f}: encoder "
        f"{flops['encoder'] / 1e9:.1f}, img_in {flops['img_in'] / 1e9:.2f}, "
        f"head {flops['head'] / 1e9:.2f})")

  rates = matmul_rate()
  peak_measured = max(rates.values())
  print("measured fp32 matmul 2048^3: " + ", ".join(
      f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items())
        + f"  -> MFU reference {peak_measured / 1e9:.1f} GFLOP/s")
  mfu_rates = [peak_measured] + ([args.peak_tflops * 1e12]
                                 if args.peak_tflops > 0 else [])

  # ---- Flax -----------------------------------------------------------
  step, state = make_flax_step(net, params, tcfg, args.task, wra=args.wra)
  step, compile_s, xla_flops = compile_step(step, state, fbatch)
  holder = {"state": state, "loss": []}

  def run_flax():
    new, m = step(holder["state"], fbatch)
    jax.block_until_ready(new)
    holder["state"] = new
    holder["loss"].append(float(m["loss"]))

  fns = {"flax": run_flax}
  if not args.no_torch:
    packed = R.static_to_packed(batch)
    torch_step = make_torch_step(ref, packed, args.task, tcfg)
    tloss = []
    fns["pytorch"] = lambda: tloss.append(torch_step())
  times, warm = time_interleaved(fns, args.warmup, args.repeats)
  if int(holder["state"].bad_step) >= 0:
    raise FloatingPointError("Flax step produced a non-finite loss/grad")
  del warm
  tf, runs_f = statistics.median(times["flax"]), times["flax"]
  if not args.no_torch:
    tt, runs_t = statistics.median(times["pytorch"]), times["pytorch"]

  head = ["impl    ", "  s/step", "   ex/s ", " tokens/s", " GFLOP/s",
          "MFU(matmul)"] + (["MFU(peak)"] if args.peak_tflops > 0 else [])
  print()
  print("  ".join(head))
  print(_row("flax", tf, runs_f, b, tokens, flops["train"], mfu_rates))
  if not args.no_torch:
    print(_row("pytorch", tt, runs_t, b, tokens, flops["train"], mfu_rates))
  print(f"flax compile {compile_s:.1f} s (XLA's own count for the compiled "
        "step: " + (f"{xla_flops / 1e9:.1f} GFLOP" if xla_flops else "n/a")
        + f"); first-step loss flax {holder['loss'][0]:.4f}"
        + ("" if args.no_torch else f", pytorch {tloss[0]:.4f} (same "
           "weights and batch, different dropout masks)"))
  if not args.no_torch:
    print(f"ratio flax/pytorch: examples/s {tt / tf:.2f}x "
          f"({'flax' if tf < tt else 'pytorch'} faster)"
          + ("  [pytorch runs ITM without WRA]" if args.wra else ""))


if __name__ == "__main__":
  main()
