"""Checkpoints and the workdir survive what clusters do to a run.

One run per workdir (a lock that a SIGKILLed holder cannot leave behind),
resume past a damaged newest checkpoint, partial saves that are never taken
for checkpoints, and a full disk that ends in one clear error with the older
checkpoints intact. States are a tiny flax struct, so the file runs in
seconds without a model.
"""

import errno
import glob
import logging
import os
import shutil
import socket
import subprocess
import sys
import uuid

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniter_jax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR_PY = os.path.join(ROOT, "uniter_jax", "train", "workdir.py")


@flax.struct.dataclass
class TinyState:
  """TrainState's shape in miniature: array leaves plus a static field."""
  step: jax.Array
  params: dict
  rng: jax.Array
  tx: object = flax.struct.field(pytree_node=False, default=None)


def tiny(i: int, n: int = 4, k: int = 1) -> TinyState:
  """`k` random (n, 3) float32 matrices and a few small leaves."""
  ws = {f"w{j}": jax.random.normal(jax.random.key(i * 100 + j), (n, 3))
        for j in range(k)}
  return TinyState(step=jnp.array(i, jnp.int32),
                   params={**ws, "b": jnp.full((3,), float(i))},
                   rng=jax.random.key_data(jax.random.key(i)))


ABSTRACT = jax.eval_shape(lambda: tiny(0))


def assert_same(a: TinyState, b: TinyState):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(workdir, steps, keep=10):
  ck = ckpt_lib.Checkpointer(str(workdir), keep)
  for i in steps:
    ck.save(i, tiny(i), {"iterators": {"a": i}}, {"seed": 0})
  ck.close()


def listing(root):
  return sorted(os.path.relpath(p, root) for p in glob.glob(
      os.path.join(root, "**"), recursive=True))


# ---------------------------------------------------------------- the lock

# A holder in its own process. workdir.py needs only the standard library,
# so it is loaded from its file: the package's import of the trainer (and
# JAX) would cost seconds per process for nothing.
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("workdir", sys.argv[1])
w = importlib.util.module_from_spec(spec)
spec.loader.exec_module(w)
try:
  w.WorkdirLock(sys.argv[2]).acquire()
except w.WorkdirBusyError as e:
  print(e, file=sys.stderr)
  sys.exit(3)
print("locked", flush=True)
time.sleep(600)
"""


def _holder(workdir):
  return subprocess.Popen([sys.executable, "-c", HOLDER, WORKDIR_PY,
                           str(workdir)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_locked(p):
  line = p.stdout.readline()
  if line.strip() != "locked":
    p.kill()
    raise AssertionError(f"holder did not lock: {line!r} "
                         f"{p.stderr.read()[-2000:]}")


def test_second_run_on_a_workdir_fails_and_a_killed_holder_frees_it(
    tmp_path):
  wd = tmp_path / "wd"
  first = _holder(wd)
  try:
    _wait_locked(first)
    second = subprocess.run([sys.executable, "-c", HOLDER, WORKDIR_PY,
                             str(wd)], capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 3, second.stderr[-2000:]
    msg = second.stderr.strip()
    assert "\n" not in msg, msg
    assert f"PID {first.pid}" in msg and socket.gethostname() in msg, msg
    assert str(wd) in msg and "--workdir" in msg, msg
    # The holder's identity is in the file, for a person looking at it.
    assert f"pid={first.pid}" in (wd / ".lock").read_text()
  finally:
    first.kill()          # SIGKILL: no cleanup runs; the kernel drops the lock
    first.wait()
  third = _holder(wd)
  try:
    _wait_locked(third)
  finally:
    third.kill()
    third.wait()


def test_lock_in_process_release_and_reacquire(tmp_path):
  from uniter_jax.train import workdir as wd_lib  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / "wd")
  with wd_lib.WorkdirLock(wd) as lock:
    assert lock.locked
    with pytest.raises(wd_lib.WorkdirBusyError, match=f"PID {os.getpid()}"):
      wd_lib.WorkdirLock(wd).acquire()
  # Released: the next one gets it, and no stale identity is left behind.
  assert open(os.path.join(wd, ".lock")).read() == ""
  with wd_lib.WorkdirLock(wd):
    pass


# ------------------------------------------------- damaged newest checkpoint

DAMAGE = {
    "manifest": lambda d: os.remove(d / "state" / "manifest.ocdbt"),
    "_METADATA": lambda d: os.remove(d / "state" / "_METADATA"),
    "data_json": lambda d: (d / "data" / "metadata").write_text("{trunc"),
    "no_state": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_latest_falls_back_past_damaged_steps(tmp_path, caplog,
                                                      damage):
  save_steps(tmp_path, (1, 2, 3))
  ckdir = tmp_path / "checkpoints"
  DAMAGE[damage](ckdir / "3")
  DAMAGE["manifest"](ckdir / "2")
  before = listing(ckdir)
  ck = ckpt_lib.Checkpointer(str(tmp_path), 10)
  with caplog.at_level(logging.WARNING):
    step, state, data = ck.restore_latest(ABSTRACT)
  assert step == 1 and data == {"iterators": {"a": 1}}
  assert_same(state, tiny(1))
  assert listing(ckdir) == before          # nothing deleted or moved
  skipped = [r.getMessage() for r in caplog.records
             if "does not restore" in r.getMessage()]
  assert len(skipped) == 2, skipped
  for s, m in zip((3, 2), skipped):
    assert "\n" not in m and len(m) < 600, m
    assert str(ckdir / str(s)) in m and "Error" in m, m
  # The damaged steps are not "the last good checkpoint".
  assert ck.latest_step() == 1
  # The resumed run saves update 2 again: the damaged 2 and 3 are set aside
  # (renamed, never deleted) so the new 2 is written and is the latest.
  ck.save(2, tiny(22), {"iterators": {"a": 22}}, {"seed": 0})
  ck.close()
  aside = sorted(p.name.split(".")[0] for p in ckdir.iterdir()
                 if ".unrestorable-" in p.name)
  assert aside == ["2", "3"]
  ck = ckpt_lib.Checkpointer(str(tmp_path), 10)
  step, state, data = ck.restore_latest(ABSTRACT)
  assert step == 2 and data == {"iterators": {"a": 22}}
  assert_same(state, tiny(22))
  ck.close()


def test_restore_latest_none_restores_one_line(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), 10)
  assert ck.restore_latest(ABSTRACT) is None   # fresh workdir
  ck.close()
  save_steps(tmp_path, (1, 2))
  for s in (1, 2):
    DAMAGE["_METADATA"](tmp_path / "checkpoints" / str(s))
  ck = ckpt_lib.Checkpointer(str(tmp_path), 10)
  with pytest.raises(ckpt_lib.CheckpointRestoreError) as ei:
    ck.restore_latest(ABSTRACT)
  msg = str(ei.value)
  assert "\n" not in msg and "2, 1" in msg
  assert str(tmp_path / "checkpoints") in msg
  ck.close()


def test_partial_save_dirs_are_not_checkpoints(tmp_path):
  """A crash mid-save leaves `<step>.orbax-checkpoint-tmp` (orbax 0.12's
  name; older orbax added `-<timestamp>`); neither is a step, the next save
  of that step works, and `remove_partial_saves` clears them."""
  save_steps(tmp_path, (1, 2))
  ckdir = tmp_path / "checkpoints"
  shutil.copytree(ckdir / "2", ckdir / "3.orbax-checkpoint-tmp")
  os.remove(ckdir / "3.orbax-checkpoint-tmp" / "state" / "manifest.ocdbt")
  shutil.copytree(ckdir / "2", ckdir / "4.orbax-checkpoint-tmp-1700000000")
  ck = ckpt_lib.Checkpointer(str(tmp_path), 10)
  assert ck.latest_step() == 2
  step, state, _ = ck.restore_latest(ABSTRACT)
  assert step == 2
  assert_same(state, tiny(2))
  ck.save(3, tiny(3), {"iterators": {"a": 3}}, {"seed": 0})
  ck.close()
  ck = ckpt_lib.Checkpointer(str(tmp_path), 10)
  assert ck.latest_step() == 3
  assert ck.restore_latest(ABSTRACT)[0] == 3
  ck.close()
  assert (ckdir / "4.orbax-checkpoint-tmp-1700000000").exists()
  ck = ckpt_lib.Checkpointer(str(tmp_path), 10, remove_partial_saves=True)
  assert not [p for p in os.listdir(ckdir) if "orbax-checkpoint-tmp" in p]
  assert ck.latest_step() == 3
  ck.close()


# --------------------------------------------------------------- disk full


@pytest.fixture
def small_fs(tmp_path):
  """A real 1 MiB tmpfs: writes past it fail with ENOSPC in the kernel, as
  on a full disk. Mounting needs root (CAP_SYS_ADMIN)."""
  mnt = tmp_path / "fs"
  mnt.mkdir()
  if shutil.which("mount") is None:
    pytest.skip("no mount command")
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                      str(mnt)], capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"cannot mount a small tmpfs: {r.stderr.strip()}")
  try:
    yield mnt
  finally:
    if subprocess.run(["umount", str(mnt)]).returncode:
      subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_save_one_error_old_steps_intact_retry_works(small_fs,
                                                               caplog, capfd):
  wd = small_fs / "wd"
  ck = ckpt_lib.Checkpointer(str(wd), 10)
  ck.save(1, tiny(1), {"iterators": {"a": 1}}, {"seed": 0})
  # Leave ~96 KiB free; update 2 needs ~240 KiB of incompressible floats,
  # in 8 arrays, so several writers are in flight when the disk fills.
  filler = small_fs / f"filler-{uuid.uuid4().hex}"
  free = shutil.disk_usage(small_fs).free
  with open(filler, "wb") as f:
    f.write(os.urandom(free - 96 * 1024))
  big = tiny(2, n=2500, k=8)
  capfd.readouterr()
  need = sum(x.nbytes for x in jax.tree.leaves(big))
  with caplog.at_level(logging.ERROR):
    with pytest.raises(ckpt_lib.CheckpointWriteError) as ei:
      ck.save(2, big, {"iterators": {"a": 2}}, {"seed": 0})
  err = ei.value
  msg = str(err)
  assert isinstance(err, OSError) and err.errno == errno.ENOSPC
  assert "\n" not in msg, msg
  assert str(wd / "checkpoints" / "2") in msg, msg
  assert f"{need} bytes" in msg and "free" in msg, msg
  assert not [r for r in caplog.records if r.exc_info], (
      "tracebacks logged: " + caplog.records[0].getMessage()[:300])
  assert "Traceback" not in capfd.readouterr().err
  # Only its own partial output is gone; update 1 is intact and restores.
  assert sorted(os.listdir(wd / "checkpoints")) == ["1"]
  assert ck.latest_step() == 1
  step, state, _ = ck.restore_latest(ABSTRACT)
  assert step == 1
  assert_same(state, tiny(1))
  # Space freed: the same save now works, in this process.
  os.remove(filler)
  ck.save(2, big, {"iterators": {"a": 2}}, {"seed": 0})
  ck.close()
  ck = ckpt_lib.Checkpointer(str(wd), 10)
  step, state, data = ck.restore_latest(jax.eval_shape(lambda: big))
  assert step == 2 and data == {"iterators": {"a": 2}}
  assert_same(state, big)
  ck.close()
