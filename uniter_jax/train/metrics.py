"""Metrics: JSON lines and TensorBoard event files, written by process 0."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)):
    return v.item() if np.ndim(v) == 0 else v.tolist()
  return v


class MetricWriter:
  """Appends `{"step": s, ...}` lines to `<workdir>/metrics.jsonl` and
  writes the scalars to TensorBoard under `<workdir>/tensorboard/`."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
