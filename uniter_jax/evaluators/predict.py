"""Every held-out example once: model outputs per example, result files.

Finetuning evaluators (VQA score, NLVR2 accuracy and consistency, SNLI-VE
accuracy, prediction files) must see each example of a split exactly once,
on any number of devices and hosts. `exact_outputs` runs a jitted function
over `UniterData.exact_batches()` and returns its outputs per kept record,
padding rows dropped; `write_result` writes a result file atomically on
the main process.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

RESULTS_DIR = "results"


def exact_outputs(ctx, data, fn: Callable[[Any, Mapping[str, Any]],
                                          Mapping[str, jax.Array]],
                  params, *, jit_key: Any) -> tuple[np.ndarray,
                                                    dict[str, np.ndarray]]:
  """`fn(params, batch)` on every kept example of `data` exactly once.

  Args:
    ctx: the `EvalContext` (mesh placement, jit cache).
    data: a `UniterData` (its `exact_batches` are read).
    fn: traceable `(params, global batch) -> {name: array}`; each array's
      leading dim is the batch's rows B (per row) or its examples
      E = B / rows_per_example (per example, e.g. NLVR2 paired logits).
    params: the model parameters.
    jit_key: key of the compiled function in `ctx.jit` (one per `fn`).

  Returns:
    `(indices, outputs)`: the kept-record indices in ascending order (each
    once; `data.text.example(i)` / `data.text` ids give the records), and
    per output name an array `[n, ...]` in that order; per-row outputs of
    multi-row examples come back `[n, rows_per_example, ...]`.
  """
  rpe = int(data.rows_per_example)

  def with_index(p, batch):
    return (fn(p, batch), batch["example_index"], batch["example_mask"])

  run = ctx.jit(("exact_outputs", jit_key), with_index)
  pending = [run(params, ctx.put(b)) for b in data.exact_batches()]
  indices, parts = [], {}
  for out, index, mask in jax.device_get(pending):
    index = np.asarray(index)[::rpe]
    keep = np.asarray(mask)[::rpe]
    rows, examples = len(index) * rpe, len(index)
    for name, value in out.items():
      value = np.asarray(value)
      if value.shape[:1] == (rows,) and rpe > 1:
        value = value.reshape((examples, rpe) + value.shape[1:])
      elif value.shape[:1] != (examples,):
        raise ValueError(f"{data.name}: output {name!r} has shape "
                         f"{value.shape}; expected {rows} rows or "
                         f"{examples} examples first")
      parts.setdefault(name, []).append(value[keep])
    indices.append(index[keep])
  if not indices:
    return np.zeros(0, np.int64), {}
  idx = np.concatenate(indices)
  order = np.argsort(idx, kind="stable")
  idx = idx[order]
  if len(idx) != len(np.unique(idx)):
    raise AssertionError(f"{data.name}: an example was scored twice")
  return idx, {k: np.concatenate(v)[order] for k, v in parts.items()}


def record_ids(data, indices: np.ndarray) -> list[str]:
  """The record ids (`id` field) of kept records `indices`."""
  return [data.text.record_id(int(i)) for i in indices]


def result_path(ctx, filename: str) -> str:
  """`<workdir>/results/<filename>`."""
  return os.path.join(ctx.workdir, RESULTS_DIR, filename)


def write_result(ctx, filename: str, content: str | bytes) -> str | None:
  """Writes `<workdir>/results/<filename>` on the main process (complete
  or not at all: a temporary file renamed into place); returns the path
  there, None on other processes."""
  if not ctx.is_main:
    return None
  path = result_path(ctx, filename)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  mode = "wb" if isinstance(content, bytes) else "w"
  with open(tmp, mode) as f:
    f.write(content)
  os.replace(tmp, path)
  return path
