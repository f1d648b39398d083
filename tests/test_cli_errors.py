"""The command lines' errors, TFDS defaults and the official img_db reading.

`python -m data_prep` and `python -m uniter_jax.convert` answer a person's
mistake with one line `error: <what> (<where>): <fix>` on stderr and a
non-zero status (2 for usage), with no traceback unless `--verbose`. Most
cases call `main(argv)` in-process; a few subprocesses prove the same end
to end. `data_prep img_db` reads an official image folder as the official
`DetectFeatLmdb` does, and cuts arrays longer than the regions it keeps.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from data_prep import __main__ as prep_cli
from data_prep import common
from data_prep import uniter_db
import fixtures_official as fx
from uniter_jax import convert
from uniter_jax.convert import __main__ as conv_cli
from uniter_jax.data import schema
from uniter_jax.model import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_error_line(err: str) -> str:
  """The one error line of `err`, its last line; fails on a traceback.

  A build that failed midway has written progress bars (tqdm) before it.
  """
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], err
  return errors[0]


def _prep(capsys, *argv) -> tuple[int, str]:
  rc = prep_cli.main([os.fspath(a) for a in argv])
  return rc, capsys.readouterr().err


def _records(data_dir, name):
  """{img_key: record} of a built image store (split `images`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  src = tfds.data_source(f"uniter_img_db/{name}", data_dir=os.fspath(
      data_dir), split="images")
  return {r["img_key"].decode(): r for r in (src[i] for i in range(len(src)))}


def _meta(data_dir, name):
  return schema.read_meta(schema.builder_dir(data_dir,
                                             f"uniter_img_db/{name}:1.0.0"))


@pytest.fixture()
def image_folder(tmp_path):
  """manual/img/coco: as downloaded, a dynamic db with its nbb json, a fixed
  compressed db and `all`, from the same images (4-12 regions)."""
  folder = tmp_path / "manual" / "img" / "coco"
  images = fx.make_images(4, seed=3, min_bb=4, max_bb=12, soft=False)
  fx.write_img_db(os.fspath(folder), images, variant="dyn", min_bb=10)
  fx.write_img_db(os.fspath(folder), images, variant="fixed", num_bb=3,
                  compressed=True)
  fx.write_img_db(os.fspath(folder), images, variant="all")
  return folder, images


# ----------------------------------------------------------------------------
# data_prep img_db: the official image folder and the official cut.
# ----------------------------------------------------------------------------
def test_image_folder_picks_the_db_as_the_official_reader(
    tmp_path, image_folder, capsys):
  folder, images = image_folder
  manual, data = tmp_path / "manual", tmp_path / "data"
  # Default rule (0.2 / 100 / 10): the dynamic db, counts from its json.
  assert prep_cli.main(["img_db", "--manual_dir", os.fspath(manual),
                        "--img_db", "img/coco", "--name", "dyn",
                        "--data_dir", os.fspath(data)]) == 0
  assert "feat_th0.2_max100_min10: region counts from nbb_th0.2_max100_" \
      "min10.json" in capsys.readouterr().out
  meta = _meta(data, "dyn")
  assert meta["db_name"] == "feat_th0.2_max100_min10"
  assert meta["db_cut"] == {"conf_th": 0.2, "min_bb": 10, "max_bb": 100,
                            "num_bb": None}
  nbb = json.loads((folder / "nbb_th0.2_max100_min10.json").read_text())
  recs = _records(data, "dyn")
  for key, arrs in images.items():
    assert recs[key]["num_bb"] == min(nbb[key], len(arrs["conf"]))
  # conf_th -1: the fixed db (only the compressed one exists), num_bb rows.
  assert prep_cli.main(["img_db", "--manual_dir", os.fspath(manual),
                        "--img_db", "img/coco", "--conf_th", "-1",
                        "--num_bb", "3", "--name", "fixed",
                        "--data_dir", os.fspath(data)]) == 0
  assert _meta(data, "fixed")["db_name"] == "feat_numbb3_compressed"
  assert {int(r["num_bb"]) for r in _records(data, "fixed").values()} == {3}
  # A rule without its nbb json: `all`, counts by the rule from each conf.
  assert prep_cli.main(["img_db", "--manual_dir", os.fspath(manual),
                        "--img_db", "img/coco", "--conf_th", "0.5",
                        "--min_bb", "2", "--max_bb", "6", "--name", "rule",
                        "--data_dir", os.fspath(data)]) == 0
  meta = _meta(data, "rule")
  assert meta["db_name"] == "all"
  assert meta["db_cut"] == {"conf_th": 0.5, "min_bb": 2, "max_bb": 6,
                            "num_bb": None}
  recs = _records(data, "rule")
  counts = []
  for key, arrs in images.items():
    conf = arrs["conf"].astype(np.float16)    # as stored and read
    want = min(fx.nbb_rule(conf, 0.5, 2, 6), len(conf))
    counts.append(want)
    assert recs[key]["num_bb"] == want
    np.testing.assert_array_equal(recs[key]["conf"], conf[:want])
  assert len(set(counts)) > 1 or counts[0] < 12   # the rule really cut


def test_arrays_longer_than_the_regions_are_cut_not_refused(tmp_path, capsys):
  # `conf` (and `soft_labels`) over every detection beside 5 feature rows:
  # the official reader keeps features[:nbb], 5 regions, and so do we.
  images = fx.make_images(2, seed=4, min_bb=5, max_bb=5)
  for arrs in images.values():
    arrs["conf"] = np.concatenate([arrs["conf"], np.full(7, 0.9, np.float32)])
    arrs["soft_labels"] = np.concatenate(
        [arrs["soft_labels"], np.full((7, 1601), 1 / 1601, np.float32)])
  db = fx.write_img_db(os.fspath(tmp_path / "m" / "img"), images,
                       variant="all")
  assert prep_cli.main(["img_db", "--img_db", db, "--name", "long",
                        "--data_dir", os.fspath(tmp_path / "data")]) == 0
  recs = _records(tmp_path / "data", "long")
  for key, arrs in images.items():
    rec = recs[key]
    assert rec["num_bb"] == 5 and rec["conf"].shape == (5,)
    np.testing.assert_array_equal(rec["conf"],
                                  arrs["conf"][:5].astype(np.float16))
  # A fixed db whose records hold more rows than its num_bb (as
  # convert_imgdir.py writes feat_numbbN: cut by max_bb): num_bb rows.
  fixed = tmp_path / "m" / "img" / "feat_numbb3"
  os.rename(db, fixed)
  assert prep_cli.main(["img_db", "--img_db", os.fspath(fixed), "--name",
                        "fixed", "--data_dir",
                        os.fspath(tmp_path / "data")]) == 0
  for key, rec in _records(tmp_path / "data", "fixed").items():
    assert rec["num_bb"] == 3
    np.testing.assert_array_equal(
        rec["conf"], images[key]["conf"][:3].astype(np.float16))
  assert "error" not in capsys.readouterr().err


def test_choose_img_db_variants(image_folder):
  folder, _ = image_folder
  c = uniter_db.choose_img_db(os.fspath(folder), compressed=True,
                              conf_th=-1, num_bb=3)
  assert c.db_dir.endswith("feat_numbb3_compressed") and c.num_bb == 3
  # The db folder itself: its name decides; a contradicting option fails.
  c = uniter_db.choose_img_db(os.fspath(folder / "feat_th0.2_max100_min10"))
  assert c.nbb_file.endswith("nbb_th0.2_max100_min10.json")
  with pytest.raises(common.BadInputError, match=r"--max_bb 50 .*drop "
                     "those options"):
    uniter_db.choose_img_db(os.fspath(folder / "feat_th0.2_max100_min10"),
                            max_bb=50)
  # Without the nbb json the dynamic db keeps its stored counts only when
  # there is no `all` to compute them from (the official reader's choice).
  (folder / "nbb_th0.2_max100_min10.json").unlink()
  assert uniter_db.choose_img_db(os.fspath(folder)).rule is not None
  assert uniter_db.rule_db_names(0.2, 100, 10, 36) == (
      "feat_th0.2_max100_min10", "nbb_th0.2_max100_min10.json")
  assert uniter_db.rule_db_names(-1, 100, 10, 36) == ("feat_numbb36", None)


# ----------------------------------------------------------------------------
# data_prep: one line for each mistake.
# ----------------------------------------------------------------------------
def test_data_prep_path_mistakes_are_one_line(tmp_path, image_folder, capsys):
  folder, _ = image_folder
  manual, data = tmp_path / "manual", tmp_path / "data"
  fx.write_txt_db(os.fspath(manual / "txt" / "a.db"), {
      "t0": {"input_ids": [12, 14], "img_fname": "img_0000.npz"}})
  base = ["--manual_dir", manual, "--name", "x", "--data_dir", data]
  cases = [
      # (argv, what the line must name)
      (["img_db", "--img_db", "img/cocoa"] + base,
       ["img_db folder does not exist", "img/cocoa", "holds coco"]),
      (["img_db", "--img_db", "img"] + base,    # one level too high
       ["image folders inside it", os.fspath(folder)]),
      (["img_db", "--img_db", "txt/a.db"] + base,
       ["is a txt_db", "python -m data_prep txt_db"]),
      # No feat_th0.3 db and no all_compressed to count regions from.
      (["img_db", "--img_db", "img/coco", "--conf_th", "0.3",
        "--compressed_db"] + base,
       ["conf_th 0.3", "(_compressed)", "feat_th0.2_max100_min10 (--conf_th "
        "0.2 --max_bb 100 --min_bb 10)", "feat_numbb3_compressed (--conf_th "
        "-1 --num_bb 3 --compressed_db)", "all (a rule without its "
        "nbb_*.json)"]),
      (["txt_db", "--txt_db", "img/coco", "--img_store", "s/c:1.0.0"] + base,
       ["is an img_db, not a txt_db", "python -m data_prep img_db"]),
      (["txt_db", "--txt_db", "txt", "--img_store", "s/c:1.0.0"] + base,
       ["folders inside it are txt_dbs", "(a.db)"]),
      (["txt_db", "--txt_db", "txt/a.db", "--img_store",
        "uniter_img_db/none:1.0.0"] + base,
       ["'uniter_img_db/none:1.0.0' is not built", "build it first"]),
      (["img_db", "--img_db", "img/coco", "--name", "x", "--data_dir",
        data],   # the TFDS default manual_dir does not exist
       [os.path.join(os.fspath(data), "downloads", "manual"),
        "pass --manual_dir"]),
  ]
  for argv, names in cases:
    rc, err = _prep(capsys, *argv)
    line = _one_error_line(err)
    assert rc == 1, (argv, err)
    for n in names:
      assert n in line, (n, line)
  assert not (data / "uniter_img_db").exists()   # nothing was built


def test_data_prep_bad_record_json_and_existing_dataset(tmp_path, capsys):
  images = fx.make_images(3, seed=5, soft=False)
  db = fx.write_img_db(os.fspath(tmp_path / "m" / "img"), images,
                       raw_override={"img_0001.npz": b"not msgpack"})
  data = tmp_path / "data"
  rc, err = _prep(capsys, "img_db", "--img_db", db, "--name", "bad",
                  "--data_dir", data)
  line = _one_error_line(err)
  assert rc == 1 and "corrupted record" in line
  assert "record 'img_0001.npz'" in line and db in line
  assert "re-download" in line
  with pytest.raises(Exception):
    _records(data, "bad")            # the failed build left no dataset
  # An nbb json that is not JSON names itself.
  good = fx.write_img_db(os.fspath(tmp_path / "m2" / "img"), images)
  nbb = tmp_path / "m2" / "img" / "nbb_th0.2_max100_min10.json"
  nbb.write_text("{oops")
  rc, err = _prep(capsys, "img_db", "--img_db", good, "--name", "j",
                  "--data_dir", data)
  line = _one_error_line(err)
  assert rc == 1 and "not valid JSON" in line and os.fspath(nbb) in line
  # An existing dataset: an error naming --overwrite, not a silent reuse.
  nbb.unlink()
  argv = ["img_db", "--img_db", good, "--name", "ok", "--data_dir", data]
  assert _prep(capsys, *argv)[0] == 0
  rc, err = _prep(capsys, *argv)
  line = _one_error_line(err)
  assert rc == 1 and "already built" in line and "--overwrite" in line
  assert _prep(capsys, *argv, "--overwrite")[0] == 0


def test_data_prep_usage_errors_exit_2_in_one_line(tmp_path, capsys):
  for argv, names in [
      (["img_db", "--img_db", "x"], ["required: --name", "--help"]),
      (["img_db", "--name", "x", "--conf_th", "high"],
       ["invalid float value: 'high'"]),
      (["nlvr2", "--vocab", "v.txt", "--img_store", "s/c:1.0.0", "--name",
        "n", "--split", "dev.json", "--manual_dir", tmp_path],
       ["--split 'dev.json' has no '='", "NAME=FILE"]),
      (["synthetic", "--num_classes", "3"], ["without a name", "--name"]),
  ]:
    with pytest.raises(SystemExit) as e:
      prep_cli.main([os.fspath(a) for a in argv])
    assert e.value.code == 2, argv
    line = _one_error_line(capsys.readouterr().err)
    for n in names:
      assert n in line, (n, line)


def test_data_prep_verbose_raises_and_defaults_follow_tfds(
    tmp_path, monkeypatch, capsys):
  (tmp_path / "img").mkdir()
  with pytest.raises(common.MissingInputError, match="img_db folder does "
                     "not exist"):
    prep_cli.main(["img_db", "--verbose", "--manual_dir", os.fspath(
        tmp_path), "--img_db", "nope", "--name", "x"])
  # No --data_dir / --manual_dir: $TFDS_DATA_DIR and its downloads/manual.
  data = tmp_path / "tfds"
  monkeypatch.setenv("TFDS_DATA_DIR", os.fspath(data))
  fx.write_img_db(os.fspath(data / "downloads" / "manual" / "img" / "coco"),
                  fx.make_images(2, soft=False))
  assert prep_cli.main(["img_db", "--img_db", "img/coco", "--name",
                        "d"]) == 0
  assert len(_records(data, "d")) == 2
  monkeypatch.delenv("TFDS_DATA_DIR")
  monkeypatch.setenv("HOME", os.fspath(tmp_path / "home"))
  rc, err = _prep(capsys, "butd", "--name", "x")
  home_data = os.fspath(tmp_path / "home" / "tensorflow_datasets")
  line = _one_error_line(err)
  assert rc == 1 and "manual_dir does not exist" in line
  assert f"({os.path.join(home_data, 'downloads', 'manual')})" in line
  with pytest.raises(SystemExit):
    prep_cli.main(["img_db", "--help"])
  help_text = " ".join(capsys.readouterr().out.split())
  assert "~/tensorflow_datasets" in help_text
  assert "<data_dir>/downloads/manual" in help_text


# ----------------------------------------------------------------------------
# uniter_jax.convert: one line for each mistake.
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def itm_checkpoint(tmp_path_factory):
  """A random tiny ITM state_dict as .safetensors (no torch needed)."""
  d = tmp_path_factory.mktemp("ckpt")
  rng = np.random.default_rng(0)
  shapes = convert.expected_torch_shapes("itm", config_lib.tiny())
  sd = {k: rng.normal(0, 0.02, s).astype(np.float32)
        for k, s in shapes.items()}
  path = d / "itm.safetensors"
  save_file(sd, os.fspath(path))
  cfg = d / "uniter-tiny.json"
  cfg.write_text(json.dumps(config_lib.to_official_dict(config_lib.tiny())))
  return path, cfg


def _conv(capsys, *argv) -> tuple[int, str]:
  rc = conv_cli.main([os.fspath(a) for a in argv])
  return rc, capsys.readouterr().err


def test_convert_mistakes_are_one_line(tmp_path, itm_checkpoint, capsys,
                                       monkeypatch):
  src, cfg = itm_checkpoint
  hf = tmp_path / "bert-base-cased"
  hf.mkdir()
  (hf / "pytorch_model.bin").write_bytes(b"x")
  bad_cfg = tmp_path / "bad.json"
  bad_cfg.write_text("{not json")
  out = tmp_path / "out"
  cases = [
      (["to-flax", "--task", "itm", tmp_path / "nope.pt", out],
       ["checkpoint file does not exist", "nope.pt", "check the path"]),
      (["to-flax", "--task", "itm", hf, out],
       ["a folder, not a checkpoint file", "(pytorch_model.bin)"]),
      (["to-flax", "--task", "vqa", "--model-config", cfg, src, out],
       ["'itm' checkpoint, not 'vqa'", "pass --task itm"]),
      (["to-flax", "--task", "itm", "--model-config", bad_cfg, src, out],
       ["not an official model config", "not valid JSON", "bad.json"]),
      (["to-flax", "--task", "itm", src, tmp_path / "x.pt"],
       ["writes a directory", "x.pt"]),
      (["to-torch", src, tmp_path / "back.pt"],
       ["PyTorch checkpoint; to-torch takes a converted directory"]),
      (["to-torch", tmp_path, tmp_path / "back.pt"],
       ["not a converted directory (no uniter_config.json)", "to-flax"]),
  ]
  for argv, names in cases:
    rc, err = _conv(capsys, *argv)
    line = _one_error_line(err)
    assert rc == 1, (argv, err)
    for n in names:
      assert n in line, (n, line)
  assert not out.exists()
  # Converted once; then an existing destination and a wrong --task.
  assert conv_cli.main(["to-flax", "--task", "itm", "--model-config",
                        os.fspath(cfg), os.fspath(src), os.fspath(out)]) == 0
  capsys.readouterr()
  rc, err = _conv(capsys, "to-flax", "--task", "itm", src, out)
  line = _one_error_line(err)
  assert rc == 1 and "already exists" in line and "--force" in line
  rc, err = _conv(capsys, "to-torch", "--task", "vqa", out,
                  tmp_path / "back.pt")
  line = _one_error_line(err)
  assert rc == 1 and "converted for task 'itm', not 'vqa'" in line
  assert "leave --task out" in line and not (tmp_path / "back.pt").exists()
  # A .pt needs torch: without it, one line that says how to get it.
  (tmp_path / "a.pt").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)
  rc, err = _conv(capsys, "to-flax", "--task", "itm", tmp_path / "a.pt",
                  tmp_path / "o2")
  line = _one_error_line(err)
  assert rc == 1 and "needs torch" in line and "pip install torch" in line
  rc, err = _conv(capsys, "to-torch", out, tmp_path / "b.pt")
  assert rc == 1 and "writing a PyTorch checkpoint needs torch" in (
      _one_error_line(err))


def test_convert_usage_and_verbose(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    conv_cli.main(["to-flax", "--task", "vqq", "a.pt", "d"])
  assert e.value.code == 2
  line = _one_error_line(capsys.readouterr().err)
  assert "invalid choice: 'vqq'" in line and "--help" in line
  with pytest.raises(convert.ConversionError, match="does not exist"):
    conv_cli.main(["--verbose", "to-flax", "--task", "itm",
                   os.fspath(tmp_path / "nope.pt"), os.fspath(tmp_path / "d")])


def test_a_bug_keeps_its_traceback(tmp_path, itm_checkpoint, monkeypatch):
  """Exceptions that are no user mistake are not turned into a line."""
  def bug(*args, **kwargs):
    raise KeyError("a bug")

  src, _ = itm_checkpoint
  monkeypatch.setattr(convert.core, "read_state_dict", bug)
  with pytest.raises(KeyError, match="a bug"):
    conv_cli.main(["to-flax", "--task", "itm", os.fspath(src),
                   os.fspath(tmp_path / "d")])
  monkeypatch.setattr(uniter_db, "choose_img_db", bug)
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "x").write_text("")
  with pytest.raises(KeyError, match="a bug"):
    prep_cli.main(["img_db", "--manual_dir", os.fspath(tmp_path / "m"),
                   "--name", "x", "--data_dir", os.fspath(tmp_path / "d")])


# ----------------------------------------------------------------------------
# End to end: the real processes print one line, or a traceback if asked.
# ----------------------------------------------------------------------------
def _python(*argv) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", *map(os.fspath, argv)],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


def test_processes_print_one_line_and_verbose_a_traceback(tmp_path):
  argv = ["data_prep", "img_db", "--manual_dir", tmp_path, "--img_db",
          "img/coco", "--name", "x", "--data_dir", tmp_path / "d"]
  (tmp_path / "img").mkdir()
  p = _python(*argv)
  assert p.returncode == 1
  line = _one_error_line(p.stderr)
  assert "img_db folder does not exist" in line and "img/coco" in line
  p = _python(*argv, "--verbose")
  assert p.returncode == 1 and "Traceback" in p.stderr
  assert "MissingInputError" in p.stderr
  p = _python("uniter_jax.convert", "to-flax", "--task", "itm",
              tmp_path / "nope.pt", tmp_path / "out")
  assert p.returncode == 1
  assert "checkpoint file does not exist" in _one_error_line(p.stderr)
