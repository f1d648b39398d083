"""UNITER pretraining: `train_and_evaluate(config, workdir)`.

One readable function in banner-commented sections (set-up, mesh, inputs,
model and optimizer, sharded state, checkpoint restore, steps, loop); the
pieces live in small modules beside this one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from uniter_jax import convert
from uniter_jax import model as um
from uniter_jax import ot as ot_lib
from uniter_jax.model import surgery
from uniter_jax.train import checkpoint as ckpt_lib
from uniter_jax.train import evaluate as eval_lib
from uniter_jax.train import input as input_lib
from uniter_jax.train import metrics as metrics_lib
from uniter_jax.train import optim
from uniter_jax.train import plots
from uniter_jax.train import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # micro-steps done (optimizer updates x accumulation)
  params: Any
  opt_state: Any
  rng: jax.Array         # raw key data (uint32), for checkpointing
  bad_step: jax.Array    # first micro-step with a non-finite loss/grad, or -1


class NonFiniteError(FloatingPointError):
  """A loss or gradient was NaN/inf; the run stopped without saving it."""


def _l2(tree) -> jax.Array:
  return optax.global_norm(tree)


def _train_step(state: TrainState, batch, *, model, tx, task: str,
                grad_scale: float):
  """One micro-step: gradients of `task`'s loss, then the optax update.

  The gradient is taken of `loss * grad_scale`, where `grad_scale` holds the
  official summed-gradient scale and the task's `config.train.loss_weights`
  entry; the reported `loss` is unscaled.

  A non-finite loss or gradient leaves params and optimizer state as they
  were and records the step in `bad_step`; the host checks it at log and
  checkpoint steps, so no host sync happens here.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    loss, metrics = model.apply({"params": params}, batch, task,
                                deterministic=False, compute_loss=True,
                                rngs={"dropout": key})
    return loss * grad_scale, (loss, metrics)

  grads, (loss, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = functools.partial(jax.tree_util.tree_map,
                           lambda new, old: jnp.where(finite, new, old))
  bad = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
  metrics = dict(metrics, loss=loss, l2_grads=_l2(grads),
                 l2_params=_l2(state.params), l2_updates=_l2(updates))
  new = state.replace(step=state.step + 1, params=keep(params,
                                                       state.params),
                      opt_state=keep(opt_state, state.opt_state),
                      bad_step=bad)
  return new, metrics


def _eval_step(params, batch, *, model, task: str):
  _, metrics = model.apply({"params": params}, batch, task,
                           deterministic=True, compute_loss=True)
  return metrics


def _match_scores(params, batch, *, model):
  out = model.apply({"params": params}, batch, "itm", deterministic=True)
  return out["itm_logits"][:, 1].astype(jnp.float32)


def build_model(config, vocab_size: int) -> nn.Module:
  mcfg = config.model.to_dict()
  if mcfg["vocab_size"] < 0:
    mcfg["vocab_size"] = vocab_size
  elif mcfg["vocab_size"] < vocab_size:
    raise ValueError(f"config.model.vocab_size={mcfg['vocab_size']} is "
                     f"smaller than the data's vocabulary ({vocab_size})")
  ot = config.train.ot
  return um.build_model(
      config.model_task, mcfg, itm_ot_lambda=config.train.itm_ot_lambda,
      ot_config=ot_lib.OTConfig(solver=ot.solver, epsilon=ot.epsilon,
                                num_iters=ot.num_iters))


def _host(tree):
  """Global arrays -> numpy on every host (gathers across processes)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _mean_metrics(pending) -> dict[str, float]:
  """Per-task means of the micro-step metrics since the last log."""
  sums: dict[str, list[float]] = {}
  for task, m in jax.device_get(pending):
    for k, v in m.items():
      if k in ("loss", "l2_grads", "l2_params", "l2_updates"):
        sums.setdefault(f"train/{k}", []).append(float(v))
      sums.setdefault(f"train/{task}/{k}", []).append(float(v))
  return {k: float(np.mean(v)) for k, v in sums.items()}


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves a checkpoint and returns."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM,):
      self._old[s] = signal.signal(s, self._set)
    return self

  def _set(self, signum, frame):  # pylint: disable=unused-argument
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def _maybe_init_distributed(config) -> None:
  d = config.distributed
  if not d.enabled or jax.distributed.is_initialized():
    return
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes > 0:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  # Cross-process collectives of the CPU backend (harmless on GPU/TPU). Must
  # not touch the backend before initialize().
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, float]:
  """Pretrains (resuming from `workdir` if it holds a checkpoint).

  Returns the last evaluation metrics.
  """
  # ---------------------------------------------------------------- set-up
  _maybe_init_distributed(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  tcfg = config.train
  accum = int(tcfg.gradient_accumulation_steps)
  total_micro = int(tcfg.num_train_steps) * accum

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  n_batch = sharding.batch_size_multiple(mesh)
  multiple = int(np.lcm.reduce([n_batch, jax.process_count(),
                                 max(1, config.data.batch_multiple)]))
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape),
               mesh.size, jax.process_count())

  # ----------------------------------------------------------------- inputs
  if is_main:
    input_lib.maybe_build_synthetic(config)
  multihost_utils.sync_global_devices("synthetic data ready")
  train_data = input_lib.make_datasets(
      config, split_field="split", text_field="text",
      token_budget=tcfg.token_budget * n_batch, batch_multiple=multiple,
      seed=config.seed)
  val_data = input_lib.make_datasets(
      config, split_field="val_split", text_field="val_text",
      token_budget=tcfg.token_budget * n_batch, batch_multiple=multiple,
      seed=config.seed + 1)
  meta = input_lib.vocab_info({**train_data, **val_data})
  pool = input_lib.task_pool(config)

  # ------------------------------------------------- model and optimizer
  model = build_model(config, int(meta["vocab_size"]))
  rng = jax.random.key(config.seed)
  init_batch = um.dummy_batch(model.cfg, "pretrain", n_batch, 8, 4)
  init_params = lambda: model.init({"params": rng, "dropout": rng},  # pylint: disable=g-long-lambda
                                   init_batch)["params"]
  tx = optim.make_optimizer(tcfg, jax.eval_shape(
      lambda: nn.unbox(init_params())))

  def init_state(boxed: bool):
    def fn():
      params = init_params()
      state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state=tx.init(params),
                         rng=jax.random.key_data(rng),
                         bad_step=jnp.full((), -1, jnp.int32))
      return state if boxed else nn.unbox(state)
    return fn

  with jax.set_mesh(mesh), nn.logical_axis_rules(config.logical_axis_rules):
    # ------------------------------------------ shardings, then the state
    abstract, state_sh = sharding.state_shardings(init_state(True), mesh,
                                                  config.logical_axis_rules)
    ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint.keep)
    latest = ckpt.latest_step()
    data_state: dict[str, Any] = {}
    if latest is not None:
      state, data_state = ckpt.restore(latest, abstract)
      logging.info("resumed from %s at update %d", ckpt.directory, latest)
    else:
      state = jax.jit(init_state(False), out_shardings=state_sh)()
      if config.init_checkpoint:
        state = state.replace(params=jax.device_put(
            _init_params(config, model, state.params), state_sh.params))
        logging.info("initialised from %s", config.init_checkpoint)

    # ------------------------------------------------------- step functions
    grad_scale = float(n_batch) if tcfg.sum_grads else 1.0
    rep = sharding.replicated(mesh)
    train_steps = {
        t: jax.jit(functools.partial(
            _train_step, model=model, tx=tx, task=t,
            grad_scale=grad_scale * float(tcfg.loss_weights[t])),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))
        for t in {k.split("_", 1)[0] for k in pool}}
    eval_steps = {}

    def eval_step(task):
      if task not in eval_steps:
        eval_steps[task] = jax.jit(functools.partial(
            _eval_step, model=model, task=task), out_shardings=rep)
      return eval_steps[task]

    score_fn = jax.jit(functools.partial(_match_scores, model=model),
                       out_shardings=rep)

    def evaluate(step: int) -> dict[str, float]:
      out = dict(eval_lib.task_metrics(
          eval_step, state.params, val_data, mesh, config.eval.max_batches,
          tcfg.mlm_prob, tcfg.mrm_prob))
      if config.eval.retrieval_images > 0 and val_data:
        first = val_data[sorted(val_data)[0]]
        out.update(eval_lib.zero_shot_retrieval(
            score_fn, state.params, first, mesh,
            config.eval.retrieval_images, multiple))
      writer.write(step, out)
      return out

    # ----------------------------------------------------------------- loop
    iters = {k: d.iterator(num_epochs=None, num_threads=config.data.num_threads,
                           prefetch=config.data.prefetch)
             for k, d in train_data.items()}
    for k, s in data_state.get("iterators", {}).items():
      iters[k].set_state(s)
    writer = metrics_lib.MetricWriter(workdir)
    config_json = json.loads(config.to_json_best_effort())

    def save(update: int):
      ckpt.save(update, state, {"iterators": {k: it.get_state()
                                              for k, it in iters.items()}},
                config_json)

    step = int(jax.device_get(state.step))
    if config.mode == "eval":
      if latest is None:
        raise FileNotFoundError(f"config.mode='eval': no checkpoint in "
                                f"{ckpt.directory}")
      out = evaluate(step // accum)
      writer.close()
      ckpt.close()
      return out
    if config.mode != "train":
      raise ValueError(f"config.mode={config.mode!r}; expected 'train' or "
                       "'eval'")
    last_eval: dict[str, float] = {}
    pending: list = []
    t0, examples, tokens = time.perf_counter(), 0, 0
    progress = _progress(is_main, total_micro // accum, step // accum)
    with _StopFlag() as stop:
      while step < total_micro:
        update = step // accum
        key = input_lib.task_for_update(pool, config.seed, update)
        task = key.split("_", 1)[0]
        batch = input_lib.with_positions(next(iters[key]), task,
                                         tcfg.mlm_prob, tcfg.mrm_prob)
        examples += batch["input_ids"].shape[0] * jax.process_count()
        tokens += int(batch["attn_masks"].sum()) * jax.process_count()
        state, m = train_steps[task](state, sharding.to_global(batch, mesh))
        pending.append((task, m))
        step += 1
        if step % accum:
          continue
        update = step // accum
        progress.update(1)
        done = step >= total_micro
        if update % config.log_every_steps == 0 or done or stop.signum:
          _check_finite(state, task, ckpt)
          row = _mean_metrics(pending)
          dt = time.perf_counter() - t0
          row.update({"train/lr": float(optim.learning_rate_at(
              tcfg, update - 1)), "train/examples_per_sec": examples / dt,
                      "train/tokens_per_sec": tokens / dt,
                      "train/updates_per_sec": len(pending) / accum / dt})
          writer.write(update, row)
          progress.set_postfix(loss=f"{row['train/loss']:.3f}")
          pending, t0, examples, tokens = [], time.perf_counter(), 0, 0
        if update % config.eval.every_steps == 0 or done:
          last_eval = evaluate(update)
          t0 = time.perf_counter()
        if update % config.checkpoint.every_steps == 0 or done or stop.signum:
          _check_finite(state, task, ckpt)
          save(update)
        if stop.signum:
          logging.warning("signal %d: saved update %d, stopping", stop.signum,
                          update)
          break
    progress.close()
    writer.close()
    ckpt.close()
    # The converter-format export is written by one process with orbax's
    # single-host path; multi-process runs keep only the checkpoints.
    params = (_host(state.params)
              if step >= total_micro and jax.process_count() == 1 else None)
    if step >= total_micro and jax.process_count() > 1 and is_main:
      logging.warning("multi-process run: export_flax/ and plots are not "
                      "written; the final state is in %s", ckpt.directory)

  # ------------------------------------------------------ export and plots
  if params is not None and is_main:
    convert.save_flax(os.path.join(workdir, "export_flax"),
                      convert.unscan_params(params), "pretrain", model.cfg.as_configdict().to_dict(),
                      overwrite=True)
    if config.plots:
      _plots(workdir, model, params, val_data or train_data, meta, config)
  return last_eval


def _init_params(config, model, fresh):
  """Params from `config.init_checkpoint`, adapted to the model's task."""
  base = {k: model.cfg[k] for k in um.config.OFFICIAL_FIELDS}
  spec = um.head_spec(config.model_task)
  base["vocab_size"] -= spec.extra_vocab
  base["type_vocab_size"] = config.model.type_vocab_size
  src_task = config.init_checkpoint_task
  _, loaded = convert.load_checkpoint(
      config.init_checkpoint, src_task, model_config=base,
      scan_layers=bool(config.model.scan_layers))
  if src_task == config.model_task:
    return loaded
  return surgery.adapt_params(loaded, _host(fresh), config.model_task,
                              jax.random.key(config.seed + 17),
                              model.cfg.initializer_range)


def _check_finite(state: TrainState, task: str,
                  ckpt: ckpt_lib.Checkpointer) -> None:
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    raise NonFiniteError(
        f"non-finite loss or gradient at micro-step {bad} (task '{task}' or "
        f"earlier since the last log); that update was not applied and the "
        f"run stops here. The last good checkpoint is update "
        f"{ckpt.latest_step()} in {ckpt.directory}.")


def _progress(enabled: bool, total: int, initial: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, disable=not enabled,
              unit="update", dynamic_ncols=True, desc="pretrain")


def _plots(workdir, model, params, datasets, meta, config) -> None:
  """Loss curves and the WRA plan of one held-out matched pair."""
  pdir = os.path.join(workdir, "plots")
  plots.loss_curves(metrics_lib.read_metrics(workdir),
                    os.path.join(pdir, "loss_curves.png"))
  data = datasets[sorted(datasets)[0]]
  ex = data.text.example(0)
  batch = {
      "input_ids": ex["input_ids"][None],
      "position_ids": np.arange(len(ex["input_ids"]), dtype=np.int32)[None],
      "img_feat": ex["img_feat"][None],
      "img_pos_feat": ex["img_pos_feat"][None],
      "attn_masks": np.ones((1, len(ex["input_ids"]) + len(ex["img_feat"])),
                            np.int32),
  }
  out = model.apply({"params": params}, batch, "itm")
  lt = len(ex["input_ids"])
  tv = np.ones((1, lt), bool)
  iv = np.ones((1, len(ex["img_feat"])), bool)
  ot = config.train.ot
  cfg = ot_lib.OTConfig(solver=ot.solver, epsilon=ot.epsilon,
                        num_iters=ot.num_iters)
  cost = ot_lib.cosine_cost(out["txt_output"], out["img_output"])
  plan = np.asarray(ot_lib.sinkhorn_plan(cost, tv, iv, cfg)
                    if cfg.solver == "sinkhorn" else
                    ot_lib.ipot_plan(cost, tv, iv, cfg))[0]
  vocab = meta.get("vocab")
  words = [vocab[i] if vocab and i < len(vocab) else str(i)
           for i in ex["input_ids"].tolist()]
  match = float(jax.nn.softmax(out["itm_logits"])[0, 1])
  plots.transport_plan(plan, words, os.path.join(pdir, "wra_plan.png"),
                       f"WRA transport plan, held-out pair "
                       f"{ex.get('_id', '')} (ITM match prob {match:.2f})")
