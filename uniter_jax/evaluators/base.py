"""Evaluators chosen by type in the config, and what they are given.

`config.evals` holds one entry per evaluator: `config.evals.<name>.type`
names a registered evaluator class (`EVALUATORS`); the entry's other fields
are its options, except the schedule every evaluator understands:
`every_steps` (default `config.eval.every_steps`): N > 0 runs it every N
updates and after the last one; 0 only after the last update (plots); a
negative value switches it off (`--config.evals.wra_plan.every_steps=-1`). An evaluator
yields `(metric name, value)` pairs; the train loop writes them as one
metrics row per step, and never knows what an evaluator computes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterator, Mapping

import jax


@dataclasses.dataclass
class EvalContext:
  """What an evaluator may use: the model, the tasks, the held-out data.

  Attributes:
    model: the Flax module being trained.
    tasks: task name -> `uniter_jax.tasks.Task` of the run.
    key_task: "{task}_{dataset}" data key -> its task name.
    datasets: held-out `UniterData` per "{task}_{dataset}" key.
    train_datasets: the training `UniterData` per key (may be empty, e.g.
      in `mode=eval`).
    mesh: the device mesh.
    put: host batch -> global batch on the mesh (`train.sharding.to_global`).
    replicated: the replicated sharding of the mesh (outputs of `jit`).
    batch_multiple: global batch sizes must be multiples of this.
    meta: text metadata of the run (vocabulary size, special ids, vocab).
    workdir: the run's directory (metrics, plots, `results/`).
    config: the run config.
    make_data: `make_data(key, split, text=None)` -> a `UniterData` of
      another split (e.g. SNLI-VE's test split, VQA's unlabelled test)
      read for the task of data key `key` with the run's data settings;
      `text` (a tfds name) defaults to that dataset's `val_text`.
  """
  model: Any
  tasks: Mapping[str, Any]
  key_task: Mapping[str, str]
  datasets: Mapping[str, Any]
  train_datasets: Mapping[str, Any]
  mesh: Any
  put: Callable[[Any], Any]
  replicated: Any
  batch_multiple: int
  meta: Mapping[str, Any]
  workdir: str
  config: Any
  make_data: Callable[..., Any] | None = None
  _jitted: dict = dataclasses.field(default_factory=dict)
  _extra_data: dict = dataclasses.field(default_factory=dict)

  def task_of(self, key: str):
    """The task of a "{task}_{dataset}" data key."""
    return self.tasks[self.key_task[key]]

  def data(self, key: str, split: str = "", text: str | None = None):
    """The held-out data of `key` (`split` empty), or that key's task read
    from another split (built once per run and cached)."""
    if not split:
      if key not in self.datasets:
        raise ValueError(f"no held-out data {key!r}; have "
                         f"{sorted(self.datasets)}")
      return self.datasets[key]
    if self.make_data is None:
      raise ValueError("this EvalContext cannot read other splits "
                       "(no make_data)")
    if (key, split, text) not in self._extra_data:
      self._extra_data[key, split, text] = self.make_data(key, split, text)
    return self._extra_data[key, split, text]

  @property
  def is_main(self) -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0

  def jit(self, key: Any, fn: Callable) -> Callable:
    """`jax.jit(fn)` with replicated outputs, compiled once per `key` for
    the whole run (shared by the evaluators)."""
    if key not in self._jitted:
      self._jitted[key] = jax.jit(fn, out_shardings=self.replicated)
    return self._jitted[key]


class Evaluator:
  """Base class: `__init__(ctx, **options)`, `run(params, step)`."""

  type: ClassVar[str] = ""

  def __init__(self, ctx: EvalContext, **options: Any):
    if options:
      raise ValueError(f"evaluator type {self.type!r}: unknown options "
                       f"{sorted(options)}")
    self.ctx = ctx

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    raise NotImplementedError


EVALUATORS: dict[str, type[Evaluator]] = {}


def register_evaluator(cls: type[Evaluator] | None = None, *,
                       overwrite: bool = False):
  """Class decorator adding an evaluator under `cls.type`."""
  def add(c: type[Evaluator]) -> type[Evaluator]:
    if not c.type:
      raise ValueError(f"{c.__name__}: an evaluator needs a type name")
    if c.type in EVALUATORS and EVALUATORS[c.type] is not c and not overwrite:
      raise ValueError(f"evaluator type {c.type!r} is already registered")
    EVALUATORS[c.type] = c
    return c
  return add if cls is None else add(cls)


@dataclasses.dataclass
class Scheduled:
  name: str
  evaluator: Evaluator
  every_steps: int

  @property
  def final_only(self) -> bool:
    return self.every_steps == 0

  def due(self, update: int, done: bool) -> bool:
    if self.every_steps < 0:
      return False
    if done:
      return True
    return self.every_steps > 0 and update % self.every_steps == 0


def from_config(ctx: EvalContext, evals, default_every: int
                ) -> list[Scheduled]:
  """The evaluators of `config.evals`, in name order (switched-off ones are
  not built)."""
  out = []
  for name in sorted(evals.keys()) if evals is not None else []:
    every = evals[name].get("every_steps", None)
    every = int(default_every if every is None else every)
    if every < 0:
      continue
    opts = dict(evals[name].to_dict() if hasattr(evals[name], "to_dict")
                else evals[name])
    kind = opts.pop("type", None)
    if kind not in EVALUATORS:
      raise ValueError(f"config.evals.{name}.type={kind!r}; registered "
                       f"evaluator types: {sorted(EVALUATORS)}")
    opts.pop("every_steps", None)
    try:
      ev = EVALUATORS[kind](ctx, **opts)
    except TypeError as e:
      raise ValueError(f"config.evals.{name} ({kind}): {e}") from e
    out.append(Scheduled(name, ev, every))
  return out


def run_due(scheduled: list[Scheduled], params, update: int, done: bool
            ) -> dict[str, float]:
  out: dict[str, float] = {}
  for s in scheduled:
    if s.due(update, done):
      out.update(s.evaluator.run(params, update))
  return out
