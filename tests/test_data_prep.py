"""data_prep: official LMDB dbs, BUTD TSV + annotations, bad input, schema."""
import json
import os

import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import butd
from data_prep import common
from data_prep import tokenizer
from data_prep import uniter_db
import fixtures_official as fx
from uniter_jax.data import schema


def _source(data_dir, name, split):
  return tfds.data_source(name, data_dir=os.fspath(data_dir), split=split)


def _build_img_db(tmp_path, images, name="imgs", **kw):
  manual = tmp_path / "manual"
  db = fx.write_img_db(os.fspath(manual / "coco"), images, **kw)
  b = uniter_db.UniterImgDb(
      config=uniter_db.ImgDbConfig(name=name, img_db=os.path.relpath(
          db, manual)), data_dir=os.fspath(tmp_path / "data"))
  return b, common.build(b, manual_dir=os.fspath(manual))


def _cut(arrs, nbb):
  return {k: (v.astype(np.float16) if v.dtype == np.float32 else v)[:nbb]
          for k, v in arrs.items()}


# ----------------------------------------------------------------------------
# Schema.
# ----------------------------------------------------------------------------
def test_select_num_bb_matches_official_rule():
  rng = np.random.default_rng(0)
  for _ in range(50):
    conf = rng.uniform(0, 1, int(rng.integers(1, 150)))
    want = fx.nbb_rule(conf, 0.2, 10, 100)
    assert schema.select_num_bb(conf) == min(want, len(conf))
  conf = np.full(50, 0.9)
  assert schema.select_num_bb(conf, max_bb=30) == 30
  assert schema.select_num_bb(np.zeros(50), min_bb=10) == 10
  assert schema.select_num_bb(np.zeros(5), min_bb=10) == 5
  assert schema.select_num_bb(np.zeros(50), num_bb=36) == 36
  assert schema.select_num_bb(np.zeros(20), num_bb=36) == 20


def test_effective_num_bb_uses_stored_count_under_db_cut():
  conf = np.array([0.1, 0.9, 0.1, 0.1], np.float32)  # unsorted confidences
  cut = {"conf_th": 0.2, "min_bb": 10, "max_bb": 100, "num_bb": None}
  assert schema.effective_num_bb(conf, 4, cut) == 4
  assert schema.effective_num_bb(conf, 4, cut, min_bb=1) == 1
  assert schema.effective_num_bb(conf, 4, None, min_bb=1) == 1


# ----------------------------------------------------------------------------
# img_db.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("variant", ["dyn", "fixed", "all"])
def test_img_db_round_trip(tmp_path, compressed, variant):
  images = fx.make_images(5, seed=1, min_bb=3, max_bb=14)
  b, summary = _build_img_db(tmp_path, images, variant=variant,
                             compressed=compressed, min_bb=4, num_bb=6)
  assert summary.written == {"images": 5, "soft_labels": 5}
  assert summary.dropped == {}
  src = _source(tmp_path / "data", "uniter_img_db/imgs", "images")
  soft = _source(tmp_path / "data", "uniter_img_db/imgs", "soft_labels")
  index = schema.read_image_index(b.data_dir)
  assert list(index) == list(images)
  meta = schema.read_meta(b.data_dir)
  assert meta["has_soft_labels"] and meta["kind"] == "images"
  for key, arrs in images.items():
    rec = src[index[key]]
    assert rec["img_key"].decode() == key
    nbb = {"dyn": fx.nbb_rule(arrs["conf"], 0.2, 4, 100), "fixed": 6,
           "all": None}[variant]
    want = _cut(arrs, nbb)
    assert rec["num_bb"] == want["features"].shape[0]
    assert rec["features"].dtype == np.float16
    np.testing.assert_array_equal(rec["features"], want["features"])
    assert rec["soft_labels"].shape == (0, 1601)
    srec = soft[index[key]]
    assert srec["img_key"].decode() == key and srec["num_bb"] == rec["num_bb"]
    assert srec["features"].shape == (0, 2048)
    np.testing.assert_array_equal(srec["soft_labels"], want["soft_labels"])
    np.testing.assert_array_equal(rec["norm_bb"],
                                  want["norm_bb"].astype(np.float32))
    np.testing.assert_array_equal(rec["conf"], want["conf"].astype(np.float32))
  if variant == "dyn":
    assert meta["db_cut"] == {"conf_th": 0.2, "min_bb": 4, "max_bb": 100,
                              "num_bb": None}
  elif variant == "fixed":
    assert meta["db_cut"]["num_bb"] == 6
  else:
    assert meta["db_cut"] is None


def test_img_db_without_soft_labels(tmp_path):
  images = fx.make_images(2, soft=False)
  b, _ = _build_img_db(tmp_path, images, variant="all")
  meta = schema.read_meta(b.data_dir)
  assert not meta["has_soft_labels"] and not meta["soft_label_split"]
  assert meta["written"] == {"images": 2}
  rec = _source(tmp_path / "data", "uniter_img_db/imgs", "images")[0]
  assert rec["soft_labels"].shape == (0, 1601)
  with pytest.raises(Exception):
    _source(tmp_path / "data", "uniter_img_db/imgs", "soft_labels")


def _assert_not_built(tmp_path, name):
  with pytest.raises(Exception):
    _source(tmp_path / "data", name, "images")
  base = tmp_path / "data" / name.split("/")[0]
  leftovers = [p for p in base.rglob("*")] if base.exists() else []
  assert not [p for p in leftovers if p.name == "dataset_info.json"]


@pytest.mark.parametrize("problem,match", [
    ("corrupt", "corrupted record"),
    ("nan", "NaN/inf"),
    ("zero", "zero regions"),
    ("overflow", "NaN/inf"),
])
def test_img_db_bad_record_errors_and_leaves_no_dataset(tmp_path, problem,
                                                       match):
  images = fx.make_images(4, seed=2, soft=False)
  bad = "img_0002.npz"
  override = None
  if problem == "corrupt":
    override = {bad: b"\x93NUMPY-not-really"}
  elif problem == "nan":
    images[bad]["features"][1, 7] = np.nan
  elif problem == "zero":
    images[bad] = {k: v[:0] for k, v in images[bad].items()}
  elif problem == "overflow":    # finite fp32, inf after the fp16 cast
    images[bad]["features"] = images[bad]["features"].astype(np.float64)
    images[bad]["features"][0, 0] = 1e6
  with pytest.raises(schema.DataError, match=match) as e:
    _build_img_db(tmp_path, images, variant="all", raw_override=override)
  assert e.value.record_id == bad and "uniter_img_db/imgs" in str(e.value)
  _assert_not_built(tmp_path, "uniter_img_db/imgs")


def test_img_db_nbb_json_mismatch(tmp_path):
  images = fx.make_images(3, min_bb=12, max_bb=12)
  manual = tmp_path / "manual"
  db = fx.write_img_db(os.fspath(manual), images, min_bb=10)
  nbb_file = manual / "nbb_th0.2_max100_min10.json"
  nbb = json.loads(nbb_file.read_text())
  nbb["img_0001.npz"] -= 1
  nbb_file.write_text(json.dumps(nbb))
  b = uniter_db.UniterImgDb(config=uniter_db.ImgDbConfig(
      name="x", img_db=os.path.basename(db)), data_dir=os.fspath(
          tmp_path / "data"))
  with pytest.raises(schema.DataError,
                     match=r"uniter_img_db/x:1.0.0 from .*: record "
                     r"'img_0001.npz'.*nbb_th"):
    common.build(b, manual_dir=os.fspath(manual))


# ----------------------------------------------------------------------------
# txt_db.
# ----------------------------------------------------------------------------
def _examples():
  return {
      "t0": {"input_ids": [12, 14], "img_fname": "img_0000.npz"},
      "t1": {"input_ids": np.array([11, 13, 16, 7], np.int64),
             "img_fname": "img_0001.npz",
             "target": {"labels": [2, 5], "scores": [1.0, 0.3]}},
      "t2": {"input_ids": [10] * 8, "img_fname": "img_0000.npz"},  # too long
      "t3": {"input_ids": [26, 27], "img_fname": ["img_0000.npz",
                                                   "img_0002.npz"],
             "target": 1},
      "t4": {"input_ids": [23], "img_fname": "img_0002.npz", "target": None},
  }


@pytest.fixture()
def img_store(tmp_path):
  _build_img_db(tmp_path, fx.make_images(3, soft=False), variant="all")
  return "uniter_img_db/imgs:1.0.0"


def _build_txt_db(tmp_path, examples, img_store, vocab="", **kw):
  manual = tmp_path / "manual"
  fx.write_txt_db(os.fspath(manual / "txt.db"), examples, **kw)
  b = uniter_db.UniterTxtDb(config=uniter_db.TxtDbConfig(
      name="txt", txt_db="txt.db", img_store=img_store, max_txt_len=6,
      task="mixed", vocab=vocab), data_dir=os.fspath(tmp_path / "data"))
  return b, common.build(b, manual_dir=os.fspath(manual))


def test_txt_db_round_trip_and_drop_count(tmp_path, img_store):
  vocab = fx.write_vocab(os.fspath(tmp_path / "vocab.txt"))
  b, summary = _build_txt_db(tmp_path, _examples(), img_store, vocab=vocab)
  assert summary.written == {"train": 4}
  assert summary.dropped == {"over_max_txt_len": 1}
  meta = schema.read_meta(b.data_dir)
  assert meta["img_store"] == img_store and meta["vocab_size"] == len(fx.VOCAB)
  assert {k: meta[k] for k in ("CLS", "SEP", "MASK", "UNK")} == {
      k: fx.bert_meta()[k] for k in ("CLS", "SEP", "MASK", "UNK")}
  assert meta["v_range"] == [6, len(fx.VOCAB)]
  src = _source(tmp_path / "data", "uniter_txt_db/txt", "train")
  got = {src[i]["id"].decode(): src[i] for i in range(len(src))}
  ex = _examples()
  assert sorted(got) == ["t0", "t1", "t3", "t4"]
  for rid, rec in got.items():
    np.testing.assert_array_equal(rec["input_ids"], ex[rid]["input_ids"])
    assert rec["input_ids"].dtype == np.int32
    fname = ex[rid]["img_fname"]
    assert [k.decode() for k in rec["img_keys"]] == (
        [fname] if isinstance(fname, str) else fname)
  np.testing.assert_array_equal(got["t1"]["target_labels"], [2, 5])
  np.testing.assert_allclose(got["t1"]["target_scores"], [1.0, 0.3])
  assert got["t3"]["target"] == 1 and got["t4"]["target"] == -1
  assert got["t0"]["target_labels"].shape == (0,)


def test_txt_db_missing_image_key(tmp_path, img_store):
  ex = _examples()
  ex["t4"]["img_fname"] = "nope.npz"
  with pytest.raises(schema.DataError,
                     match=r"uniter_txt_db/txt:1.0.0\[train\]: "
                     r"record 't4'.*nope.npz.*missing"):
    _build_txt_db(tmp_path, ex, img_store)
  with pytest.raises(Exception):
    _source(tmp_path / "data", "uniter_txt_db/txt", "train")


def test_txt_db_corrupted_record(tmp_path, img_store):
  with pytest.raises(schema.DataError,
                     match=r"uniter_txt_db/txt:1.0.0 from .*txt.db: "
                     r"record 't1': corrupted"):
    _build_txt_db(tmp_path, _examples(), img_store,
                  raw_override={"t1": b"garbage"})
  assert not (tmp_path / "data" / "uniter_txt_db" / "txt" / "1.0.0").exists()


def test_txt_db_refuses_pickled_objects(tmp_path, img_store):
  ex = {"t0": {"input_ids": np.array([object()], dtype=object),
               "img_fname": "img_0000.npz"}}
  raw = lz4.frame.compress(msgpack.dumps(ex["t0"], use_bin_type=True,
                                         default=msgpack_numpy.encode))
  with pytest.raises(schema.DataError, match="corrupted.*pickled"):
    _build_txt_db(tmp_path, {"t0": {"input_ids": [1],
                                    "img_fname": "img_0000.npz"}},
                  img_store, raw_override={"t0": raw})


def test_txt_db_id2len_mismatch(tmp_path, img_store):
  with pytest.raises(schema.DataError,
                     match=r"txt:1.0.0 from .*txt.db: record 't0'.*id2len"):
    _build_txt_db(tmp_path, _examples(), img_store,
                  id2len_override={"t0": 3})


def test_txt_db_vocab_mismatch(tmp_path, img_store):
  bad = list(fx.VOCAB)
  bad[3], bad[4] = bad[4], bad[3]          # [CLS] and [SEP] swapped
  vocab = fx.write_vocab(os.fspath(tmp_path / "v.txt"), bad)
  with pytest.raises(schema.DataError, match="vocab does not match "
                     "meta.json: CLS=3"):
    _build_txt_db(tmp_path, _examples(), img_store, vocab=vocab)


def test_txt_db_needs_image_store_built(tmp_path):
  with pytest.raises(FileNotFoundError, match="not built"):
    _build_txt_db(tmp_path, _examples(), "uniter_img_db/absent:1.0.0")


# ----------------------------------------------------------------------------
# BUTD TSV and annotations.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [6, 7, 10])
def test_butd_tsv_round_trip(tmp_path, layout):
  images = {f"{i}": a for i, a in enumerate(
      fx.make_images(3, seed=4, min_bb=2, max_bb=6).values())}
  manual = tmp_path / "manual"
  manual.mkdir()
  truth = fx.write_butd_tsv(os.fspath(manual / "feats.tsv"), images, layout)
  b = butd.UniterButdImages(config=butd.ButdConfig(name="t"),
                            data_dir=os.fspath(tmp_path / "data"))
  summary = common.build(b, manual_dir=os.fspath(manual))
  assert summary.written == ({"images": 3, "soft_labels": 3} if layout == 7
                             else {"images": 3})
  meta = schema.read_meta(b.data_dir)
  assert meta["has_soft_labels"] == (layout == 7)
  assert meta["has_conf"] == (layout != 6)
  src = _source(tmp_path / "data", "uniter_butd_images/t", "images")
  if layout == 7:
    soft = _source(tmp_path / "data", "uniter_butd_images/t", "soft_labels")
  index = schema.read_image_index(b.data_dir)
  for key, arrs in images.items():
    rec = src[index[key]]
    t = truth[key]
    np.testing.assert_array_equal(rec["features"],
                                  arrs["features"].astype(np.float16))
    x1, y1, x2, y2 = t["boxes"].T
    w, h = t["w"], t["h"]
    want = np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w,
                     (y2 - y1) / h], 1)
    np.testing.assert_allclose(rec["norm_bb"], want, rtol=1e-6)
    assert (rec["image_w"], rec["image_h"]) == (w, h)
    if layout == 6:
      np.testing.assert_array_equal(rec["conf"], 1.0)
      assert rec["soft_labels"].shape == (0, 1601)
    elif layout == 7:
      np.testing.assert_array_equal(
          soft[index[key]]["soft_labels"],
          arrs["soft_labels"].astype(np.float16))
      np.testing.assert_array_equal(
          rec["conf"], arrs["soft_labels"][:, 1:].max(1))
    else:
      np.testing.assert_array_equal(rec["conf"], arrs["conf"])


def test_butd_tsv_bad_lines(tmp_path):
  images = {"7": fx.make_images(1, soft=False)["img_0000.npz"]}
  path = os.fspath(tmp_path / "x.tsv")
  fx.write_butd_tsv(path, images)
  line = open(path).read().rstrip("\n").split("\t")
  with pytest.raises(schema.DataError, match="ds: record '7': zero regions"):
    butd.parse_tsv_row(line[:3] + ["0"] + line[4:], "ds")
  with pytest.raises(schema.DataError, match="ds: record '7': .*bad base64"):
    butd.parse_tsv_row(line[:5] + ["@@@"], "ds")
  with pytest.raises(schema.DataError, match="ds: record '7': .*columns"):
    butd.parse_tsv_row(line[:5], "ds")


def test_wordpiece_matches_hand_tokenisation(tmp_path):
  tok = tokenizer.WordPiece(fx.write_vocab(os.fspath(tmp_path / "v.txt")))
  ix = {t: i for i, t in enumerate(fx.VOCAB)}
  want = [ix[t] for t in ["a", "Dog", "run", "##s", "on", "the", "grass",
                          "!", "[UNK]"]]
  assert tok("a Dog  runs on the grass! zebra") == want
  assert tok("what color?") == [ix["what"], ix["color"], ix["?"]]
  low = tokenizer.WordPiece(os.fspath(tmp_path / "v.txt"), lowercase=True)
  assert low("Dog") == [ix["dog"]]      # uncased vocab behaviour
  assert tok.meta["v_range"] == [ix["!"], len(fx.VOCAB)]


def _butd_store(tmp_path, keys):
  manual = tmp_path / "manual"
  manual.mkdir(exist_ok=True)
  imgs = fx.make_images(len(keys), soft=False, min_bb=2, max_bb=3)
  fx.write_butd_tsv(os.fspath(manual / "f.tsv"),
                    dict(zip(keys, imgs.values())))
  common.build(butd.UniterButdImages(
      config="default",
      data_dir=os.fspath(tmp_path / "data")), manual_dir=os.fspath(manual))
  fx.write_vocab(os.fspath(manual / "vocab.txt"))
  return manual


def test_coco_captions(tmp_path):
  manual = _butd_store(tmp_path, ["COCO_000001", "COCO_000002"])
  fx.write_coco_captions(os.fspath(manual / "caps.json"), [
      (10, 1, "a dog runs on the grass ."), (11, 1, "   "),
      (12, 2, "a cat sits"), (13, 2, "the " * 61)])
  cfg = butd.AnnConfig(name="c", splits={"train": "caps.json"},
                       img_key_format="COCO_{image_id:06d}")
  b = butd.UniterCocoCaptions(config=cfg, data_dir=os.fspath(
      tmp_path / "data"))
  s = common.build(b, manual_dir=os.fspath(manual))
  assert s.written == {"train": 2}
  assert s.dropped == {"empty_text": 1, "over_max_txt_len": 1}
  src = _source(tmp_path / "data", "uniter_coco_captions/c", "train")
  ix = {t: i for i, t in enumerate(fx.VOCAB)}
  assert src[0]["id"] == b"10"
  assert list(src[0]["input_ids"]) == [ix[t] for t in
                                       "a dog run ##s on the grass .".split()]
  assert [k.decode() for k in src[1]["img_keys"]] == ["COCO_000002"]
  # A key missing from the store is an error naming the record.
  fx.write_coco_captions(os.fspath(manual / "caps.json"),
                         [(14, 3, "a dog")])
  b = butd.UniterCocoCaptions(config=butd.AnnConfig(
      name="d", splits={"train": "caps.json"},
      img_key_format="COCO_{image_id:06d}"), data_dir=os.fspath(
          tmp_path / "data"))
  with pytest.raises(schema.DataError,
                     match=r"uniter_coco_captions/d:1.0.0\[train\]: "
                     r"record '14'.*COCO_000003"):
    common.build(b, manual_dir=os.fspath(manual))


def test_vqa_targets_and_builder(tmp_path):
  ans2label = {"yes": 0, "no": 1, "two": 2, "red": 3}
  labels, scores = butd.vqa_targets(
      ["yes"] * 2 + ["Yes "] * 4 + ["no"] * 2 + ["two"] + ["zebra"],
      ans2label)
  assert dict(zip(labels, scores)) == {0: 1.0, 1: pytest.approx(2 / 3),
                                       2: pytest.approx(1 / 3)}
  manual = _butd_store(tmp_path, ["5", "6"])
  (manual / "a2l.json").write_text(json.dumps(ans2label))
  fx.write_vqa(os.fspath(manual / "q.json"), os.fspath(manual / "a.json"), [
      (50, 5, "what color is the dog ?", ["red"] * 10),
      (51, 6, "two dogs ?", ["two"] * 2 + ["zebra"] * 8)])
  cfg = butd.AnnConfig(name="v", splits={"train": "q.json,a.json",
                                         "test": "q.json"},
                       ans2label="a2l.json")
  b = butd.UniterVqa(config=cfg, data_dir=os.fspath(tmp_path / "data"))
  s = common.build(b, manual_dir=os.fspath(manual))
  assert s.written == {"train": 2, "test": 2}
  meta = schema.read_meta(b.data_dir)
  assert meta["num_answers"] == 4 and meta["task"] == "vqa"
  src = _source(tmp_path / "data", "uniter_vqa/v", "train")
  assert list(src[0]["target_labels"]) == [3]
  np.testing.assert_allclose(src[0]["target_scores"], [1.0])
  assert list(src[1]["target_labels"]) == [2]
  np.testing.assert_allclose(src[1]["target_scores"], [2 / 3], rtol=1e-6)
  test = _source(tmp_path / "data", "uniter_vqa/v", "test")
  assert test[0]["target_labels"].shape == (0,)


def test_cli_runs_img_db(tmp_path):
  from data_prep import __main__ as cli  # pylint: disable=g-import-not-at-top
  images = fx.make_images(2, soft=False)
  fx.write_img_db(os.fspath(tmp_path / "m"), images, variant="fixed",
                  compressed=True, num_bb=5)
  assert cli.main(["img_db", "--manual_dir", os.fspath(tmp_path / "m"),
                   "--img_db", "feat_numbb5_compressed", "--name", "cli",
                   "--data_dir", os.fspath(tmp_path / "data")]) == 0
  meta = schema.read_meta(schema.builder_dir(tmp_path / "data",
                                             "uniter_img_db/cli:1.0.0"))
  assert meta["written"] == {"images": 2}
