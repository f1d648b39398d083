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
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from data_prep import schema
from uniter_jax.data import buckets as bk
from uniter_jax.data import collate as collate_lib
from uniter_jax.data import ops as ops_lib
from uniter_jax.data import sources

# Upper bound on steps of an endless iterator (grain needs a length).
_ENDLESS_EPOCHS = 1 << 20


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
    batch_multiple: every global batch size is a multiple of this (use the
      data-parallel device count); must be a multiple of `shard_count`.
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
    ops: per-example task ops (names in the registry or callables).
    op_params: hyper-parameters the ops read from their context, e.g.
      {"mlm_prob": 0.15, "itm_neg_prob": 0.5}.
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
               image_store: str | None = None):
    self.shard_index, self.shard_count = _host_defaults(shard_index,
                                                        shard_count)
    if batch_multiple % self.shard_count:
      raise ValueError(f"batch_multiple {batch_multiple} must be a multiple "
                       f"of the host count {self.shard_count}")
    self.seed = int(seed)
    self.ops = ops_lib.resolve_ops(ops)
    self.op_params = dict(op_params or {})
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
    self.num_bbs = self.text.num_bbs()

    if buckets is None:
      self.buckets = bk.choose_buckets(
          self.txt_lens, self.num_bbs, token_budget, batch_multiple,
          max_buckets=max_buckets, target_padding=target_padding,
          length_multiple=length_multiple)
    else:
      self.buckets = _explicit_buckets(buckets, token_budget, batch_multiple)
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

    # ITM negatives: images of this split, sorted by region count.
    imgs = np.unique(self.text.img_index)
    nbb = self.store.num_bbs(imgs)
    order = np.argsort(nbb, kind="stable")
    self._neg_images, self._neg_nbb = imgs[order], nbb[order]
    self._neg_pos = np.full(len(self.store), len(imgs), np.int64)
    self._neg_pos[self._neg_images] = np.arange(len(imgs))

    # Memory of the large batch arrays, reused once a batch is dropped.
    self._pool = collate_lib.BufferPool()
    self._plans: collections.OrderedDict[int, bk.EpochPlan] = (
        collections.OrderedDict())
    self._lock = threading.Lock()
    self.batches_per_epoch = len(self.plan(0).batches)
    if self.batches_per_epoch == 0:
      raise ValueError(f"{self.name}: {len(self.text)} examples make no full "
                       f"batch with buckets {self.buckets}")

  # -- planning ---------------------------------------------------------------
  def plan(self, epoch: int) -> bk.EpochPlan:
    """The (cached) plan of an epoch; identical on every host."""
    with self._lock:
      if epoch not in self._plans:
        self._plans[epoch] = bk.plan_epoch(self.assignment, self.buckets,
                                           self.seed, epoch)
        while len(self._plans) > 2:
          self._plans.popitem(last=False)
      return self._plans[epoch]

  def global_batch(self, step: int) -> tuple[bk.Bucket, np.ndarray]:
    """Shape and example indices of global batch `step` (all hosts' rows)."""
    epoch, pos = divmod(int(step), self.batches_per_epoch)
    p = self.plan(epoch)
    return self.buckets[int(p.bucket_ids[pos])], p.batches[pos]

  def host_rows(self, step: int) -> tuple[bk.Bucket, np.ndarray]:
    """Shape and example indices of this host's slice of batch `step`."""
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
        "ops": [n for n, _ in self.ops], "op_params": self.op_params},
        sort_keys=True, default=str)
    return hashlib.sha1(desc.encode()).hexdigest()[:16]

  # -- loading ----------------------------------------------------------------
  def _sample_image(self, rng: np.random.Generator, exclude_key: str | None,
                    max_img: int) -> dict[str, Any]:
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
        return self.store.load(img)

  def context(self, bucket: bk.Bucket) -> ops_lib.OpContext:
    sp = self.text.special
    return ops_lib.OpContext(
        cls_id=sp["CLS"], sep_id=sp["SEP"], mask_id=sp["MASK"],
        pad_id=sp["PAD"], v_range=self.text.v_range, meta=self.text.meta,
        max_txt=bucket.max_txt, max_img=bucket.max_img,
        _sample_image=self._sample_image, params=self.op_params)

  def example(self, index: int, epoch: int,
              bucket: bk.Bucket | None = None,
              img_feat_out: np.ndarray | None = None) -> dict[str, Any]:
    """Joined example `index` after the task ops of `epoch`
    (`img_feat_out`: see `ImageStore.load`)."""
    ex = self.text.example(index, img_feat_out=img_feat_out)
    if self.ops:
      if bucket is None:
        bucket = self.buckets[int(self.assignment[index])]
      rng = ops_lib.example_rng(self.seed, epoch, int(index))
      ex = ops_lib.apply_ops(ex, self.ops, rng, self.context(bucket))
    return ex

  def load_batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's rows of batch `step`, padded to the step's bucket."""
    bucket, rows = self.host_rows(step)
    epoch = int(step) // self.batches_per_epoch
    if self.ops:
      arena = None
      if self.img_feat_dtype == np.float32:
        # The examples' fp32 features are views of one array: a single large
        # (huge-page backed) allocation instead of one fresh one per example.
        arena = self._pool.empty((len(rows), bucket.max_img,
                                  schema.FEAT_DIM), np.float32)
      examples = [self.example(int(i), epoch, bucket,
                               None if arena is None else arena[r])
                  for r, i in enumerate(rows)]
    else:
      # No op sees the examples: keep the stored fp16 features (checked
      # finite by the store) and let collate cast them straight into the
      # padded batch (same values, one pass less over the largest array).
      examples = [self.text.example(int(i), np.float16) for i in rows]
    return collate_lib.collate(examples, bucket,
                               img_feat_dtype=self.img_feat_dtype,
                               fp16_checked=not self.ops, pool=self._pool)

  # -- iteration --------------------------------------------------------------
  def iterator(self, num_epochs: int | None = None, num_threads: int = 2,
               prefetch: int = 4) -> "DataIterator":
    """A checkpointable iterator over this host's batches."""
    total = self.batches_per_epoch * (num_epochs or _ENDLESS_EPOCHS)
    ds = grain.MapDataset.range(total).map(self.load_batch)
    it = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch))
    return DataIterator(self, iter(it))

  def stats(self, epoch: int = 0) -> dict[str, Any]:
    """Padding and drop counts of an epoch's plan."""
    p = self.plan(epoch)
    out = bk.padding_stats(self.txt_lens, self.num_bbs, p, self.buckets)
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


class DataIterator(Iterator[dict[str, np.ndarray]]):
  """grain iterator over batches with a JSON-able, checked state."""

  def __init__(self, data: UniterData, it):
    self.data = data
    self._it = it

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    """{'step': next batch, 'fingerprint': ...}; save it with the model."""
    return {"step": int(self._it.get_state()["next_index"]),
            "fingerprint": self.data.fingerprint()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `get_state`, possibly on other hosts)."""
    if state.get("fingerprint") != self.data.fingerprint():
      raise ValueError(
          f"{self.data.name}: iterator state {dict(state)} was saved for a "
          f"different data setup (fingerprint {self.data.fingerprint()}); "
          "seed, buckets, ops or dataset changed")
    self._it.set_state({"next_index": int(state["step"])})


def make_pretrain_iterator(data_dir: str, text: str, split: str = "train", *,
                           num_epochs: int | None = None,
                           state: Mapping[str, Any] | None = None,
                           num_threads: int = 2, prefetch: int = 4,
                           **kwargs) -> DataIterator:
  """`UniterData(data_dir, text, split, **kwargs).iterator(...)`, restored
  from `state` when given."""
  data = UniterData(data_dir, text, split, **kwargs)
  it = data.iterator(num_epochs=num_epochs, num_threads=num_threads,
                     prefetch=prefetch)
  if state is not None:
    it.set_state(state)
  return it
