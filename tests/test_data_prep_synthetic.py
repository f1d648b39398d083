"""data_prep: the synthetic corpus builds deterministically, with structure."""
import dataclasses
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import common
from data_prep import synthetic
from data_prep import tokenizer
from uniter_jax.data import schema


class _Merged:
  """Image records with `soft_labels` taken from the soft-label split."""

  def __init__(self, images, soft):
    self.images, self.soft = images, soft

  def __len__(self):
    assert len(self.images) == len(self.soft)
    return len(self.images)

  def __getitem__(self, i):
    rec, soft = dict(self.images[i]), self.soft[i]
    assert rec["soft_labels"].shape == (0, schema.NUM_LABELS)
    assert soft["img_key"] == rec["img_key"]
    assert soft["num_bb"] == rec["num_bb"]
    assert soft["features"].shape == (0, schema.FEAT_DIM)
    rec["soft_labels"] = soft["soft_labels"]
    return rec


def _build(data_dir, cfg):
  common.build(synthetic.UniterSyntheticImages(config=cfg,
                                               data_dir=os.fspath(data_dir)))
  common.build(synthetic.UniterSyntheticText(config=cfg,
                                             data_dir=os.fspath(data_dir)))
  img = _Merged(*(tfds.data_source(f"uniter_synthetic_images/{cfg.name}",
                                   data_dir=os.fspath(data_dir), split=s)
                  for s in (schema.IMAGE_SPLIT, schema.SOFT_LABEL_SPLIT)))
  txt = {s: tfds.data_source(f"uniter_synthetic_text/{cfg.name}",
                             data_dir=os.fspath(data_dir), split=s)
         for s in ("train", "val")}
  return img, txt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("synth")
  img, txt = _build(d, synthetic.TINY_CONFIG)
  return d, img, txt


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k])
    else:
      assert a[k] == b[k], k


def test_deterministic_for_a_seed(tiny, tmp_path):
  _, img, txt = tiny
  img2, txt2 = _build(tmp_path, synthetic.TINY_CONFIG)
  assert len(img2) == len(img) == 32
  for i in range(len(img)):
    _same(img[i], img2[i])
  for s in ("train", "val"):
    assert len(txt[s]) == len(txt2[s])
    for i in range(len(txt[s])):
      _same(txt[s][i], txt2[s][i])
  other = dataclasses.replace(synthetic.TINY_CONFIG, seed=1)
  a = synthetic.image_record(synthetic.TINY_CONFIG, 0)
  b = synthetic.image_record(other, 0)
  assert a["features"].shape != b["features"].shape or not np.array_equal(
      a["features"], b["features"])
  assert synthetic.captions(synthetic.TINY_CONFIG, 3) != synthetic.captions(
      other, 3) or synthetic.scene(other, 3)["n_regions"] != (
          synthetic.scene(synthetic.TINY_CONFIG, 3)["n_regions"])


def test_image_structure(tiny):
  d, img, _ = tiny
  cfg = synthetic.TINY_CONFIG
  meta = schema.read_meta(schema.builder_dir(
      d, "uniter_synthetic_images/tiny:1.0.0"))
  assert meta["has_soft_labels"] and meta["written"] == {"images": 32,
                                                  "soft_labels": 32}
  assert meta["soft_label_split"]
  right = total = 0
  for i in range(len(img)):
    r = img[i]
    n = r["num_bb"]
    assert cfg.min_regions <= n <= cfg.max_regions
    assert r["features"].shape == (n, 2048) and r["features"].min() >= 0
    assert np.all(np.diff(r["conf"]) <= 0)          # sorted by confidence
    bb = r["norm_bb"]
    assert np.all((bb[:, :4] >= 0) & (bb[:, :4] <= 1))
    np.testing.assert_allclose(bb[:, 4], bb[:, 2] - bb[:, 0], atol=1e-6)
    np.testing.assert_allclose(bb[:, 5], bb[:, 3] - bb[:, 1], atol=1e-6)
    np.testing.assert_allclose(r["soft_labels"].astype(np.float32).sum(1),
                               1.0, atol=1e-2)
    sc = synthetic.scene(cfg, int(r["img_key"].decode().split("_")[1]))
    n_obj = len(sc["classes"]) + int(sc["dup"].sum())
    # Object regions (conf >= 0.5) come first; the official rule keeps them.
    assert np.sum(r["conf"] >= 0.5) == n_obj
    assert schema.select_num_bb(r["conf"]) >= n_obj
    top = r["soft_labels"][:n_obj].argmax(1) - 1
    right += np.isin(top, sc["classes"]).sum()
    total += n_obj
  assert right / total > 0.7


def test_captions_name_the_objects(tiny):
  d, img, txt = tiny
  cfg = synthetic.TINY_CONFIG
  voc = synthetic.vocab()
  index = schema.read_image_index(schema.builder_dir(
      d, "uniter_synthetic_images/tiny:1.0.0"))
  keys = {}
  for s in ("train", "val"):
    assert len(txt[s]) == len(synthetic.split_images(cfg)[s]) * 3
    keys[s] = set()
    for i in range(len(txt[s])):
      r = txt[s][i]
      (key,) = [k.decode() for k in r["img_keys"]]
      assert key in index
      keys[s].add(key)
      sc = synthetic.scene(cfg, int(key.split("_")[1]))
      words = [voc[t] for t in r["input_ids"]]
      named = {synthetic.CLASSES.index(w) for w in words
               if w in synthetic.CLASSES}
      assert named and named <= set(sc["classes"].tolist())
      for j, w in enumerate(words):   # each colour precedes its object
        if w in synthetic.CLASSES and words[j - 1] in synthetic.COLOURS:
          o = list(sc["classes"]).index(synthetic.CLASSES.index(w))
          assert synthetic.COLOURS[sc["colours"][o]] == words[j - 1]
  assert not keys["train"] & keys["val"]


def _colour_and_class_counts(cfg, images):
  n_col = n_cls = 0
  for idx in images:
    for text in synthetic.captions(cfg, idx):
      words = text.split()
      n_col += sum(w in synthetic.COLOURS for w in words)
      n_cls += sum(w in synthetic.CLASSES for w in words)
  return n_col, n_cls


def test_colour_prob():
  # Every preset but the demo names every colour (and keeps its captions).
  n_col, n_cls = _colour_and_class_counts(synthetic.DEFAULT_CONFIG, range(50))
  assert n_col == n_cls > 0
  # The demo names each object, and its colour about a quarter of the time.
  demo = synthetic.PRESETS["demo"]
  assert demo.colour_prob == 0.25
  n_col, n_cls = _colour_and_class_counts(demo, range(200))
  assert 0.2 < n_col / n_cls < 0.3
  assert synthetic.captions(demo, 7) == synthetic.captions(demo, 7)


def test_vocab_and_meta(tiny, tmp_path):
  d, _, txt = tiny
  meta = schema.read_meta(schema.builder_dir(
      d, "uniter_synthetic_text/tiny:1.0.0"))
  assert meta["img_store"] == "uniter_synthetic_images/tiny:1.0.0"
  assert meta["vocab"] == synthetic.vocab()
  assert meta["vocab_size"] == len(synthetic.vocab())
  path = os.fspath(tmp_path / "vocab.txt")
  synthetic.write_vocab_file(path)
  tok = tokenizer.WordPiece(path)
  assert {k: tok.meta[k] for k in ("PAD", "UNK", "CLS", "SEP", "MASK",
                                   "vocab_size")} == {
                                       k: meta[k] for k in (
                                           "PAD", "UNK", "CLS", "SEP",
                                           "MASK", "vocab_size")}
  lo, hi = meta["v_range"]
  assert lo == 5 and hi == meta["vocab_size"]
  for text in synthetic.captions(synthetic.TINY_CONFIG, 0):
    assert tok(text) == synthetic.tokenize(text)
  ids = np.concatenate([txt["train"][i]["input_ids"]
                        for i in range(len(txt["train"]))])
  assert ids.min() >= lo and ids.max() < hi   # no specials inside captions


def test_itm_is_solvable_from_features(tiny):
  """Prototypes estimated from train regions tell matched captions apart."""
  _, img, txt = tiny
  voc = synthetic.vocab()
  by_key = {img[i]["img_key"].decode(): img[i] for i in range(len(img))}
  # Class prototypes from train images' confident regions and soft labels.
  sums = np.zeros((synthetic.TINY_CONFIG.num_classes, 2048))
  cnt = np.zeros(synthetic.TINY_CONFIG.num_classes)
  for i in range(len(txt["train"])):
    r = by_key[txt["train"][i]["img_keys"][0].decode()]
    obj = r["conf"] >= 0.5
    lab = r["soft_labels"][obj].argmax(1) - 1
    for f, c in zip(r["features"][obj].astype(np.float64), lab):
      if c >= 0:
        sums[c] += f
        cnt[c] += 1
  protos = sums / np.maximum(cnt, 1)[:, None]
  protos /= np.linalg.norm(protos, axis=1, keepdims=True) + 1e-9

  def score(ids, rec):
    feats = rec["features"].astype(np.float64)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    cls = [synthetic.CLASSES.index(voc[t]) for t in ids
           if voc[t] in synthetic.CLASSES]
    return np.mean([np.max(feats @ protos[c]) for c in cls])

  val = txt["val"]
  pos, neg = [], []
  for i in range(len(val)):
    r = val[i]
    j = (i + 7) % len(val)
    if val[j]["img_keys"][0] == r["img_keys"][0]:
      continue
    pos.append(score(r["input_ids"], by_key[r["img_keys"][0].decode()]))
    neg.append(score(r["input_ids"], by_key[val[j]["img_keys"][0].decode()]))
  pos, neg = np.array(pos), np.array(neg)
  auc = np.mean(pos[:, None] > neg[None, :])
  assert auc > 0.9, auc


def test_bad_config_is_rejected(tmp_path):
  cfg = dataclasses.replace(synthetic.TINY_CONFIG, name="bad",
                            min_regions=4)
  with pytest.raises(ValueError, match="min_regions"):
    common.build(synthetic.UniterSyntheticImages(
        config=cfg, data_dir=os.fspath(tmp_path)))
  assert not (tmp_path / "uniter_synthetic_images" / "bad" / "1.0.0"
              ).exists()


def test_cli_synthetic(tmp_path, capsys):
  from data_prep import __main__ as cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["synthetic", "--data_dir", os.fspath(tmp_path),
                   "--preset", "tiny", "--name", "s2", "--num_train_images",
                   "6", "--num_val_images", "2"]) == 0
  out = capsys.readouterr().out
  assert ("uniter_synthetic_images/s2:1.0.0: wrote images=8, soft_labels=8"
          in out)
  assert "wrote train=18, val=6" in out
  vocab = tokenizer.read_vocab(os.path.join(
      schema.builder_dir(tmp_path, "uniter_synthetic_text/s2:1.0.0"),
      "vocab.txt"))
  assert vocab == synthetic.vocab()


def test_tfds_build_command(tmp_path):
  from tensorflow_datasets.scripts.cli import build  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.scripts.cli import cli_utils  # pylint: disable=g-import-not-at-top
  parse = cli_utils.make_flags_parser(build.Args, description="")
  args = parse(["tfds_build", "uniter_synthetic_images",
                "--imports", "data_prep.builders", "--data_dir",
                os.fspath(tmp_path), "--config",
                '{"name": "j", "seed": 2, "num_train_images": 3, '
                '"num_val_images": 1}'])
  args.execute()
  src = tfds.data_source("uniter_synthetic_images/j", data_dir=os.fspath(
      tmp_path), split="images")
  assert len(src) == 4
  cfg = dataclasses.replace(synthetic.TINY_CONFIG, name="j", seed=2,
                            num_train_images=3, num_val_images=1)
  want = synthetic.image_record(cfg, 2)
  np.testing.assert_array_equal(src[2]["features"],
                                want["features"].astype(np.float16))


def test_cli_synthetic_preset_without_name(tmp_path, capsys):
  """`--preset tiny` alone builds the built-in config (it used to fail with
  TFDS's "Cannot name a custom BuilderConfig the same as ..." error)."""
  from data_prep import __main__ as cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["synthetic", "--data_dir", os.fspath(tmp_path),
                   "--preset", "tiny"]) == 0
  out = capsys.readouterr().out
  assert "uniter_synthetic_images/tiny:1.0.0: wrote images=32, soft_labels=32" \
      in out
  assert "uniter_synthetic_text/tiny:1.0.0: wrote train=72, val=24" in out
  with pytest.raises(SystemExit, match="built-in preset"):
    cli.main(["synthetic", "--data_dir", os.fspath(tmp_path), "--preset",
              "default", "--name", "tiny"])


def test_written_uncompressed_with_soft_label_split(tiny):
  """Every split is ArrayRecord `group_size:1,uncompressed`; soft labels
  live in their own split, in the images split's order."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  d, img, _ = tiny
  meta = schema.read_meta(schema.builder_dir(
      d, "uniter_synthetic_images/tiny:1.0.0"))
  assert meta["array_record_options"] == common.ARRAY_RECORD_OPTIONS
  files = [p for p in (d / "uniter_synthetic_images" / "tiny" / "1.0.0"
                       ).iterdir() if ".array_record" in p.name]
  files += [p for p in (d / "uniter_synthetic_text" / "tiny" / "1.0.0"
                        ).iterdir() if ".array_record" in p.name]
  assert len(files) == 4   # images, soft_labels, train, val
  for p in files:
    r = array_record_module.ArrayRecordReader(os.fspath(p),
                                              "readahead_buffer_size:0")
    opts = r.writer_options_string().split(",")
    r.close()
    assert "uncompressed" in opts and "group_size:1" in opts, (p, opts)
  for i in range(len(img)):
    img[i]   # _Merged checks keys, counts and shapes of both splits
