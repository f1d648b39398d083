"""Tests of uniter_jax.data on small synthetic TFDS datasets built by data_prep."""

import dataclasses

import numpy as np
import pytest

from data_prep import schema
from uniter_jax.data import buckets as bk
from uniter_jax.data import collate as collate_lib
from uniter_jax.data import ops as ops_lib
from uniter_jax.data import pipeline
from uniter_jax.data import sources

TEXT = "uniter_synthetic_text/pipetest:1.0.0"
IMAGES = "uniter_synthetic_images/pipetest:1.0.0"


def _build_corpus(d, name):
  """The test corpus (40 train / 8 val images, 10-60 regions) as `name`."""
  from data_prep import common, synthetic  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(synthetic.TINY_CONFIG, name=name,
                            num_train_images=40, num_val_images=8,
                            captions_per_image=3, min_regions=10,
                            max_regions=60)
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


def test_ops_by_name_deterministic_across_threads(data_dir):
  ops_lib.register_op("toy_itm", _toy_itm, overwrite=True)
  assert "toy_itm" in ops_lib.registered_ops()
  a = list(make(data_dir, ops=["toy_itm"]).iterator(num_epochs=2,
                                                    num_threads=3))
  b = list(make(data_dir, ops={"toy_itm": _toy_itm}).iterator(
      num_epochs=2, num_threads=1))
  for x, y in zip(a, b):
    same_batch(x, y)
  targets = np.concatenate([x["targets"] for x in a])
  assert 0.2 < targets.mean() < 0.8
  # Epochs redraw: the op's choices differ between epoch 0 and 1.
  d = make(data_dir, ops=["toy_itm"])
  e0 = [d.example(i, 0)["targets"] for i in range(len(d.text))]
  e1 = [d.example(i, 1)["targets"] for i in range(len(d.text))]
  assert e0 != e1
  with pytest.raises(KeyError, match="unknown data op"):
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
  ops = masking.TASK_OPS
  d = make(data_dir, ops={"itm": ops["itm"], "mlm": ops["mlm"]},
           op_params={"itm_neg_prob": 0.5})
  assert d.context(d.buckets[0]).itm_neg_prob == 0.5
  for step in range(d.batches_per_epoch):
    batch = d.load_batch(step)
    bucket, _ = d.host_rows(step)
    assert batch["txt_labels"].shape == (bucket.batch_size, bucket.max_txt)
    assert batch["targets"].shape == (bucket.batch_size,)
    assert batch["img_feat"].shape[1] == bucket.max_img
    assert ((batch["txt_labels"] != -1).sum(1) >= 1).all()
  d = make(data_dir, ops={"mrfr": ops["mrfr"]}, with_soft_labels=True)
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


def test_flat_reader_matches_tfds(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from uniter_jax.data import arrayrecord  # pylint: disable=g-import-not-at-top
  cases = [(IMAGES, schema.IMAGE_SPLIT, schema.IMAGE_ARRAYS, ()),
           (IMAGES, schema.SOFT_LABEL_SPLIT, schema.IMAGE_ARRAYS, ()),
           (TEXT, "train", schema.TEXT_ARRAYS, schema.TEXT_LISTS)]
  for name, split, arrays, lists in cases:
    reader = sources.RecordReader(data_dir, name, split, arrays, lists)
    assert reader._flat is not None, (name, split)  # pylint: disable=protected-access
    files = tfds.data_source(name, split=split, data_dir=data_dir)
    for f in files.dataset_info.splits[split].file_instructions:
      assert arrayrecord.writer_options(f.filename).split(",")[:4] == [
          "group_size:1", "transpose:false", "pad_to_block_boundary:false",
          "uncompressed"]
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
    # Records of a dataset share a layout: after the first, the largest
    # array lands 8-byte aligned in its buffer (no realigning copy).
    rec = reader.get(len(reader) - 1, tuple(arrays))
    big = max(rec.values(), key=lambda v: v.nbytes)
    assert big.ctypes.data % 8 == 0


def test_flat_reader_refuses_other_layouts(tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from uniter_jax.data import arrayrecord  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "x.array_record")
  w = array_record_module.ArrayRecordWriter(path, "group_size:1")  # brotli
  w.write(b"abc")
  w.close()
  assert not arrayrecord.supported(path)
  with pytest.raises(arrayrecord.FormatError):
    arrayrecord.parse_example(b"\x0a\x05\x0a\x03\x0a\x01")  # truncated entry


def test_corrupted_record_is_an_error(data_dir):
  store = sources.ImageStore(data_dir, IMAGES)
  src = store._source  # pylint: disable=protected-access
  buf = src._flat.read(3).copy()  # pylint: disable=protected-access
  buf[1:40] = 0xFF
  with pytest.raises(sources.DataError, match=r"images\].*record 3.*corrupt"):
    src.decode_flat(buf, 3)


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
  assert not slow.store._source.flat and fast.store._source.flat  # pylint: disable=protected-access
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
