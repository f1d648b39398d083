"""The train loop: `train_and_evaluate(config, workdir)`.

One readable function in banner-commented sections (set-up, mesh, tasks and
inputs, model and optimizer, sharded state, checkpoint restore, steps,
evaluators, loop, export); the pieces live in small modules beside this one,
the objectives in `uniter_jax.tasks` and the evaluators in
`uniter_jax.evaluators`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from uniter_jax import convert
from uniter_jax import evaluators
from uniter_jax import model as um
from uniter_jax import processor as processor_lib
from uniter_jax import supervisor
from uniter_jax.train import checkpoint as ckpt_lib
from uniter_jax.train import input as input_lib
from uniter_jax.train import metrics as metrics_lib
from uniter_jax.train import optim
from uniter_jax.train import sharding
from uniter_jax.train import step as step_lib
from uniter_jax.train import workdir as workdir_lib
from uniter_jax.train.step import TrainState


# Loggers of the libraries a run uses. At INFO they bury the run's own lines:
# orbax writes dozens per checkpoint save, tensorflow_datasets one per
# dataset opened, jax probes its backends. orbax and tfds log through absl's
# logger ("absl").
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "jaxlib", "flax", "optax",
                   "tensorflow", "tensorflow_datasets", "etils", "grain",
                   "array_record", "tensorboardX", "matplotlib", "PIL",
                   "asyncio", "urllib3", "fsspec", "h5py", "torch")


def set_log_levels(library_level: int | str = logging.WARNING,
                   own_level: int | str = logging.INFO) -> None:
  """Shows the run's own log lines from `own_level` and the libraries'
  (`LIBRARY_LOGGERS`) from `library_level`.

  The run's lines go through the root logger, so it gets the lower of the
  two levels and each library logger its own. `run.py` calls this (its
  `--log_level` flag sets `library_level`); code that calls
  `train_and_evaluate` itself may.
  """
  lib = logging.getLevelName(library_level.upper()) if isinstance(
      library_level, str) else int(library_level)
  own = logging.getLevelName(own_level.upper()) if isinstance(
      own_level, str) else int(own_level)
  if not isinstance(lib, int) or not isinstance(own, int):
    raise ValueError(f"unknown log level {library_level!r} or {own_level!r}")
  logging.getLogger().setLevel(min(lib, own))
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(lib)


class NonFiniteError(FloatingPointError):
  """A loss or gradient was NaN/inf; the run stopped without saving it."""


class PeerLostError(RuntimeError):
  """Another process of a multi-process run died or became unreachable.

  The process that raises it must exit without JAX's shutdown barrier,
  which would wait for the dead peer and then abort (`run.py` does so).
  """


# Words of the runtime errors that mean a peer is gone: gloo's broken
# connections and the coordination service's heartbeat verdicts.
_PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer",
                      "heartbeat", "unhealthy", "Gloo", "UNAVAILABLE")


def build_model(config, vocab_size: int) -> nn.Module:
  mcfg = config.model.to_dict()
  if mcfg["vocab_size"] < 0:
    mcfg["vocab_size"] = vocab_size
  elif mcfg["vocab_size"] < vocab_size:
    raise ValueError(f"config.model.vocab_size={mcfg['vocab_size']} is "
                     f"smaller than the data's vocabulary ({vocab_size})")
  return um.build_model(config.model_task, mcfg)


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
  """Set by a stop request; the loop saves a checkpoint and returns.

  SIGTERM (what Kubernetes, most schedulers and TPU VM preemption send
  before the kill), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's `--signal=USR1@T`
  warning) all ask the run to finish the current update, save and exit 0. A
  second Ctrl-C raises KeyboardInterrupt at once (nothing more is saved).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in self.SIGNALS:
      self._old[s] = signal.signal(s, self._set)
    return self

  def _set(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt("second Ctrl-C: stopping without saving")
    self.signum = signum
    logging.warning("%s received: finishing this update, saving a "
                    "checkpoint, then stopping%s",
                    signal.Signals(signum).name,
                    " (Ctrl-C again quits at once)"
                    if signum == signal.SIGINT else "")

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def _should_stop(stop, sync_point: bool) -> bool:
  """Whether every process stops after this update.

  One process alone: as soon as it got a stop request. Several processes:
  a request reaches some of them only (or at different updates), and a
  process that stops alone leaves the others waiting in a collective, so
  they agree at the log steps (`sync_point`), where they all meet anyway.
  """
  asked = stop.signum is not None
  if jax.process_count() == 1:
    return asked
  if not sync_point:
    return False
  flags = multihost_utils.process_allgather(np.asarray([int(asked)],
                                                       np.int32))
  return bool(np.any(flags))


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
  supervisor.report_process(jax.process_index(), jax.process_count())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       config_name: str | None = None) -> dict[str, float]:
  """Trains the tasks of `config` (resuming from `workdir` if it holds a
  checkpoint), or evaluates the latest checkpoint when `config.mode` is
  "eval". Returns the last evaluation metrics.

  `config_name` (e.g. "configs/demo.py:runlocal") names the config in the
  line logged at the start, which also gives the devices, the mesh, the
  data and whether the run starts fresh or resumes. Training rows go to
  `<workdir>/metrics.jsonl` and TensorBoard; `mode=eval` writes its row to
  `<workdir>/eval_metrics.jsonl` and leaves the training history alone.

  Nothing here names a task: the tasks (`uniter_jax.tasks`) declare their
  head, data, loss and metrics; the evaluators (`uniter_jax.evaluators`) are
  chosen by type in `config.evals`.
  """
  # ---------------------------------------------------------------- set-up
  if config.mode not in ("train", "eval"):
    raise ValueError(f"config.mode={config.mode!r}; expected 'train' or "
                     "'eval'")
  tasks = input_lib.make_run_tasks(config)
  _maybe_init_distributed(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  # One run per workdir: a second one stops here, naming the holder. Only
  # process 0 holds the lock; the kernel drops it when the process dies.
  lock = (workdir_lib.WorkdirLock(workdir).acquire()
          if jax.process_index() == 0 else None)
  try:
    return _run(config, workdir, tasks, lock, config_name or "config")
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1 or not any(m in str(e)
                                            for m in _PEER_LOST_MARKERS):
      raise
    raise PeerLostError(_peer_lost_message(e, workdir)) from e
  finally:
    if lock is not None:
      lock.release()


def _peer_lost_message(err: Exception, workdir: str) -> str:
  """One line: which process lost which, why, and where to resume from."""
  me, n = jax.process_index(), jax.process_count()
  peer = re.search(r"\[([0-9a-fA-F.:]+)\]:(\d+)", str(err))
  who = (f"process {1 - me}" if n == 2 else "another process") + (
      f" (at {peer.group(1)}:{peer.group(2)})" if peer else "")
  first = str(err).strip().splitlines()[0][:160]
  return supervisor.peer_lost_message(me, n, who, first, workdir)


def _run(config, workdir: str, tasks, lock, config_name: str
         ) -> dict[str, float]:
  """The body of `train_and_evaluate`, with the workdir locked."""
  training = config.mode == "train"
  is_main = jax.process_index() == 0
  if is_main and training:
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

  # ----------------------------------------------------------------- inputs
  budget = tcfg.token_budget * n_batch
  train_data = input_lib.make_datasets(
      config, tasks, split_field="split", text_field="text",
      token_budget=budget, batch_multiple=multiple,
      seed=config.seed) if training else {}
  val_data = input_lib.make_datasets(
      config, tasks, split_field="val_split", text_field="val_text",
      token_budget=budget, batch_multiple=multiple, seed=config.seed + 1,
      held_out=True)
  if not train_data and not val_data:
    raise ValueError("config.mode='eval' needs held-out data: no dataset "
                     "in config.datasets has a val_split")
  meta = input_lib.vocab_info({**train_data, **val_data})
  pool = input_lib.task_pool(config, {k: len(d.text) for k, d in
                                      train_data.items()}) if training else []
  key_task = {key: task for key, task, _ in input_lib.task_keys(config)}

  # ------------------------------------------------- model and optimizer
  model = build_model(config, int(meta["vocab_size"]))
  rng = jax.random.key(config.seed)
  init_batch = um.dummy_batch(model.cfg, config.model_task, n_batch, 8, 4)
  init_params = lambda: model.init({"params": rng, "dropout": rng},  # pylint: disable=g-long-lambda
                                   init_batch)["params"]
  tx = optim.make_optimizer(tcfg, jax.eval_shape(
      lambda: nn.unbox(init_params())))

  def init_state(boxed: bool):
    def fn():
      state = step_lib.create_state(init_params(), tx, rng)
      return state if boxed else nn.unbox(state)
    return fn

  with jax.set_mesh(mesh), nn.logical_axis_rules(config.logical_axis_rules):
    # ------------------------------------------ shardings, then the state
    abstract, state_sh = sharding.state_shardings(init_state(True), mesh,
                                                  config.logical_axis_rules)
    # Restores the newest checkpoint that restores (a damaged one is
    # skipped with a warning, never deleted); leftovers of a save killed
    # midway are removed while the lock is held.
    ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint.keep,
                                 remove_partial_saves=lock is not None)
    found = ckpt.restore_latest(abstract)
    latest = None
    data_state: dict[str, Any] = {}
    if found is not None:
      latest, state, data_state = found
    elif not training and not config.init_checkpoint:
      ckpt.close()
      raise FileNotFoundError(
          f"config.mode='eval': no checkpoint in {ckpt.directory} and no "
          "config.init_checkpoint to evaluate")
    if is_main:
      logging.info("%s", _start_line(
          config, config_name, mesh, key_task, train_data, val_data,
          latest, ckpt.directory))
    if found is None:
      # Fresh training, or evaluating `init_checkpoint` as it is (e.g. an
      # official finetuned .pt) when the workdir holds no checkpoint.
      state = jax.jit(init_state(False), out_shardings=state_sh)()
      if config.init_checkpoint:
        state = state.replace(params=_init_params(
            config, model, tasks, state.params, state_sh.params))

    # ------------------------------------------------------- step functions
    grad_scale = float(n_batch) if tcfg.sum_grads else 1.0
    rep = sharding.replicated(mesh)
    train_steps = {
        t: jax.jit(functools.partial(step_lib.train_step, model=model,
                                     task=tasks[t], grad_scale=grad_scale),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))
        for t in {key_task[k] for k in pool}} if training else {}

    # ------------------------------------------------------------ evaluators
    ctx = evaluators.EvalContext(
        model=model, tasks=tasks, key_task=key_task, datasets=val_data,
        train_datasets=train_data, mesh=mesh,
        put=functools.partial(sharding.to_global, mesh=mesh), replicated=rep,
        batch_multiple=multiple, meta=meta, workdir=workdir, config=config,
        make_data=functools.partial(
            _eval_data, config, tasks, key_task, budget=budget,
            multiple=multiple))
    scheduled = evaluators.base.from_config(ctx, config.evals,
                                            config.eval.every_steps)
    # A resumed run logs again every update after its checkpoint: rows a
    # crashed run wrote past it are dropped (and purged from TensorBoard).
    # An evaluation of the workdir writes apart from the training history:
    # a row of its own, no TensorBoard point at an update already logged.
    if training:
      writer = metrics_lib.MetricWriter(workdir, resume_step=latest or 0)
      extra = {}
    else:
      writer = metrics_lib.MetricWriter(
          workdir, filename=metrics_lib.EVAL_METRICS_FILE, tensorboard=False)
      extra = {"evaluated": (os.path.join(ckpt.directory, str(latest))
                             if latest is not None else
                             str(config.init_checkpoint))}

    def evaluate(update: int, done: bool) -> dict[str, float]:
      """Runs the due evaluators; those that only run at the end (plots)
      go after the final row is written, so they see it."""
      regular = [s for s in scheduled if not s.final_only]
      out = {}
      if any(s.due(update, done) for s in regular):
        out = evaluators.base.run_due(regular, state.params, update, done)
        writer.write(update, {**extra, **out})
      if done:
        final = evaluators.base.run_due(
            [s for s in scheduled if s.final_only], state.params, update,
            done)
        if final:
          writer.write(update, {**extra, **final})
          out.update(final)
      return out

    step = int(jax.device_get(state.step))
    if not training:
      out = evaluate(step // accum, True)
      writer.close()
      ckpt.close()
      return out

    # ----------------------------------------------------------------- loop
    # The host's input worker processes are shared out over the training
    # datasets (each iterator gets its own).
    workers = input_lib.num_workers(config)
    per_iter = -(-workers // len(train_data)) if workers else 0
    iters = {k: d.iterator(num_epochs=None, num_workers=per_iter)
             for k, d in train_data.items()}
    for k, s in data_state.get("iterators", {}).items():
      iters[k].set_state(s)
    config_json = json.loads(config.to_json_best_effort())

    def save(update: int):
      ckpt.save(update, state, {"iterators": {k: it.get_state()
                                              for k, it in iters.items()}},
                config_json)

    last_eval: dict[str, float] = {}
    pending: list = []
    # Throughput leaves out what is not training: steps that compile (the
    # first of each task and batch shape), evaluations and saves.
    timer = metrics_lib.Throughput()
    compiled: set = set()

    def untimed():
      # JAX dispatches steps asynchronously: the device finishes the steps
      # already sent before the untimed block starts, inside the window.
      jax.block_until_ready(state)
      return timer.untimed()

    with _progress(is_main, total_micro // accum,
                   step // accum) as progress, _StopFlag() as stop:
      while step < total_micro:
        update = step // accum
        key = input_lib.task_for_update(pool, config.seed, update)
        task = key_task[key]
        batch = next(iters[key])
        # Examples, not rows (an NLVR2 pair is 2 rows, a retrieval
        # example 2 x (1 + negatives)).
        examples = (batch["input_ids"].shape[0] * jax.process_count()
                    // train_data[key].rows_per_example)
        tokens = int(batch["attn_masks"].sum()) * jax.process_count()
        shapes = (task, _batch_shapes(batch))
        global_batch = sharding.to_global(batch, mesh)
        if shapes in compiled:
          state, m = train_steps[task](state, global_batch)
          timer.count(examples, tokens)
        else:
          with untimed() as took:
            state, m = train_steps[task](state, global_batch)
            jax.block_until_ready(m)
          compiled.add(shapes)
          if is_main:
            _log_compile(task, batch, took["secs"],
                         first=sum(t == task for t, _ in compiled) == 1)
        pending.append((task, m))
        step += 1
        if step % accum:
          continue
        update = step // accum
        progress.update(1)
        done = step >= total_micro
        stopping = _should_stop(stop, update % config.log_every_steps == 0
                                or done)
        if update % config.log_every_steps == 0 or done or stopping:
          _check_finite(state, task, ckpt)
          row = _mean_metrics(pending)
          row["train/lr"] = float(optim.learning_rate_at(tcfg, update - 1))
          row.update(timer.rates(accum))
          writer.write(update, row)
          progress.set_postfix(loss=f"{row['train/loss']:.3f}")
          pending = []
          timer.restart()
        if any(s.due(update, done) for s in scheduled):
          with untimed():
            last_eval = evaluate(update, done) or last_eval
        if update % config.checkpoint.every_steps == 0 or done or stopping:
          _check_finite(state, task, ckpt)
          with untimed():
            save(update)
        if stopping:
          logging.warning("stop requested: saved update %d in %s; rerun the "
                          "same command to resume", update, ckpt.directory)
          break
    for it in iters.values():
      it.close()   # stops input worker processes
    writer.close()
    ckpt.close()
    # The converter-format export is written by one process with orbax's
    # single-host path; multi-process runs keep only the checkpoints.
    params = (jax.device_get(state.params)
              if step >= total_micro and jax.process_count() == 1 else None)
    if step >= total_micro and jax.process_count() > 1 and is_main:
      logging.warning("multi-process run: export_flax/ is not written; the "
                      "final state is in %s", ckpt.directory)

  # ------------------------------------------------------------- export
  if params is not None and is_main:
    # Self-describing: the vocabulary (when the data records one) and the
    # text/region settings travel with the weights (`Processor.
    # from_pretrained`, `load_checkpoint(dir)` need nothing else).
    convert.save_flax(os.path.join(workdir, "export_flax"),
                      convert.unscan_params(params), config.model_task,
                      _base_model_config(config, model), overwrite=True,
                      vocab=meta.get("vocab"),
                      text_config=processor_lib.text_config_from_meta(
                          meta, max_txt_len=config.data.max_txt_len,
                          region_rule=input_lib.region_rule(config)))
  return last_eval


def _batch_shapes(batch) -> tuple:
  """What a jitted step compiles for besides the state: the batch's array
  shapes and dtypes (a new one means a new program)."""
  return tuple((k, np.shape(v), str(getattr(v, "dtype", type(v).__name__)))
               for k, v in sorted(batch.items()))


def _log_compile(task: str, batch, secs: float, first: bool) -> None:
  """The first program of a task at INFO (why the first update is slow);
  later batch shapes at DEBUG (up to one per bucket)."""
  rows, lt = np.shape(batch["input_ids"])[:2]
  li = np.shape(batch["img_feat"])[1] if "img_feat" in batch else 0
  logging.log(logging.INFO if first else logging.DEBUG,
              "%s: compiled the train step for %d rows x (%d tokens + %d "
              "regions) in %.1f s; steps that compile are left out of the "
              "throughput figures", task, rows, lt, li, secs)


def _start_line(config, config_name: str, mesh, key_task, train_data,
                val_data, latest: int | None, ckdir: str) -> str:
  """One line: config, mode, devices and mesh, data, fresh or resumed."""
  dev = jax.devices()[0]
  n = mesh.size
  devices = f"{n} {dev.platform} device{'s' if n != 1 else ''}"
  if dev.platform != "cpu":
    devices += f" ({dev.device_kind})"
  if jax.process_count() > 1:
    devices += f" in {jax.process_count()} processes"
  mesh_s = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  steps = int(config.train.num_train_steps)
  if config.mode == "train":
    what = f"train {steps} updates"
  else:
    what = "eval"
  parts = [config_name, f"{what} on {devices}, mesh {mesh_s}"]
  for label, data in (("train data", train_data), ("held out", val_data)):
    if data:
      parts.append(f"{label}: {_data_summary(data, key_task)}")
  init = str(config.init_checkpoint or "")
  if config.mode == "eval":
    start = (f"evaluates update {latest} ({os.path.join(ckdir, str(latest))})"
             if latest is not None else
             f"evaluates init_checkpoint {init} as it is (no checkpoint in "
             f"{ckdir})")
  elif latest is not None:
    start = f"resumes from update {latest} ({os.path.join(ckdir, str(latest))})"
    if latest >= steps:
      start += f"; finished already (num_train_steps={steps})"
  elif init:
    start = f"starts fresh from init_checkpoint {init}"
  else:
    start = "starts fresh from a random init"
  parts.append(start)
  return " | ".join(parts)


def _data_summary(datasets, key_task) -> str:
  """"<tfds name>[<split>] N examples (tasks)" per text split read."""
  by_name: dict[str, tuple[int, list[str]]] = {}
  for key in sorted(datasets):
    d = datasets[key]
    by_name.setdefault(d.name, (len(d.text), []))[1].append(key_task[key])
  return ", ".join(f"{name} {n} examples ({', '.join(tasks)})"
                   for name, (n, tasks) in by_name.items())


def _eval_data(config, tasks, key_task, key: str, split: str,
               text: str | None = None, *, budget: int, multiple: int):
  """Another split of data key `key`, read as its held-out data is."""
  name = key[len(key_task[key]) + 1:]
  ds = config.datasets[name]
  return input_lib.make_dataset(
      config, tasks[key_task[key]], text or ds.val_text, split,
      token_budget=budget, batch_multiple=multiple, seed=config.seed + 1,
      held_out=True)


def _base_model_config(config, model) -> dict[str, Any]:
  """The official model config of `model` before its head's changes (the
  VCR heads add 81 words), as the converter records it."""
  base = {k: model.cfg[k] for k in um.config.OFFICIAL_FIELDS}
  base["vocab_size"] -= um.head_spec(config.model_task).extra_vocab
  base["type_vocab_size"] = config.model.type_vocab_size
  return base


def _init_params(config, model, tasks, fresh, shardings):
  """Params from `config.init_checkpoint` (an official `.pt`, a converted
  directory or a training workdir), adapted to the model's head and placed
  leaf by leaf on `shardings`. Parameters the checkpoint lacks must be
  declared new by a task (`Task.new_params`); every one is reported."""
  path = os.path.expanduser(config.init_checkpoint)
  allow_new = sorted({p for t in tasks.values() for p in t.new_params})
  params, report = convert.load_init_params(
      path, head=config.model_task, model_cfg=model.cfg, target=fresh,
      shardings=shardings,
      src_head=config.init_checkpoint_task if os.path.isfile(path) else None,
      allow_new=allow_new, rng=jax.random.key(config.seed + 17))
  for line in report.lines():
    logging.info("%s", line)
  return params


def _check_finite(state: TrainState, task: str,
                  ckpt: ckpt_lib.Checkpointer) -> None:
  """Stops the run (before anything is saved) when a step was not finite."""
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    last = ckpt.latest_step()
    where = (f"The last good checkpoint is update {last} in {ckpt.directory}."
             if last is not None else "No checkpoint was written.")
    raise NonFiniteError(
        f"non-finite loss, gradient or updated state at micro-step {bad} "
        f"(task '{task}' or earlier since the last log); that update was not "
        f"applied and the run stops here. {where}")


class _ClearBar(logging.Filter):
  """Clears the progress bar before a log line is written, so the line
  starts on a clean line instead of after the bar (the bar redraws at its
  next update)."""

  def __init__(self, bar):
    super().__init__()
    self._bar = bar

  def filter(self, record) -> bool:
    self._bar.clear()
    return True


@contextlib.contextmanager
def _progress(enabled: bool, total: int, initial: int):
  """The tqdm bar of the loop; log lines written meanwhile clear it first."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=total, initial=initial, disable=not enabled,
             unit="update", dynamic_ncols=True, desc="train")
  handlers = list(logging.getLogger().handlers) if enabled else []
  clear = _ClearBar(bar)
  for h in handlers:
    h.addFilter(clear)
  try:
    yield bar
  finally:
    for h in handlers:
      h.removeFilter(clear)
    bar.close()
