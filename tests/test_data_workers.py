"""Input worker processes: the same batches as threads, exact resume, and
a worker that dies ends the iteration with one line naming it.

Workers are real spawned processes (grain's multiprocessing prefetch), each
starting a Python interpreter: a few seconds per iterator, so the checks
share iterators where they can.
"""

import dataclasses
import os
import signal
import time

import numpy as np
import pytest

from uniter_jax.data import pipeline
from uniter_jax.tasks import masking

NAME = "workertest"
TEXT = f"uniter_synthetic_text/{NAME}:1.0.0"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_prep import common, synthetic  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(synthetic.TINY_CONFIG, name=NAME,
                            num_train_images=24, num_val_images=6,
                            captions_per_image=2, min_regions=10,
                            max_regions=36)
  d = str(tmp_path_factory.mktemp("tfds"))
  for builder in (synthetic.UniterSyntheticImages,
                  synthetic.UniterSyntheticText):
    common.build(builder(config=cfg, data_dir=d))
  return d


def make(data_dir, split="train", token_budget=1024):
  # Real task ops (ITM negatives read other images; MLM masking draws from
  # the per-example RNG): what the workers must reproduce.
  return pipeline.UniterData(
      data_dir, TEXT, split, token_budget=token_budget, batch_multiple=2,
      shard_index=0, shard_count=1, max_buckets=3, seed=11,
      ops=[masking.itm_op, masking.mlm_op],
      op_params={"itm_neg_prob": 0.5, "mlm_prob": 0.15})


def same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


N = 10


@pytest.fixture(scope="module")
def reference(data_dir):
  """Batches 0..N-1 made in this process with one thread."""
  d = make(data_dir)
  assert d.batches_per_epoch < N   # the batches cross an epoch boundary
  return [b for _, b in zip(range(N), d.iterator(num_threads=1,
                                                 num_workers=0))]


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_threads_batches_and_resume_exactly(
    data_dir, reference, workers):
  d = make(data_dir)
  it = d.iterator(num_workers=workers, num_threads=1)
  try:
    for want in reference[:4]:
      same(next(it), want)
    state = it.get_state()
    assert state["step"] == 4
    # A fresh iterator on a fresh data object (as after a restart) restored
    # mid-epoch continues with the uninterrupted sequence.
    it2 = make(data_dir).iterator(num_workers=workers, num_threads=2)
    it2.set_state(state)
    try:
      for want in reference[4:]:
        same(next(it2), want)
    finally:
      it2.close()
  finally:
    it.close()


def test_exact_batches_with_workers_equal_threads(data_dir):
  d = make(data_dir, "val", token_budget=400)
  want = list(d.exact_batches(num_workers=0, num_threads=1))
  got = list(d.exact_batches(num_workers=2))
  assert len(got) == len(want) > 1
  for a, b in zip(got, want):
    same(a, b)


def _workers_of(pid_dir_parent_pid):
  kids = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      with open(f"/proc/{name}/cmdline") as f:
        cmd = f.read()
    except OSError:
      continue
    if int(fields[1]) == pid_dir_parent_pid and "spawn_main" in cmd:
      kids.append(int(name))
  return sorted(kids)


def test_a_killed_worker_ends_with_one_line_naming_it(data_dir, reference):
  it = make(data_dir).iterator(num_workers=2, num_threads=1)
  same(next(it), reference[0])
  workers = _workers_of(os.getpid())
  assert len(workers) == 2, workers
  os.kill(workers[-1], signal.SIGKILL)
  start = time.monotonic()
  with pytest.raises(pipeline.WorkerError) as e:
    for _ in range(200):   # the buffered batches, then the failure
      next(it)
  assert time.monotonic() - start < 60
  msg = str(e.value)
  assert "\n" not in msg
  assert f"(pid {workers[-1]}) killed by signal 9 (SIGKILL)" in msg, msg
  assert NAME in msg and "last checkpoint is intact" in msg


def test_worker_count_from_the_host_cores():
  assert [pipeline.auto_num_workers(c) for c in (1, 2, 4, 8, 16, 64)] == [
      0, 0, 0, 6, 14, 32]
  with pytest.raises(ValueError, match="num_workers"):
    pipeline.Loading(num_workers=-1)


def test_run_py_reports_a_worker_error_in_one_line():
  from uniter_jax import train  # pylint: disable=g-import-not-at-top
  # run.py prints the errors of RUN_ERRORS as one `error: ...` line, exit 1.
  assert issubclass(pipeline.WorkerError, train.RUN_ERRORS)
