"""Metrics: JSON lines and TensorBoard event files, written by process 0.

`Throughput` turns the examples, tokens and updates of a log window into
rates per second, leaving out the time of steps that compiled a program
(and of evaluations and saves), so the first window of a run or of a new
batch shape reports the training speed, not the compiler's.

A run can die anywhere: inside a `write` (leaving a torn last line), or
after logging updates its last checkpoint does not hold (a resume replays
them). `MetricWriter(workdir, resume_step=S)` therefore cuts both files
back to update S before appending, and `read_metrics` tolerates what an
older run or a hand-edited file may still contain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping, MutableMapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
# Rows of `config.mode=eval` runs: kept apart from the training history, so
# evaluating a finished run adds no second row for its last update.
EVAL_METRICS_FILE = "eval_metrics.jsonl"


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)):
    return v.item() if np.ndim(v) == 0 else v.tolist()
  return v


def _parse(line: str) -> dict[str, Any] | None:
  """The row on `line`, or None when it is not a JSON object (torn)."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  return row if isinstance(row, dict) else None


def _read_rows(path: str) -> tuple[list[tuple[str, dict[str, Any]]], int]:
  """`(line, row)` of every JSON-object line of `path`, and how many lines
  were torn (not a JSON object); blank lines are neither."""
  good, torn = [], 0
  if os.path.exists(path):
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if not line.strip():
          continue
        row = _parse(line)
        if row is None:
          torn += 1
        else:
          good.append((line, row))
  return good, torn


def _step(row: Mapping[str, Any]) -> int | None:
  s = row.get("step")
  return int(s) if isinstance(s, (int, float)) and not isinstance(
      s, bool) else None


class MetricWriter:
  """Appends `{"step": s, ...}` lines to `<workdir>/metrics.jsonl` and
  writes the scalars to TensorBoard under `<workdir>/tensorboard/`.

  `resume_step`: the update of the checkpoint the run starts from (0 for a
  fresh training run), or None to keep every existing row (evaluation of a
  finished run). Rows with `step > resume_step` are dropped before anything
  is appended, since the run is about to log those updates again, and
  TensorBoard is told to hide its events from `resume_step + 1` on. A torn
  last line is dropped in any case: appending after it would glue the next
  row onto it.

  `filename`: the JSON-lines file in the workdir (`EVAL_METRICS_FILE` for
  `config.mode=eval`); `tensorboard=False` writes no events (an evaluation
  of a finished run would otherwise put a second point at its last update).
  """

  def __init__(self, workdir: str, resume_step: int | None = None, *,
               filename: str = METRICS_FILE, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._repair(resume_step)
      if not tensorboard:
        return
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # tensorboardX names event files by the second they were opened; a
      # restart within that second would reopen (and truncate) the previous
      # file. The nanosecond suffix keeps the names distinct and still in
      # opening order, which is the order TensorBoard applies purges in.
      self._tb = SummaryWriter(
          os.path.join(workdir, "tensorboard"),
          purge_step=None if resume_step is None else int(resume_step) + 1,
          filename_suffix=f".{time.time_ns()}")

  def _repair(self, resume_step: int | None) -> None:
    """Rewrites metrics.jsonl without torn lines and, when resuming, without
    the rows after `resume_step`. The rewrite goes to a temporary file in the
    same directory and replaces the original in one rename, so a crash
    during the repair leaves the old file whole."""
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8", errors="replace") as f:
      lines = f.readlines()
    good, torn = _read_rows(self.path)
    keep, after = [], 0
    for line, row in good:
      step = _step(row)
      if resume_step is not None and step is not None and step > resume_step:
        after += 1
        continue
      keep.append(line if line.endswith("\n") else line + "\n")
    if not torn and not after and (not lines or lines[-1].endswith("\n")):
      return
    d = os.path.dirname(os.path.abspath(self.path))
    fd, tmp = tempfile.mkstemp(prefix=f".{METRICS_FILE}.tmp-", dir=d)
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
      os.chmod(tmp, os.stat(self.path).st_mode & 0o7777)
      os.replace(tmp, self.path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    parts = []
    if after:
      parts.append(f"{after} row{'s' if after != 1 else ''} after update "
                   f"{resume_step} (the run resumes from its checkpoint and "
                   f"logs them again)")
    if torn:
      parts.append(f"{torn} torn line{'s' if torn != 1 else ''}")
    logging.log(logging.WARNING if torn else logging.INFO,
                "%s: dropped %s; %d rows kept", self.path,
                " and ".join(parts), len(keep))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    for k, v in row.items():
      if self._tb is not None and k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Throughput:
  """Examples, tokens and updates per second over one log window.

  The trainer `count`s every micro-step it times and wraps what must not
  count in `untimed()`: a step that compiles a program (the first of each
  task and of each new batch shape: tracing and XLA compilation take
  seconds to minutes, the step itself milliseconds), an evaluation, a
  checkpoint save. Those steps' examples are not counted either, so the
  rates are those of the timed steps alone. The caller makes the device
  finish the steps dispatched before an untimed block (JAX dispatches
  asynchronously), so their time stays in the window.

  `clock` (seconds, monotonic) is replaceable for tests.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self.restart()

  def restart(self) -> None:
    """Starts a new window (after a log row)."""
    self._t0 = self._clock()
    self._untimed = 0.0
    self.examples = self.tokens = self.micro_steps = 0

  def count(self, examples: int, tokens: int) -> None:
    """One timed micro-step of `examples` examples and `tokens` tokens."""
    self.examples += int(examples)
    self.tokens += int(tokens)
    self.micro_steps += 1

  @contextlib.contextmanager
  def untimed(self) -> Iterator[dict[str, float]]:
    """Leaves the time of the block out of the window; yields a dict whose
    "secs" holds that time once the block ends (for a log line)."""
    out = {"secs": 0.0}
    t = self._clock()
    try:
      yield out
    finally:
      out["secs"] = self._clock() - t
      self._untimed += out["secs"]

  def rates(self, accumulation_steps: int = 1) -> dict[str, float]:
    """`train/{examples,tokens,updates}_per_sec` of the timed micro-steps
    since `restart`; empty when none was timed (a window that only
    compiled), rather than a rate made of compile time."""
    dt = self._clock() - self._t0 - self._untimed
    if not self.micro_steps or dt <= 0:
      return {}
    return {"train/examples_per_sec": self.examples / dt,
            "train/tokens_per_sec": self.tokens / dt,
            "train/updates_per_sec": (self.micro_steps / accumulation_steps
                                      / dt)}


def read_metrics(workdir: str, stats: MutableMapping[str, int] | None = None
                 ) -> list[dict[str, Any]]:
  """The rows of `<workdir>/metrics.jsonl`, in file order.

  A line that is not a JSON object (a crash inside a write) is skipped, so a
  finished run still plots. When a later row has the same step as an earlier
  one and shares a key with it, the later row wins: it was logged by the run
  that resumed and replayed that update. Rows of one step with disjoint keys
  (training and evaluation) are all kept. Skips are logged as one warning;
  `stats`, when given, receives the counts {"rows", "torn", "duplicates"}.
  """
  path = os.path.join(workdir, METRICS_FILE)
  rows: list[dict[str, Any] | None] = []
  by_step: dict[int, list[int]] = {}
  good, torn = _read_rows(path)
  dup = 0
  for _, row in good:
    step = _step(row)
    if step is not None:
      keys = row.keys() - {"step"}
      for i in by_step.get(step, []):
        if rows[i] is not None and keys & rows[i].keys():
          rows[i] = None
          dup += 1
      by_step.setdefault(step, []).append(len(rows))
    rows.append(row)
  out = [r for r in rows if r is not None]
  if torn or dup:
    logging.warning("%s: skipped %d torn line%s and %d duplicate row%s (a "
                    "later row of the same step replaces each); %d rows read",
                    path, torn, "" if torn == 1 else "s", dup,
                    "" if dup == 1 else "s", len(out))
  if stats is not None:
    stats.update(rows=len(out), torn=torn, duplicates=dup)
  return out
