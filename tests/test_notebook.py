"""The Colab notebook: its code cells run on the CPU (smoke variant), and
its install cell keeps a runtime's accelerator jax."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cells():
  nb = json.load(open(os.path.join(ROOT, "notebooks", "uniter_demo.ipynb")))
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_cells_are_plain_python_and_settings_come_first(cells):
  for src in cells:  # no shell escapes or magics: the test runs them as Python
    assert not any(line.lstrip().startswith(("!", "%"))
                   for line in src.splitlines()), src
  settings = cells[0]
  for name in ("REPO_URL", "DATA_DIR", "WORKDIR", "VARIANT"):
    assert f"\n{name} = " in settings, name
  assert "import" not in settings.replace("import os", "")


def _run_install_cell(cells, tmp_path, monkeypatch, backend):
  """Runs the install cell in an empty runtime whose jax reports `backend`."""
  repo = tmp_path / backend / "uniter-jax"
  repo.mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "requirements.txt"), repo)
  monkeypatch.chdir(repo.parent)
  monkeypatch.setattr(sys, "path", list(sys.path))
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      None if name == "uniter_jax" else real_find_spec(name, *a)))
  calls = []

  def fake_run(cmd, **kw):
    calls.append(list(cmd))
    if "-c" in cmd:  # the probe of the preinstalled jax
      return types.SimpleNamespace(returncode=0, stdout=backend + "\n")
    return types.SimpleNamespace(returncode=1 if cmd[0] == "nvidia-smi"
                                 else 0, stdout="")
  monkeypatch.setattr(subprocess, "run", fake_run)
  scope = {}
  for n, src in enumerate(cells[:2]):   # the settings, then the install
    exec(compile(src, f"cell-{n}", "exec"), scope)  # pylint: disable=exec-used
  pip = [c for c in calls if "pip" in c]
  reqs = pip[0][pip[0].index("-r") + 1]
  with open(reqs if os.path.isabs(reqs) else repo / reqs) as f:
    names = {l.split("==")[0].strip() for l in f if "==" in l}
  return pip, names


def test_install_keeps_an_accelerator_jax(cells, tmp_path, monkeypatch):
  pip, names = _run_install_cell(cells, tmp_path, monkeypatch, "tpu")
  assert len(pip) == 1, pip                 # no jax[tpu] reinstall
  assert not names & {"jax", "jaxlib"} and "flax" in names


def test_install_on_cpu_takes_the_pinned_jax(cells, tmp_path, monkeypatch):
  pip, names = _run_install_cell(cells, tmp_path, monkeypatch, "cpu")
  assert {"jax", "jaxlib", "flax"} <= names
  assert not any("jax[" in " ".join(c) for c in pip)  # no accelerator here


def test_notebook_code_cells_run(cells, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("UNITER_DEMO_VARIANT", "runlocal")
  monkeypatch.setenv("UNITER_DEMO_WORKDIR", str(tmp_path / "demo"))
  monkeypatch.setenv("UNITER_DATA_DIR", "/tmp/uniter_jax_data")
  scope = {"__name__": "__main__"}
  for src in cells:
    exec(compile(src, "notebook-cell", "exec"), scope)  # pylint: disable=exec-used
  assert scope["config"].data.data_dir == "/tmp/uniter_jax_data"
  assert scope["ACCELERATOR"] is None
  assert os.path.getsize(scope["out_pt"]) > 100_000
  assert {"val/itm_synthetic/itm_acc", "val/zs_ir_r1"} <= set(scope["result"])
  scores = scope["scores"]
  assert scores.shape == (8,) and ((scores >= 0) & (scores <= 1)).all()
  out = capsys.readouterr().out
  assert "tensorboard --logdir" in out and "p(match)" in out
