"""One line, not a native abort, when a peer of a multi-process run dies.

When one process of a `jax.distributed` job dies, JAX's coordination
service notices it too, and its client thread terminates every survivor
at once with a native abort (exit 134, a fatal log line and a Python stack
dump). Nothing in the process can run after that: the client's
`missed_heartbeat_callback` that would replace the abort cannot be given a
Python function (jaxlib 0.10 throws `std::bad_cast` when calling it), and a
handler for SIGABRT cannot run Python before the process is gone. Which of
the two wins, that abort or the trainer's own error from its next
collective, is a race: the leader's death reaches the survivors' client
thread as fast as it reaches their collectives.

So `run.py` runs each process of a multi-process job as a child of a small
supervisor (`run`), which holds no JAX state:

- the child's stderr passes through the supervisor line by line. From the
  coordination service's fatal line on, the rest (the stack dump) is held
  back, and when the child exits the supervisor prints one line naming the
  lost process and the workdir's last checkpoint, and exits 1;
- the child tells the supervisor its process index and count through a
  pipe (`report_process`), for that line;
- SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGHUP and SIGQUIT sent to the
  supervisor reach the child exactly once: the child has its own process
  group, so a terminal's Ctrl-C reaches only the supervisor, which passes
  it on;
- if the supervisor is killed (SIGKILL included), the kernel kills the
  child (`PR_SET_PDEATHSIG`), so killing the process a scheduler started
  still ends the run;
- otherwise the supervisor ends as the child did: its exit code, or the
  same signal (after one line naming it). After a failure, what is left
  of the child's process group (its input worker processes) is killed.

Only the standard library is used here, so the supervisor costs no JAX
import and no accelerator. Linux only (`PR_SET_PDEATHSIG`); elsewhere
`run.py` runs the process directly.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading

# Set in the child's environment: the pipe's write end, for report_process.
CHILD_ENV = "UNITER_JAX_SUPERVISOR_FD"
# The start of the coordination client's fatal line (jaxlib's client.h).
FATAL_MARKER = b"JAX distributed service detected fatal errors"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGHUP, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1


def available() -> bool:
  """Whether `run` can supervise here (Linux, and not already a child)."""
  return sys.platform.startswith("linux") and CHILD_ENV not in os.environ


def last_checkpoint(workdir: str) -> str:
  """Where a restart resumes from, listed from the directory alone (with a
  peer gone, nothing that may wait for the other processes can run)."""
  ckdir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in (os.listdir(ckdir) if os.path.isdir(ckdir)
                                  else []) if d.isdigit())
  return (f"the last checkpoint is update {steps[-1]} in {ckdir}" if steps
          else "no checkpoint was written")


def peer_lost_message(me, count, lost: str, reason: str,
                      workdir: str) -> str:
  """The one line a survivor prints: who lost whom, why, where to resume."""
  who = "this process" if me is None else f"process {me} of {count}"
  return (f"{who} lost {lost}: {reason}; {last_checkpoint(workdir)}; "
          "restart every process to resume")


def report_process(index: int, count: int) -> None:
  """In a supervised child: tells the supervisor its process index and the
  process count (called once `jax.distributed` is up). No-op otherwise."""
  fd = os.environ.pop(CHILD_ENV, None)
  if fd is None:
    return
  try:
    os.write(int(fd), f"{index} {count}\n".encode())
    os.close(int(fd))
  except OSError:
    pass


def parse_fatal(text: str, me) -> tuple[str, str]:
  """(the lost process, the reason) from the coordination client's fatal
  line and what follows it."""
  status = text.split("absl::Status:", 1)[-1].strip()
  # The status's first sentence, e.g. "UNAVAILABLE: Failed to send RPC to
  # coordination service".
  reason = (status.splitlines()[0].split(". ")[0].strip().rstrip(".")
            if status else "the coordination service reported a fatal error")
  if ("leader task" in status
      or "Failed to send RPC to coordination service" in status):
    return "process 0 (the coordinator)", reason[:200]
  ids = re.findall(r"task:(\d+)", status)
  if not ids and "stopped sending heartbeats" in status:
    after = status.split("stopped sending heartbeats", 1)[1]
    ids = re.findall(r"^\s*(\d+)\s*$", after, re.M)
  ids = sorted({int(i) for i in ids} - ({me} if me is not None else set()))
  if ids:
    return ("process " + ", ".join(map(str, ids)) if len(ids) == 1 else
            "processes " + ", ".join(map(str, ids))), reason[:200]
  return "another process", reason[:200]


def _die_with_parent(parent: int):
  def prepare():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:   # the supervisor died before prctl
      os._exit(1)  # pylint: disable=protected-access
  return prepare


def run(cmd: list[str], workdir: str) -> int:
  """Runs `cmd` as a supervised child (see the module docstring); returns
  the exit code to end with (or ends by the child's signal)."""
  r, w = os.pipe()
  env = dict(os.environ)
  env[CHILD_ENV] = str(w)
  child = subprocess.Popen(  # pylint: disable=subprocess-popen-preexec-fn
      cmd, env=env, stderr=subprocess.PIPE, pass_fds=(w,), process_group=0,
      preexec_fn=_die_with_parent(os.getpid()))
  os.close(w)
  os.set_blocking(r, False)   # read after the child ends, whatever holds w

  def forward(signum, frame):  # pylint: disable=unused-argument
    if child.poll() is None:
      child.send_signal(signum)
  for s in FORWARDED:
    signal.signal(s, forward)

  fatal: list[bytes] = []

  def relay():
    out = sys.stderr.buffer
    for line in iter(child.stderr.readline, b""):
      if fatal or FATAL_MARKER in line:
        fatal.append(line)   # the abort's own lines and the stack dump
        continue
      out.write(line)
      out.flush()
  relay_thread = threading.Thread(target=relay, daemon=True)
  relay_thread.start()
  rc = child.wait()
  # Processes the child started (input workers) share its process group
  # and its stderr; after a failure, none may outlive it and keep the pipe
  # open.
  relay_thread.join(timeout=5)
  if rc != 0:
    try:
      os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    relay_thread.join(timeout=5)
  with os.fdopen(r, "rb") as f:
    told = (f.read() or b"").split()
  me, count = (int(told[0]), int(told[1])) if len(told) == 2 else (None,
                                                                    None)
  if fatal and rc != 0:
    lost, reason = parse_fatal(b"".join(fatal).decode(errors="replace"), me)
    print("error: " + peer_lost_message(me, count, lost, reason, workdir),
          file=sys.stderr, flush=True)
    return 1
  if rc < 0:
    sig = signal.Signals(-rc)
    who = "" if me is None else f"process {me} of {count}: "
    print(f"error: {who}the training process (pid {child.pid}) was killed by "
          f"signal {-rc} ({sig.name}); {last_checkpoint(workdir)}",
          file=sys.stderr, flush=True)
    try:
      signal.signal(sig, signal.SIG_DFL)
    except OSError:           # SIGKILL, SIGSTOP: no handler to reset
      pass
    os.kill(os.getpid(), sig)
  return rc
