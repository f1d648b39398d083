"""run.py's supervisor: a dead peer of a multi-process run ends the
survivors in one line, not JAX's native abort; signals and deaths pass
through the supervisor (uniter_jax/supervisor.py)."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import multiproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What jaxlib 0.10's coordination client prints before it aborts, in the
# two cases (copied from real runs of this project): the leader (process 0,
# which hosts the coordination service) died; or the leader's service saw
# process 1 stop sending heartbeats.
LEADER_DIED = (
    "F1202 00:35:43.656926   26311 client.h:80] Terminating process because "
    "the JAX distributed service detected fatal errors. This most likely "
    "indicates that another task died; see the other task logs for more "
    "details. Disable Python buffering, i.e. `python -u`, to be sure to see "
    "all the previous output. absl::Status: UNAVAILABLE: Failed to send RPC "
    "to coordination service. Either the leader task was preempted/died/"
    "restarted unexpectedly or this task is experiencing network issues.\n"
    "Additional GRPC error information from remote target "
    "coordination_service while calling "
    "/xla.coordination.CoordinationService/PollForError:\n")
PEER_SILENT = (
    "F1202 00:38:14.750931   27292 client.h:80] Terminating process because "
    "the JAX distributed service detected fatal errors. This most likely "
    "indicates that another task died; see the other task logs for more "
    "details. Disable Python buffering, i.e. `python -u`, to be sure to see "
    "all the previous output. absl::Status: UNAVAILABLE: The following tasks "
    "are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed. "
    "Check the task logs for an earlier error, or scheduler events (e.g. "
    "preemption, eviction) to debug further.\n")
STACK_DUMP = ("Fatal Python error: Aborted\n\nThread 0x00007f (most recent "
              "call first):\n  File \"run.py\", line 85 in <module>\n\n"
              "Extension modules: numpy._core (total: 1)\n")


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("UNITER_JAX_SUPERVISOR_FD", None)
  return env


def _supervise(workdir, child_src, **kw):
  """The supervisor in its own process, running `child_src` as the child."""
  return subprocess.Popen(
      [sys.executable, "-c",
       "import sys; from uniter_jax import supervisor; "
       "sys.exit(supervisor.run(sys.argv[2:], sys.argv[1]))",
       str(workdir), sys.executable, "-c", textwrap.dedent(child_src)],
      stderr=subprocess.PIPE, text=True, env=_env(), **kw)


@pytest.mark.parametrize("fatal,me,lost,reason", [
    (LEADER_DIED, 1, "process 0 (the coordinator)",
     "UNAVAILABLE: Failed to send RPC to coordination service"),
    (PEER_SILENT, 0, "process 1", "UNAVAILABLE: The following tasks are "
     "unhealthy (stopped sending heartbeats):"),
])
def test_the_coordination_abort_becomes_one_line(tmp_path, fatal, me, lost,
                                                 reason):
  for step in (3, 6):
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
  p = _supervise(tmp_path, f"""
      import os, sys
      from uniter_jax import supervisor
      supervisor.report_process({me}, 2)
      sys.stderr.write("I1202 an ordinary log line\\n"); sys.stderr.flush()
      sys.stderr.write({fatal + STACK_DUMP!r}); sys.stderr.flush()
      os.abort()
      """)
  _, err = p.communicate(timeout=60)
  assert p.returncode == 1, err
  lines = err.splitlines()
  assert lines[0] == "I1202 an ordinary log line"
  assert lines[-1] == (
      f"error: process {me} of 2 lost {lost}: {reason}; the last checkpoint "
      f"is update 6 in {tmp_path}/checkpoints; restart every process to "
      "resume")
  # The abort's own lines and the stack dump are held back.
  assert len(lines) == 2, err


def test_what_the_child_started_does_not_outlive_it(tmp_path):
  """An input worker of the child holds its stderr open; after the abort
  the supervisor still ends at once, and the worker with it."""
  pidfile = tmp_path / "worker"
  p = _supervise(tmp_path, f"""
      import os, subprocess, sys
      w = subprocess.Popen([sys.executable, "-c",
                            "import time; time.sleep(120)"])
      open({str(pidfile)!r}, "w").write(str(w.pid))
      sys.stderr.write({LEADER_DIED + STACK_DUMP!r}); sys.stderr.flush()
      os.abort()
      """)
  t0 = time.time()
  _, err = p.communicate(timeout=60)
  assert time.time() - t0 < 30
  assert p.returncode == 1, err
  assert err.splitlines()[-1].startswith("error: this process lost process 0")
  worker = int(pidfile.read_text())
  _wait_gone(worker)


def _wait_gone(pid):
  end = time.time() + 10
  while time.time() < end:
    try:
      with open(f"/proc/{pid}/status") as f:
        if "\nState:\tZ" in f.read():
          return                      # dead, not yet reaped
    except FileNotFoundError:
      return
    time.sleep(0.05)
  os.kill(pid, signal.SIGKILL)
  pytest.fail(f"process {pid} outlived the supervised run")


def test_signals_reach_the_child_once_and_a_signal_death_is_named(tmp_path):
  log = tmp_path / "signals"
  p = _supervise(tmp_path, f"""
      import os, signal, sys, time
      got = []
      def note(s, f):
        got.append(signal.Signals(s).name)
        open({str(log)!r}, "w").write(" ".join(got))
      for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, note)
      open({str(log)!r}, "w").write("ready")
      while len(got) < 3:
        time.sleep(0.01)
      time.sleep(0.5)           # a signal delivered twice would show here
      open({str(log)!r}, "w").write(" ".join(got))
      os.kill(os.getpid(), signal.SIGKILL)
      """)
  end = time.time() + 30
  while not (log.exists() and log.read_text() == "ready"):
    assert time.time() < end and p.poll() is None
    time.sleep(0.05)
  for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    p.send_signal(s)
    time.sleep(0.2)
  _, err = p.communicate(timeout=30)
  assert log.read_text() == "SIGINT SIGTERM SIGUSR1"
  # The child's death by a signal is the supervisor's, after one line.
  assert p.returncode == -signal.SIGKILL
  assert err.splitlines()[-1].startswith("error: the training process (pid ")
  assert "was killed by signal 9 (SIGKILL); no checkpoint was written" in err


def test_killing_the_supervisor_kills_the_child(tmp_path):
  pidfile = tmp_path / "pid"
  p = _supervise(tmp_path, f"""
      import os, time
      open({str(pidfile)!r}, "w").write(str(os.getpid()))
      time.sleep(120)
      """)
  end = time.time() + 30
  while not pidfile.exists() or not pidfile.read_text():
    assert time.time() < end
    time.sleep(0.05)
  child = int(pidfile.read_text())
  p.kill()
  p.wait(timeout=30)
  _wait_gone(child)


def test_a_dead_coordinator_ends_the_survivor_in_one_line(tmp_path):
  """Two run.py processes; process 0, which hosts JAX's coordination
  service, is killed mid-run. The survivor ends in one line naming it and
  the last checkpoint (whichever noticed first: the coordination client or
  the next collective), without a stack dump."""
  wd = tmp_path / "run"
  env = _env()
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  procs = multiproc.start(
      ["--config", os.path.join(ROOT, "configs/demo.py:runlocal"),
       "--workdir", str(wd), "--config.data.data_dir=/tmp/uniter_jax_test_data",
       "--config.train.num_train_steps=1000", "--config.mesh.data=-1",
       "--config.log_every_steps=1", "--config.checkpoint.every_steps=3",
       "--config.evals.loss_curves.every_steps=-1",
       "--config.evals.wra_plan.every_steps=-1",
       "--config.evals.zero_shot.every_steps=-1",
       "--config.datasets.synthetic.tasks=('mlm',)",
       "--config.datasets.synthetic.mix_ratio=(1,)",
       "--config.train.token_budget=256", "--config.model.hidden_size=32",
       "--config.model.num_hidden_layers=1",
       "--config.model.num_attention_heads=2",
       "--config.model.intermediate_size=64"], env)
  try:
    metrics = wd / "metrics.jsonl"
    end = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
      assert time.time() < end and all(p.poll() is None for p in procs), (
          procs[0].stderr.read()[-3000:] if procs[0].poll() is not None
          else "no metrics rows in 300 s")
      time.sleep(0.1)
    procs[0].kill()
    _, err = procs[1].communicate(timeout=120)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.communicate()
  assert procs[1].returncode == 1, err[-3000:]
  last = err.splitlines()[-1]
  assert last.startswith("error: process 1 of 2 lost process 0"), err[-3000:]
  step = re.search(r"the last checkpoint is update (\d+) in (\S+); ", last)
  assert step and step.group(2) == f"{wd}/checkpoints", last
  assert int(step.group(1)) == max(
      int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
  assert "Fatal Python error" not in err and "Traceback" not in err
