"""One run per workdir: an advisory lock on `<workdir>/.lock`.

Two runs writing one workdir interleave their checkpoints and metrics and
delete each other's checkpoints (`keep`), so the second one must stop before
it writes anything. The lock is an `fcntl.flock` on `<workdir>/.lock`: the
kernel drops it when the holding process ends, however it ends, so a run
killed by SIGKILL, the OOM killer or a node reboot never leaves a stale lock
that blocks its restart. The file itself stays (removing it would let two
processes lock two different files of one name); it holds the holder's PID,
host and start time so the refusal can say who holds it.

Multi-process runs: only process 0 takes the lock (the processes of one run
share the workdir by design); the trainer calls this only where
`jax.process_index() == 0`. This module needs only the standard library.

Limits: `flock` is per host on filesystems without distributed locking. On
NFSv4 Linux maps it to NFS byte-range locks, so it works across hosts; a
filesystem without locks (Lustre mounted without `-o flock`) refuses it, and
then the run goes on unlocked with one warning rather than not at all. Child
processes started with fork (data loader workers) inherit the lock and hold
it until they exit too.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
import sys
import time

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """Exclusive use of a workdir for as long as this object holds it.

      with WorkdirLock(workdir):
        ...               # the whole run

  or `lock = WorkdirLock(workdir).acquire()` ... `lock.release()`. A second
  acquirer, in this process or any other, gets `WorkdirBusyError` at once
  (it never waits: a run that waited hours for another to finish would
  surprise more than one that says why it did not start).
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd: int | None = None
    self.locked = False   # False also after a filesystem refused locking

  def acquire(self) -> WorkdirLock:
    """Takes the lock or raises `WorkdirBusyError` naming its holder."""
    if self._fd is not None:
      raise RuntimeError(f"{self.path} is already held by this WorkdirLock; "
                         f"release it before acquiring it again")
    os.makedirs(self.workdir, exist_ok=True)
    # Not inherited across exec (Python opens non-inheritable fds), so
    # run.py's subprocesses do not keep the lock alive after it dies.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirBusyError(_busy_message(self.workdir, holder)) from None
      if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP,
                     errno.EINVAL):
        logging.warning("%s: this filesystem cannot lock files (%s); the "
                        "run goes on, but nothing stops a second run on this "
                        "workdir", self.path, os.strerror(e.errno))
        self._fd = fd
        return self
      os.close(fd)
      raise
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = (f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
            f"since={since}\ncommand={' '.join(sys.argv)[:500]}\n")
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    os.fsync(fd)
    self._fd, self.locked = fd, True
    return self

  def release(self) -> None:
    """Clears the holder's identity and unlocks; a no-op when not held."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      if self.locked:
        # Cleared before unlocking, so no reader sees a released lock's
        # identity as if it were the current holder's.
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      self.locked = False
      os.close(fd)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> dict[str, str]:
  """The holder's `key=value` lines. A holder that has just locked may not
  have written them yet, so an empty file is read again for a moment."""
  for _ in range(20):
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    if text.strip():
      return dict(line.split("=", 1) for line in text.splitlines()
                  if "=" in line)
    time.sleep(0.025)
  return {}


def _busy_message(workdir: str, holder: dict[str, str]) -> str:
  if "pid" not in holder:
    return (f"{workdir} is in use by another process (its identity is not "
            f"in {os.path.join(workdir, LOCK_NAME)} yet); wait for it or use "
            f"another --workdir")
  pid, host = holder["pid"], holder.get("host", "?")
  since = holder.get("since", "unknown time")
  note = ""
  if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
    # The kernel drops a dead process's lock, so a child that inherited it
    # (a forked worker) still runs.
    note = (f"; PID {pid} has exited, so a process it forked still holds "
            f"the lock: find it with `fuser {os.path.join(workdir, LOCK_NAME)}`")
  return (f"{workdir} is in use by PID {pid} on host {host} (since {since})"
          f"{note}; wait for it or use another --workdir")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
