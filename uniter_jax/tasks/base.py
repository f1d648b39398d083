"""The task protocol: what a training objective declares, and its registry.

A task is the unit of extension. It names

* the model head it trains (`heads`, names in `uniter_jax.model.HEADS`)
  and what it asks that head to compute (`head_output`);
* its per-example data ops (`data_ops`, run in the input pipeline after the
  text-image join) and batch ops (`batch_ops`, run on the collated batch);
* its batch fields (`fields`, `uniter_jax.data.contract.Field`s beyond the
  base layout), checked at the pipeline boundary;
* its loss over the model's outputs (`loss(outputs, batch) -> (loss,
  metrics)`), and how its metrics average over batches (`metric_weights`);
* the parameters its head adds when it starts from another head's
  checkpoint (`new_params`, globs over '/'-joined parameter paths).

The train loop, the checkpointing and the mesh never name a task: they call
these methods. One registry (`TASKS`) maps a name to a task class; a config
names tasks by these names (`config.datasets.<name>.tasks`), and a task
reads its own options from the config (`from_config`).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

import jax

from uniter_jax.data import contract

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


class Task:
  """One training objective. Subclass it, set the class attributes, write
  `loss`, and register it with `@register_task`."""

  name: ClassVar[str] = ""
  # Model heads (keys of uniter_jax.model.HEADS) this task can train.
  heads: ClassVar[tuple[str, ...]] = ()
  # Passed to the model as its second argument (e.g. which pretraining head
  # to run); None calls the model with the batch alone.
  head_output: ClassVar[str | None] = None
  # Rows of the batch per example (NLVR2 paired: 2, VCR: 4).
  rows_per_example: ClassVar[int] = 1
  # How a record of several images counts its regions for bucketing:
  # "max" (each row holds one image: NLVR2 paired) or "sum" (one row holds
  # them all: NLVR2 triplet); see `UniterData(row_regions=)`.
  row_regions: ClassVar[str] = "max"
  # Batch fields beyond `contract.BASE_FIELDS` that this task's ops and
  # batch ops produce.
  fields: ClassVar[tuple[contract.Field, ...]] = ()
  # The image store must also load the detector soft labels.
  with_soft_labels: ClassVar[bool] = False
  # Globs of parameters the head adds (allowed to start fresh when the
  # initial checkpoint is another head's).
  new_params: ClassVar[tuple[str, ...]] = ()
  # metric -> the metric that weights it when averaging over batches
  # (unweighted mean otherwise).
  metric_weights: ClassVar[Mapping[str, str]] = {}
  # Metrics that are bookkeeping: averaged as weights but not reported.
  hidden_metrics: ClassVar[tuple[str, ...]] = ()

  def __init__(self, *, loss_weight: float = 1.0, **options: Any):
    if options:
      raise TypeError(f"task {self.name!r}: unknown options {sorted(options)}")
    self.loss_weight = float(loss_weight)

  @classmethod
  def from_config(cls, config) -> "Task":
    """The task with its options read from a run config."""
    return cls(loss_weight=loss_weight_of(config, cls.name))

  # -- data -----------------------------------------------------------------
  def data_ops(self) -> Mapping[str, Callable]:
    """Per-example ops `op(example, rng, ctx) -> example`, in order."""
    return {}

  def op_params(self) -> dict[str, Any]:
    """Hyper-parameters the ops read from their context (`ctx.<name>`)."""
    return {}

  def batch_ops(self) -> tuple[Callable[[dict], dict], ...]:
    """Functions `batch -> batch` run on each collated host batch."""
    return ()

  def batch_fields(self) -> tuple[contract.Field, ...]:
    """Every field a batch of this task may hold (the batch contract)."""
    return tuple(contract.BASE_FIELDS) + tuple(self.fields)

  # -- model ----------------------------------------------------------------
  def outputs(self, model, params, batch: Batch, *, deterministic: bool = True,
              rngs: Mapping[str, jax.Array] | None = None) -> dict:
    """The model's output dict for this task's head."""
    args = () if self.head_output is None else (self.head_output,)
    return model.apply({"params": params}, batch, *args,
                       deterministic=deterministic, rngs=rngs or {})

  def loss(self, outputs: Mapping[str, jax.Array], batch: Batch
           ) -> tuple[jax.Array, Metrics]:
    """`(scalar loss, metrics)` of a batch, float32."""
    raise NotImplementedError(f"task {self.name!r} defines no loss")

  def check_head(self, head: str) -> None:
    if self.heads and head not in self.heads:
      raise ValueError(f"task {self.name!r} trains the heads {self.heads}, "
                       f"but the model is '{head}' (config.model_task)")


def loss_weight_of(config, name: str) -> float:
  """`config.train.loss_weights[name]`, 1.0 when the config sets none."""
  weights = config.train.get("loss_weights", None) if config else None
  if weights is None:
    return 1.0
  return float(weights.get(name, 1.0))


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task] | None = None, *, overwrite: bool = False):
  """Class decorator adding a task to `TASKS` under `cls.name`."""
  def add(c: type[Task]) -> type[Task]:
    if not c.name:
      raise ValueError(f"{c.__name__}: a task needs a name")
    if c.name in TASKS and TASKS[c.name] is not c and not overwrite:
      raise ValueError(f"task {c.name!r} is already registered "
                       f"({TASKS[c.name].__name__})")
    TASKS[c.name] = c
    return c
  return add if cls is None else add(cls)


def get_task_class(name: str) -> type[Task]:
  try:
    return TASKS[name]
  except KeyError:
    raise ValueError(f"unknown task {name!r}; registered tasks: "
                     f"{sorted(TASKS)}") from None


def make_task(name: str, config=None, **options) -> Task:
  """Task `name` with options from `config` (or given directly)."""
  cls = get_task_class(name)
  if config is not None and options:
    raise TypeError(f"make_task({name!r}): give a config or options, not "
                    "both (the config's values would be ignored)")
  return cls.from_config(config) if config is not None else cls(**options)


def make_tasks(names: Sequence[str], config) -> dict[str, Task]:
  return {n: make_task(n, config) for n in names}
