"""The training entrypoint: resume, signals, NaN, sharding, multi-process."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

import multiproc
from configs import demo
from data_prep import prepare
from uniter_jax import convert
from uniter_jax.data import schema
from uniter_jax.train import checkpoint as ckpt_lib
from uniter_jax.train import input as input_lib
from uniter_jax.train import metrics as metrics_lib
from uniter_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DATA_DIR = "/tmp/uniter_jax_test_data"


def tiny_config(steps=4, tasks=("mlm", "itm"), **mesh):
  c = demo.get_config("runlocal")
  c.data.data_dir = DATA_DIR
  c.model.update(dict(hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64))
  c.datasets.synthetic.tasks = tuple(tasks)
  c.datasets.synthetic.mix_ratio = tuple(1 for _ in tasks)
  c.train.num_train_steps = steps
  c.train.token_budget = 256
  c.log_every_steps = 1
  c.eval.every_steps = 1000
  for name in ("zero_shot", "loss_curves", "wra_plan"):
    c.evals[name].every_steps = -1
  c.checkpoint.every_steps = 2
  c.mesh.data = mesh.get("data", 1)
  c.mesh.fsdp = mesh.get("fsdp", 1)
  prepare.ensure_synthetic(c)   # run.py builds it before training
  return c


def losses(workdir):
  return [(r["step"], r["train/loss"]) for r in
          metrics_lib.read_metrics(workdir) if "train/loss" in r]


def _flat_params(workdir, step):
  d = os.path.join(workdir, "checkpoints", str(step), "state")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree = ocp.PyTreeCheckpointer().restore(d)
  return traverse_util.flatten_dict(tree["params"])


def _env(n_devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run_py(args, **kw):
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args],
                        capture_output=True, text=True, env=_env(), **kw)


def _overrides(steps, workdir, extra=()):
  return ["--config", os.path.join(ROOT, "configs/demo.py:runlocal"),
          "--workdir", str(workdir), f"--config.data.data_dir={DATA_DIR}",
          f"--config.train.num_train_steps={steps}", *extra]


def test_config_typo_is_an_error(tmp_path):
  r = _run_py(_overrides(2, tmp_path, ["--config.train.learnin_rate=1"]))
  assert r.returncode != 0
  assert "learnin_rate" in r.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_run_py_end_to_end(tmp_path):
  r = _run_py(_overrides(4, tmp_path, ["--config.checkpoint.every_steps=2",
                                       "--config.log_every_steps=1"]))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "final evaluation" in r.stdout
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  assert any("val/zs_ir_r1" in r for r in rows)
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["train"]["num_train_steps"] == 4
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  for png in ("loss_curves.png", "wra_plan.png"):
    assert (tmp_path / "plots" / png).stat().st_size > 10_000
  assert list((tmp_path / "tensorboard").iterdir())
  # The export converts to an official PyTorch state_dict.
  model, params = convert.load_checkpoint(str(tmp_path / "export_flax"),
                                          "pretrain")
  assert model.cfg.hidden_size == 128
  from uniter_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["to-torch", "--task", "pretrain",
                   str(tmp_path / "export_flax"),
                   str(tmp_path / "out.pt")]) == 0
  # A second run on the finished workdir resumes and has nothing to do.
  r2 = _run_py(_overrides(4, tmp_path))
  assert r2.returncode == 0, r2.stderr[-2000:]
  assert len(losses(str(tmp_path))) == 4


def test_nan_in_a_batch_stops_the_run(tmp_path, monkeypatch):
  calls = {"n": 0}
  orig = trainer.sharding.to_global

  def poisoned(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 4:   # the batch of micro-step 3
      batch = dict(batch, img_feat=batch["img_feat"] * np.nan)
    return orig(batch, mesh)

  monkeypatch.setattr(trainer.sharding, "to_global", poisoned)
  with pytest.raises(trainer.NonFiniteError, match="non-finite loss") as e:
    trainer.train_and_evaluate(tiny_config(steps=6), str(tmp_path))
  assert "micro-step 3" in str(e.value)
  ck = ckpt_lib.Checkpointer(str(tmp_path), 3)
  assert ck.latest_step() == 2
  params = _flat_params(str(tmp_path), 2)
  assert all(np.isfinite(v).all() for v in params.values())


def test_loss_weights_scale_the_task_gradient(tmp_path):
  def first_row(weight, name):
    c = tiny_config(steps=1, tasks=("mlm",))
    c.train.loss_weights.mlm = weight
    trainer.train_and_evaluate(c, str(tmp_path / name))
    return [r for r in metrics_lib.read_metrics(str(tmp_path / name))
            if "train/loss" in r][0]

  full, quarter = first_row(1.0, "full"), first_row(0.25, "quarter")
  # The same first batch and params: the reported loss is unweighted, the
  # gradient (before clipping) is the weighted loss's.
  assert quarter["train/loss"] == pytest.approx(full["train/loss"], rel=1e-6)
  assert quarter["train/mlm/l2_grads"] == pytest.approx(
      0.25 * full["train/mlm/l2_grads"], rel=1e-5)


def test_two_runs_build_one_synthetic_corpus_together(tmp_path):
  # Both processes ask for the corpus at once; one builds it, the other
  # waits for the build lock and then accepts that build.
  code = ("from configs import demo; from data_prep import prepare; "
          "c = demo.get_config('runlocal'); c.data.data_dir = {d!r}; "
          "prepare.ensure_synthetic(c); print('ready')").format(
              d=str(tmp_path))
  procs = [subprocess.Popen([sys.executable, "-c", code], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert out.strip().endswith("ready")
  c = tiny_config()
  c.data.data_dir = str(tmp_path)
  ds = input_lib.make_datasets(c, input_lib.make_run_tasks(c),
                               split_field="split", text_field="text",
                               token_budget=256, batch_multiple=1, seed=0)
  assert ds["mlm_synthetic"].load_batch(0)["input_ids"].shape[0] > 0


def test_a_stale_synthetic_corpus_is_refused(tmp_path):
  c = tiny_config()
  c.data.data_dir = str(tmp_path)
  prepare.ensure_synthetic(c)
  prepare.ensure_synthetic(c)   # the same preset: accepted as built
  # As if an older release had built preset "tiny" with other settings.
  d = schema.builder_dir(str(tmp_path), "uniter_synthetic_images/tiny:1.0.0")
  path = os.path.join(d, schema.META_FILE)
  with open(path) as f:
    meta = json.load(f)
  # A build from before `colour_prob` existed: read as its default, accepted.
  del meta["config"]["colour_prob"]
  with open(path, "w") as f:
    json.dump(meta, f)
  prepare.ensure_synthetic(c)
  meta["config"]["noise"] = 0.9
  with open(path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match="preset 'tiny' built with .*delete"):
    prepare.ensure_synthetic(c)


def test_loss_weights_reject_unknown_tasks():
  c = tiny_config()
  c.lock()   # as run.py locks it
  with pytest.raises(AttributeError):
    c.train.loss_weights.mml = 0.5
  c.train.loss_weights.mlm = 0.5


def _sharding_cfg(**mesh):
  c = tiny_config(steps=3, **mesh)
  n = c.mesh.data * c.mesh.fsdp
  c.train.token_budget = 1024 // n  # per device: the same global budget
  c.data.batch_multiple = 8      # the same batches on every mesh
  c.train.sum_grads = False      # the same gradient scale on every mesh
  c.checkpoint.every_steps = 100
  return c


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
  """The reference run on one device, shared by both meshes below."""
  wd = str(tmp_path_factory.mktemp("one_device") / "run")
  trainer.train_and_evaluate(_sharding_cfg(), wd)
  return losses(wd)


@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=4)])
def test_sharded_training_matches_one_device(tmp_path, mesh,
                                             one_device_losses):
  assert len(jax.devices()) >= 8
  trainer.train_and_evaluate(_sharding_cfg(**mesh), str(tmp_path / "many"))
  one, many = one_device_losses, losses(str(tmp_path / "many"))
  assert [s for s, _ in one] == [s for s, _ in many] == [1, 2, 3]
  np.testing.assert_allclose([l for _, l in many], [l for _, l in one],
                             rtol=2e-4)


def test_two_processes_train_together(tmp_path):
  common = ["--config.mesh.data=-1", "--config.log_every_steps=1",
            "--config.checkpoint.every_steps=3",
            "--config.evals.loss_curves.every_steps=-1",
            "--config.evals.wra_plan.every_steps=-1",
            "--config.evals.zero_shot.every_steps=-1",
            "--config.datasets.synthetic.tasks=('mlm','itm')",
            "--config.datasets.synthetic.mix_ratio=(1,1)",
            "--config.train.sum_grads=False", "--config.train.token_budget=256"]
  # Build the data once so both processes find it.
  tiny_config()
  procs = multiproc.start(_overrides(3, tmp_path / "multi", common),
                          _env(1))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # The same global batches on one process with two devices.
  single = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run.py"),
       *_overrides(3, tmp_path / "single", common)],
      capture_output=True, text=True, env=_env(2), timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  multi = losses(str(tmp_path / "multi"))
  one = losses(str(tmp_path / "single"))
  assert [s for s, _ in multi] == [1, 2, 3]
  np.testing.assert_allclose([l for _, l in multi], [l for _, l in one],
                             rtol=2e-4)
  assert ckpt_lib.Checkpointer(str(tmp_path / "multi"), 3).latest_step() == 3
