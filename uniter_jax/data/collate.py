"""Pads per-row dicts to a static bucket shape (the batch contract).

Layout per row: `[CLS text SEP pad.. (Lt) | regions pad.. (Li)]`. Which
fields exist, their dtypes, trailing dims and padding values come from a
field table (`contract.Field`s; default `contract.DEFAULT_FIELDS`, the base
layout plus the pretraining fields), so a task adds fields by declaring
them. Optional fields are emitted only when some row carries them (an op's
output must be present in all rows of a batch or in none).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Sequence

import numpy as np

from uniter_jax.data import contract
from uniter_jax.data import sources
from uniter_jax.data.buckets import Bucket


def _split(fields: Sequence[contract.Field]):
  """(text, image, row, example) {name: field} and the required names."""
  table = contract.field_table(fields)
  by_kind = {k: {n: f for n, f in table.items() if f.kind == k}
             for k in contract.COLLATED_KINDS}
  required = tuple(n for n, f in table.items()
                   if f.kind in contract.COLLATED_KINDS and not f.optional)
  known = frozenset(n for n, f in table.items()
                    if f.kind in contract.COLLATED_KINDS)
  return by_kind, required, known


_DEFAULT = _split(contract.DEFAULT_FIELDS)
# Names a row may carry with the default table. Besides these, collate makes
# `position_ids`, `attn_masks`, `txt_lens` and `num_bbs`.
KNOWN_FIELDS = _DEFAULT[2]
# Per-row bookkeeping that never reaches the batch (besides `_*` keys).
IGNORED_FIELDS = frozenset({"img_key"})
# Per-region fields with at most this many values a region (boxes: 7) are
# padded in one masked assignment; larger ones (features, soft labels) row
# by row, without a first pass over the whole array.
_SMALL_TAIL = 64


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


def _check_tail(f: contract.Field, tail: tuple, example: dict[str, Any],
                lt: int, li: int) -> None:
  want = tuple(contract.expected_shape(f, 0, lt, li)[
      2 if f.kind in ("text", "image") else 1:])
  if len(tail) != len(want) or any(w is not None and t != w
                                   for t, w in zip(tail, want)):
    raise ValueError(f"collate: {_where(example)} {f.name} has trailing dims "
                     f"{tail}; the batch contract declares {f.tail}")


def _stack(examples: Sequence[dict[str, Any]], f: contract.Field, lt: int,
           li: int) -> np.ndarray:
  """A "row" / "example" field: one value per dict, stacked."""
  vals = [np.asarray(ex[f.name]) for ex in examples]
  tail = vals[0].shape
  _check_tail(f, tail, examples[0], lt, li)
  for ex, v in zip(examples, vals):
    if v.shape != tail:
      raise ValueError(f"collate: {_where(ex)} {f.name} shape {v.shape}, "
                       f"expected {tail} like the batch's first row")
  arr = np.stack(vals)
  if arr.dtype not in f.dtypes:
    if not np.can_cast(arr.dtype, f.default_dtype, "same_kind"):
      raise ValueError(f"collate: {f.name} has dtype {arr.dtype}; the batch "
                       f"contract declares {f.default_dtype}")
    arr = arr.astype(f.default_dtype)
  return arr


def _rows_in_buffer(examples: Sequence[dict[str, Any]],
                    buf: np.ndarray | None, dtype: np.dtype, shape: tuple,
                    num_bbs: np.ndarray) -> bool:
  """Whether row r's `img_feat` is `buf[r, :num_bbs[r]]` for every row (so
  `buf` holds the batch's values and needs only its padding written).

  Nothing can then refer to a row's padding part, which is all that is
  written: ops receive and return `[:n]` views, never the whole row.
  """
  if (buf is None or buf.dtype != dtype or buf.shape != shape
      or not buf.flags.c_contiguous):
    return False
  start, row_bytes = buf.ctypes.data, buf.strides[0]
  for r, ex in enumerate(examples):
    v = ex["img_feat"]
    if (not isinstance(v, np.ndarray) or v.dtype != dtype
        or v.shape[0] != num_bbs[r] or v.shape[1:] != shape[2:]
        or v.strides != buf.strides[1:]
        or v.ctypes.data != start + r * row_bytes):
      return False
  return True


def collate(examples: Sequence[dict[str, Any]], bucket: Bucket,
            num_rows: int | None = None,
            img_feat_dtype: Any = np.float32,
            fp16_checked: bool = False,
            pool: BufferPool | None = None,
            fields: Sequence[contract.Field] | None = None,
            rows_per_example: int = 1,
            img_feat_buffer: np.ndarray | None = None
            ) -> dict[str, np.ndarray]:
  """Stacks per-row dicts into one batch of shape `bucket` (`num_rows` rows).

  Args:
    examples: per-row dicts (batch contract), example-major when an example
      has several rows; `img_key` and `_`-prefixed keys are ignored.
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
    fields: the field table (`contract.Field`s); default
      `contract.DEFAULT_FIELDS`. Fields of kind "batch" are never taken
      from the rows.
    rows_per_example: rows per example; "example" fields are taken from the
      first row of each example.
    img_feat_buffer: a float32 [num_rows, Li, D] array into which the rows'
      fp32 features were loaded (`UniterData`'s per-batch arena). When
      every row's `img_feat` is exactly its own row of it (row r:
      `img_feat_buffer[r, :n]`), it becomes the batch's `img_feat` and only
      the padding is written (no copy); otherwise it is just a source.

  Returns:
    The batch dict with `position_ids`, `attn_masks`, `txt_lens`, `num_bbs`.

  Raises:
    ValueError: a row does not fit the shape, lacks a required field,
      carries an unknown field, or an optional field is in some rows only.
  """
  b = len(examples) if num_rows is None else num_rows
  if b != len(examples):
    raise ValueError(f"collate: {len(examples)} examples for {b} rows")
  if rows_per_example < 1 or b % rows_per_example:
    raise ValueError(f"collate: {b} rows are no whole number of examples of "
                     f"rows_per_example={rows_per_example} rows")
  by_kind, required, known = _DEFAULT if fields is None else _split(fields)
  lt, li = bucket.max_txt, bucket.max_img
  present = set()
  checked_keys = None
  for ex in examples:
    if checked_keys is not None and ex.keys() == checked_keys:
      continue    # same keys as an example already checked
    checked_keys = ex.keys()
    keys = {k for k in ex
            if not k.startswith("_") and k not in IGNORED_FIELDS}
    unknown = keys - known
    if unknown:
      raise ValueError(f"collate: {_where(ex)} has unknown fields "
                       f"{sorted(unknown)}; known: {sorted(known)}")
    missing = [k for k in required if k not in ex]
    if missing:
      raise ValueError(f"collate: {_where(ex)} lacks {missing}")
    present |= keys
  for ex in examples:
    if len(ex) >= len(present) and ex.keys() >= present:
      continue
    absent = present - set(ex)
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
  # Text fields are small: padding first, then every row's values in one
  # masked assignment (row-major order: row by row, as concatenated).
  in_text = np.arange(lt)[None] < txt_lens[:, None]
  in_image = np.arange(li)[None] < num_bbs[:, None]
  lens, nbbs = txt_lens.tolist(), num_bbs.tolist()
  for name, f in by_kind["text"].items():
    if name not in present:
      continue
    dtype, pad = f.default_dtype, f.pad
    tail = np.shape(examples[0][name])[1:]
    _check_tail(f, tail, examples[0], lt, li)
    vals = [np.asarray(ex[name]) for ex in examples]
    for ex, v, t in zip(examples, vals, lens):
      if v.shape != (t,) + tail:
        raise ValueError(f"collate: {_where(ex)} {name} shape {v.shape}, "
                         f"expected {(t,) + tail} like input_ids")
    arr = np.full((b, lt) + tail, pad, dtype)
    if vals:
      arr[in_text] = np.concatenate(vals)
    out[name] = arr
  for name, f in by_kind["image"].items():
    if name not in present:
      continue
    dtype, pad = f.default_dtype, f.pad
    if name == "img_feat":
      dtype = np.dtype(img_feat_dtype)
      if dtype not in f.dtypes:
        raise ValueError(f"collate: img_feat_dtype must be "
                         f"{' or '.join(str(d) for d in f.dtypes)}, got "
                         f"{dtype}")
    elif len(f.dtypes) > 1:
      have = np.asarray(examples[0][name]).dtype
      dtype = have if have in f.dtypes else dtype
    tail = np.shape(examples[0][name])[1:]
    _check_tail(f, tail, examples[0], lt, li)
    vals = [np.asarray(ex[name]) for ex in examples]
    same_dtype = True
    for ex, v, n in zip(examples, vals, nbbs):
      if v.shape != (n,) + tail:
        raise ValueError(f"collate: {_where(ex)} {name} shape {v.shape}, "
                         f"expected {(n,) + tail}")
      same_dtype = same_dtype and v.dtype == dtype
    if (name == "img_feat"
        and _rows_in_buffer(examples, img_feat_buffer, dtype,
                            (b, li) + tail, num_bbs)):
      # The values are there already: only the padding is written.
      arr = img_feat_buffer
      for r, n in enumerate(nbbs):
        if n < li:
          arr[r, n:] = pad
    elif same_dtype and int(np.prod(tail)) <= _SMALL_TAIL:
      # Small per-region fields (boxes, masks, type ids): as text fields.
      arr = np.full((b, li) + tail, pad, dtype)
      if vals:
        arr[in_image] = np.concatenate(vals)
    else:
      arr = _unfilled((b, li) + tail, dtype, pool)
      for r, (v, n) in enumerate(zip(vals, nbbs)):
        if v.dtype == np.float16 and arr.dtype == np.float32:
          # Exact, and much faster than numpy's own fp16 cast.
          sources.fp16_to_fp32(v, out=arr[r, :n],
                               finite=True if fp16_checked else None)
        else:
          arr[r, :n] = v
        if n < li:
          arr[r, n:] = pad
    out[name] = arr
  for name, f in by_kind["row"].items():
    if name in present:
      out[name] = _stack(examples, f, lt, li)
  for name, f in by_kind["example"].items():
    if name in present:
      out[name] = _stack(examples[::rows_per_example], f, lt, li)
  out["position_ids"] = np.broadcast_to(np.arange(lt, dtype=np.int32),
                                        (b, lt)).copy()
  attn = np.zeros((b, lt + li), np.int32)
  attn[:, :lt] = in_text
  attn[:, lt:] = in_image
  out["attn_masks"] = attn
  out["txt_lens"] = txt_lens
  out["num_bbs"] = num_bbs
  return out
