"""Quiet, clear runs: library logs at WARNING, one start line, throughput
without compilation, and `mode=eval` leaving the training history alone.

One run.py subprocess trains a tiny MLM-only model for 4 updates (module
fixture); the resume and evaluation tests reuse its workdir in-process.
"""

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from configs import demo
from data_prep import prepare
from uniter_jax.train import metrics as metrics_lib
from uniter_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = "/tmp/uniter_jax_test_data"
STEPS = 4

# The same tiny run as flags (for run.py) and as a config (in-process).
OVERRIDES = {
    "data.data_dir": DATA_DIR,
    "model.hidden_size": 32, "model.num_hidden_layers": 1,
    "model.num_attention_heads": 2, "model.intermediate_size": 64,
    # MLM alone: the cheapest task to compile (ITM adds the OT solver).
    "datasets.synthetic.tasks": ("mlm",),
    "datasets.synthetic.mix_ratio": (1,),
    "train.num_train_steps": STEPS, "train.token_budget": 256,
    "log_every_steps": 2, "checkpoint.every_steps": 2,
    # Plots and zero-shot retrieval are tested elsewhere; the held-out
    # evaluation (`val`) stays, for mode=eval to write a row.
    "evals.zero_shot.every_steps": -1, "evals.loss_curves.every_steps": -1,
    "evals.wra_plan.every_steps": -1,
}

# An absl-formatted log line: level letter, date, time, thread, file:line].
LOG_LINE = re.compile(r"([DIWEF])\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] (.*)")


def _flag(v):
  return repr(v) if isinstance(v, tuple) else str(v)


def _config():
  c = demo.get_config("runlocal")
  for field, value in OVERRIDES.items():
    *parents, last = field.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def _project_files():
  """Basenames of the project's Python files (its log lines name them)."""
  out = {"run.py"}
  for pkg in ("uniter_jax", "data_prep", "configs"):
    for _, _, files in os.walk(os.path.join(ROOT, pkg)):
      out.update(f for f in files if f.endswith(".py"))
  return out


def _log_lines(stderr):
  # tqdm redraws with carriage returns: a log line may follow one.
  return [m.groups() for part in re.split(r"[\r\n]", stderr)
          for m in [LOG_LINE.search(part)] if m]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  prepare.ensure_synthetic(_config())   # as run.py does, once for all
  wd = tmp_path_factory.mktemp("quiet") / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  args = [f"--config.{k}={_flag(v)}" for k, v in OVERRIDES.items()]
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run.py"), "--config",
       os.path.join(ROOT, "configs/demo.py:runlocal"), "--workdir", str(wd),
       *args], capture_output=True, text=True, env=env, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return str(wd), r


@pytest.fixture
def restore_log_levels():
  names = ("",) + trainer.LIBRARY_LOGGERS
  levels = {n: logging.getLogger(n).level for n in names}
  yield
  for n, level in levels.items():
    logging.getLogger(n).setLevel(level)


def test_library_info_lines_are_hidden(trained):
  _, r = trained
  lines = _log_lines(r.stderr)
  assert lines, r.stderr[-2000:]
  own = _project_files()
  info = [(f, msg) for level, f, msg in lines if level in "DI"]
  # Only the project's own files log below WARNING ...
  assert {f for f, _ in info} <= own, info
  # ... and none of what orbax and tensorflow_datasets said before.
  for word in ("orbax", "CheckpointManager", "Load dataset info",
               "Finished saving checkpoint"):
    assert word not in r.stderr, word
  assert "Traceback" not in r.stderr


def test_one_start_line_names_config_devices_data_and_a_fresh_start(trained):
  _, r = trained
  start = [msg for _, _, msg in _log_lines(r.stderr)
           if msg.startswith(os.path.join(ROOT, "configs/demo.py:runlocal"))]
  assert len(start) == 1, r.stderr[-3000:]
  line = start[0]
  assert f"train {STEPS} updates on 1 cpu device" in line
  assert "mesh data=1 fsdp=1 tensor=1" in line
  assert re.search(r"train data: uniter_synthetic_text/tiny:1.0.0\[train\] "
                   r"\d+ examples \(mlm\)", line), line
  assert re.search(r"held out: uniter_synthetic_text/tiny:1.0.0\[val\] "
                   r"\d+ examples \(mlm\)", line), line
  assert line.endswith("starts fresh from a random init")


def test_compiling_steps_are_left_out_of_the_throughput(trained):
  wd, r = trained
  # One task, one batch shape: exactly one step compiled, and it said so.
  compiled = [msg for _, _, msg in _log_lines(r.stderr)
              if "compiled the train step" in msg]
  assert len(compiled) == 1 and compiled[0].startswith("mlm:"), compiled
  rows = [row for row in metrics_lib.read_metrics(wd) if "train/loss" in row]
  assert [row["step"] for row in rows] == [2, 4]
  # Every window kept a timed step (only the compiling one was left out):
  # each row has rates, and they describe the same batches.
  for row in rows:
    assert row["train/examples_per_sec"] > 0
    assert row["train/tokens_per_sec"] > row["train/examples_per_sec"]
    assert row["train/updates_per_sec"] > 0


def test_throughput_leaves_out_untimed_blocks():
  now = [0.0]
  t = metrics_lib.Throughput(clock=lambda: now[0])
  with t.untimed() as took:        # a step that compiles: 30 s
    now[0] += 30.0
  assert took["secs"] == 30.0
  assert t.rates() == {}           # nothing timed yet: no rate at all
  for _ in range(2):               # two timed micro-steps of 0.5 s
    now[0] += 0.5
    t.count(examples=8, tokens=100)
  with t.untimed():                # an evaluation inside the window
    now[0] += 100.0
  rates = t.rates(accumulation_steps=2)
  assert rates == {"train/examples_per_sec": 16.0,
                   "train/tokens_per_sec": 200.0,
                   "train/updates_per_sec": 1.0}
  t.restart()
  now[0] += 1.0
  t.count(examples=4, tokens=10)
  assert t.rates()["train/examples_per_sec"] == 4.0


def test_library_loggers_follow_the_log_level(restore_log_levels):
  del restore_log_levels
  trainer.set_log_levels()
  assert logging.getLogger().isEnabledFor(logging.INFO)
  for name in ("absl", "orbax.checkpoint", "jax._src.dispatch"):
    assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
  trainer.set_log_levels("info")   # run.py --log_level=info
  assert logging.getLogger("absl").isEnabledFor(logging.INFO)
  with pytest.raises(ValueError, match="unknown log level"):
    trainer.set_log_levels("loud")


def test_a_resumed_run_says_from_which_update(trained, caplog):
  wd, _ = trained
  caplog.set_level(logging.INFO)
  trainer.train_and_evaluate(_config(), wd, config_name="tiny")
  start = [rec.getMessage() for rec in caplog.records
           if rec.getMessage().startswith("tiny | ")]
  assert len(start) == 1
  assert (f"resumes from update {STEPS} "
          f"({os.path.join(wd, 'checkpoints', str(STEPS))}); finished "
          f"already (num_train_steps={STEPS})") in start[0]


def test_eval_mode_writes_no_training_row(trained, caplog):
  wd, _ = trained
  path = os.path.join(wd, "metrics.jsonl")
  with open(path, "rb") as f:
    before = f.read()
  tb = os.path.join(wd, "tensorboard")
  events = sorted(os.listdir(tb))
  c = _config()
  c.mode = "eval"
  caplog.set_level(logging.INFO)
  out = trainer.train_and_evaluate(c, wd, config_name="tiny")
  with open(path, "rb") as f:
    assert f.read() == before      # the training history is untouched
  assert sorted(os.listdir(tb)) == events   # no TensorBoard point either
  with open(os.path.join(wd, metrics_lib.EVAL_METRICS_FILE)) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1
  row = rows[0]
  assert row["step"] == STEPS
  assert row["evaluated"] == os.path.join(wd, "checkpoints", str(STEPS))
  assert not any(k.startswith("train/") for k in row)
  assert {k: v for k, v in row.items() if k.startswith("val/")} == out
  assert "val/mlm_synthetic/mlm_acc" in out
  start = [rec.getMessage() for rec in caplog.records
           if rec.getMessage().startswith("tiny | ")]
  assert len(start) == 1 and start[0].startswith("tiny | eval on ")
  assert start[0].endswith(
      f"evaluates update {STEPS} "
      f"({os.path.join(wd, 'checkpoints', str(STEPS))})")
