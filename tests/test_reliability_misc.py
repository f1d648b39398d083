"""What a real cluster does to a run: crashes mid-write, restarts from an
older checkpoint, a site umask. Metrics, TensorBoard and converter files
must come out the same as after a clean run."""

import glob
import json
import logging
import os
import re
import struct

import pytest

from uniter_jax.train import metrics as metrics_lib


def _rows(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _write_run(workdir, steps, resume_step=None, tag="train/loss",
               scale=1.0):
  w = metrics_lib.MetricWriter(workdir, resume_step=resume_step)
  for s in steps:
    w.write(s, {tag: s * scale})
  w.close()


# ---------------------------------------------------------------- metrics


def test_resume_drops_rows_after_the_checkpoint(tmp_path, caplog):
  wd = str(tmp_path)
  _write_run(wd, range(1, 11))          # crashed after update 10 ...
  caplog.set_level(logging.INFO)
  _write_run(wd, range(6, 9), resume_step=5, scale=2.0)  # ... saved at 5
  rows = _rows(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert [r["train/loss"] for r in rows] == [1, 2, 3, 4, 5, 12, 14, 16]
  msgs = [r.getMessage() for r in caplog.records]
  assert any("metrics.jsonl" in m and "5 rows" in m for m in msgs), msgs
  # The rewrite went through a temporary in the same directory; none is left.
  assert sorted(os.listdir(wd)) == ["metrics.jsonl", "tensorboard"]


def test_torn_last_line_is_dropped_before_appending(tmp_path):
  wd = str(tmp_path)
  _write_run(wd, range(1, 4))
  path = os.path.join(wd, "metrics.jsonl")
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"step": 4, "train/lo')       # killed inside write()
  # Not a resume (e.g. eval mode): only the torn line goes.
  _write_run(wd, [4])
  assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4]
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"step": 5, "train/lo')
  _write_run(wd, [3], resume_step=2, scale=3.0)
  rows = _rows(path)
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1), (2, 2),
                                                           (3, 9)]


def test_complete_last_row_without_newline_is_kept(tmp_path):
  wd = str(tmp_path)
  path = os.path.join(wd, "metrics.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}')
  _write_run(wd, [3], tag="a")
  assert [r["step"] for r in _rows(path)] == [1, 2, 3]


def test_read_metrics_skips_a_torn_line(tmp_path, caplog):
  wd = str(tmp_path)
  _write_run(wd, range(1, 4))
  with open(os.path.join(wd, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write('{"step": 4, "train/lo')
  caplog.set_level(logging.WARNING)
  stats = {}
  rows = metrics_lib.read_metrics(wd, stats=stats)
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert stats == {"rows": 3, "torn": 1, "duplicates": 0}
  assert any("metrics.jsonl" in r.getMessage() and "1 torn" in r.getMessage()
             for r in caplog.records)


def test_read_metrics_keeps_the_last_of_duplicate_rows(tmp_path):
  # The file a crash + resume left before MetricWriter truncated on resume:
  # updates 3-4 twice; the eval row at update 4 has other keys and stays.
  lines = [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 2.0},
           {"step": 3, "train/loss": 3.0}, {"step": 4, "train/loss": 4.0},
           {"step": 4, "val/acc": 0.5},
           {"step": 3, "train/loss": 30.0}, {"step": 4, "train/loss": 40.0}]
  with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in lines))
  stats = {}
  rows = metrics_lib.read_metrics(str(tmp_path), stats=stats)
  assert rows == [{"step": 1, "train/loss": 1.0},
                  {"step": 2, "train/loss": 2.0},
                  {"step": 4, "val/acc": 0.5},
                  {"step": 3, "train/loss": 30.0},
                  {"step": 4, "train/loss": 40.0}]
  assert stats == {"rows": 5, "torn": 0, "duplicates": 2}
  assert metrics_lib.read_metrics(str(tmp_path / "none")) == []


# ------------------------------------------------------------- tensorboard


def _tb_scalars(logdir):
  """{tag: {step: value}} as TensorBoard shows it: event files in name
  order, and a SessionLog START at step P hides earlier events with
  step >= P (what `purge_step` writes; the tensorboard package is not
  installed, so the records are read here)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  seen = []
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  assert files, f"no event files in {logdir}"
  for path in files:
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      rec = data[pos + 12:pos + 12 + n]
      assert len(rec) == n, f"{path}: truncated record"
      pos += 12 + n + 4
      ev = event_pb2.Event.FromString(rec)
      if (ev.HasField("session_log") and
          ev.session_log.status == event_pb2.SessionLog.START):
        seen = [x for x in seen if x[1] < ev.step]
      for v in ev.summary.value:
        seen.append((v.tag, ev.step, v.simple_value))
  out = {}
  for tag, step, value in seen:
    assert step not in out.get(tag, {}), f"{tag} step {step} shown twice"
    out.setdefault(tag, {})[step] = value
  return out


def test_tensorboard_purges_the_steps_replayed_after_a_resume(tmp_path):
  wd = str(tmp_path)
  # Both writers open their event file within the same second, as a test
  # (or a fast crash loop) does: the second must not overwrite the first.
  _write_run(wd, range(1, 11))
  _write_run(wd, range(6, 9), resume_step=5, scale=2.0)
  got = _tb_scalars(os.path.join(wd, "tensorboard"))
  assert got == {"train/loss": {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 12, 7: 14,
                                8: 16}}


# ------------------------------------------------------------ the converter

torch = pytest.importorskip("torch")


def _pretrain_files(tmp_path):
  import parity_cases as P  # pylint: disable=g-import-not-at-top
  import torch_ref as R  # pylint: disable=g-import-not-at-top
  cfg_json = tmp_path / "tiny.json"
  cfg_json.write_text(json.dumps(R.tiny_config().to_dict()))
  model = P.make_reference("pretrain", R.tiny_config())
  src = tmp_path / "pre.pt"
  torch.save(model.state_dict(), src)
  return model, str(cfg_json), str(src)


def _printed_count(text):
  m = re.search(r"\(([\d,]+) parameters", text)
  assert m, text
  return int(m.group(1).replace(",", ""))


def test_both_directions_print_the_same_parameter_count(tmp_path, capsys):
  from uniter_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  model, cfg_json, src = _pretrain_files(tmp_path)
  assert cli.main(["to-flax", "--task", "pretrain", "--model-config",
                   cfg_json, src, str(tmp_path / "flax")]) == 0
  to_flax = _printed_count(capsys.readouterr().out)
  assert cli.main(["to-torch", "--task", "pretrain", str(tmp_path / "flax"),
                   str(tmp_path / "back.pt")]) == 0
  to_torch = _printed_count(capsys.readouterr().out)
  # torch's parameters() yields a tied parameter once.
  distinct = sum(p.numel() for p in model.parameters())
  distinct += sum(b.numel() for b in model.buffers())
  assert to_flax == to_torch == distinct


@pytest.fixture
def umask():
  """Sets the process umask for one test and restores it afterwards."""
  old = os.umask(0o022)
  yield os.umask
  os.umask(old)


@pytest.mark.parametrize("mask,file_mode,dir_mode",
                         [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_converter_outputs_follow_the_umask(tmp_path, umask, mask, file_mode,
                                            dir_mode):
  import parity_cases as P  # pylint: disable=g-import-not-at-top
  import torch_ref as R  # pylint: disable=g-import-not-at-top
  from uniter_jax import convert  # pylint: disable=g-import-not-at-top
  sd = P.state_dict_numpy(P.make_reference("itm", R.tiny_config()))
  fcfg = P.flax_config(R.tiny_config())
  umask(mask)
  convert.write_state_dict(sd, tmp_path / "out.pt")
  params = convert.torch_to_flax(sd, "itm", fcfg)
  convert.save_flax(tmp_path / "flax", params, "itm", fcfg)
  convert.save_flax(tmp_path / "flax", params, "itm", fcfg, overwrite=True)
  assert os.stat(tmp_path / "out.pt").st_mode & 0o777 == file_mode
  assert os.stat(tmp_path / "flax").st_mode & 0o777 == dir_mode
  assert (os.stat(tmp_path / "flax" / "uniter_config.json").st_mode & 0o777
          == file_mode)
