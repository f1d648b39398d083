"""Orbax checkpoints of the train state, data-iterator state and config.

One checkpoint per saved step under `<workdir>/checkpoints/<step>/` with
three items: `state` (params, optimizer state, step, RNG), `data` (the
JSON state of every data iterator) and `config`. Orbax writes each step to
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` when complete, so a
run killed while saving leaves the previous checkpoint as the latest one;
only integer names are steps, so a leftover temporary directory is never
taken for a checkpoint (and the next save of that step replaces it).

What clusters do to checkpoints, and what this module does about it:
- A newest checkpoint that does not restore (a file lost or cut short):
  `restore_latest` falls back to the newest one that does, logging one line
  per step it skips. Nothing is deleted; the next `save` renames the skipped
  steps to `<step>.unrestorable-<time>` so they neither block that save nor
  count against `keep`.
- A save that fails (disk full, quota, I/O error): its partial temporary
  directory is removed, the earlier checkpoints are untouched, and one
  `CheckpointWriteError` says where, how much it needs and how much is free.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import gc
import logging
import os
import shutil
import sys
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

# The name orbax 0.12 gives a step being written (`<step>` + this); older
# releases appended `-<timestamp>`. Anything containing it is a partial save.
TMP_MARK = ".orbax-checkpoint-tmp"
# Steps that did not restore are renamed `<step>` + this + a time stamp.
ASIDE_MARK = ".unrestorable-"


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the earlier ones are intact.

  `errno` is ENOSPC or EDQUOT when the filesystem is full, else None.
  Orbax's own exception is not chained (pages of tensorstore internals);
  it is logged at DEBUG level."""


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist but none of them restores."""


class Checkpointer:
  """Saves/restores the train state with its data state and config.

  `remove_partial_saves=True` deletes the `*.orbax-checkpoint-tmp*`
  directories that earlier runs left when killed mid-save (they can hold as
  much as a whole checkpoint). Pass it only while holding the workdir's
  lock (`workdir.WorkdirLock`): without it, they may be another live run's
  saves in progress.
  """

  def __init__(self, workdir: str, keep: int, *,
               remove_partial_saves: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if remove_partial_saves and jax.process_index() == 0:
      self._remove_partial_saves()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "data", "config"))
    # step -> why it did not restore; set by restore_latest.
    self._unrestorable: dict[int, str] = {}

  def steps(self) -> list[int]:
    """Saved steps, oldest first, less those found not to restore."""
    return sorted(s for s in self.manager.all_steps()
                  if s not in self._unrestorable)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step. Temporary directories of
    unfinished saves are never steps; after `restore_latest` this also
    skips the steps it found damaged, so it names the last good one."""
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_state: dict,
           config_json: dict) -> None:
    """Writes checkpoint `step`, or raises `CheckpointWriteError` (one line)
    having removed this save's partial output."""
    self._set_aside_unrestorable()
    err = None
    with _worker_noise_muted():
      try:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_json)), force=True)
        self.manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-exception-caught
        if jax.process_index() == 0:
          self._remove_partial_saves(step)
        err = self._write_error(step, state, e)
      if err is not None:
        # Outside the except block, so `err` does not chain orbax's error;
        # collected now, while muted, so its orphaned writer tasks do not
        # print "Task exception was never retrieved" tracebacks later.
        gc.collect()
    if err is not None:
      raise err

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Checkpoint `step` as (state, data_state); orbax's errors as they are."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[int, Any, dict] | None:
    """The newest checkpoint that restores, as (step, state, data_state).

    None when there is no checkpoint. A step that fails to restore is
    logged in one line (its path, the exception type and message) and the
    next older one is tried; nothing is deleted. Raises
    `CheckpointRestoreError` when checkpoints exist but none restores. Out
    of memory is raised as it is: an older checkpoint is no smaller.
    """
    tried = []
    for step in reversed(self.steps()):
      why = None
      with _worker_noise_muted():
        try:
          state, data_state = self.restore(step, abstract_state)
        except Exception as e:  # pylint: disable=broad-exception-caught
          if _out_of_memory(e):
            raise
          why = _short(e)
        if why is not None:
          gc.collect()   # while muted: see `save`
      if jax.process_count() > 1 and not _everywhere(why is None):
        # One process's reads failed (its shards), another's did not: all
        # skip the step, or they would resume from different steps.
        why = why or "did not restore on another process"
      if why is None:
        return step, state, data_state
      self._unrestorable[step] = why
      tried.append(step)
      logging.warning("checkpoint %s does not restore (%s); trying the one "
                      "before it", self._path(step), why)
    if not tried:
      return None
    raise CheckpointRestoreError(
        f"no checkpoint in {self.directory} restores (tried steps "
        f"{', '.join(map(str, tried))}; the warnings above say why); move "
        f"them out of the way to start afresh, or use another --workdir")

  def close(self) -> None:
    self.manager.close()

  # ------------------------------------------------------------ internals

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _set_aside_unrestorable(self) -> None:
    """Renames the steps restore_latest skipped, once, before the next save:
    the resumed run is about to write those step numbers again, and orbax
    would refuse an existing step and count them against `keep`."""
    if not self._unrestorable:
      return
    if jax.process_index() == 0:
      stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
      for step in sorted(self._unrestorable):
        src = self._path(step)
        if os.path.isdir(src):
          dst = f"{src}{ASIDE_MARK}{stamp}"
          os.rename(src, dst)
          logging.warning("moved checkpoint %s, which does not restore, to "
                          "%s (kept for inspection; delete it when done)",
                          src, dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("uniter_checkpoint_set_aside")
    self._unrestorable.clear()
    self.manager.reload()

  def _remove_partial_saves(self, step: int | None = None) -> None:
    """Removes the partial saves of `step` (None: of every step)."""
    if not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      if TMP_MARK not in name:
        continue
      if step is not None and name.split(TMP_MARK)[0] != str(step):
        continue
      path = os.path.join(self.directory, name)
      logging.warning("removing %s, a checkpoint save that did not finish",
                      path)
      shutil.rmtree(path, ignore_errors=True)

  def _write_error(self, step: int, state: Any,
                   e: Exception) -> CheckpointWriteError:
    path = self._path(step)
    need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
    try:
      free = f"{shutil.disk_usage(self.directory).free} bytes"
    except OSError:
      free = "an unknown number of bytes"
    latest = self.latest_step()
    resume = (f"rerun to resume from step {latest}" if latest is not None
              else "rerun")
    code = _space_errno(e)
    if code is not None:
      what = ("no space left on its filesystem" if code == errno.ENOSPC
              else "disk quota exceeded")
      msg = (f"checkpoint {path} not written: {what} (it needs about {need} "
             f"bytes ({need / 2**20:.1f} MiB), {free} are free there); free "
             f"space or lower config.checkpoint.keep, then {resume}")
    else:
      msg = (f"checkpoint {path} not written: {_short(e)} (it needs about "
             f"{need} bytes, {free} are free there); the earlier "
             f"checkpoints are intact; {resume}")
    err = CheckpointWriteError(msg)
    err.errno = code
    logging.debug("checkpoint save failed", exc_info=e)
    return err


def _chain(e: BaseException | None) -> Iterator[BaseException]:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _space_errno(e: BaseException) -> int | None:
  """ENOSPC/EDQUOT if the failure is a full filesystem. Tensorstore reports
  it as a ValueError whose text carries the OS error code."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
      return x.errno
    text = str(x)
    for code in (errno.ENOSPC, errno.EDQUOT):
      if (os.strerror(code) in text or f"os_error_code='{code}'" in text):
        return code
  return None


def _out_of_memory(e: BaseException) -> bool:
  return any(isinstance(x, MemoryError) or "out of memory" in str(x).lower()
             for x in _chain(e))


def _short(e: BaseException, limit: int = 240) -> str:
  """`Type: first line`, without tensorstore's spec dump, at most `limit`."""
  text = (str(e).strip().splitlines() or [""])[0]
  text = text.split(" [tensorstore_spec=")[0]
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _MuteSaveErrors(logging.Filter):
  """Drops the ERROR tracebacks of a failing save's workers: orbax logs one
  per writer thread and asyncio one per orphaned writer future, hundreds
  for a real model, all the same error that `save` raises once."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    msg = str(record.msg)
    return not (("raised an exception" in msg and "orbax" in record.pathname)
                or "exception was never retrieved" in msg)


def _closed_loop_noise(unraisable) -> bool:
  """The `RuntimeError: Event loop is closed` that each tensorstore write
  still in flight raises when it completes after orbax gave up on the save
  and closed its event loop: one bare traceback per array, no news."""
  exc = unraisable.exc_value
  return (unraisable.object is None and isinstance(exc, RuntimeError)
          and str(exc) == "Event loop is closed")


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective: all must call)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.process_allgather(np.array(ok)).all())


@contextlib.contextmanager
def _worker_noise_muted():
  """Mutes what a failing save's or restore's worker threads print (see
  above) while it runs; the error itself is raised or logged once."""
  loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
  f = _MuteSaveErrors()
  for lg in loggers:
    lg.addFilter(f)
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not _closed_loop_noise(unraisable):
      previous_hook(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    if sys.unraisablehook is hook:
      sys.unraisablehook = previous_hook
    for lg in loggers:
      lg.removeFilter(f)
