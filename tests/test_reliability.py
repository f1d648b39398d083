"""Training survives what clusters do to it (run.py, subprocesses, CPU).

* SIGKILL at chosen moments, one of them inside a checkpoint save: the
  resumed run ends bitwise equal to an uninterrupted one, with every
  metrics row once.
* An update that would make the state non-finite is never applied nor
  saved, and the run says which checkpoint is the last good one.
* Ctrl-C (SIGINT) saves and exits 0; SIGTERM takes the same path, and a
  Ctrl-C during that stop quits at once. A second run on the workdir is
  refused.
* A misspelt config variant is an error listing the known ones.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from uniter_jax.train import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = "/tmp/uniter_jax_test_data"

# Runs run.py in this process after arranging a SIGKILL: `update:N` kills
# while update N+1 is being drawn (after update N was logged), `save:N`
# kills inside the save of update N, after orbax wrote the step's files and
# before it renames them into place; `slowsave:S` makes every checkpoint
# save wait S seconds first (time for a second Ctrl-C).
DRIVER = r"""
import os, runpy, signal, sys
kill = sys.argv[1]
sys.argv = [os.path.join(ROOT, "run.py")] + sys.argv[2:]
what, n = kill.split(":") if kill else ("", "0")
n = int(n)
def die():
  os.kill(os.getpid(), signal.SIGKILL)
if what == "update":
  from uniter_jax.train import input as input_lib
  orig = input_lib.task_for_update
  def spy(pool, seed, u):
    if u == n:
      die()
    return orig(pool, seed, u)
  input_lib.task_for_update = spy
elif what == "save":
  from orbax.checkpoint._src.path import atomicity
  cls = atomicity.AtomicRenameTemporaryPath
  orig = cls.finalize
  async def finalize(self, *a, **k):
    final = self.get_final()
    if final.name == str(n) and final.parent.name == "checkpoints":
      die()
    return await orig(self, *a, **k)
  cls.finalize = finalize
elif what == "slowsave":
  import time
  from uniter_jax.train import checkpoint as ckpt_lib
  orig_save = ckpt_lib.Checkpointer.save
  def slow_save(self, *a, **k):
    time.sleep(n)
    return orig_save(self, *a, **k)
  ckpt_lib.Checkpointer.save = slow_save
runpy.run_path(sys.argv[0], run_name="__main__")
""".replace("ROOT", repr(ROOT))


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _args(workdir, steps, extra=()):
  return ["--config", os.path.join(ROOT, "configs/demo.py:runlocal"),
          "--workdir", str(workdir), f"--config.data.data_dir={DATA_DIR}",
          f"--config.train.num_train_steps={steps}",
          "--config.model.hidden_size=32", "--config.model.num_hidden_layers=1",
          "--config.model.num_attention_heads=2",
          "--config.model.intermediate_size=64",
          "--config.log_every_steps=1", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.keep=10",
          # Two tasks and no evaluation: fewer programs to compile per run.
          "--config.datasets.synthetic.tasks=('mlm','itm')",
          "--config.datasets.synthetic.mix_ratio=(1,1)",
          "--config.evals.val.every_steps=-1",
          "--config.evals.zero_shot.every_steps=-1",
          "--config.evals.loss_curves.every_steps=-1",
          "--config.evals.wra_plan.every_steps=-1", *extra]


def _driver(kill, workdir, steps, extra=()):
  return subprocess.run([sys.executable, "-c", DRIVER, kill,
                         *_args(workdir, steps, extra)],
                        capture_output=True, text=True, env=_env(),
                        timeout=600)


def _state(workdir, step):
  """Every array of a saved train state, by its path in the tree."""
  tree = ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path(tree)}


def _train_rows(workdir):
  return [r for r in metrics_lib.read_metrics(str(workdir))
          if "train/loss" in r]


def test_sigkills_then_resume_is_exact(tmp_path):
  steps = 10
  full, hit = tmp_path / "full", tmp_path / "hit"
  r = _driver("", full, steps)
  assert r.returncode == 0, r.stderr[-3000:]
  # Killed after update 3 was logged (checkpoint 2 is the latest) ...
  r = _driver("update:3", hit, steps)
  assert r.returncode == -signal.SIGKILL
  # ... inside the save of update 6 (step dir written, not renamed) ...
  r = _driver("save:6", hit, steps)
  assert r.returncode == -signal.SIGKILL
  ckdir = hit / "checkpoints"
  assert "6" not in os.listdir(ckdir) and "4" in os.listdir(ckdir)
  # ... and after update 7 was logged, with the temp dir of 6 still there.
  r = _driver("update:7", hit, steps)
  assert r.returncode == -signal.SIGKILL
  r = _driver("", hit, steps)
  assert r.returncode == 0, r.stderr[-3000:]

  a, b = _state(full, steps), _state(hit, steps)
  assert a.keys() == b.keys() and len(a) > 10
  for k in a:   # params, Adam moments, step, RNG, bad_step
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  rows_full, rows_hit = _train_rows(full), _train_rows(hit)
  assert [r["step"] for r in rows_hit] == list(range(1, steps + 1))
  drop = lambda r: {k: v for k, v in r.items() if "per_sec" not in k}  # pylint: disable=unnecessary-lambda-assignment
  assert [drop(r) for r in rows_hit] == [drop(r) for r in rows_full]


def test_an_update_that_overflows_the_state_is_never_saved(tmp_path):
  # Update 1's loss and gradients are finite; the step lr * direction
  # overflows float32, so applying it would make the params inf.
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run.py"),
       *_args(tmp_path, 8, ["--config.checkpoint.every_steps=1",
                            "--config.train.learning_rate=1e40",
                            "--config.train.warmup_steps=1"])],
      capture_output=True, text=True, env=_env(), timeout=600)
  assert r.returncode == 1, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, r.stderr[-3000:]
  assert "non-finite" in errors[0] and "micro-step 0" in errors[0]
  assert "No checkpoint was written" in errors[0]
  assert "Traceback" not in r.stderr
  ckdir = tmp_path / "checkpoints"
  assert not ckdir.exists() or not [d for d in os.listdir(ckdir)
                                    if d.isdigit()]


def _start(workdir, kill="", stderr=subprocess.PIPE, steps=100000):
  return subprocess.Popen(
      [sys.executable, "-c", DRIVER, kill,
       *_args(workdir, steps, ["--config.checkpoint.every_steps=1000"])],
      stdout=subprocess.PIPE, stderr=stderr, text=True, env=_env())


def _wait_rows(workdir, n, proc, deadline=300):
  end = time.time() + deadline
  while time.time() < end and len(_train_rows(workdir)) < n:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.2)


def test_ctrl_c_saves_and_a_second_one_quits(tmp_path):
  p = _start(tmp_path / "once")
  _wait_rows(tmp_path / "once", 3, p)
  # A second run on the same workdir is refused at start, naming the first.
  r = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"),
                      *_args(tmp_path / "once", 5)], capture_output=True,
                     text=True, env=_env(), timeout=300)
  assert r.returncode == 1
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and f"in use by PID {p.pid} on host" in errors[0]
  assert "Traceback" not in r.stderr
  p.send_signal(signal.SIGINT)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  assert "SIGINT received" in err
  steps = [int(d) for d in os.listdir(tmp_path / "once" / "checkpoints")
           if d.isdigit()]
  assert steps and min(steps) >= 3
  # SIGTERM, then Ctrl-C while the stop's save is under way: SIGTERM takes
  # the same path, and the Ctrl-C stops at once, without saving, in one
  # line, exit 130.
  log = tmp_path / "twice.log"
  with open(log, "w") as f:
    p = _start(tmp_path / "twice", "slowsave:60", stderr=f)
    _wait_rows(tmp_path / "twice", 3, p)
    p.send_signal(signal.SIGTERM)
    end = time.time() + 120
    while time.time() < end and "SIGTERM received" not in log.read_text():
      time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
  err = log.read_text()
  # 130 and no checkpoint below: it did not wait for the 60 s save.
  assert p.returncode == 130, err[-3000:]
  assert [l for l in err.splitlines() if l.startswith("interrupted:")]
  assert "Traceback" not in err
  ckdir = tmp_path / "twice" / "checkpoints"
  assert not ckdir.exists() or not [d for d in os.listdir(ckdir)
                                    if d.isdigit()]


def test_a_misspelt_variant_is_an_error(tmp_path):
  args = _args(tmp_path, 2)
  args[1] = os.path.join(ROOT, "configs/demo.py:runlcoal")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args],
                     capture_output=True, text=True, env=_env(), timeout=300)
  assert r.returncode != 0
  assert "runlcoal" in r.stderr and "runlocal" in r.stderr
  assert not (tmp_path / "checkpoints").exists()
