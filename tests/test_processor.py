"""`uniter_jax.Processor`: text and regions -> the model's batch layout.

The round trips build a small synthetic corpus with data_prep and compare
the processor's batch, made from the corpus's raw records (caption strings,
fp32 features, boxes and confidences), with the input pipeline's batch of
the same examples, field by field.
"""

import dataclasses

import numpy as np
import pytest

from uniter_jax import processor as processor_lib
from uniter_jax.data import buckets
from uniter_jax.data import collate as collate_lib
from uniter_jax.data import contract
from uniter_jax.data import pipeline
from uniter_jax.data import schema

Processor = processor_lib.Processor
NAME = "proctest"
TEXT = f"uniter_synthetic_text/{NAME}:1.0.0"


def _cfg():
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(synthetic.TINY_CONFIG, name=NAME,
                             num_train_images=6, num_val_images=6,
                             captions_per_image=2, min_regions=10,
                             max_regions=36)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_prep import common, synthetic  # pylint: disable=g-import-not-at-top
  d = str(tmp_path_factory.mktemp("tfds"))
  for builder in (synthetic.UniterSyntheticImages,
                  synthetic.UniterSyntheticText):
    common.build(builder(config=_cfg(), data_dir=d))
  return d


@pytest.fixture(scope="module")
def synth():
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic


def _raw_example(synth, rid):
  """(caption string, raw image record) of a synthetic text record id."""
  _, img, j = rid.split("_")
  cfg = _cfg()
  return (synth.captions(cfg, int(img))[int(j)],
          synth.image_record(cfg, int(img)))


def _regions(proc, rec):
  return proc.regions(rec["features"], rec["norm_bb"], conf=rec["conf"])


# ---------------------------------------------------------------------------
# Round trips against the pipeline.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_equals_pipeline_batch_field_by_field(data_dir, synth, split):
  data = pipeline.UniterData(data_dir, TEXT, split, token_budget=2048,
                             shard_index=0, shard_count=1, max_buckets=2,
                             max_txt_len=60)
  proc = Processor(synth.vocab())
  plan = data.exact_plan()
  assert plan
  seen = 0
  for n, (k, part, _) in enumerate(plan):
    want = data.load_exact_batch(n)
    bucket = data.buckets[k]
    texts, images = [], []
    for i in part:
      caption, rec = _raw_example(synth, data.text.example(int(i))["_id"])
      texts.append(caption)
      images.append(_regions(proc, rec))
    got = proc(texts, images, pad_to=(bucket.max_txt, bucket.max_img))
    extra = {"example_mask", "example_index"}
    assert set(got) == set(want) - extra
    for f in got:
      assert got[f].dtype == want[f].dtype, f
      np.testing.assert_array_equal(got[f], want[f], err_msg=f)
    seen += len(part)
  assert seen >= len(data.text)
  # Without pad_to the batch is as wide as its longest row.
  b = proc(texts, images)
  assert b["input_ids"].shape[1] == max(b["txt_lens"])
  assert b["img_feat"].shape[1] == max(b["num_bbs"])


@pytest.mark.parametrize("head", ["nlvr2-paired", "nlvr2-triplet"])
def test_two_image_rows_equal_the_nlvr2_task_rows(data_dir, synth, head):
  """NLVR2 rows as the project's NLVR2 data ops make them from a joined
  two-image record (image type ids 1 / 2; pairs or concatenation)."""
  nlvr2 = pytest.importorskip("uniter_jax.tasks.nlvr2")
  data = pipeline.UniterData(data_dir, TEXT, "val", token_budget=4096,
                             shard_index=0, shard_count=1, max_buckets=1)
  proc = Processor(synth.vocab())
  store = data.store
  rows, texts, pairs = [], [], []
  for i in range(4):
    ex = data.text.example(i)
    a, b = int(data.text.img_index[i]), int(data.text.img_index[i + 2])
    ex["_images"] = [store.load(a), store.load(b)]
    op = nlvr2.pair_rows if head == "nlvr2-paired" else nlvr2.triplet_row
    made = op(ex, None, None)
    for r in (made if isinstance(made, list) else [made]):
      rows.append({k: v for k, v in r.items() if k != "targets"})
    caption, _ = _raw_example(synth, ex["_id"])
    texts.append(caption)
    pairs.append(tuple(_regions(proc, synth.image_record(
        _cfg(), int(store.keys[j].split("_")[-1]))) for j in (a, b)))
  lt = max(len(r["input_ids"]) for r in rows)
  li = max(len(r["img_feat"]) for r in rows)
  rpe = 2 if head == "nlvr2-paired" else 1
  want = collate_lib.collate(rows, buckets.Bucket(lt, li, len(rows)),
                             fields=contract.BASE_FIELDS,
                             rows_per_example=rpe)
  got = proc(texts, pairs, task=head)
  assert set(got) == set(want)
  for f in got:
    np.testing.assert_array_equal(got[f], want[f], err_msg=f)
  if head == "nlvr2-paired":
    assert got["input_ids"].shape[0] == 8
    np.testing.assert_array_equal(got["input_ids"][0], got["input_ids"][1])
    assert (got["img_type_ids"][0, :got["num_bbs"][0]] == 1).all()
    assert (got["img_type_ids"][1, :got["num_bbs"][1]] == 2).all()
  else:
    n0 = pairs[0][0].num_bb
    assert got["num_bbs"][0] == n0 + pairs[0][1].num_bb
    assert (got["img_type_ids"][0, :n0] == 1).all()
    assert (got["img_type_ids"][0, n0:got["num_bbs"][0]] == 2).all()


# ---------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "dog", "##s",
         "run", "!", "Dog", "a", "##b"]


def test_wordpiece_is_cased_and_splits_punctuation():
  proc = Processor(VOCAB)
  # "The" is not in the cased vocabulary: [UNK]; "dogs" -> dog ##s; "!" is
  # split off; "[MASK]" stays one token; an unknown word is one [UNK].
  assert proc.tokenize("The dogs run!  Dog [MASK] xyz") == [
      1, 6, 7, 8, 9, 10, 4, 1]
  assert Processor(VOCAB, lowercase=True).tokenize("The DOG") == [5, 6]
  b = proc(["dogs run", [6, 8]], {"features": np.ones((2, 2048)),
                                  "boxes": [[0, 0, .5, .5], [0, 0, 1, 1]]})
  np.testing.assert_array_equal(b["input_ids"], [[2, 6, 7, 8, 3],
                                                 [2, 6, 8, 3, 0]])
  assert b["txt_lens"].tolist() == [5, 4]
  assert "txt_type_ids" not in b and "img_type_ids" not in b


def test_long_text_is_kept_whole_as_official_inference_unless_truncated():
  """The official code never truncates: training drops texts of more than
  max_txt_len word pieces (TxtTokLmdb), inference keeps them whole
  (TxtTokLmdb(db, -1)). truncation=True cuts to max_txt_len instead."""
  img = {"features": np.ones((3, 2048)), "boxes": np.full((3, 4), 0.5)}
  words = " ".join(["dog"] * 70)
  whole = Processor(VOCAB)(words, img)
  assert whole["txt_lens"].tolist() == [72]
  assert whole["input_ids"][0, 0] == 2 and whole["input_ids"][0, 71] == 3
  cut = Processor(VOCAB, truncation=True)(words, img)
  assert cut["txt_lens"].tolist() == [62]
  np.testing.assert_array_equal(cut["input_ids"][0],
                                [2] + [6] * 60 + [3])
  assert Processor(VOCAB, truncation=True, max_txt_len=5)(
      words, img)["txt_lens"].tolist() == [7]
  # More than the position table holds: an error naming the fix, or cut to
  # the table with truncation.
  small = dict(max_position_embeddings=32)
  with pytest.raises(ValueError, match="truncation=True"):
    Processor(VOCAB, **small)(words, img)
  assert Processor(VOCAB, truncation=True, max_txt_len=-1, **small)(
      words, img)["txt_lens"].tolist() == [32]


def test_vcr_rows_and_type_ids_follow_the_official_dataset():
  proc = Processor(VOCAB)
  img = {"features": np.ones((3, 2048)), "boxes": np.full((3, 4), 0.5)}
  qa = proc.vcr("dog", ["run", "the dogs"], img)
  # [CLS] q [SEP] a [SEP]: types 0 on [CLS] and q, 2 on the rest.
  assert qa["input_ids"].shape == (2, 7)
  assert qa["input_ids"][0].tolist() == [2, 6, 3, 8, 3, 0, 0]
  assert qa["txt_lens"].tolist() == [5, 7]
  assert qa["txt_type_ids"][0, :5].tolist() == [0, 0, 2, 2, 2]
  assert qa["input_ids"][1].tolist() == [2, 6, 3, 5, 6, 7, 3]
  assert qa["txt_type_ids"][1].tolist() == [0, 0, 2, 2, 2, 2, 2]
  # QA->R: [CLS] q [SEP] a_gt [SEP] r [SEP] with types 0 / 2 / 3.
  qar = proc.vcr([[6]], [[[8], [9]]], [img], answer=[[5]])
  assert qar["input_ids"][0].tolist() == [2, 6, 3, 5, 3, 8, 3]
  assert qar["txt_type_ids"][0].tolist() == [0, 0, 2, 2, 3, 3, 3]
  assert qar["input_ids"].shape[0] == 2
  with pytest.raises(ValueError, match="same number of choices"):
    proc.vcr(["dog", "dog"], [["run"], ["run", "dog"]], [img, img])


# ---------------------------------------------------------------------------
# Regions.
# ---------------------------------------------------------------------------
def _feats(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 2048)).astype(
      np.float32)


def _boxes(n, seed=0):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 0.5, (n, 2))
  return np.concatenate([xy, xy + rng.uniform(0.05, 0.5, (n, 2))], 1)


@pytest.mark.parametrize("n,conf,rule,keep", [
    (5, 0.1, {}, 5),          # fewer regions than min_bb: all of them
    (120, 0.9, {}, 100),      # more confident regions than max_bb
    (50, None, {}, 50),       # no confidences: min(n, max_bb)
    (150, None, {}, 100),
    (20, 0.9, {"num_bb": 36}, 20),   # fixed rule, capped at what is given
    (50, 0.1, {"num_bb": 36}, 36),
    (40, 0.1, {"min_bb": 3, "max_bb": 30}, 3),
])
def test_official_region_rule(n, conf, rule, keep):
  proc = Processor(VOCAB, region_rule=rule)
  feats = _feats(n)
  c = None if conf is None else np.full(n, conf, np.float32)
  r = proc.regions(feats, _boxes(n), conf=c)
  assert r.num_bb == keep and r.num_given == n
  np.testing.assert_array_equal(
      r.img_feat, feats[:keep].astype(np.float16).astype(np.float32))
  assert r.num_bb == schema.select_num_bb(
      np.ones(n) if c is None else c, num_bb=rule.get("num_bb"),
      min_bb=rule.get("min_bb", 10), max_bb=rule.get("max_bb", 100))


def test_region_rule_counts_confidences_above_the_threshold():
  proc = Processor(VOCAB)
  conf = np.full(50, 0.1, np.float32)
  conf[[0, 7, 30]] = 0.8                  # 3 above 0.2: min_bb 10 kept
  assert proc.regions(_feats(50), _boxes(50), conf=conf).num_bb == 10
  conf[:25] = 0.5                         # 26 above: 26 kept (first 26)
  assert proc.regions(_feats(50), _boxes(50), conf=conf).num_bb == 26


def test_pixel_and_normalised_boxes_agree():
  w, h = 640, 427
  norm = _boxes(30, seed=4).astype(np.float32)
  px = norm * np.array([w, h, w, h], np.float32)
  proc = Processor(VOCAB)
  a = proc.regions(_feats(30), px, image_size=(w, h))
  b = proc.regions(_feats(30), norm)
  np.testing.assert_allclose(a.img_pos_feat, b.img_pos_feat, atol=1e-6)
  # The official extraction: x1/W, y1/H, x1/W + w/W, y1/H + h/H, w/W, h/H,
  # then the area of the stored w and h.
  x1, y1, x2, y2 = px.T
  sw, sh = (x2 - x1) / np.float32(w), (y2 - y1) / np.float32(h)
  want = np.stack([x1 / w, y1 / h, x1 / w + sw, y1 / h + sh, sw, sh,
                   sw * sh], 1).astype(np.float32)
  np.testing.assert_array_equal(a.img_pos_feat, want)
  # The 6-column official norm_bb is taken as it is.
  six = np.concatenate([norm, norm[:, 2:] - norm[:, :2]], 1)
  c = proc.regions(_feats(30), six)
  np.testing.assert_allclose(c.img_pos_feat, b.img_pos_feat, atol=1e-7)
  np.testing.assert_array_equal(c.img_pos_feat[:, 6], six[:, 4] * six[:, 5])
  # fp16 boxes, as the official .npz files store norm_bb.
  d = Processor(VOCAB, round_boxes_fp16=True).regions(_feats(30), six)
  np.testing.assert_array_equal(
      d.img_pos_feat[:, :6], six.astype(np.float16).astype(np.float32))


def test_bad_regions_are_clear_errors():
  proc = Processor(VOCAB)
  px = _boxes(4) * 500
  with pytest.raises(ValueError, match="image_size=\\(width, height\\)"):
    proc.regions(_feats(4), px)
  xywh = np.array([[0.5, 0.5, 0.2, 0.2]])
  with pytest.raises(ValueError, match="not \\[x, y, w, h\\]"):
    proc.regions(_feats(1), xywh)
  with pytest.raises(ValueError, match="4 features but 3 boxes"):
    proc.regions(_feats(4), _boxes(3))
  with pytest.raises(ValueError, match="expected \\[n, 2048\\]"):
    proc.regions(np.ones((4, 100)), _boxes(4))
  with pytest.raises(ValueError, match="2 texts for 3 images"):
    proc(["dog", "run"], [{"features": _feats(2), "boxes": _boxes(2)}] * 3)


def test_one_caption_against_many_images_and_pad_to():
  proc = Processor(VOCAB, pad_to_multiple_of=8)
  imgs = [proc.regions(_feats(n, n), _boxes(n, n)) for n in (3, 11, 5)]
  b = proc("the dogs run", imgs)
  assert b["input_ids"].shape == (3, 8) and b["img_feat"].shape == (3, 16,
                                                                     2048)
  assert b["num_bbs"].tolist() == [3, 11, 5]
  assert (b["input_ids"] == b["input_ids"][0]).all()
  assert b["attn_masks"][1].sum() == 6 + 11
  b = proc("the dogs run", imgs, pad_to=(9, 12))
  assert b["attn_masks"].shape == (3, 21)
  with pytest.raises(ValueError, match="smaller than the batch needs"):
    proc("the dogs run", imgs, pad_to=(4, 12))
