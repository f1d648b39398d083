"""Tests of uniter_jax.data on small synthetic TFDS datasets built by data_prep."""

import dataclasses

import numpy as np
import pytest

import batch_digest

from uniter_jax.data import buckets as bk
from uniter_jax.data import collate as collate_lib
from uniter_jax.data import contract
from uniter_jax.data import pipeline
from uniter_jax.data import schema
from uniter_jax.data import sources

TEXT = "uniter_synthetic_text/pipetest:1.0.0"
IMAGES = "uniter_synthetic_images/pipetest:1.0.0"


def _config(name):
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(synthetic.TINY_CONFIG, name=name,
                             num_train_images=40, num_val_images=8,
                             captions_per_image=3, min_regions=10,
                             max_regions=60)


def _build_corpus(d, name):
  """The test corpus (40 train / 8 val images, 10-60 regions) as `name`."""
  from data_prep import common, synthetic  # pylint: disable=g-import-not-at-top
  cfg = _config(name)
  for builder in (synthetic.UniterSyntheticImages,
                  synthetic.UniterSyntheticText):
    common.build(builder(config=cfg, data_dir=d))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  _build_corpus(d, "pipetest")
  return d


def make(data_dir, **kw):
  args = dict(token_budget=1024, batch_multiple=4, shard_index=0,
              shard_count=1, max_buckets=6, target_padding=0.0, seed=3)
  args.update(kw)
  return pipeline.UniterData(data_dir, TEXT, "train", **args)


def same_batch(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------
# Buckets.
# ---------------------------------------------------------------------------
def _lengths(n, seed=0, fixed_bb=None):
  rng = np.random.default_rng(seed)
  t = 2 + np.clip(np.round(rng.lognormal(np.log(12), 0.3, n)), 3, 60)
  if fixed_bb:
    nb = np.full(n, fixed_bb)
  else:
    nb = np.clip(np.round(rng.normal(45, 22, n)), 10, 100)
  return t.astype(int), nb.astype(int)


@pytest.mark.parametrize("budget,mult", [(10240, 8), (4096, 8), (6144, 16)])
def test_buckets_respect_budget_and_multiple(budget, mult):
  t, n = _lengths(20000)
  buckets = bk.choose_buckets(t, n, budget, mult, max_buckets=12)
  assert 1 < len(buckets) <= 12
  for b in buckets:
    assert b.tokens <= budget and b.batch_size % mult == 0 and b.batch_size
    # batch size is the largest that fits: one more group would not.
    assert (b.batch_size + mult) * b.seq_len > budget
  a = bk.assign_buckets(t, n, buckets)
  assert (a >= 0).all()
  assert (t <= [buckets[k].max_txt for k in a]).all()
  assert (n <= [buckets[k].max_img for k in a]).all()
  plan = bk.plan_epoch(a, buckets, seed=0, epoch=0)
  for k, idx in zip(plan.bucket_ids, plan.batches):
    b = buckets[k]
    assert len(idx) == b.batch_size
    assert (t[idx] <= b.max_txt).all() and (n[idx] <= b.max_img).all()
    assert (t[idx] + n[idx]).sum() <= budget


def test_plan_partitions_examples_and_reshuffles():
  t, n = _lengths(5000)
  buckets = bk.choose_buckets(t, n, 4096, 8, max_buckets=8)
  a = bk.assign_buckets(t, n, buckets)
  p0 = bk.plan_epoch(a, buckets, seed=1, epoch=0)
  seen = np.concatenate(p0.batches + [p0.dropped])
  np.testing.assert_array_equal(np.sort(seen), np.arange(len(t)))
  # Only less than one batch of the widest shape is left out per epoch.
  assert len(p0.dropped) < buckets[-1].batch_size
  p0b = bk.plan_epoch(a, buckets, seed=1, epoch=0)
  p1 = bk.plan_epoch(a, buckets, seed=1, epoch=1)
  assert all((x == y).all() for x, y in zip(p0.batches, p0b.batches))
  assert len(p1.batches) == len(p0.batches)
  assert not all(len(x) == len(y) and (x == y).all()
                 for x, y in zip(p0.batches, p1.batches))


def test_padding_low_on_realistic_lengths():
  # Fixed 36 regions (the official conf_th=-1 db), COCO-like captions: few
  # shapes suffice.
  t, n = _lengths(50000, fixed_bb=36)
  buckets = bk.choose_buckets(t, n, 10240, 8, max_buckets=8,
                              target_padding=0.05)
  plan = bk.plan_epoch(bk.assign_buckets(t, n, buckets), buckets, 0, 0)
  assert len(buckets) <= 6
  assert bk.padding_stats(t, n, plan, buckets)["padding_fraction"] <= 0.05
  # Dynamic 10..100 regions: 2-d quantisation needs more shapes for <=10%.
  t, n = _lengths(50000)
  buckets = bk.choose_buckets(t, n, 10240, 8, max_buckets=32,
                              target_padding=0.10)
  plan = bk.plan_epoch(bk.assign_buckets(t, n, buckets), buckets, 0, 0)
  # The histogram-level target is 10%; per-epoch remainders carried into
  # wider shapes add a little on 50k examples.
  assert bk.padding_stats(t, n, plan, buckets)["padding_fraction"] <= 0.11
  few = bk.choose_buckets(t, n, 10240, 8, max_buckets=4)
  plan = bk.plan_epoch(bk.assign_buckets(t, n, few), few, 0, 0)
  assert bk.padding_stats(t, n, plan, few)["padding_fraction"] > 0.15


def test_budget_too_small_raises():
  with pytest.raises(ValueError, match="token_budget"):
    bk.choose_buckets([10, 20], [36, 100], token_budget=200, batch_multiple=8)


# ---------------------------------------------------------------------------
# Join, num_bb rule, features.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", [
    sources.RegionRule(),                                  # dynamic default
    sources.RegionRule(conf_th=0.4, min_bb=12, max_bb=30),
    sources.RegionRule(num_bb=20),                         # fixed
])
def test_join_matches_stored_images(data_dir, rule):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  d = make(data_dir, region_rule=rule, with_soft_labels=True)
  imgs = tfds.data_source(IMAGES, split=schema.IMAGE_SPLIT, data_dir=data_dir)
  softs = tfds.data_source(IMAGES, split=schema.SOFT_LABEL_SPLIT,
                           data_dir=data_dir)
  texts = tfds.data_source(TEXT, split="train", data_dir=data_dir)
  key_to_index = schema.read_image_index(schema.builder_dir(data_dir, IMAGES))
  meta = schema.read_meta(schema.builder_dir(data_dir, TEXT))
  for i in range(0, len(d.text), 7):
    ex = d.example(i, epoch=0)
    rec = texts[int(d.text.records[i])]
    assert ex["_id"] == rec["id"].decode()
    np.testing.assert_array_equal(
        ex["input_ids"], [meta["CLS"], *rec["input_ids"], meta["SEP"]])
    key = rec["img_keys"][0].decode()
    assert ex["img_key"] == key
    img = imgs[key_to_index[key]]
    n = schema.select_num_bb(img["conf"], rule.conf_th, rule.min_bb,
                             rule.max_bb, rule.num_bb)
    assert ex["img_feat"].shape == (n, 2048) and ex["img_feat"].dtype == np.float32
    # fp16 -> fp32 is exact: casting back gives the stored bits.
    np.testing.assert_array_equal(ex["img_feat"].astype(np.float16),
                                  img["features"][:n])
    soft = softs[key_to_index[key]]
    assert soft["img_key"].decode() == key and img["soft_labels"].shape[0] == 0
    np.testing.assert_array_equal(ex["img_soft_labels"],
                                  soft["soft_labels"][:n].astype(np.float32))
    bb = img["norm_bb"][:n]
    np.testing.assert_array_equal(ex["img_pos_feat"][:, :6], bb)
    np.testing.assert_allclose(ex["img_pos_feat"][:, 6], bb[:, 4] * bb[:, 5],
                               rtol=1e-7)
    assert d.num_bbs[i] == n and d.txt_lens[i] == len(rec["input_ids"]) + 2


def test_box7():
  bb = np.array([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4]], np.float32)
  out = sources.box7(bb)
  np.testing.assert_allclose(out, [[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]],
                             rtol=1e-6)


def test_batches_are_padded_per_contract(data_dir):
  d = make(data_dir)
  for step in range(d.batches_per_epoch):
    bucket, rows = d.host_rows(step)
    batch = d.load_batch(step)
    b, lt, li = bucket.batch_size, bucket.max_txt, bucket.max_img
    assert batch["input_ids"].shape == (b, lt)
    assert batch["img_feat"].shape == (b, li, 2048)
    assert batch["img_pos_feat"].shape == (b, li, 7)
    assert batch["attn_masks"].shape == (b, lt + li)
    assert b * (lt + li) <= 1024
    np.testing.assert_array_equal(batch["position_ids"],
                                  np.tile(np.arange(lt), (b, 1)))
    for r, i in enumerate(rows):
      tl, nb = batch["txt_lens"][r], batch["num_bbs"][r]
      assert tl == d.txt_lens[i] and nb == d.num_bbs[i]
      assert batch["attn_masks"][r].tolist() == (
          [1] * tl + [0] * (lt - tl) + [1] * nb + [0] * (li - nb))
      assert (batch["input_ids"][r, tl:] == 0).all()
      assert (batch["img_feat"][r, nb:] == 0).all()
      assert (batch["img_pos_feat"][r, nb:] == 0).all()
      np.testing.assert_array_equal(batch["img_feat"][r, :nb],
                                    d.example(int(i), 0)["img_feat"])


def test_collate_optional_fields_padding():
  bucket = bk.Bucket(6, 4, 2)
  exs = [{"input_ids": np.array([2, 7, 3], np.int32),
          "txt_labels": np.array([-1, 7, -1], np.int32),
          "img_feat": np.ones((2, 2048), np.float32),
          "img_pos_feat": np.ones((2, 7), np.float32),
          "img_masks": np.array([True, False]),
          "label_targets": np.ones((2, 1601), np.float32),
          "targets": np.int32(1), "_id": "a"},
         {"input_ids": np.array([2, 3], np.int32),
          "txt_labels": np.array([-1, -1], np.int32),
          "img_feat": np.ones((4, 2048), np.float32),
          "img_pos_feat": np.ones((4, 7), np.float32),
          "img_masks": np.array([False, True, False, False]),
          "label_targets": np.ones((4, 1601), np.float32),
          "targets": np.int32(0), "_id": "b"}]
  out = collate_lib.collate(exs, bucket)
  assert out["txt_labels"][0].tolist() == [-1, 7, -1, -1, -1, -1]
  assert out["img_masks"][0].tolist() == [True, False, False, False]
  assert out["label_targets"].shape == (2, 4, 1601)
  assert (out["label_targets"][0, 2:] == 0).all()
  assert out["targets"].tolist() == [1, 0]
  with pytest.raises(ValueError, match="bucket holds"):
    collate_lib.collate(exs, bk.Bucket(6, 3, 2))
  del exs[1]["img_masks"]
  with pytest.raises(ValueError, match="lacks"):
    collate_lib.collate(exs, bucket)
  exs[1]["img_masks"] = np.zeros(4, bool)
  exs[1]["oops"] = 1
  with pytest.raises(ValueError, match="unknown fields"):
    collate_lib.collate(exs, bucket)


# ---------------------------------------------------------------------------
# Determinism, state, sharding.
# ---------------------------------------------------------------------------
def test_deterministic_for_a_seed(data_dir):
  a = list(make(data_dir).iterator(num_epochs=2))
  b = list(make(data_dir).iterator(num_epochs=2, num_threads=1, prefetch=1))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    same_batch(x, y)
  c = list(make(data_dir, seed=4).iterator(num_epochs=1))
  assert any(x["input_ids"].shape != y["input_ids"].shape
             or (x["input_ids"] != y["input_ids"]).any()
             for x, y in zip(a, c))


def test_save_restore_reproduces_next_batches(data_dir):
  d = make(data_dir)
  n = d.batches_per_epoch
  it = d.iterator(num_epochs=3)
  for _ in range(n - 1):   # stop just before an epoch boundary
    next(it)
  state = it.get_state()
  expect = [next(it) for _ in range(3)]
  import json  # pylint: disable=g-import-not-at-top
  state = json.loads(json.dumps(state))
  it2 = pipeline.make_pretrain_iterator(
      data_dir, TEXT, "train", num_epochs=3, state=state, token_budget=1024,
      batch_multiple=4, shard_index=0, shard_count=1, max_buckets=6,
      target_padding=0.0, seed=3)
  for e in expect:
    same_batch(e, next(it2))
  with pytest.raises(ValueError, match="different data setup"):
    make(data_dir, seed=5).iterator().set_state(state)


def test_host_sharding_partitions_global_batches(data_dir):
  full = make(data_dir, batch_multiple=4)
  hosts = [make(data_dir, batch_multiple=4, shard_index=h, shard_count=2)
           for h in range(2)]
  steps = 2 * full.batches_per_epoch
  for step in range(0, steps, 3):
    g_bucket, g_rows = full.host_rows(step)
    parts = [h.host_rows(step) for h in hosts]
    assert all(b == g_bucket for b, _ in parts)
    rows = np.concatenate([r for _, r in parts])
    np.testing.assert_array_equal(rows, g_rows)
    assert len(np.intersect1d(parts[0][1], parts[1][1])) == 0
    gb = full.load_batch(step)
    hb = [h.load_batch(step) for h in hosts]
    for k in gb:
      np.testing.assert_array_equal(np.concatenate([x[k] for x in hb]), gb[k])
  with pytest.raises(ValueError, match="multiple of the host count"):
    make(data_dir, batch_multiple=3, shard_index=0, shard_count=2)


# ---------------------------------------------------------------------------
# Task ops hook.
# ---------------------------------------------------------------------------
def _toy_itm(example, rng, ctx):
  """Replaces the image by a random other one half of the time."""
  out = dict(example)
  if rng.random() < 0.5:
    neg = ctx.sample_image(rng, exclude_key=example["img_key"])
    assert neg["img_key"] != example["img_key"]
    assert len(neg["img_feat"]) <= ctx.max_img
    out.update(neg)
    out["targets"] = np.int32(0)
  else:
    out["targets"] = np.int32(1)
  ids = out["input_ids"].copy()
  assert ids[0] == ctx.cls_id and ids[-1] == ctx.sep_id
  out["txt_labels"] = np.where(rng.random(len(ids)) < 0.3, ids, -1)
  out["txt_labels"][[0, -1]] = -1
  return out


def test_ops_deterministic_across_threads(data_dir):
  a = list(make(data_dir, ops=[_toy_itm]).iterator(num_epochs=2,
                                                   num_threads=3))
  b = list(make(data_dir, ops={"toy_itm": _toy_itm}).iterator(
      num_epochs=2, num_threads=1))
  for x, y in zip(a, b):
    same_batch(x, y)
  targets = np.concatenate([x["targets"] for x in a])
  assert 0.2 < targets.mean() < 0.8
  # Epochs redraw: the op's choices differ between epoch 0 and 1.
  d = make(data_dir, ops=[_toy_itm])
  e0 = [d.example(i, 0)["targets"] for i in range(len(d.text))]
  e1 = [d.example(i, 1)["targets"] for i in range(len(d.text))]
  assert e0 != e1
  with pytest.raises(TypeError, match="must be a callable"):
    make(data_dir, ops=["no_such_op"])


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------
class _Corrupt:
  """Wraps a data source, corrupting one record."""

  def __init__(self, src, index, fn):
    self.src, self.index, self.fn = src, index, fn

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    rec = self.src[i]
    return self.fn(dict(rec)) if i == self.index else rec

  def get(self, i, fields):
    return {k: v for k, v in self[i].items() if k in fields}


def test_missing_image_key_is_an_error(data_dir):
  store = sources.ImageStore(data_dir, IMAGES)
  del store.key_to_index["synthetic_0000003"]
  with pytest.raises(sources.DataError,
                     match=r"pipetest.*train.*record 'train_3_0'.*"
                     r"synthetic_0000003.*missing"):
    sources.TextSource(data_dir, TEXT, "train", store)


def test_nan_features_and_zero_regions_are_errors(data_dir):
  store = sources.ImageStore(data_dir, IMAGES)

  def nan(rec):
    rec["features"] = rec["features"].copy()
    rec["features"][0, 5] = np.nan
    return rec

  def empty(rec):
    rec["num_bb"] = 0
    rec["conf"] = rec["conf"][:0]
    return rec

  store._source = _Corrupt(store._source, 2, nan)  # pylint: disable=protected-access
  store.load(1)
  with pytest.raises(sources.DataError,
                     match=r"uniter_synthetic_images.*'synthetic_0000002'.*"
                     r"img_feat holds NaN/inf"):
    store.load(2)
  store._source = _Corrupt(store._source.src, 4, empty)  # pylint: disable=protected-access
  with pytest.raises(sources.DataError,
                     match=r"'synthetic_0000004'.*zero regions"):
    store.num_bbs()


def test_long_text_dropped_and_counted(data_dir):
  full = make(data_dir, max_txt_len=-1)
  lens = full.txt_lens - 2
  cut = int(np.median(lens))
  d = make(data_dir, max_txt_len=cut)
  assert len(d.text) == int((lens <= cut).sum())
  assert d.dropped["longer_than_max_txt_len"] == int((lens > cut).sum()) > 0
  assert d.stats()["dropped_at_load"]["longer_than_max_txt_len"] > 0


def test_with_pretraining_ops_from_tasks(data_dir):
  """The real MLM / MRM / ITM ops (uniter_jax.tasks.masking) fit the hook."""
  masking = pytest.importorskip("uniter_jax.tasks.masking")
  d = make(data_dir, ops={"itm": masking.itm_op, "mlm": masking.mlm_op},
           op_params={"itm_neg_prob": 0.5})
  assert d.context(d.buckets[0]).itm_neg_prob == 0.5
  for step in range(d.batches_per_epoch):
    batch = d.load_batch(step)
    bucket, _ = d.host_rows(step)
    assert batch["txt_labels"].shape == (bucket.batch_size, bucket.max_txt)
    assert batch["targets"].shape == (bucket.batch_size,)
    assert batch["img_feat"].shape[1] == bucket.max_img
    assert ((batch["txt_labels"] != -1).sum(1) >= 1).all()
  d = make(data_dir, ops={"mrfr": masking.mrm_op}, with_soft_labels=True)
  batch = d.load_batch(0)
  assert batch["img_masks"].any(1).all()
  assert (batch["img_feat"][batch["img_masks"]] == 0).all()
  assert batch["feat_targets"].shape == batch["img_feat"].shape
  assert batch["label_targets"].shape[-1] == 1601


# ---------------------------------------------------------------------------
# Fast reading path: uncompressed ArrayRecord, in-place parsing, fp16 cast.
# ---------------------------------------------------------------------------
def test_fp16_to_fp32_is_exact_for_every_bit_pattern():
  bits = np.arange(1 << 16, dtype=np.uint16)
  x = bits.view(np.float16)
  want = x.astype(np.float32)
  finite = np.isfinite(x)
  assert not sources.fp16_all_finite(x)
  assert sources.fp16_all_finite(x[finite])
  # Finite values (bit-shift path), incl. subnormals and -0.
  got = sources.fp16_to_fp32(x[finite])
  np.testing.assert_array_equal(got.view(np.uint32),
                                want[finite].view(np.uint32))
  # With inf/NaN present (lookup-table path), every pattern incl. payloads.
  np.testing.assert_array_equal(sources.fp16_to_fp32(x).view(np.uint32),
                                want.view(np.uint32))
  for bad in (np.inf, -np.inf, np.nan):
    assert not sources.fp16_all_finite(np.array([1, bad, 2], np.float16))
  # Into a given output, from an unaligned view.
  raw = np.zeros(2 * 12 + 1, np.uint8)
  unaligned = np.ndarray((3, 4), np.float16, buffer=raw, offset=1)
  unaligned[...] = np.arange(12).reshape(3, 4) - 5.5
  out = np.full((3, 4), 7.0, np.float32)
  assert sources.fp16_to_fp32(unaligned, out=out) is out
  np.testing.assert_array_equal(out, np.arange(12).reshape(3, 4) - 5.5)


def test_reader_matches_tfds(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cases = [(IMAGES, schema.IMAGE_SPLIT, schema.IMAGE_ARRAYS, ()),
           (IMAGES, schema.SOFT_LABEL_SPLIT, schema.IMAGE_ARRAYS, ()),
           (TEXT, "train", schema.TEXT_ARRAYS, schema.TEXT_LISTS)]
  for name, split, arrays, lists in cases:
    reader = sources.RecordReader(data_dir, name, split, arrays, lists)
    files = tfds.data_source(name, split=split, data_dir=data_dir)
    for i in range(len(files)):
      a, b = reader[i], files[i]
      assert a.keys() == b.keys()
      for k in a:
        if isinstance(b[k], np.ndarray) and b[k].dtype != object:
          assert a[k].dtype == b[k].dtype, k
          np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
          assert list(a[k]) == list(b[k]) if isinstance(a[k], list) else (
              a[k] == b[k]), k


def test_corrupted_record_is_an_error(data_dir):
  store = sources.ImageStore(data_dir, IMAGES)
  src = store._source  # pylint: disable=protected-access
  buf = bytearray(src.tfds_source.data_source[3])
  buf[1:40] = b"\xff" * 39
  with pytest.raises(sources.DataError, match=r"images\].*record 3.*corrupt"):
    src.decode(bytes(buf), 3)


def test_img_feat_float16_option(data_dir):
  d32 = make(data_dir)
  d16 = make(data_dir, img_feat_dtype="float16")
  for step in range(d32.batches_per_epoch):
    a, b = d32.load_batch(step), d16.load_batch(step)
    assert a.keys() == b.keys()
    assert a["img_feat"].dtype == np.float32
    assert b["img_feat"].dtype == np.float16
    np.testing.assert_array_equal(b["img_feat"].astype(np.float32),
                                  a["img_feat"])
    for k in a:
      if k != "img_feat":
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  with pytest.raises(ValueError, match="img_feat_dtype"):
    make(data_dir, img_feat_dtype="bfloat16")


def test_no_op_batches_equal_op_path_batches(data_dir):
  """Without ops the fp16 features are cast while padding; same batches."""
  def identity(example, rng, ctx):
    del rng, ctx
    assert example["img_feat"].dtype == np.float32   # the contract
    return example
  plain = make(data_dir)
  with_op = make(data_dir, ops=[identity])
  for step in range(plain.batches_per_epoch):
    same_batch(plain.load_batch(step), with_op.load_batch(step))


def test_soft_label_split_out_of_order_is_an_error(data_dir):
  store = sources.ImageStore(data_dir, IMAGES, with_soft_labels=True)

  class _Shifted:
    def __init__(self, src):
      self.src = src

    def get(self, i, fields):
      return self.src.get(i + 1, fields)

  store._soft = _Shifted(store._soft)  # pylint: disable=protected-access
  with pytest.raises(sources.DataError, match="out of order"):
    store.load(0)


def test_default_buckets_reach_target_padding():
  """UniterData's defaults (max_buckets=32, target 10%) on realistic
  dynamic-region lengths; 16 shapes are not enough for 10%."""
  import inspect  # pylint: disable=g-import-not-at-top
  sig = inspect.signature(pipeline.UniterData)
  max_buckets = sig.parameters["max_buckets"].default
  target = sig.parameters["target_padding"].default
  t, n = _lengths(100000)
  buckets = bk.choose_buckets(t, n, 10240, 8, max_buckets=max_buckets,
                              target_padding=target)
  plan = bk.plan_epoch(bk.assign_buckets(t, n, buckets), buckets, 0, 0)
  assert 16 < len(buckets) <= max_buckets
  assert bk.padding_stats(t, n, plan, buckets)["padding_fraction"] <= 0.101
  sixteen = bk.choose_buckets(t, n, 10240, 8, max_buckets=16)
  plan = bk.plan_epoch(bk.assign_buckets(t, n, sixteen), sixteen, 0, 0)
  assert bk.padding_stats(t, n, plan, sixteen)["padding_fraction"] > 0.12


def test_compressed_datasets_read_through_slow_path(data_dir, monkeypatch):
  """A store written with TFDS's default (brotli) ArrayRecord options is read
  through array_record + protobuf and gives the very same batches."""
  from data_prep import common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, "ARRAY_RECORD_OPTIONS", "group_size:1")
  _build_corpus(data_dir, "pipebrotli")
  slow_text = "uniter_synthetic_text/pipebrotli:1.0.0"
  slow = pipeline.UniterData(
      data_dir, slow_text, "train", token_budget=1024, batch_multiple=4,
      shard_index=0, shard_count=1, max_buckets=6, target_padding=0.0,
      seed=3, with_soft_labels=True)
  fast = make(data_dir, with_soft_labels=True)
  assert slow.batches_per_epoch == fast.batches_per_epoch
  for step in range(slow.batches_per_epoch):
    same_batch(slow.load_batch(step), fast.load_batch(step))
  a = fast.example(5, 0)
  b = slow.example(5, 0)
  np.testing.assert_array_equal(a["img_soft_labels"], b["img_soft_labels"])


def test_buffer_pool_reuses_only_unreferenced_memory():
  pool = collate_lib.BufferPool(max_buffers=2, min_bytes=1 << 20)
  shape = (300, 1024)                       # 1.2 MB of float32
  a = pool.empty(shape, np.float32)
  where = a.ctypes.data
  del a
  b = pool.empty(shape, np.float32)
  assert b.ctypes.data == where and len(pool) == 1     # reused
  c = pool.empty(shape, np.float32)
  assert c.ctypes.data != where and len(pool) == 2     # b still alive
  view = b[1:]
  del b
  d = pool.empty(shape, np.float32)                    # pool full, all used
  assert d.ctypes.data not in (where, c.ctypes.data) and len(pool) == 2
  del view
  e = pool.empty((2, 300, 1024), np.float16)          # fits in b's buffer
  assert e.ctypes.data == where and e.shape == (2, 300, 1024)
  small = pool.empty((4, 4), np.float32)
  assert len(pool) == 2 and small.shape == (4, 4)
  del c, d, e, small


@pytest.mark.parametrize("ops", [None, "identity"])
def test_dropped_batches_recycle_memory_safely(data_dir, ops):
  """Batches kept alive (a list: no memory reused) equal batches dropped
  one by one (pooled memory reused)."""
  def identity(example, rng, ctx):
    del rng, ctx
    return example

  def digest(batch):
    return {k: (v.shape, v.dtype.str, hash(v.tobytes()))
            for k, v in batch.items()}

  kw = dict(token_budget=4096, ops=None if ops is None else [identity])
  kept = list(make(data_dir, **kw).iterator(num_epochs=2, num_threads=2))
  want = [digest(b) for b in kept]
  d = make(data_dir, **kw)
  got = [digest(b) for b in d.iterator(num_epochs=2, num_threads=2)]
  assert got == want
  assert len(d._pool) >= 1  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Pretraining batches stay bit-identical (pinned against the code before the
# task protocol: multi-row examples, field tables, batch ops, exact batches).
# ---------------------------------------------------------------------------
def _pin_op(example, rng, ctx):
  """ITM negative, text and region masks: touches every pretraining field."""
  out = dict(example)
  if rng.random() < 0.5:
    out.update(ctx.sample_image(rng, exclude_key=example["img_key"]))
    out["targets"] = np.int32(0)
  else:
    out["targets"] = np.int32(1)
  ids = out["input_ids"].copy()
  out["txt_labels"] = np.where(rng.random(len(ids)) < 0.3, ids,
                               -1).astype(np.int32)
  out["input_ids"] = np.where(out["txt_labels"] >= 0, ctx.mask_id,
                              ids).astype(np.int32)
  feat = np.asarray(out["img_feat"], np.float32)
  m = rng.random(len(feat)) < 0.2
  out["img_masks"] = m
  out["feat_targets"] = feat.copy()
  out["img_feat"] = np.where(m[:, None], np.float32(0), feat)
  if "img_soft_labels" in out:
    out["label_targets"] = out["img_soft_labels"].copy()
  out["txt_type_ids"] = np.zeros(len(ids), np.int32)
  out["img_type_ids"] = np.ones(len(feat), np.int32)
  return out


# Computed with the code before the change (same corpus, same configs):
# epoch 0 and the first batch of epoch 1.
_PINNED = {
    "plain": "e91609794397d08a951ab172c0a14cdadecd9bac",
    "ops_soft": "cece0bde7e0ed77b1c0f2c771838cc11c19eb940",
    "ops_fp16_shard1": "c4e0f262f354f6e2eea03e78ccf4dfb76249c489",
}


@pytest.mark.parametrize("name,kw", [
    ("plain", {}),
    ("ops_soft", dict(with_soft_labels=True, ops=[_pin_op])),
    ("ops_fp16_shard1", dict(ops=[_pin_op], img_feat_dtype="float16",
                             shard_index=1, shard_count=2)),
])
def test_pretraining_batches_are_pinned(data_dir, name, kw):
  d = make(data_dir, **kw)
  assert d.fingerprint() == make(data_dir, **{
      k: v for k, v in kw.items() if k not in ("shard_index",
                                               "shard_count")}).fingerprint()
  steps = range(d.batches_per_epoch + 1)
  batches = [d.load_batch(s) for s in steps]
  assert batch_digest.digest(batches) == _PINNED[name]
  # The same through the iterator (grain threads).
  it = d.iterator(num_epochs=2, num_threads=2)
  assert batch_digest.digest([next(it) for _ in steps]) == _PINNED[name]


def test_pretraining_batch_layout(data_dir):
  """Keys (in order), dtypes and shapes of the default and op batches."""
  d = make(data_dir)
  bucket, _ = d.host_rows(0)
  b, lt, li = bucket.batch_size, bucket.max_txt, bucket.max_img
  batch = d.load_batch(0)
  assert [(k, v.dtype.str, v.shape) for k, v in batch.items()] == [
      ("input_ids", "<i4", (b, lt)), ("img_feat", "<f4", (b, li, 2048)),
      ("img_pos_feat", "<f4", (b, li, 7)), ("position_ids", "<i4", (b, lt)),
      ("attn_masks", "<i4", (b, lt + li)), ("txt_lens", "<i4", (b,)),
      ("num_bbs", "<i4", (b,))]
  contract.check_batch(batch, contract.BASE_FIELDS, where="plain")
  batch = make(data_dir, ops=[_pin_op], with_soft_labels=True).load_batch(0)
  assert [(k, v.dtype.str, v.shape) for k, v in batch.items()] == [
      ("input_ids", "<i4", (b, lt)), ("txt_type_ids", "<i4", (b, lt)),
      ("txt_labels", "<i4", (b, lt)), ("img_feat", "<f4", (b, li, 2048)),
      ("img_pos_feat", "<f4", (b, li, 7)), ("img_type_ids", "<i4", (b, li)),
      ("img_soft_labels", "<f4", (b, li, 1601)),
      ("img_masks", "|b1", (b, li)), ("feat_targets", "<f4", (b, li, 2048)),
      ("label_targets", "<f4", (b, li, 1601)), ("targets", "<i4", (b,)),
      ("position_ids", "<i4", (b, lt)), ("attn_masks", "<i4", (b, lt + li)),
      ("txt_lens", "<i4", (b,)), ("num_bbs", "<i4", (b,))]
  contract.check_batch(batch, contract.BASE_FIELDS + contract.PRETRAIN_FIELDS,
                       where="ops")
  tl, nb = batch["txt_lens"], batch["num_bbs"]
  for r in range(b):
    assert (batch["txt_labels"][r, tl[r]:] == -1).all()
    assert (batch["img_type_ids"][r, nb[r]:] == 1).all()
    assert not batch["img_masks"][r, nb[r]:].any()


# ---------------------------------------------------------------------------
# Several images per text record, several rows per example.
# ---------------------------------------------------------------------------
PAIR_TEXT = "uniter_pair_test_text:1.0.0"
_PAIR_BUILDER = []


def _pair_records(indices):
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  cfg = _config("pipetest")
  for i in indices:
    yield {"id": f"pair_{i}",
           "input_ids": synthetic.tokenize(synthetic.captions(cfg, i)[0]),
           "img_keys": [synthetic.image_key(i),
                        synthetic.image_key((7 * i + 3) % 40)],
           "target": i % 2}


def _pair_builder(pkg_dir):
  """A text dataset naming two images per record (NLVR2-like) over the
  pipetest image store: 40 train records, 23 val records."""
  if not _PAIR_BUILDER:
    from etils import epath  # pylint: disable=g-import-not-at-top
    from data_prep import common, synthetic  # pylint: disable=g-import-not-at-top

    class UniterPairTestText(common.TextBuilder):
      SOURCE = "test"
      # TFDS looks for README/citation files next to a builder's package; a
      # test module is no package.
      pkg_dir_path = epath.Path(pkg_dir)

      def _text_meta(self, dl_manager):
        meta = synthetic._text_meta(_config("pipetest"))  # pylint: disable=protected-access
        meta["task"] = "nlvr2"
        return meta

      def _split_iters(self, dl_manager):
        return {"train": _pair_records(range(40)),
                "val": _pair_records(range(23))}

    _PAIR_BUILDER.append(UniterPairTestText)
  return _PAIR_BUILDER[0]


@pytest.fixture(scope="module")
def pair_dir(data_dir, tmp_path_factory):
  from data_prep import common  # pylint: disable=g-import-not-at-top
  pkg = str(tmp_path_factory.mktemp("pair_builder"))
  common.build(_pair_builder(pkg)(data_dir=data_dir))
  return data_dir


def _paired(example, rng, ctx):
  """NLVR2 paired: one row per image, the text in both."""
  del rng, ctx
  rows = []
  for img in example["_images"]:
    row = {k: v for k, v in example.items() if k != "_images"}
    row.update(img)
    rows.append(row)
  return rows


def _concat(example, rng, ctx):
  """NLVR2 triplet-like: one row holding both images' regions."""
  del rng, ctx
  imgs = example["_images"]
  out = {k: v for k, v in example.items() if k != "_images"}
  for f in ("img_feat", "img_pos_feat"):
    out[f] = np.concatenate([im[f] for im in imgs])
  out["img_type_ids"] = np.concatenate([
      np.full(len(im["img_feat"]), t + 1, np.int32)
      for t, im in enumerate(imgs)])
  return out


def _mask_text(example, rng, ctx):
  """A per-row op after a row-making op: marks some text tokens."""
  del ctx
  out = dict(example)
  ids = out["input_ids"]
  out["txt_labels"] = np.where(rng.random(len(ids)) < 0.5, ids,
                               -1).astype(np.int32)
  return out


_PAIR_FIELDS = tuple(f for f in contract.BASE_FIELDS) + (
    contract.Field("txt_labels", np.int32, "text", pad=-1),
    contract.Field("targets", np.int32, "example"),   # one label per pair
    contract.Field("pair_rows", np.int32, "batch", optional=True),
)


def _pair_rows(batch):
  """A batch op: the row's position within its example."""
  out = dict(batch)
  out["pair_rows"] = np.tile(np.arange(2, dtype=np.int32),
                             len(batch["input_ids"]) // 2)
  return out


def make_pair(data_dir, split="train", **kw):
  args = dict(token_budget=1024, batch_multiple=4, shard_index=0,
              shard_count=1, max_buckets=4, target_padding=0.0, seed=3)
  args.update(kw)
  return pipeline.UniterData(data_dir, PAIR_TEXT, split, **args)


def test_multi_image_records_are_joined(pair_dir):
  d = make_pair(pair_dir, ops=[_paired], rows_per_example=2)
  text, store = d.text, d.store
  assert text.max_images == 2 and (text.num_images == 2).all()
  for i in range(0, len(text), 5):
    k = int(text.records[i])
    keys = [store.keys[j] for j in text.images_of(i)]
    assert keys == [f"synthetic_{k:07d}", f"synthetic_{(7 * k + 3) % 40:07d}"]
    assert text.img_index[i] == text.images_of(i)[0]
    ex = text.example(i)
    assert ex["img_key"] == keys[0] and len(ex["_images"]) == 2
    assert [im["img_key"] for im in ex["_images"]] == keys
    assert ex["_images"][0]["img_feat"] is ex["img_feat"]
    for im, j in zip(ex["_images"], text.images_of(i)):
      np.testing.assert_array_equal(im["img_feat"],
                                    store.load(int(j))["img_feat"])
  # The length index: the most regions of a record's images ("max").
  nbb = store.num_bbs(text.img_indices).reshape(-1, 2)
  np.testing.assert_array_equal(d.num_bbs, nbb.max(1))
  np.testing.assert_array_equal(
      make_pair(pair_dir, ops=[_concat], row_regions="sum").num_bbs,
      nbb.sum(1))
  # One-image records: no `_images`, the example of before.
  single = make(pair_dir).text.example(3)
  assert "_images" not in single


def test_paired_rows_are_adjacent_and_fit_the_budget(pair_dir):
  d = make_pair(pair_dir, ops=[_paired, _mask_text], rows_per_example=2,
                fields=_PAIR_FIELDS, batch_ops=[_pair_rows])
  assert d.batches_per_epoch > 0
  seen = 0
  for step in range(d.batches_per_epoch):
    bucket, idx = d.host_rows(step)
    batch = d.load_batch(step)      # checked against _PAIR_FIELDS inside
    b, lt, li = bucket.batch_size, bucket.max_txt, bucket.max_img
    assert b % 4 == 0 and b % 2 == 0 and b * (lt + li) <= 1024
    assert len(idx) == b // 2 and batch["input_ids"].shape == (b, lt)
    assert batch["img_feat"].shape == (b, li, 2048)
    assert batch["targets"].shape == (b // 2,)
    assert batch["pair_rows"].tolist() == [0, 1] * (b // 2)
    for e, i in enumerate(idx):
      r0, r1 = 2 * e, 2 * e + 1
      np.testing.assert_array_equal(batch["input_ids"][r0],
                                    batch["input_ids"][r1])
      assert batch["targets"][e] == int(d.text.records[i]) % 2
      for r, j in zip((r0, r1), d.text.images_of(int(i))):
        feat = d.store.load(int(j))["img_feat"]
        assert batch["num_bbs"][r] == len(feat)
        np.testing.assert_array_equal(batch["img_feat"][r, :len(feat)], feat)
    seen += len(idx)
  assert seen + len(d.plan(0).dropped) == len(d.text)
  # Batch ops and the field check place no example elsewhere: a state saved
  # without them resumes with them.
  assert d.fingerprint() == make_pair(pair_dir, ops=[_paired, _mask_text],
                                      rows_per_example=2).fingerprint()
  # An undeclared field made by a batch op is refused at the boundary.
  bad = make_pair(pair_dir, ops=[_paired, _mask_text], rows_per_example=2,
                  fields=_PAIR_FIELDS[:-1], batch_ops=[_pair_rows])
  with pytest.raises(contract.BatchContractError, match="pair_rows"):
    bad.load_batch(0)


def test_concatenated_images_in_one_row(pair_dir):
  d = make_pair(pair_dir, ops=[_concat], row_regions="sum",
                fields=contract.BASE_FIELDS + contract.PRETRAIN_FIELDS)
  for step in range(d.batches_per_epoch):
    bucket, idx = d.host_rows(step)
    batch = d.load_batch(step)
    b, lt, li = bucket.batch_size, bucket.max_txt, bucket.max_img
    assert batch["img_feat"].shape == (b, li, 2048) and len(idx) == b
    assert b * (lt + li) <= 1024
    for r, i in enumerate(idx):
      n = [d.store.num_bbs()[j] for j in d.text.images_of(int(i))]
      assert batch["num_bbs"][r] == sum(n) == d.num_bbs[i]
      assert batch["img_type_ids"][r].tolist() == (
          [1] * n[0] + [2] * n[1] + [1] * (li - sum(n)))
      assert batch["targets"][r] == int(d.text.records[i]) % 2
  # With the length index of one image per row, the concatenation does not
  # fit its shape: a clear error, not a silent cut.
  with pytest.raises(ValueError, match="bucket holds"):
    small = make_pair(pair_dir, ops=[_concat])
    for step in range(small.batches_per_epoch):
      small.load_batch(step)


def test_rows_per_example_errors(pair_dir):
  with pytest.raises(ValueError, match="needs task ops"):
    make_pair(pair_dir, rows_per_example=2)
  with pytest.raises(ValueError, match=r"pair_\d+.*1 rows.*rows_per_example=2"):
    make_pair(pair_dir, ops=[_concat], rows_per_example=2,
              row_regions="sum").load_batch(0)
  with pytest.raises(ValueError, match="2 rows.*rows_per_example=1"):
    make_pair(pair_dir, ops=[_paired]).load_batch(0)
  with pytest.raises(ValueError, match="rows_per_example \\* host count"):
    make_pair(pair_dir, ops=[_paired], rows_per_example=2, batch_multiple=2,
              shard_index=0, shard_count=2, buckets=[(20, 34)])


# ---------------------------------------------------------------------------
# Exact evaluation batches.
# ---------------------------------------------------------------------------
def _check_exact(d, batches):
  """Every kept example once, padding masked, shapes of the buckets."""
  plan = d.exact_plan()
  assert len(batches) == len(plan)
  rpe = d.rows_per_example
  got = []
  for (k, part, real), batch in zip(plan, batches):
    bucket = d.buckets[k]
    rows = bucket.batch_size // d.shard_count
    assert batch["input_ids"].shape == (rows, bucket.max_txt)
    assert rows % (4 // d.shard_count) == 0
    mask, index = batch["example_mask"], batch["example_index"]
    assert mask.dtype == np.bool_ and index.dtype == np.int64
    assert mask.shape == index.shape == (rows,)
    # All rows of an example alike.
    assert (mask.reshape(-1, rpe) == mask[::rpe, None]).all()
    assert (index.reshape(-1, rpe) == index[::rpe, None]).all()
    assert (index[~mask] == -1).all() and (index[mask] >= 0).all()
    assert (d.assignment[index[mask]] == k).all()
    got.append(index[mask][::rpe])
    assert real == len(np.unique(part))
  return np.concatenate(got)


def test_exact_batches_visit_every_example_once(data_dir):
  # The val split: 24 captions, fewer than some shapes' batches.
  d = pipeline.UniterData(data_dir, TEXT, "val", token_budget=1024,
                          batch_multiple=4, shard_index=0, shard_count=1,
                          max_buckets=3, target_padding=0.0, seed=3,
                          ops=[_pin_op],
                          fields=contract.BASE_FIELDS
                          + contract.PRETRAIN_FIELDS)
  n = len(d.text)
  batches = list(d.exact_batches())
  ids = _check_exact(d, batches)
  assert len(ids) == n
  np.testing.assert_array_equal(np.sort(ids), np.arange(n))
  # Index order within each shape; the padding copies a real example.
  for (k, part, real), batch in zip(d.exact_plan(), batches):
    assert (np.diff(part[:real]) > 0).all()
    pad = ~batch["example_mask"]
    if pad.any():
      first = int(np.flatnonzero(~pad)[0])
      for r in np.flatnonzero(pad):
        np.testing.assert_array_equal(batch["img_feat"][r],
                                      batch["img_feat"][first])
        np.testing.assert_array_equal(batch["input_ids"][r],
                                      batch["input_ids"][first])
  assert any((~b["example_mask"]).any() for b in batches)
  # Deterministic (the ops' RNG of epoch 0), in grain's threads or not.
  again = [d.load_exact_batch(j) for j in range(len(batches))]
  assert batch_digest.digest(again) == batch_digest.digest(batches)
  # Two hosts: each takes its slice of every batch; together everything.
  hosts = [pipeline.UniterData(data_dir, TEXT, "val", token_budget=1024,
                               batch_multiple=4, shard_index=h, shard_count=2,
                               max_buckets=3, target_padding=0.0, seed=3,
                               ops=[_pin_op]) for h in range(2)]
  parts = [list(h.exact_batches(num_threads=1)) for h in hosts]
  ids = [_check_exact(h, p) for h, p in zip(hosts, parts)]
  assert len(np.intersect1d(ids[0], ids[1])) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(n))
  for whole, a, b in zip(batches, *parts):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]),
                                    whole[key], err_msg=key)


def test_exact_batches_of_a_split_smaller_than_a_batch(data_dir):
  d = pipeline.UniterData(data_dir, TEXT, "val", token_budget=8192,
                          batch_multiple=4, shard_index=0, shard_count=1,
                          max_buckets=2, seed=3)
  assert d.batches_per_epoch == 0      # training has nothing to draw from
  with pytest.raises(ValueError, match="make no full batch"):
    d.iterator()
  with pytest.raises(ValueError, match="make no full batch"):
    d.load_batch(0)
  batches = list(d.exact_batches(num_threads=1))
  ids = _check_exact(d, batches)
  np.testing.assert_array_equal(np.sort(ids), np.arange(len(d.text)))


def test_exact_batches_of_multi_row_examples(pair_dir):
  d = make_pair(pair_dir, "val", ops=[_paired, _mask_text],
                rows_per_example=2, fields=_PAIR_FIELDS,
                batch_ops=[_pair_rows])
  assert len(d.text) == 23
  batches = list(d.exact_batches())
  ids = _check_exact(d, batches)
  np.testing.assert_array_equal(np.sort(ids), np.arange(23))
  for batch in batches:
    assert batch["targets"].shape == (len(batch["input_ids"]) // 2,)
