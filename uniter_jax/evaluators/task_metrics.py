"""`task_metrics`: each task's own metrics on its held-out batches."""

from __future__ import annotations

import functools
from typing import Iterator

import jax

from uniter_jax.evaluators.base import Evaluator, register_evaluator
from uniter_jax.train import step as step_lib


@register_evaluator
class TaskMetrics(Evaluator):
  """Mean of every task's `loss` metrics over its validation batches.

  For each "{task}_{dataset}" held-out set, the first `max_batches` batches
  of its epoch-0 plan (all of them when `max_batches` <= 0) go through the
  task's `eval_step`; metrics average over batches weighted as the task's
  `metric_weights` say (e.g. MLM accuracy by the number of masked tokens).
  Yields `val/{key}/{metric}`.
  """

  type = "task_metrics"

  def __init__(self, ctx, *, max_batches: int = 50):
    super().__init__(ctx)
    self.max_batches = int(max_batches)

  def _step(self, key: str):
    task = self.ctx.task_of(key)
    return self.ctx.jit(("eval_step", task.name), functools.partial(
        step_lib.eval_step, model=self.ctx.model, task=task))

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    del step
    for key in sorted(self.ctx.datasets):
      data = self.ctx.datasets[key]
      task = self.ctx.task_of(key)
      n = data.batches_per_epoch
      if self.max_batches > 0:
        n = min(n, self.max_batches)
      fn = self._step(key)
      outs = [fn(params, self.ctx.put(data.load_batch(i))) for i in range(n)]
      sums: dict[str, float] = {}
      weights: dict[str, float] = {}
      wkeys = task.metric_weights
      for m in jax.device_get(outs):
        for name, v in m.items():
          w = float(m[wkeys[name]]) if name in wkeys else 1.0
          sums[name] = sums.get(name, 0.0) + float(v) * w
          weights[name] = weights.get(name, 0.0) + w
      hidden = set(task.hidden_metrics)
      for name in sorted(sums):
        if name in hidden:
          continue
        yield f"val/{key}/{name}", sums[name] / max(weights[name], 1e-9)
