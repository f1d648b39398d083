"""benchmarks/demo_seeds.py: runs run.py per seed and reports what it logged."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "demo_seeds.py")
DATA_DIR = "/tmp/uniter_jax_test_data"


def _run(args):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                        text=True, env=env, timeout=600)


def test_demo_seeds_reports_each_seed(tmp_path):
  out = tmp_path / "sweep"
  args = ["--config", os.path.join(ROOT, "configs/demo.py:runlocal"),
          "--seeds", "3", "--out", str(out), "--",
          f"--config.data.data_dir={DATA_DIR}",
          "--config.train.num_train_steps=2", "--config.eval.every_steps=2"]
  r = _run(args)
  assert r.returncode == 0, r.stderr[-3000:]
  workdir = out / "seed_3"
  # The seed and the passed-through overrides reached run.py.
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["seed"] == 3
  assert cfg["train"]["num_train_steps"] == 2
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  last = [row for row in rows if "val/itm_synthetic/itm_acc" in row][-1]
  line = [x for x in r.stdout.splitlines() if x.startswith("seed   3:")]
  assert len(line) == 1, r.stdout
  # The printed figures are the run's last evaluation.
  assert f"update {last['step']}: ITM " \
         f"{last['val/itm_synthetic/itm_acc']:.3f}" in line[0]
  assert f"MLM {last['val/mlm_synthetic/mlm_acc']:.3f}" in line[0]
  reached = int(last["val/itm_synthetic/itm_acc"] >= 0.9)
  assert f"{reached} of 1 seeds reached" in r.stdout
  # Its own workdir is replaced on the next sweep (a finished run.py workdir
  # would otherwise resume with nothing to do).
  (workdir / "stale.txt").write_text("from the first sweep")
  r2 = _run(args)
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert not (workdir / "stale.txt").exists()
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == len(rows)


def test_demo_seeds_refuses_a_directory_it_did_not_make(tmp_path):
  (tmp_path / "seed_0").mkdir()
  (tmp_path / "seed_0" / "keep.txt").write_text("user data")
  r = _run(["--seeds", "0", "--out", str(tmp_path)])
  assert r.returncode != 0
  assert "seed_0" in r.stderr and "not made by this script" in r.stderr
  assert (tmp_path / "seed_0" / "keep.txt").read_text() == "user data"
