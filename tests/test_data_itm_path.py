"""The ITM / MLM path of the input pipeline reads each image once, into the
batch (and the region tasks copy no example's features whole: last test).

`masking.itm_op` and `masking.mlm_op` are marked `ops.no_image_arrays`, so
the pipeline defers an example's image until the ops are done: an image
that an ITM negative replaces is never read, and the image the example
ends with (its own or the negative) is cast straight into its row of the
batch's `img_feat`. The same op run unmarked (a plain wrapper) takes the
old path: the true image is read first, every negative gets arrays of its
own, and the batch is a copy. Both must give the same batches, and those
of the real ops are pinned to digests made before the change.
"""
import dataclasses

import numpy as np
import pytest

import batch_digest

from uniter_jax.data import ops as ops_lib
from uniter_jax.data import pipeline
from uniter_jax.data import sources
from uniter_jax.tasks import masking

TEXT = "uniter_synthetic_text/itmpath:1.0.0"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_prep import common, synthetic  # pylint: disable=g-import-not-at-top
  d = str(tmp_path_factory.mktemp("tfds"))
  cfg = dataclasses.replace(synthetic.TINY_CONFIG, name="itmpath",
                            num_train_images=24, num_val_images=2,
                            captions_per_image=2, min_regions=10,
                            max_regions=40)
  for builder in (synthetic.UniterSyntheticImages,
                  synthetic.UniterSyntheticText):
    common.build(builder(config=cfg, data_dir=d))
  return d


def make(data_dir, ops, **kw):
  args = dict(token_budget=1024, batch_multiple=4, shard_index=0,
              shard_count=1, max_buckets=4, target_padding=0.0, seed=5,
              op_params={"itm_neg_prob": 0.5, "mlm_prob": 0.15})
  args.update(kw)
  return pipeline.UniterData(data_dir, TEXT, "train", ops=ops, **args)


def _unmarked(op):
  """`op` without the `no_image_arrays` mark: the pipeline then reads the
  example's image before it and hands it full negatives (the old path)."""
  def run(example, rng, ctx):
    return op(example, rng, ctx)
  return run


def _itm_mlm(marked: bool):
  ops = {"itm": masking.itm_op, "mlm": masking.mlm_op}
  return ops if marked else {k: _unmarked(v) for k, v in ops.items()}


def same_batch(a, b):
  assert list(a) == list(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class _CountLoads:
  """Wraps `ImageStore.load`: every call's `img_feat_out` and result."""

  def __init__(self, monkeypatch):
    self.calls = []
    real = sources.ImageStore.load

    def load(store, index, img_feat_dtype=None, img_feat_out=None):
      part = real(store, index, img_feat_dtype, img_feat_out)
      self.calls.append((int(index), img_feat_out, part))
      return part
    monkeypatch.setattr(sources.ImageStore, "load", load)

  def take(self):
    calls, self.calls = self.calls, []
    return calls


def test_ops_are_marked():
  assert not ops_lib.reads_image_arrays(masking.itm_op)
  assert not ops_lib.reads_image_arrays(masking.mlm_op)
  assert ops_lib.reads_image_arrays(masking.mrm_op)
  assert ops_lib.reads_image_arrays(_unmarked(masking.itm_op))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_read_per_row_into_the_batch(data_dir, monkeypatch, dtype):
  # float16 (a bf16 model's batches): the stored values are copied into
  # the batch's rows as they are.
  lazy = make(data_dir, _itm_mlm(True), img_feat_dtype=dtype)
  eager = make(data_dir, _itm_mlm(False), img_feat_dtype=dtype)
  loads = _CountLoads(monkeypatch)
  negatives = 0
  for step in range(lazy.batches_per_epoch + 1):   # epoch 0 and 1 start
    _, rows = lazy.host_rows(step)
    batch = lazy.load_batch(step)
    calls = loads.take()
    neg = int((batch["targets"] == 0).sum())
    negatives += neg
    # One read per row: the images that negatives replaced are not read.
    assert len(calls) == len(rows)
    for r, (_, out, part) in enumerate(calls):
      # Each image, negative or not, is cast into its row of the batch.
      assert out is not None and out.dtype == dtype
      assert np.shares_memory(out, batch["img_feat"][r])
      assert np.shares_memory(part["img_feat"], batch["img_feat"][r])
    want = eager.load_batch(step)
    eager_calls = loads.take()
    # The old path: the true image of every row, plus each negative, the
    # negatives in arrays of their own.
    assert len(eager_calls) == len(rows) + neg
    # (in float16, where the unmarked ops would see the arrays, none is
    # read into the batch: ops get float32 features of their own).
    assert sum(out is None for _, out, _ in eager_calls) == (
        neg if dtype == "float32" else len(rows) + neg)
    same_batch(batch, want)
  assert negatives > 0


# Computed with the code before deferred images (the true image read, then
# replaced by a negative in an array of its own): epoch 0 and the first
# batch of epoch 1 with the real ITM and MLM ops.
_PINNED = {
    "float32": "cb2940fd7cb250e30cd694cfaaf43b4ca5e68974",
    "float16": "611e18054214f5737907cc1a82a18645410ee54c",
}


@pytest.mark.parametrize("dtype", sorted(_PINNED))
def test_itm_mlm_batches_are_pinned(data_dir, dtype):
  d = make(data_dir, _itm_mlm(True), img_feat_dtype=dtype)
  steps = range(d.batches_per_epoch + 1)
  assert batch_digest.digest([d.load_batch(s) for s in steps]) == _PINNED[dtype]


@pytest.mark.parametrize("kw", [
    {},
    {"img_feat_dtype": "float16"},
    {"with_soft_labels": True},
    {"shard_index": 1, "shard_count": 2},
])
def test_batches_equal_the_old_path(data_dir, kw):
  lazy = make(data_dir, _itm_mlm(True), **kw)
  eager = make(data_dir, _itm_mlm(False), **kw)
  assert lazy.fingerprint() == eager.fingerprint()
  for step in range(lazy.batches_per_epoch + 2):
    same_batch(lazy.load_batch(step), eager.load_batch(step))


def test_exact_batches_and_region_ops_equal_the_old_path(data_dir):
  # Exact batches repeat an example to fill the last batch of a shape
  # (the batch then is a copy, not the arena); an op that reads the
  # features after ITM gets them loaded first.
  lazy = make(data_dir, {**_itm_mlm(True), "mrfr": masking.mrm_op},
              with_soft_labels=True)
  eager = make(data_dir, {**_itm_mlm(False), "mrfr": masking.mrm_op},
               with_soft_labels=True)
  for a, b in zip(lazy.exact_batches(num_threads=1),
                  eager.exact_batches(num_threads=1)):
    same_batch(a, b)
  lazy = make(data_dir, _itm_mlm(True))
  eager = make(data_dir, _itm_mlm(False))
  n = 0
  for a, b in zip(lazy.exact_batches(num_threads=1),
                  eager.exact_batches(num_threads=1)):
    same_batch(a, b)
    n += 1
  assert n == len(lazy.exact_plan())


def test_marked_op_sees_deferred_parts(data_dir):
  """Inside a marked op the example and `ctx.sample_image` carry the key
  only; an unmarked op sees arrays; the example ends with arrays."""
  seen = []

  @ops_lib.no_image_arrays
  def peek(example, rng, ctx):
    neg = ctx.sample_image(rng, exclude_key=example["img_key"])
    seen.append(("marked", "img_feat" in example, "img_feat" in neg,
                 neg["img_key"] != example["img_key"]))
    return example

  def reader(example, rng, ctx):
    neg = ctx.sample_image(rng, exclude_key=example["img_key"])
    seen.append(("plain", "img_feat" in example, "img_feat" in neg,
                 neg["img_key"] != example["img_key"]))
    return example

  d = make(data_dir, {"peek": peek, "reader": reader})
  ex = d.example(0, 0)
  assert seen == [("marked", False, False, True),
                  ("plain", True, True, True)]
  assert ex["img_feat"].dtype == np.float32
  assert ops_lib.DEFERRED_IMAGE not in ex
  np.testing.assert_array_equal(
      ex["img_feat"], d.store.load(int(d.text.img_index[0]))["img_feat"])


def test_marked_op_making_rows_gets_them_loaded(data_dir):
  """A marked op may build rows from deferred parts (`sample_images`);
  every row ends with its image's arrays, rows of one image share them."""
  @ops_lib.no_image_arrays
  def pair_rows(example, rng, ctx):
    negs = ctx.sample_images(rng, 2, exclude_key=example["img_key"])
    assert all("img_feat" not in n for n in negs)
    rows = [dict(example), dict(example)]
    for row, neg in zip(rows, negs):
      for k in ("img_key", ops_lib.DEFERRED_IMAGE):
        row[k] = neg[k]
    return [dict(example)] + rows + [dict(example)]

  d = make(data_dir, {"rows": pair_rows}, rows_per_example=4,
           batch_multiple=4)
  rows = d.example_rows(3, 0)
  assert len(rows) == 4
  for row in rows:
    assert ops_lib.DEFERRED_IMAGE not in row
    want = d.store.load(d.store.key_to_index[row["img_key"]])
    np.testing.assert_array_equal(row["img_feat"], want["img_feat"])
    np.testing.assert_array_equal(row["img_pos_feat"], want["img_pos_feat"])
  assert rows[0]["img_key"] == rows[3]["img_key"] != rows[1]["img_key"]
  assert rows[0]["img_feat"] is rows[3]["img_feat"]
  batch = d.load_batch(0)
  assert batch["img_feat"].shape[0] % 4 == 0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_region_tasks_batches_equal_the_full_copy_path(data_dir, dtype):
  """MRFR makes masks only and its batch op gathers the targets
  ([B, P, D]) and zeroes the masked rows; MRC / MRC-kl's op gathers the
  masked regions' soft labels ([P, C] per row). Against `mrm_op` (every
  example's features copied whole, full [B, Li, D] targets): the same
  masks and features, the gathered targets equal the full ones at
  `mrm_positions`, and the losses are bitwise equal."""
  from uniter_jax import tasks  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for name in ("mrfr", "mrckl"):
    task = tasks.make_task(name)
    common = dict(with_soft_labels=task.with_soft_labels,
                  op_params=task.op_params(), img_feat_dtype=dtype)
    new = make(data_dir, task.data_ops(), batch_ops=task.batch_ops(),
               fields=task.batch_fields(), **common)
    old = make(data_dir, {name: masking.mrm_op},
               batch_ops=(task.add_positions,), **common)
    for step in range(new.batches_per_epoch + 1):
      a, b = new.load_batch(step), old.load_batch(step)
      gathered = {"mrfr": "mrm_feat_targets",
                  "mrckl": "mrm_label_targets"}[name]
      for k in a:
        if k != gathered:
          np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      assert not {"feat_targets", "label_targets", "img_soft_labels"} & set(a)
      pos = b["mrm_positions"]
      full = b[gathered[len("mrm_"):]]
      np.testing.assert_array_equal(
          a[gathered], np.take_along_axis(full, pos[..., None], axis=1))
      width = a[gathered].shape[-1]
      out_key = task.out_key
      pred = rng.standard_normal(pos.shape + (width,)).astype(np.float32)
      la, ma = task.loss({out_key: pred}, a)
      lb, mb = task.loss({out_key: pred}, b)
      assert np.asarray(la).tobytes() == np.asarray(lb).tobytes()
      for k in ma:
        assert np.asarray(ma[k]).tobytes() == np.asarray(mb[k]).tobytes(), k
    if dtype == "float32":
      # Made in a worker process (the batch in shared memory): the same.
      it = new.iterator(num_threads=1, num_workers=1, prefetch=1)
      try:
        for step in range(2):
          got, want = next(it), new.load_batch(step)
          assert sorted(got) == sorted(want)
          for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
      finally:
        it.close()
