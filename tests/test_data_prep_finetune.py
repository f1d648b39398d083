"""data_prep for finetuning: synthetic VQA, VE, NLVR2; raw annotations; txt_db.

The synthetic checks recompute every answer, label and truth value from
`synthetic.scene()` with rules written out here, independently of the
generator; the raw builders run on small hand-written files.
"""
import collections
import json
import os
import re

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import annotations
from data_prep import butd
from data_prep import common
from data_prep import prepare
from data_prep import synthetic
from data_prep import synthetic_tasks as st
from data_prep import uniter_db
import fixtures_official as fx
from uniter_jax.data import schema

CFG = synthetic.TINY_CONFIG
NAMES = {t: f"uniter_synthetic_{t}/tiny:1.0.0" for t in st.TASKS}
VOCAB = synthetic.vocab()


def _config(data_dir, names):
  return ml_collections.ConfigDict({
      "data": {"synthetic": "tiny", "data_dir": os.fspath(data_dir)},
      "datasets": {f"d{i}": {"text": n, "val_text": n}
                   for i, n in enumerate(names)}})


def _read(data_dir, name, split):
  src = tfds.data_source(name.split(":")[0], data_dir=os.fspath(data_dir),
                         split=split)
  out = []
  for i in range(len(src)):
    r = src[i]
    out.append({"id": r["id"].decode(),
                "input_ids": [int(x) for x in r["input_ids"]],
                "img_keys": [k.decode() for k in r["img_keys"]],
                "target": int(r["target"]),
                "target_labels": [int(x) for x in r["target_labels"]],
                "target_scores": [float(x) for x in r["target_scores"]]})
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The tiny preset's three task datasets, built by `ensure_synthetic`."""
  d = tmp_path_factory.mktemp("tasks")
  prepare.ensure_synthetic(_config(d, list(NAMES.values())))
  data = {t: {s: _read(d, NAMES[t], s) for s in st.SPLITS} for t in st.TASKS}
  return d, data


# ----------------------------------------------------------------------------
# Independent truth from the scene.
# ----------------------------------------------------------------------------
def _objects(idx):
  sc = synthetic.scene(CFG, idx)
  return [{"cls": synthetic.CLASSES[int(c)],
           "colour": synthetic.COLOURS[int(col)], "box": box}
          for c, col, box in zip(sc["classes"], sc["colours"], sc["boxes"])]


def _idx(key):
  return int(key.split("_")[1])


def _find(objs, cls):
  hits = [o for o in objs if o["cls"] == cls]
  assert len(hits) <= 1   # a scene holds each class once
  return hits[0] if hits else None


def _where(a, b):
  """How box a lies relative to box b: the caption rule, written out."""
  ca = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)
  cb = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
  dx, dy = cb[0] - ca[0], cb[1] - ca[1]
  if max(abs(dx), abs(dy)) < 0.1:
    return "next to"
  if abs(dx) >= abs(dy):
    return "left of" if dx > 0 else "right of"
  return "above" if dy > 0 else "below"


def _text(rec):
  return " ".join(VOCAB[i] for i in rec["input_ids"])


def _vqa_answer(text, objs):
  """The right answer of a synthetic question, from the scene."""
  m = re.fullmatch(r"is there a (\w+) in the picture", text)
  if m:
    return "yes" if _find(objs, m[1]) else "no"
  m = re.fullmatch(r"is there a (\w+) (\w+) in the image", text)
  if m:
    o = _find(objs, m[2])
    return "yes" if o and o["colour"] == m[1] else "no"
  m = re.fullmatch(r"the (\w+) is", text)
  if m:
    return _find(objs, m[1])["colour"]
  m = re.fullmatch(r"is the (\w+) (small|large)", text)
  if m:
    b = _find(objs, m[1])["box"]
    large = (b[2] - b[0]) * (b[3] - b[1]) > 0.12
    return "yes" if (m[2] == "large") == large else "no"
  m = re.fullmatch(r"is the (\w+) (left of|right of|above|below|next to) "
                   r"the (\w+)", text)
  if m:
    rel = _where(_find(objs, m[1])["box"], _find(objs, m[3])["box"])
    return "yes" if rel == m[2] else "no"
  m = re.fullmatch(r"in the picture there is a (\w+)", text)
  if m:
    hits = [o for o in objs if o["colour"] == m[1]]
    assert len(hits) == 1, text
    return hits[0]["cls"]
  raise AssertionError(f"unexpected question {text!r}")


def _ve_label(text, objs):
  m = re.fullmatch(r"there is a (\w+) (\w+) in the picture \.", text)
  if m:
    o = _find(objs, m[2])
    return 2 if o is None else int(o["colour"] == m[1])
  m = re.fullmatch(r"a (\w+) (\w+) (left of|right of|above|below|next to) "
                   r"a (\w+) \.", text)
  assert m, text
  a, b = _find(objs, m[2]), _find(objs, m[4])
  assert a is not None, text   # the first object is always present
  if b is None:
    return 2
  return int(a["colour"] == m[1] and _where(a["box"], b["box"]) == m[3])


def _nlvr2_truth(text, left, right):
  def has(objs, noun):
    words = noun.split()
    o = _find(objs, words[-1])
    return o is not None and (len(words) == 1 or o["colour"] == words[0])
  noun = r"((?:\w+ )?\w+)"
  m = re.fullmatch(rf"there is a {noun} in the (left|right) image \.", text)
  if m:
    return has(left if m[2] == "left" else right, m[1])
  m = re.fullmatch(rf"there is a {noun} in the left image and a {noun} in "
                   r"the right image \.", text)
  if m:
    return has(left, m[1]) and has(right, m[2])
  m = re.fullmatch(rf"there is a {noun} in the left image and in the right "
                   r"image \.", text)
  assert m, text
  return has(left, m[1]) and has(right, m[1])


# ----------------------------------------------------------------------------
# Synthetic tasks.
# ----------------------------------------------------------------------------
def test_tasks_build_with_metadata(built):
  d, data = built
  for task in st.TASKS:
    meta = schema.read_meta(schema.builder_dir(d, NAMES[task]))
    assert meta["task"] == task and meta["vocab"] == VOCAB
    assert meta["img_store"] == "uniter_synthetic_images/tiny:1.0.0"
    assert meta["task_version"] == st.TASK_VERSION
    assert set(meta["written"]) == set(st.SPLITS)
    assert all(len(data[task][s]) >= 24 for s in st.SPLITS)
  for task, labels in (("vqa", st.VQA_LABEL2ANS), ("ve", st.VE_LABEL2ANS)):
    meta = schema.read_meta(schema.builder_dir(d, NAMES[task]))
    assert meta["label2ans"] == list(labels)
    assert meta["num_answers"] == len(labels)
  assert schema.read_meta(schema.builder_dir(d, NAMES["ve"]))[
      "label2ans"] == ["contradiction", "entailment", "neutral"]


def test_deterministic_and_seeded(built):
  _, data = built
  other = synthetic.SyntheticConfig(name="tiny", seed=1, num_train_images=24,
                                    num_val_images=8, captions_per_image=3)
  for task in st.TASKS:
    for split in st.SPLITS:
      again = list(st.records(CFG, task, split))
      stored = data[task][split]
      assert [r["id"] for r in again] == [r["id"] for r in stored]
      assert [list(r["input_ids"]) for r in again] == [
          r["input_ids"] for r in stored]
      assert [r.get("target_labels", []) for r in again] == [
          r["target_labels"] for r in stored]
      assert [r.get("target", -1) for r in again] == [r["target"]
                                                      for r in stored]
    texts = [r["input_ids"] for r in st.records(other, task, "train")]
    assert texts != [r["input_ids"] for r in data[task]["train"]]


def test_only_vocabulary_words_and_split_images(built):
  _, data = built
  lo, hi = synthetic.v_range()
  train = {synthetic.image_key(i) for i in synthetic.split_images(CFG)[
      "train"]}
  val = {synthetic.image_key(i) for i in synthetic.split_images(CFG)["val"]}
  for task in st.TASKS:
    for split in st.SPLITS:
      for r in data[task][split]:
        assert all(lo <= t < hi for t in r["input_ids"]), r
        assert set(r["img_keys"]) <= (train if split == "train" else val)
      ids = [r["id"] for r in data[task][split]]
      assert len(set(ids)) == len(ids)


def test_vqa_answers_follow_from_the_scene(built):
  _, data = built
  kinds = collections.Counter()
  partial = 0
  for split in ("train", "val"):
    for r in data["vqa"][split]:
      assert r["id"].isdigit() and r["target"] == -1
      objs = _objects(_idx(r["img_keys"][0]))
      text = _text(r)
      kinds[text.split()[0] + " " + text.split()[1]] += 1
      labels, scores = r["target_labels"], r["target_scores"]
      assert st.VQA_LABEL2ANS[labels[0]] == _vqa_answer(text, objs), text
      assert scores[0] == 1.0
      if len(labels) > 1:   # partial credit for one other answer
        partial += 1
        assert len(labels) == 2 and labels[1] != labels[0]
        assert scores[1] == pytest.approx(st.PARTIAL_SCORE)
  assert partial > 0
  assert len(kinds) >= 5
  answers = collections.Counter(
      st.VQA_LABEL2ANS[r["target_labels"][0]] for r in data["vqa"]["train"])
  assert 0.35 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.65
  assert all(not r["target_labels"] and not r["target_scores"]
             for r in data["vqa"]["test"])
  test_ids = {r["id"] for r in data["vqa"]["test"]}
  assert not test_ids & {r["id"] for r in data["vqa"]["val"]}


def test_ve_labels_follow_from_the_scene_and_are_balanced(built):
  _, data = built
  for split in st.SPLITS:
    counts = collections.Counter()
    for r in data["ve"][split]:
      assert len(r["target_labels"]) == 1 and r["target_scores"] == [1.0]
      label = r["target_labels"][0]
      assert label == _ve_label(_text(r), _objects(_idx(r["img_keys"][0])))
      counts[label] += 1
    assert sorted(counts) == [0, 1, 2]
    assert max(counts.values()) - min(counts.values()) <= 1


def test_nlvr2_truth_ids_and_consistency_groups(built):
  _, data = built
  for split in st.SPLITS:
    recs = data["nlvr2"][split]
    truth = []
    by_statement = collections.defaultdict(list)
    by_pair = collections.defaultdict(list)
    for r in recs:
      parts = r["id"].split("-")
      assert len(parts) == 4 and parts[0] == split
      assert len(r["img_keys"]) == 2 and r["target"] in (0, 1)
      left, right = (_objects(_idx(k)) for k in r["img_keys"])
      assert r["target"] == int(_nlvr2_truth(_text(r), left, right))
      truth.append(r["target"])
      # The official eval blanks the pair id (3rd part) to group a
      # statement's examples; the official image names drop the last part.
      by_statement["-".join(parts[:2] + [""] + parts[3:])].append(r)
      by_pair["-".join(parts[:-1])].append(r)
    assert 0.35 < np.mean(truth) < 0.65
    assert min(len(g) for g in by_statement.values()) == 4
    for g in by_statement.values():
      assert len({tuple(r["input_ids"]) for r in g}) == 1
    for g in by_pair.values():
      assert len(g) == 2 and len({tuple(r["img_keys"]) for r in g}) == 1
    mixed = sum(len({r["target"] for r in g}) > 1
                for g in by_statement.values())
    assert mixed > 0   # consistency differs from accuracy


def test_ensure_synthetic_checks_task_builds(built, tmp_path):
  d, _ = built
  cfg = _config(d, list(NAMES.values()))
  prepare.ensure_synthetic(cfg)   # already built: accepted
  path = os.path.join(schema.builder_dir(d, NAMES["nlvr2"]), schema.META_FILE)
  with open(path) as f:
    good = f.read()
  try:
    meta = json.loads(good)
    meta["task_version"] = st.TASK_VERSION - 1
    with open(path, "w") as f:
      json.dump(meta, f)
    with pytest.raises(ValueError, match="generator version"):
      prepare.ensure_synthetic(cfg)
  finally:
    with open(path, "w") as f:
      f.write(good)
  with pytest.raises(ValueError, match="'nope'"):
    prepare.ensure_synthetic(_config(tmp_path, [
        "uniter_synthetic_vqa/nope:1.0.0"]))
  assert prepare.parse_synthetic_name("uniter_synthetic_ve/demo:1.0.0") == (
      "ve", "demo")
  assert prepare.parse_synthetic_name("uniter_vqa/x:1.0.0") is None


def test_cli_synthetic_tasks_flag(tmp_path):
  from data_prep import __main__ as cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit, match="vqq"):
    cli.main(["synthetic", "--preset", "tiny", "--tasks", "vqq",
              "--data_dir", os.fspath(tmp_path)])
  assert cli.main(["synthetic", "--preset", "tiny", "--tasks", "ve",
                   "--data_dir", os.fspath(tmp_path)]) == 0
  meta = schema.read_meta(schema.builder_dir(tmp_path, NAMES["ve"]))
  assert meta["written"] == {"train": 72, "val": 24, "test": 24}
  assert not os.path.exists(schema.builder_dir(tmp_path, NAMES["vqa"]))


# ----------------------------------------------------------------------------
# Raw annotations.
# ----------------------------------------------------------------------------
def _store(tmp_path, keys):
  """A BUTD image store holding `keys`, and manual_dir with vocab.txt."""
  manual = tmp_path / "manual"
  manual.mkdir(exist_ok=True)
  imgs = fx.make_images(len(keys), soft=False, min_bb=2, max_bb=3)
  fx.write_butd_tsv(os.fspath(manual / "f.tsv"),
                    dict(zip(keys, imgs.values())))
  common.build(butd.UniterButdImages(
      config="default", data_dir=os.fspath(tmp_path / "data")),
      manual_dir=os.fspath(manual))
  fx.write_vocab(os.fspath(manual / "vocab.txt"))
  return manual


def _jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _ids(text):
  ix = {t: i for i, t in enumerate(fx.VOCAB)}
  return [ix[t] for t in text.split()]


def _built(tmp_path, name):
  with pytest.raises(Exception):
    tfds.data_source(name, data_dir=os.fspath(tmp_path / "data"),
                     split="train")
  return False


STORE = "uniter_butd_images/default:1.0.0"


def test_snli_ve(tmp_path):
  manual = _store(tmp_path, ["flickr30k_000000000123.npz",
                             "flickr30k_003416050480.npz"])
  _jsonl(manual / "ve.jsonl", [
      {"pairID": "3416050480.jpg#4r1e", "Flikr30kID": "3416050480.jpg",
       "sentence2": "a dog runs", "gold_label": "entailment"},
      {"pairID": "123.jpg#0r1c", "Flikr30kID": "123.jpg",
       "sentence2": "two cats play", "gold_label": "contradiction"},
      {"pairID": "123.jpg#0r1n", "Flikr30kID": "123.jpg",
       "sentence2": "a man sits", "gold_label": "neutral"},
      {"pairID": "123.jpg#9", "Flikr30kID": "123.jpg",
       "sentence2": "the ball"}])
  cfg = annotations.SnliVeConfig(name="ve", img_store=STORE,
                                 splits={"dev": "ve.jsonl"})
  b = annotations.UniterSnliVe(config=cfg, data_dir=os.fspath(
      tmp_path / "data"))
  assert common.build(b, manual_dir=os.fspath(manual)).written == {"dev": 4}
  meta = schema.read_meta(b.data_dir)
  assert meta["label2ans"] == ["contradiction", "entailment", "neutral"]
  assert meta["num_answers"] == 3 and meta["task"] == "ve"
  assert meta["unlabelled"] == {"dev": 1}
  recs = _read(tmp_path / "data", "uniter_snli_ve/ve:1.0.0", "dev")
  assert [r["id"] for r in recs] == ["3416050480.jpg#4r1e", "123.jpg#0r1c",
                                     "123.jpg#0r1n", "123.jpg#9"]
  assert recs[0]["img_keys"] == ["flickr30k_003416050480.npz"]
  assert recs[0]["input_ids"] == _ids("a dog run ##s")
  assert [r["target_labels"] for r in recs] == [[1], [0], [2], []]
  assert [r["target_scores"] for r in recs] == [[1.0]] * 3 + [[]]
  # An unknown label names the file and the pair, and leaves no dataset.
  _jsonl(manual / "bad.jsonl", [
      {"pairID": "123.jpg#1", "Flikr30kID": "123.jpg", "sentence2": "a dog",
       "gold_label": "maybe"}])
  bad = annotations.UniterSnliVe(config=annotations.SnliVeConfig(
      name="bad", img_store=STORE, splits={"train": "bad.jsonl"}),
      data_dir=os.fspath(tmp_path / "data"))
  with pytest.raises(schema.DataError,
                     match=r"bad\.jsonl: record '123\.jpg#1': gold_label "
                     r"'maybe'"):
    common.build(bad, manual_dir=os.fspath(manual))
  _built(tmp_path, "uniter_snli_ve/bad")


def test_nlvr2(tmp_path):
  keys = annotations.nlvr2_image_keys("dev-850-0-1")
  assert keys == ["nlvr2_dev-850-0-img0.npz", "nlvr2_dev-850-0-img1.npz"]
  manual = _store(tmp_path, keys + annotations.nlvr2_image_keys(
      "dev-850-1-0"))
  _jsonl(manual / "dev.json", [
      {"identifier": "dev-850-0-0", "sentence": "two dogs play",
       "label": "True"},
      {"identifier": "dev-850-0-1", "sentence": "a cat sits",
       "label": "False"},
      {"identifier": "dev-850-1-0", "sentence": "two dogs play"},
      {"identifier": "dev-851-0-0", "sentence": "a ball", "label": "True"}])
  cfg = annotations.Nlvr2Config(name="n", img_store=STORE,
                                splits={"dev": "dev.json"},
                                skip_missing_images=True)
  b = annotations.UniterNlvr2(config=cfg, data_dir=os.fspath(
      tmp_path / "data"))
  s = common.build(b, manual_dir=os.fspath(manual))
  assert s.written == {"dev": 3} and s.dropped == {"missing_image": 1}
  recs = _read(tmp_path / "data", "uniter_nlvr2/n:1.0.0", "dev")
  assert [r["target"] for r in recs] == [1, 0, -1]
  assert recs[1]["img_keys"] == keys
  assert recs[2]["img_keys"] == ["nlvr2_dev-850-1-img0.npz",
                                 "nlvr2_dev-850-1-img1.npz"]
  assert recs[0]["input_ids"] == _ids("two dog ##s play")
  assert schema.read_meta(b.data_dir)["task"] == "nlvr2"
  # Without skip_missing_images a missing image is an error; a bad label
  # and a line that is not JSON name the file and the record.
  for name, rows, match in [
      ("m", None, r"record 'dev-851-0-0'.*nlvr2_dev-851-0-img0\.npz"),
      ("l", [{"identifier": "dev-850-0-0", "sentence": "a dog",
              "label": "yes"}], r"bad\.json: record 'dev-850-0-0': label"),
      ("j", [{"identifier": "dev-850-0-0", "sentence": "a dog"}, "{oops"],
       r"bad\.json: record 'line 2': not JSON"),
      ("i", [{"identifier": "dev-850", "sentence": "a dog"}],
       r"record 'dev-850': identifier"),
  ]:
    if rows is not None:
      _jsonl(manual / "bad.json", rows)
    b = annotations.UniterNlvr2(config=annotations.Nlvr2Config(
        name=name, img_store=STORE,
        splits={"train": "dev.json" if rows is None else "bad.json"}),
        data_dir=os.fspath(tmp_path / "data"))
    with pytest.raises(schema.DataError, match=match):
      common.build(b, manual_dir=os.fspath(manual))
    _built(tmp_path, f"uniter_nlvr2/{name}")


def _karpathy(path, dataset, images):
  with open(path, "w") as f:
    json.dump({"dataset": dataset, "images": images}, f)


def test_karpathy_flickr_and_coco(tmp_path):
  manual = _store(tmp_path, [
      "flickr30k_001000092795.npz", "flickr30k_000000000007.npz",
      "coco_train2014_000000000009.npz", "coco_val2014_000000391895.npz",
      "coco_val2014_000000000042.npz"])
  sent = lambda i, t: {"sentid": i, "raw": t, "tokens": t.split()}
  _karpathy(manual / "dataset_flickr30k.json", "flickr30k", [
      {"filename": "1000092795.jpg", "imgid": 0, "split": "train",
       "sentences": [sent(0, "two dogs play"), sent(1, "a dog runs")]},
      {"filename": "7.jpg", "imgid": 1, "split": "test",
       "sentences": [sent(5, "a cat sits")]}])
  b = annotations.UniterKarpathyCaptions(config=annotations.KarpathyConfig(
      name="f", img_store=STORE), data_dir=os.fspath(tmp_path / "data"))
  s = common.build(b, manual_dir=os.fspath(manual))
  assert s.written == {"train": 2, "test": 1}
  recs = _read(tmp_path / "data", "uniter_karpathy_captions/f:1.0.0",
               "train")
  assert [r["id"] for r in recs] == ["0", "1"]
  assert recs[0]["img_keys"] == ["flickr30k_001000092795.npz"]
  assert recs[1]["input_ids"] == _ids("a dog run ##s")
  coco = [
      {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg",
       "cocoid": 9, "split": "train", "sentences": [sent(10, "a man")]},
      {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
       "cocoid": 391895, "split": "restval", "sentences": [sent(11, "a cat")]},
      {"filename": "COCO_val2014_000000000042.jpg", "split": "val",
       "sentences": [sent(12, "the ball")]}]
  _karpathy(manual / "dataset_coco.json", "coco", coco)
  from data_prep import __main__ as cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["karpathy", "--manual_dir", os.fspath(manual),
                   "--json", "dataset_coco.json", "--fold_restval",
                   "--vocab", "vocab.txt", "--img_store", STORE,
                   "--name", "coco", "--data_dir",
                   os.fspath(tmp_path / "data")]) == 0
  recs = _read(tmp_path / "data", "uniter_karpathy_captions/coco:1.0.0",
               "train")
  assert [r["img_keys"] for r in recs] == [["coco_train2014_000000000009.npz"],
                                           ["coco_val2014_000000391895.npz"]]
  val = _read(tmp_path / "data", "uniter_karpathy_captions/coco:1.0.0", "val")
  assert val[0]["img_keys"] == ["coco_val2014_000000000042.npz"]
  meta = schema.read_meta(schema.builder_dir(
      tmp_path / "data", "uniter_karpathy_captions/coco:1.0.0"))
  assert meta["karpathy_splits"] == {"train": ["train", "restval"],
                                     "val": ["val"]}
  # An unknown Karpathy split names the file and the entry.
  coco[1]["split"] = "holdout"
  _karpathy(manual / "dataset_coco.json", "coco", coco)
  b = annotations.UniterKarpathyCaptions(config=annotations.KarpathyConfig(
      name="bad", img_store=STORE, karpathy_json="dataset_coco.json"),
      data_dir=os.fspath(tmp_path / "data"))
  with pytest.raises(schema.DataError, match=r"dataset_coco\.json: record "
                     r"'images\[1\]': split 'holdout'"):
    common.build(b, manual_dir=os.fspath(manual))
  _built(tmp_path, "uniter_karpathy_captions/bad")


def test_missing_annotation_file(tmp_path):
  manual = _store(tmp_path, ["x"])
  b = annotations.UniterSnliVe(config=annotations.SnliVeConfig(
      name="m", img_store=STORE, splits={"train": "nope.jsonl"}),
      data_dir=os.fspath(tmp_path / "data"))
  with pytest.raises(schema.DataError, match=r"nope\.jsonl.*does not exist"):
    common.build(b, manual_dir=os.fspath(manual))
  _built(tmp_path, "uniter_snli_ve/m")


# ----------------------------------------------------------------------------
# Official txt_db answer vocabularies.
# ----------------------------------------------------------------------------
@pytest.fixture()
def img_db_store(tmp_path):
  manual = tmp_path / "manual"
  db = fx.write_img_db(os.fspath(manual / "imgs"), fx.make_images(
      2, soft=False), variant="all")
  common.build(uniter_db.UniterImgDb(
      config=uniter_db.ImgDbConfig(name="imgs", img_db=os.path.relpath(
          db, manual)), data_dir=os.fspath(tmp_path / "data")),
      manual_dir=os.fspath(manual))
  return "uniter_img_db/imgs:1.0.0"


def _txt_db(tmp_path, store, name, task, examples, ans2label=None):
  manual = tmp_path / "manual"
  db = fx.write_txt_db(os.fspath(manual / f"{name}.db"), examples)
  if ans2label is not None:
    with open(os.path.join(db, "ans2label.json"), "w") as f:
      json.dump(ans2label, f)
  b = uniter_db.UniterTxtDb(config=uniter_db.TxtDbConfig(
      name=name, txt_db=f"{name}.db", img_store=store, task=task),
      data_dir=os.fspath(tmp_path / "data"))
  return b, common.build(b, manual_dir=os.fspath(manual))


def test_txt_db_answer_vocabularies(tmp_path, img_db_store):
  vqa = {"q1": {"input_ids": [12, 14], "img_fname": "img_0000.npz",
                "target": {"labels": [2, 0], "scores": [1.0, 0.3]}}}
  b, _ = _txt_db(tmp_path, img_db_store, "vqa", "vqa", vqa,
                 {"yes": 0, "no": 1, "red": 2})
  meta = schema.read_meta(b.data_dir)
  assert meta["label2ans"] == ["yes", "no", "red"]
  assert meta["num_answers"] == 3
  ve = {"p1": {"input_ids": [12], "img_fname": "img_0001.npz",
               "target": {"labels": [1], "scores": [1.0]}}}
  b, _ = _txt_db(tmp_path, img_db_store, "ve", "ve", ve)
  assert schema.read_meta(b.data_dir)["label2ans"] == [
      "contradiction", "entailment", "neutral"]
  b, _ = _txt_db(tmp_path, img_db_store, "itm", "itm",
                 {"c1": {"input_ids": [12], "img_fname": "img_0001.npz"}})
  assert "label2ans" not in schema.read_meta(b.data_dir)
  # A label beyond the answers, or an ans2label that is not 0..n-1.
  with pytest.raises(schema.DataError, match=r"record 'q1': target labels "
                     r"\[2\] outside the 2 answers"):
    _txt_db(tmp_path, img_db_store, "vqa2", "vqa", vqa, {"yes": 0, "no": 1})
  with pytest.raises(schema.DataError, match="labels must be 0..1"):
    _txt_db(tmp_path, img_db_store, "vqa3", "vqa", vqa, {"yes": 0, "no": 0})
