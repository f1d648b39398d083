"""Pads per-example dicts to a static bucket shape (the batch contract).

Layout per row: `[CLS text SEP pad.. (Lt) | regions pad.. (Li)]`. Fields and
padding values follow the batch contract; optional fields are emitted only
when some example carries them (an op's output must be present in all
examples of a batch or in none).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Sequence

import numpy as np

from uniter_jax.data import sources
from uniter_jax.data.buckets import Bucket

# field -> (axis kind, dtype, pad value, trailing dims)
_TEXT = {
    "input_ids": (np.int32, 0),
    "txt_type_ids": (np.int32, 0),
    "txt_labels": (np.int32, -1),
}
_IMG = {
    "img_feat": (np.float32, 0.0),
    "img_pos_feat": (np.float32, 0.0),
    "img_type_ids": (np.int32, 1),
    "img_soft_labels": (np.float32, 0.0),
    "img_masks": (np.bool_, False),
    "feat_targets": (np.float32, 0.0),
    "label_targets": (np.float32, 0.0),
}
_REQUIRED = ("input_ids", "img_feat", "img_pos_feat")
KNOWN_FIELDS = frozenset(_TEXT) | frozenset(_IMG) | {"targets"}
# Per-example bookkeeping that never reaches the batch (besides `_*` keys).
IGNORED_FIELDS = frozenset({"img_key"})


class BufferPool:
  """Hands out the memory of large batch arrays again once unreferenced.

  A padded feature batch is tens of MB: freshly allocated, every batch
  page-faults its memory in (the kernel zero-fills each page) and its cost
  depends on the allocator's state; that was the largest cost of the fp32
  path. `empty(shape, dtype)` returns a view of a pooled buffer that no
  live array refers to (CPython reference counts: every numpy view keeps
  its base, so a buffer is reused only after the last array using it -- a
  batch, a view of it, a jax array built from it without a copy -- is
  gone), else a new buffer while the pool holds fewer than `max_buffers`,
  else plain `np.empty`. Arrays below `min_bytes` are never pooled.
  Thread-safe.
  """

  def __init__(self, max_buffers: int = 16, min_bytes: int = 1 << 20):
    self.max_buffers = max_buffers
    self.min_bytes = min_bytes
    self._bufs: list[np.ndarray] = []
    self._lock = threading.Lock()

  def empty(self, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < self.min_bytes:
      return np.empty(shape, dtype)
    with self._lock:
      pick = None
      for k in range(len(self._bufs)):
        # 2 references: the pool's list and getrefcount's argument.
        if (self._bufs[k].nbytes >= nbytes
            and sys.getrefcount(self._bufs[k]) == 2
            and (pick is None
                 or self._bufs[k].nbytes < self._bufs[pick].nbytes)):
          pick = k
      if pick is None:
        if len(self._bufs) >= self.max_buffers:
          return np.empty(shape, dtype)
        size = -(-nbytes // self.min_bytes) * self.min_bytes
        self._bufs.append(np.empty(size, np.uint8))
        pick = len(self._bufs) - 1
      return self._bufs[pick][:nbytes].view(dtype).reshape(shape)

  def __len__(self) -> int:
    return len(self._bufs)


def _unfilled(shape, dtype, pool: BufferPool | None = None) -> np.ndarray:
  # Every row is written below: its values, then its padding. np.zeros /
  # np.full would first write the whole array (calloc clears memory that
  # malloc reuses), a full extra pass over the largest arrays.
  if pool is not None:
    return pool.empty(shape, dtype)
  return np.empty(shape, dtype)


def _where(example: dict[str, Any]) -> str:
  return f"example {example.get('_id', example.get('_index', '?'))!r}"


def collate(examples: Sequence[dict[str, Any]], bucket: Bucket,
            num_rows: int | None = None,
            img_feat_dtype: Any = np.float32,
            fp16_checked: bool = False,
            pool: BufferPool | None = None) -> dict[str, np.ndarray]:
  """Stacks `examples` into one batch of shape `bucket` (rows: `num_rows`).

  Args:
    examples: per-example dicts (batch contract); `img_key` and
      `_`-prefixed keys are ignored.
    bucket: the static (Lt, Li) shape.
    num_rows: rows of the output (default `len(examples)`); must equal
      `len(examples)`: rows are never invented.
    img_feat_dtype: dtype of the batch's `img_feat`: float32 (the batch
      contract) or float16 (see `UniterData(img_feat_dtype=...)`; fp32 values
      an op wrote are then rounded to fp16).
    fp16_checked: the caller has checked that float16 arrays among the
      examples hold no inf/NaN (`ImageStore.load` does), so the cast into
      the batch skips that pass.
    pool: where the large image arrays get their memory (see `BufferPool`);
      default: fresh `np.empty`.

  Returns:
    The batch dict with `position_ids`, `attn_masks`, `txt_lens`, `num_bbs`.

  Raises:
    ValueError: an example does not fit the shape, lacks a required field,
      carries an unknown field, or an optional field is in some examples only.
  """
  b = len(examples) if num_rows is None else num_rows
  if b != len(examples):
    raise ValueError(f"collate: {len(examples)} examples for {b} rows")
  lt, li = bucket.max_txt, bucket.max_img
  fields = set()
  checked_keys = None
  for ex in examples:
    if checked_keys is not None and ex.keys() == checked_keys:
      continue    # same keys as an example already checked
    checked_keys = ex.keys()
    keys = {k for k in ex
            if not k.startswith("_") and k not in IGNORED_FIELDS}
    unknown = keys - KNOWN_FIELDS
    if unknown:
      raise ValueError(f"collate: {_where(ex)} has unknown fields "
                       f"{sorted(unknown)}; known: {sorted(KNOWN_FIELDS)}")
    missing = [k for k in _REQUIRED if k not in ex]
    if missing:
      raise ValueError(f"collate: {_where(ex)} lacks {missing}")
    fields |= keys
  for ex in examples:
    if len(ex) >= len(fields) and ex.keys() >= fields:
      continue
    absent = fields - set(ex)
    if absent:
      raise ValueError(f"collate: {_where(ex)} lacks {sorted(absent)} which "
                       "other examples of the batch carry")

  txt_lens = np.array([len(ex["input_ids"]) for ex in examples], np.int32)
  num_bbs = np.array([len(ex["img_feat"]) for ex in examples], np.int32)
  for ex, t, n in zip(examples, txt_lens, num_bbs):
    if t > lt or n > li:
      raise ValueError(f"collate: {_where(ex)} has {t} text tokens and {n} "
                       f"regions; the bucket holds Lt={lt}, Li={li}")
  out: dict[str, np.ndarray] = {}
  for name, (dtype, pad) in _TEXT.items():
    if name not in fields:
      continue
    arr = _unfilled((b, lt), dtype)
    for r, ex in enumerate(examples):
      v = np.asarray(ex[name])
      if v.shape != (txt_lens[r],):
        raise ValueError(f"collate: {_where(ex)} {name} shape {v.shape}, "
                         f"expected ({txt_lens[r]},) like input_ids")
      arr[r, :txt_lens[r]] = v
      arr[r, txt_lens[r]:] = pad
    out[name] = arr
  for name, (dtype, pad) in _IMG.items():
    if name not in fields:
      continue
    if name == "img_feat":
      dtype = np.dtype(img_feat_dtype)
      if dtype not in (np.float32, np.float16):
        raise ValueError(f"collate: img_feat_dtype must be float32 or "
                         f"float16, got {dtype}")
    tail = np.shape(examples[0][name])[1:]
    arr = _unfilled((b, li) + tail, dtype, pool)
    for r, ex in enumerate(examples):
      v = np.asarray(ex[name])
      if v.shape != (num_bbs[r],) + tail:
        raise ValueError(f"collate: {_where(ex)} {name} shape {v.shape}, "
                         f"expected {(num_bbs[r],) + tail}")
      if v.dtype == np.float16 and arr.dtype == np.float32:
        # Exact, and much faster than numpy's own fp16 cast.
        sources.fp16_to_fp32(v, out=arr[r, :num_bbs[r]],
                             finite=True if fp16_checked else None)
      else:
        arr[r, :num_bbs[r]] = v
      if num_bbs[r] < li:
        arr[r, num_bbs[r]:] = pad
    out[name] = arr
  if "targets" in fields:
    out["targets"] = np.stack([np.asarray(ex["targets"]) for ex in examples])
  out["position_ids"] = np.broadcast_to(np.arange(lt, dtype=np.int32),
                                        (b, lt)).copy()
  attn = np.zeros((b, lt + li), np.int32)
  attn[:, :lt] = np.arange(lt)[None] < txt_lens[:, None]
  attn[:, lt:] = np.arange(li)[None] < num_bbs[:, None]
  out["attn_masks"] = attn
  out["txt_lens"] = txt_lens
  out["num_bbs"] = num_bbs
  return out
