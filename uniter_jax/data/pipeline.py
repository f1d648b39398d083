"""The input pipeline: TFDS data sources -> join -> ops -> token buckets.

`UniterData` holds one text split joined to its image store, the length index
and the bucket shapes. Batch `step` of the run is a pure function of
`(seed, step)`:

  epoch = step // batches_per_epoch; the epoch's plan (`buckets.plan_epoch`)
  gives the global batch's examples and shape; this host loads its slice of
  the rows (host h of P takes rows [h*B/P, (h+1)*B/P)), joins each text with
  its image, runs the task ops with an RNG derived from (seed, epoch, record
  index) and pads to the bucket shape.

Every host computes the same plan, so all hosts produce the same shape at
every step (as global `jax.Array` batches need), their rows partition the
global batch, and a resumed run continues from a step counter. The iterator is
grain's (`grain.MapDataset` over steps, read with prefetch threads); its state
is a small JSON-able dict.

Downstream tasks use the same path: an example may have several rows (an
NLVR2 pair: `rows_per_example=2`, made by a task op from a record's
images), batch ops run on each collated batch, the batch is checked against
the task's declared fields (`contract.check_batch`), and `exact_batches`
visits every example exactly once for evaluation.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from uniter_jax.data import buckets as bk
from uniter_jax.data import collate as collate_lib
from uniter_jax.data import contract
from uniter_jax.data import ops as ops_lib
from uniter_jax.data import schema
from uniter_jax.data import sources

BatchOp = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

# Upper bound on steps of an endless iterator (grain needs a length).
_ENDLESS_EPOCHS = 1 << 20


def _resolve_batch_ops(batch_ops) -> list[tuple[str, BatchOp]]:
  out = []
  for fn in batch_ops or ():
    if not callable(fn):
      raise TypeError(f"batch op must be a callable batch -> batch, got "
                      f"{fn!r}")
    out.append((getattr(fn, "__name__", repr(fn)), fn))
  return out


def _host_defaults(shard_index, shard_count):
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  return int(shard_index), int(shard_count)


class UniterData:
  """A text split joined with its images, bucketed by a token budget.

  Args:
    data_dir: TFDS data_dir holding the text dataset and its image store.
    text: tfds name of the text dataset, "builder/config:version".
    split: text split, e.g. "train".
    token_budget: max tokens (incl. padding) per GLOBAL batch: the official
      per-GPU `train_batch_size` times the number of data-parallel devices.
      It counts every row: an example of `rows_per_example` rows costs
      `rows_per_example * (Lt + Li)`.
    batch_multiple: every global batch size (in rows) is a multiple of this
      (use the data-parallel device count); must be a multiple of
      `shard_count`. Batch sizes are also multiples of `rows_per_example`.
    max_buckets, target_padding, length_multiple: see
      `buckets.choose_buckets` (ignored when `buckets` is given). Shapes are
      added until padding is at most `target_padding` (10%) or there are
      `max_buckets` (32) of them: fixed 36 regions stop at ~3 shapes,
      dynamic 10..100 regions need ~26 (docs/data.md has the trade-off).
    buckets: explicit shapes, `Bucket`s or `(Lt, Li)` pairs (batch sizes then
      follow from the budget); examples that fit none are dropped, counted.
    max_txt_len: texts with more tokens (without CLS/SEP) are dropped and
      counted, as the official loader does; -1 keeps all.
    region_rule: the num_bb rule.
    with_soft_labels: also load detector soft labels (MRC tasks).
    img_feat_dtype: "float32" (default, the batch contract) or "float16":
      batches then carry `img_feat` as the stored fp16 values, for a model
      that casts on the device (the Flax UNITER casts `img_feat` to its
      compute dtype). Saves the host-side cast and half of the feature
      bytes copied and sent to the device; values are the same.
    ops: per-example task ops: a task's `data_ops()` mapping of names to
      callables, or a sequence of callables.
    op_params: hyper-parameters the ops read from their context, e.g.
      {"mlm_prob": 0.15, "itm_neg_prob": 0.5}.
    rows_per_example: rows of the batch per example (1: one row each; NLVR2
      paired: 2). With more than one, the ops must turn each example into a
      list of that many row dicts; the rows of an example are adjacent in
      the batch (example-major), and a bucket's batch size counts rows.
    row_regions: how a record of several images sets the region count the
      length index uses: "max" (each row holds one image), "sum" (one row
      holds them all) or a callable of the images' counts (see
      `TextSource.num_bbs`). Records of one image: their image's count.
    fields: the batch contract of this data (`contract.Field`s, e.g.
      `contract.BASE_FIELDS` plus a task's fields): collate pads by it and
      every batch is checked against it (`contract.check_batch`). Default:
      the base and pretraining fields, not checked.
    batch_ops: callables `batch -> batch` run in order on each collated
      batch (in the iterator's threads), before the check.
    loading: default threads, prefetch and worker processes of `iterator`
      and `exact_batches` (`Loading()`: 2 threads in this process).
    seed: data seed (shuffling and per-example RNG).
    shard_index, shard_count: this host and the host count (default
      `jax.process_index()` / `jax.process_count()`).
    image_store: tfds name of the image store (default: the text metadata's).
  """

  def __init__(self, data_dir: str, text: str, split: str = "train", *,
               token_budget: int,
               batch_multiple: int = 1,
               max_buckets: int = 32,
               target_padding: float = 0.10,
               length_multiple: int = 1,
               buckets: Sequence[bk.Bucket | tuple[int, int]] | None = None,
               max_txt_len: int = 60,
               region_rule: sources.RegionRule = sources.RegionRule(),
               with_soft_labels: bool = False,
               img_feat_dtype: Any = "float32",
               ops: Sequence[str | ops_lib.Op] | Mapping[str, ops_lib.Op]
               | None = None,
               op_params: Mapping[str, Any] | None = None,
               seed: int = 0,
               shard_index: int | None = None,
               shard_count: int | None = None,
               image_store: str | None = None,
               rows_per_example: int = 1,
               row_regions: str | Callable[[np.ndarray], int] = "max",
               fields: Sequence[contract.Field] | None = None,
               batch_ops: Sequence[BatchOp] = (),
               loading: "Loading | None" = None):
    self.shard_index, self.shard_count = _host_defaults(shard_index,
                                                        shard_count)
    if batch_multiple % self.shard_count:
      raise ValueError(f"batch_multiple {batch_multiple} must be a multiple "
                       f"of the host count {self.shard_count}")
    self.seed = int(seed)
    self.ops = ops_lib.resolve_ops(ops)
    self.op_params = dict(op_params or {})
    self.rows_per_example = int(rows_per_example)
    if self.rows_per_example < 1:
      raise ValueError(f"rows_per_example must be >= 1, got "
                       f"{rows_per_example}")
    if self.rows_per_example > 1 and not self.ops:
      raise ValueError(f"{text}: rows_per_example={self.rows_per_example} "
                       "needs task ops that turn an example into its rows")
    self.row_regions = row_regions
    self.fields = None if fields is None else tuple(fields)
    if self.fields is not None:
      contract.field_table(self.fields)   # refuse a bad table up front
    self.batch_ops = _resolve_batch_ops(batch_ops)
    meta = schema.read_meta(schema.builder_dir(data_dir, text))
    store_name = image_store or meta.get("img_store")
    if not store_name:
      raise ValueError(f"{text}: metadata names no img_store; pass "
                       "image_store=")
    self.store = sources.ImageStore(data_dir, store_name, region_rule,
                                    with_soft_labels, img_feat_dtype)
    self.img_feat_dtype = self.store.img_feat_dtype
    self.text = sources.TextSource(data_dir, text, split, self.store,
                                   max_txt_len)
    self.name = self.text.name
    self.dropped = collections.Counter(self.text.dropped)
    self.txt_lens = self.text.txt_lens
    self.num_bbs = self.text.num_bbs(row_regions)

    # Batch sizes count rows: a multiple of the device count and of the rows
    # of one example (the same as batch_multiple for one-row examples).
    row_multiple = math.lcm(batch_multiple, self.rows_per_example)
    if buckets is None:
      self.buckets = bk.choose_buckets(
          self.txt_lens, self.num_bbs, token_budget, row_multiple,
          max_buckets=max_buckets, target_padding=target_padding,
          length_multiple=length_multiple)
    else:
      self.buckets = _explicit_buckets(buckets, token_budget, row_multiple)
    self.assignment = bk.assign_buckets(self.txt_lens, self.num_bbs,
                                        self.buckets)
    no_fit = int((self.assignment < 0).sum())
    if no_fit:
      self.dropped["fits_no_bucket"] += no_fit
      logging.warning("%s: %d examples fit no bucket and are dropped",
                      self.name, no_fit)
    for b in self.buckets:
      if b.batch_size % self.shard_count:
        raise ValueError(f"bucket {b} batch size is not a multiple of the "
                         f"host count {self.shard_count}")
      if (b.batch_size // self.rows_per_example) % self.shard_count:
        raise ValueError(
            f"bucket {b}: its {b.batch_size // self.rows_per_example} "
            f"examples of {self.rows_per_example} rows do not split over "
            f"{self.shard_count} hosts; make batch_multiple a multiple of "
            "rows_per_example * host count")
    # What the epoch plans cut: batches of examples (rows / rows_per_example).
    self._plan_buckets = self.buckets if self.rows_per_example == 1 else [
        bk.Bucket(b.max_txt, b.max_img, b.batch_size // self.rows_per_example)
        for b in self.buckets]

    # ITM negatives: images of this split, sorted by region count.
    imgs = np.unique(self.text.img_indices)
    nbb = self.store.num_bbs(imgs)
    order = np.argsort(nbb, kind="stable")
    self._neg_images, self._neg_nbb = imgs[order], nbb[order]
    self._neg_pos = np.full(len(self.store), len(imgs), np.int64)
    self._neg_pos[self._neg_images] = np.arange(len(imgs))
    # Retrieval negatives (`sample_texts`): texts sorted by length; the
    # texts of each image are grouped on first use.
    self._neg_texts = np.argsort(self.txt_lens, kind="stable")
    self._neg_tlen = self.txt_lens[self._neg_texts]
    self._texts_by_image: tuple[np.ndarray, np.ndarray] | None = None

    # Memory of the large batch arrays, reused once a batch is dropped.
    self._pool = collate_lib.BufferPool()
    self._plans: collections.OrderedDict[int, bk.EpochPlan] = (
        collections.OrderedDict())
    self._lock = threading.Lock()
    self._exact: list[tuple[int, np.ndarray, int]] | None = None
    self.loading = loading or Loading()
    # 0 when the split is smaller than one batch: training then refuses it
    # (`global_batch`), but `exact_batches` still serves it.
    self.batches_per_epoch = len(self.plan(0).batches)

  # -- planning ---------------------------------------------------------------
  def plan(self, epoch: int) -> bk.EpochPlan:
    """The (cached) plan of an epoch; identical on every host."""
    with self._lock:
      if epoch not in self._plans:
        self._plans[epoch] = bk.plan_epoch(self.assignment,
                                           self._plan_buckets, self.seed,
                                           epoch)
        while len(self._plans) > 2:
          self._plans.popitem(last=False)
      return self._plans[epoch]

  def _need_batches(self) -> None:
    if self.batches_per_epoch == 0:
      raise ValueError(f"{self.name}: {len(self.text)} examples make no full "
                       f"batch with buckets {self.buckets}")

  def global_batch(self, step: int) -> tuple[bk.Bucket, np.ndarray]:
    """Shape and example indices of global batch `step` (all hosts'
    examples; `rows_per_example` rows each)."""
    self._need_batches()
    epoch, pos = divmod(int(step), self.batches_per_epoch)
    p = self.plan(epoch)
    return self.buckets[int(p.bucket_ids[pos])], p.batches[pos]

  def host_rows(self, step: int) -> tuple[bk.Bucket, np.ndarray]:
    """Shape and example indices of this host's slice of batch `step` (its
    rows when `rows_per_example` is 1)."""
    bucket, idx = self.global_batch(step)
    per_host = len(idx) // self.shard_count
    return bucket, idx[self.shard_index * per_host:
                       (self.shard_index + 1) * per_host]

  def fingerprint(self) -> str:
    """Identifies the global batch sequence (host count excluded)."""
    desc = json.dumps({
        "text": self.name, "seed": self.seed, "n": len(self.text),
        "buckets": [[b.max_txt, b.max_img, b.batch_size]
                    for b in self.buckets],
        "ops": [n for n, _ in self.ops], "op_params": self.op_params,
        # Only when set, so that states saved before these existed resume.
        # (Batch ops and fields change no example's place: not included.)
        **({"rows_per_example": self.rows_per_example}
           if self.rows_per_example != 1 else {}),
        **({"row_regions": getattr(self.row_regions, "__name__",
                                   self.row_regions)}
           if self.text.max_images > 1 else {})},
        sort_keys=True, default=str)
    return hashlib.sha1(desc.encode()).hexdigest()[:16]

  # -- loading ----------------------------------------------------------------
  def _sample_image(self, rng: np.random.Generator, exclude_key: str | None,
                    max_img: int, load: bool = True) -> dict[str, Any]:
    hi = int(np.searchsorted(self._neg_nbb, max_img, side="right"))
    exclude = (self.store.key_to_index.get(exclude_key, -1)
               if exclude_key is not None else -1)
    choices = hi - int(exclude >= 0 and self._neg_pos[exclude] < hi)
    if choices <= 0:
      raise ValueError(f"{self.name}: no image other than {exclude_key!r} "
                       f"with <= {max_img} regions to sample a negative from")
    while True:
      img = int(self._neg_images[rng.integers(hi)])
      if img != exclude:
        # `load=False`: the deferred part (`ops.DEFERRED_IMAGE`), same draw.
        return self.store.load(img) if load else {
            "img_key": self.store.keys[img], ops_lib.DEFERRED_IMAGE: img}

  def _sample_images(self, rng: np.random.Generator, n: int,
                     exclude_key: str | None, max_img: int,
                     load: bool = True) -> list[dict[str, Any]]:
    hi = int(np.searchsorted(self._neg_nbb, max_img, side="right"))
    exclude = (self.store.key_to_index.get(exclude_key, -1)
               if exclude_key is not None else -1)
    excluded = int(exclude >= 0 and self._neg_pos[exclude] < hi)
    if hi - excluded < n:
      raise ValueError(f"{self.name}: {n} distinct negative images other "
                       f"than {exclude_key!r} with <= {max_img} regions "
                       f"requested; the split has {hi - excluded}")
    # Distinct draws; the excluded image (if drawn) is dropped, so one
    # extra draw always leaves n.
    pos = rng.choice(hi, size=min(hi, n + excluded), replace=False)
    imgs = self._neg_images[pos]
    imgs = imgs[imgs != exclude][:n]
    if not load:
      return [{"img_key": self.store.keys[int(i)],
               ops_lib.DEFERRED_IMAGE: int(i)} for i in imgs]
    return [self.store.load(int(i)) for i in imgs]

  def _sample_texts(self, rng: np.random.Generator, n: int,
                    exclude_img_key: str | None, max_txt: int
                    ) -> list[dict[str, Any]]:
    hi = int(np.searchsorted(self._neg_tlen, max_txt, side="right"))
    img = (self.store.key_to_index.get(exclude_img_key, -1)
           if exclude_img_key is not None else -1)
    if self._texts_by_image is None:
      order = np.argsort(self.text.img_index, kind="stable")
      rank = np.empty(len(order), np.int64)
      rank[self._neg_texts] = np.arange(len(order))
      self._texts_by_image = (self.text.img_index[order], rank[order])
    img_sorted, rank_sorted = self._texts_by_image
    a, b = np.searchsorted(img_sorted, [img, img + 1]) if img >= 0 else (0, 0)
    excluded = int(np.sum(rank_sorted[a:b] < hi))
    if hi - excluded < n:
      raise ValueError(f"{self.name}: {n} distinct negative texts of images "
                       f"other than {exclude_img_key!r} with <= {max_txt} "
                       f"tokens requested; the split has {hi - excluded}")
    pos = rng.choice(hi, size=min(hi, n + excluded), replace=False)
    texts = self._neg_texts[pos]
    texts = texts[self.text.img_index[texts] != img][:n]
    return [{"input_ids": self.text.input_ids(int(t)),
             "_id": self.text.record_id(int(t)), "_index": int(t)}
            for t in texts]

  def context(self, bucket: bk.Bucket) -> ops_lib.OpContext:
    sp = self.text.special
    return ops_lib.OpContext(
        cls_id=sp["CLS"], sep_id=sp["SEP"], mask_id=sp["MASK"],
        pad_id=sp["PAD"], v_range=self.text.v_range, meta=self.text.meta,
        max_txt=bucket.max_txt, max_img=bucket.max_img,
        _sample_image=self._sample_image, params=self.op_params,
        _sample_images=self._sample_images, _sample_texts=self._sample_texts,
        _load_image=self.store.load)

  def example(self, index: int, epoch: int,
              bucket: bk.Bucket | None = None,
              img_feat_out: np.ndarray | None = None
              ) -> dict[str, Any] | list[dict[str, Any]]:
    """Joined example `index` after the task ops of `epoch`: its dict, or
    the list of its row dicts when an op made several rows
    (`img_feat_out`: see `ImageStore.load`).

    With ops, the image of a one-image record is read only when an op
    that reads image arrays comes or the ops are done (`ops.apply_ops`),
    so an image that an ITM negative replaced is never read, and the image
    the example ends with is written into `img_feat_out`."""
    if not self.ops:
      return self.text.example(index, img_feat_out=img_feat_out)
    if self.text.num_images[int(index)] == 1:
      ex = self.text.example(index, defer_image=True)
    else:   # a record of several images: all of them are read now
      ex = self.text.example(index, img_feat_out=img_feat_out)
      img_feat_out = None
    if bucket is None:
      bucket = self.buckets[int(self.assignment[index])]
    rng = ops_lib.example_rng(self.seed, epoch, int(index))
    return ops_lib.apply_ops(ex, self.ops, rng, self.context(bucket),
                             img_feat_out=img_feat_out)

  def example_rows(self, index: int, epoch: int,
                   bucket: bk.Bucket | None = None,
                   img_feat_out: np.ndarray | None = None
                   ) -> list[dict[str, Any]]:
    """The `rows_per_example` row dicts of example `index` (see `example`).
    """
    ex = self.example(index, epoch, bucket, img_feat_out)
    rows = ex if isinstance(ex, list) else [ex]
    if len(rows) != self.rows_per_example:
      rid = rows[0].get("_id", index) if rows else index
      raise ValueError(f"{self.name}: example {rid!r} (kept record {index}) "
                       f"has {len(rows)} rows after the task ops; "
                       f"rows_per_example={self.rows_per_example}")
    return rows

  def _collate(self, bucket: bk.Bucket, indices: np.ndarray,
               epoch: int) -> dict[str, np.ndarray]:
    """Rows of the examples `indices` (repeats allowed) padded to `bucket`."""
    if self.ops:
      arena = None
      if self.text.max_images == 1 and (
          self.img_feat_dtype == np.float32
          or (self.img_feat_dtype == np.float16 and not any(
              ops_lib.reads_image_arrays(op) for _, op in self.ops))):
        # The examples' features are views of one array: a single large
        # (huge-page backed) allocation instead of one fresh one per example.
        # Example r's image (its own or an ITM negative) is read straight
        # into row r; with one row per example this array then becomes the
        # batch's `img_feat` (collate writes only the padding). In float16
        # (a bf16/fp16 model) only when no op reads the arrays (ITM, MLM):
        # the stored values are copied in as they are, no cast either way.
        arena = self._pool.empty((len(indices), bucket.max_img,
                                  schema.FEAT_DIM), self.img_feat_dtype)
      rows = []
      made: dict[int, list[dict[str, Any]]] = {}
      for r, i in enumerate(indices):
        i = int(i)
        if i not in made:   # a repeat (exact batches' padding) is reused
          made[i] = self.example_rows(i, epoch, bucket,
                                      None if arena is None else arena[r])
        rows.extend(made[i])
      return collate_lib.collate(
          rows, bucket, img_feat_dtype=self.img_feat_dtype,
          fp16_checked=False, pool=self._pool, fields=self.fields,
          rows_per_example=self.rows_per_example,
          img_feat_buffer=arena if self.rows_per_example == 1 else None)
    # No op sees the examples: keep the stored fp16 features (checked
    # finite by the store) and let collate cast them straight into the
    # padded batch (same values, one pass less over the largest array).
    rows = [self.text.example(int(i), np.float16) for i in indices]
    return collate_lib.collate(rows, bucket,
                               img_feat_dtype=self.img_feat_dtype,
                               fp16_checked=True, pool=self._pool,
                               fields=self.fields,
                               rows_per_example=self.rows_per_example)

  def _finish(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Batch ops, then the contract check (when fields were declared)."""
    for name, fn in self.batch_ops:
      batch = fn(batch)
      if not isinstance(batch, dict):
        raise TypeError(f"{self.name}: batch op {name!r} returned "
                        f"{type(batch).__name__}, expected the batch dict")
    if self.fields is not None:
      contract.check_batch(batch, self.fields, where=self.name,
                           rows_per_example=self.rows_per_example)
    return batch

  def load_batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's rows of batch `step`, padded to the step's bucket."""
    bucket, rows = self.host_rows(step)
    epoch = int(step) // self.batches_per_epoch
    return self._finish(self._collate(bucket, rows, epoch))

  # -- exact evaluation -------------------------------------------------------
  def exact_plan(self) -> list[tuple[int, np.ndarray, int]]:
    """The global batches of `exact_batches`: (bucket id, example indices,
    number of real examples) each.

    Shape by shape (in `buckets` order), the examples of that shape in index
    order, cut into batches of the shape's size; the last batch of a shape
    is filled up with copies of its first example. Every kept example that
    fits a shape is in exactly one batch. Identical on every host.
    """
    with self._lock:
      if self._exact is None:
        plan = []
        for k, pb in enumerate(self._plan_buckets):
          idx = np.flatnonzero(self.assignment == k)
          for lo in range(0, len(idx), pb.batch_size):
            part = idx[lo:lo + pb.batch_size]
            real = len(part)
            if real < pb.batch_size:
              part = np.concatenate(
                  [part, np.full(pb.batch_size - real, part[0], part.dtype)])
            plan.append((k, part, real))
        self._exact = plan
      return self._exact

  def load_exact_batch(self, index: int, epoch: int = 0
                       ) -> dict[str, np.ndarray]:
    """This host's rows of exact batch `index` (see `exact_batches`)."""
    k, part, real = self.exact_plan()[int(index)]
    per_host = len(part) // self.shard_count
    lo = self.shard_index * per_host
    idx = part[lo:lo + per_host]
    valid = np.arange(lo, lo + per_host) < real
    batch = self._collate(self.buckets[k], idx, epoch)
    batch["example_mask"] = np.repeat(valid, self.rows_per_example)
    batch["example_index"] = np.repeat(
        np.where(valid, idx, -1).astype(np.int64), self.rows_per_example)
    return self._finish(batch)

  def exact_batches(self, epoch: int = 0, num_threads: int | None = None,
                    prefetch: int | None = None,
                    num_workers: int | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches visiting every kept example exactly once.

    For evaluation: unlike the training iterator, nothing is shuffled,
    carried or dropped. Batches follow `exact_plan` (shape by shape, index
    order within a shape) and keep the training shapes and batch sizes
    (multiples of `batch_multiple`, split over hosts as `load_batch`); the
    last batch of each shape is padded with copies of a real example.
    Each batch also holds `example_mask` [B] bool (False on padding rows,
    alike for all rows of an example) and `example_index` [B] int64 (the
    kept-record index, -1 on padding), so metrics can drop the padding and
    predictions can be matched to records (`text.records`, `text.example`).
    Task ops run with the per-example RNG of `epoch` (deterministic).
    `len(exact_plan())` batches, made in grain's threads or, with
    `num_workers` > 0, worker processes (default: the data's `loading`).
    """
    n = len(self.exact_plan())
    ds = grain.MapDataset.range(n).map(
        functools.partial(self.load_exact_batch, epoch=epoch))
    opts = self.loading.replace(num_threads=num_threads, prefetch=prefetch,
                                num_workers=num_workers)
    with _Workers(ds, opts, self.name) as it:
      yield from it

  # -- iteration --------------------------------------------------------------
  def iterator(self, num_epochs: int | None = None,
               num_threads: int | None = None, prefetch: int | None = None,
               num_workers: int | None = None) -> "DataIterator":
    """A checkpointable iterator over this host's batches.

    `num_workers` > 0 runs the per-batch work (reading, joining, task ops,
    collation, batch ops) in that many worker processes (grain's
    multiprocessing prefetch; each worker uses `num_threads` threads and
    takes every `num_workers`-th batch), 0 in this process's threads;
    None: the data's `loading`. Batches depend on (seed, step) only: the
    same for any worker or thread count, and a restored state continues
    exactly.
    """
    self._need_batches()
    total = self.batches_per_epoch * (num_epochs or _ENDLESS_EPOCHS)
    return DataIterator(self, total, self.loading.replace(
        num_threads=num_threads, prefetch=prefetch, num_workers=num_workers))

  # Pickled into input worker processes (spawned): the indexes built at
  # start-up travel with the object; files reopen on the other side.
  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"], state["_pool"]
    state["_plans"] = collections.OrderedDict()
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    # Unpickled in an input worker process: the large batch arrays are
    # made in shared memory, so grain hands them to the training process
    # without copying them again.
    self._pool = SharedMemoryPool()

  def stats(self, epoch: int = 0) -> dict[str, Any]:
    """Padding and drop counts of an epoch's plan (counted in examples)."""
    p = self.plan(epoch)
    out = bk.padding_stats(self.txt_lens, self.num_bbs, p, self._plan_buckets)
    out["dropped_at_load"] = dict(self.dropped)
    out["dropped_remainder"] = out.pop("dropped")
    out["buckets"] = [(b.max_txt, b.max_img, b.batch_size)
                      for b in self.buckets]
    return out


def _explicit_buckets(shapes, token_budget: int, batch_multiple: int
                      ) -> list[bk.Bucket]:
  out = []
  for s in shapes:
    if isinstance(s, bk.Bucket):
      b = s
    else:
      lt, li = (int(v) for v in s)
      size = (token_budget // (lt + li)) // batch_multiple * batch_multiple
      b = bk.Bucket(lt, li, size)
    if b.batch_size <= 0 or b.batch_size % batch_multiple:
      raise ValueError(f"bucket {b}: batch size must be a positive multiple "
                       f"of batch_multiple={batch_multiple}")
    if b.tokens > token_budget:
      raise ValueError(f"bucket {b} holds {b.tokens} tokens > token_budget "
                       f"{token_budget}")
    out.append(b)
  return sorted(out, key=lambda b: (b.seq_len, b.max_txt, b.max_img))


class SharedMemoryPool:
  """`BufferPool`'s interface for worker processes: large arrays are
  allocated in shared memory (grain's `SharedMemoryArray`), which grain
  passes to the consuming process by name instead of copying. They leave
  the process, so nothing is reused."""

  def __init__(self, min_bytes: int = 1 << 20):
    self.min_bytes = min_bytes

  def empty(self, shape, dtype) -> np.ndarray:
    from grain import multiprocessing as grain_mp  # pylint: disable=g-import-not-at-top
    dtype = np.dtype(dtype)
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize < self.min_bytes:
      return np.empty(shape, dtype)
    return grain_mp.SharedMemoryArray(tuple(shape), dtype)

  def __len__(self) -> int:
    return 0


class WorkerError(RuntimeError):
  """An input worker process died or failed; the message names it."""


class DataIterator(Iterator[dict[str, np.ndarray]]):
  """Iterator over one host's batches with a JSON-able, checked state.

  The state is the next step and the data's fingerprint; restoring it
  rebuilds the grain pipeline from that step (batches are a function of
  the step), so it is the same with or without worker processes.
  """

  def __init__(self, data: UniterData, total: int,
               loading: Loading | None = None):
    self.data = data
    self.total = int(total)
    self.loading = loading or data.loading
    self._step = 0
    self._it: _Workers | None = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._step >= self.total:
      raise StopIteration
    if self._it is None:
      ds = grain.MapDataset.range(self._step, self.total).map(
          self.data.load_batch)
      self._it = _Workers(ds, self.loading, self.data.name, self._step)
    batch = next(self._it)
    self._step += 1
    return batch

  def close(self) -> None:
    """Stops the worker processes (a later `next` starts them again)."""
    it, self._it = self._it, None
    if it is not None:
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def get_state(self) -> dict[str, Any]:
    """{'step': next batch, 'fingerprint': ...}; save it with the model."""
    return {"step": self._step, "fingerprint": self.data.fingerprint()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `get_state`, possibly on other hosts)."""
    if state.get("fingerprint") != self.data.fingerprint():
      raise ValueError(
          f"{self.data.name}: iterator state {dict(state)} was saved for a "
          f"different data setup (fingerprint {self.data.fingerprint()}); "
          "seed, buckets, ops or dataset changed")
    self.close()
    self._step = int(state["step"])


@dataclasses.dataclass(frozen=True)
class Loading:
  """How batches are made: `num_workers` worker processes (0: this
  process) each with `num_threads` threads, `prefetch` batches ahead."""
  num_threads: int = 2
  prefetch: int = 4
  num_workers: int = 0

  def __post_init__(self):
    for name in ("num_threads", "prefetch", "num_workers"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

  def replace(self, **overrides) -> "Loading":
    """A copy with the fields given as non-None overridden."""
    return dataclasses.replace(
        self, **{k: int(v) for k, v in overrides.items() if v is not None})


def auto_num_workers(cores: int | None = None) -> int:
  """Worker processes for a host of `cores` CPUs: none up to 4 cores (the
  training process needs them; threads do), else all but two, at most 32.
  """
  cores = (os.cpu_count() or 1) if cores is None else int(cores)
  return 0 if cores <= 4 else min(cores - 2, 32)


def _note_worker(pid_dir: str, worker_index: int, worker_count: int) -> None:
  """Runs first in each worker process: records its pid for error lines."""
  del worker_count
  with open(os.path.join(pid_dir, str(worker_index)), "w") as f:
    f.write(str(os.getpid()))


class _Workers:
  """grain's iterator over `ds` in threads or worker processes; a failure
  of a worker process becomes one `WorkerError` naming it."""

  def __init__(self, ds, loading: Loading, name: str, first_step: int = 0):
    self.name, self.loading, self._step = name, loading, first_step
    it = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=loading.num_threads,
        prefetch_buffer_size=loading.prefetch))
    self._pid_dir = None
    if loading.num_workers:
      # grain reads its absl flags when it starts workers; a program that
      # parsed none (a script, a notebook) gets their defaults.
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      self._pid_dir = tempfile.mkdtemp(prefix="uniter-input-workers-")
      it = it.mp_prefetch(
          grain.MultiprocessingOptions(
              num_workers=loading.num_workers,
              per_worker_buffer_size=max(
                  1, loading.prefetch // loading.num_workers)),
          worker_init_fn=functools.partial(_note_worker, self._pid_dir))
    self._it = iter(it)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._it)
    except StopIteration:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not self.loading.num_workers:
        raise
      msg = self._failure(e)
      self.close()
      raise WorkerError(msg) from e
    self._step += 1
    return batch

  def _failure(self, e: BaseException) -> str:
    """One line: which worker died and how, or what a worker raised."""
    code = re.search(r"exit code (-?\d+)", str(e))
    if code is None:   # an exception inside a worker, passed on by grain
      lines = [l for l in str(e).strip().splitlines() if l.strip()]
      return (f"{self.name}: an input worker process raised "
              f"{type(e).__name__} while making batch {self._step}: "
              f"{(lines[-1] if lines else '')[:300]}")
    c = int(code.group(1))
    how = (f"killed by signal {-c} ({signal.Signals(-c).name})" if c < 0
           else f"exited with status {c}")
    dead, same = [], []
    for f in sorted(os.listdir(self._pid_dir)):
      pid = int(open(os.path.join(self._pid_dir, f)).read())
      state, status = _process_state(pid)
      if state in ("gone", "Z"):
        name = f"worker {f} of {self.loading.num_workers} (pid {pid})"
        dead.append(name)
        # A zombie's wait status: the one grain reports, not a worker
        # grain stopped afterwards.
        if status is not None and (status & 0x7F == -c if c < 0
                                   else status >> 8 == c):
          same.append(name)
    named = same or dead
    who = (" and ".join(named) if len(named) in (1, 2) else
           f"one of {self.loading.num_workers} worker processes")
    return (f"{self.name}: input {who} {how} while making batch "
            f"{self._step}; the run stops here (its last checkpoint is "
            "intact)")

  def close(self) -> None:
    it, self._it = self._it, iter(())
    close = getattr(it, "close", None)
    if close is not None:
      close()
    if self._pid_dir is not None:
      shutil.rmtree(self._pid_dir, ignore_errors=True)
      self._pid_dir = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _process_state(pid: int) -> tuple[str, int | None]:
  """(state letter from /proc, or "gone"; the wait status of a zombie)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return "gone", None
  status = int(fields[49]) if fields[0] == "Z" and len(fields) > 49 else None
  return fields[0], status


def make_pretrain_iterator(data_dir: str, text: str, split: str = "train", *,
                           num_epochs: int | None = None,
                           state: Mapping[str, Any] | None = None,
                           num_threads: int | None = None,
                           prefetch: int | None = None,
                           num_workers: int | None = None,
                           **kwargs) -> DataIterator:
  """`UniterData(data_dir, text, split, **kwargs).iterator(...)`, restored
  from `state` when given."""
  data = UniterData(data_dir, text, split, **kwargs)
  it = data.iterator(num_epochs=num_epochs, num_threads=num_threads,
                     prefetch=prefetch, num_workers=num_workers)
  if state is not None:
    it.set_state(state)
  return it
