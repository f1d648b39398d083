"""Executes the Colab notebook's code cells on the CPU (smoke variant)."""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_notebook_code_cells_run(tmp_path, monkeypatch):
  nb = json.load(open(os.path.join(ROOT, "notebooks", "uniter_demo.ipynb")))
  cells = ["".join(c["source"]) for c in nb["cells"]
           if c["cell_type"] == "code"]
  assert len(cells) >= 5
  for src in cells:  # plain Python only: no shell escapes or magics
    assert not any(line.lstrip().startswith(("!", "%"))
                   for line in src.splitlines()), src
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("UNITER_DEMO_VARIANT", "runlocal")
  monkeypatch.setenv("UNITER_DEMO_WORKDIR", str(tmp_path / "demo"))
  scope = {"__name__": "__main__"}
  for src in cells:
    exec(compile(src, "notebook-cell", "exec"), scope)  # pylint: disable=exec-used
  assert os.path.getsize(scope["out_pt"]) > 100_000
  assert {"val/itm_synthetic/itm_acc", "val/zs_ir_r1"} <= set(scope["result"])
