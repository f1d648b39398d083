"""Pads per-example dicts to a static bucket shape (the batch contract).

Layout per row: `[CLS text SEP pad.. (Lt) | regions pad.. (Li)]`. Fields and
padding values follow the batch contract; optional fields are emitted only
when some example carries them (an op's output must be present in all
examples of a batch or in none).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

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


def _filled(shape, pad, dtype) -> np.ndarray:
  # np.zeros maps zeroed pages lazily: padding that is never written costs
  # nothing, unlike np.full which touches every page.
  if pad == 0:
    return np.zeros(shape, dtype)
  return np.full(shape, pad, dtype)


def _where(example: dict[str, Any]) -> str:
  return f"example {example.get('_id', example.get('_index', '?'))!r}"


def collate(examples: Sequence[dict[str, Any]], bucket: Bucket,
            num_rows: int | None = None) -> dict[str, np.ndarray]:
  """Stacks `examples` into one batch of shape `bucket` (rows: `num_rows`).

  Args:
    examples: per-example dicts (batch contract); `img_key` and
      `_`-prefixed keys are ignored.
    bucket: the static (Lt, Li) shape.
    num_rows: rows of the output (default `len(examples)`); must equal
      `len(examples)`: rows are never invented.

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
  for ex in examples:
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
    arr = _filled((b, lt), pad, dtype)
    for r, ex in enumerate(examples):
      v = np.asarray(ex[name])
      if v.shape != (txt_lens[r],):
        raise ValueError(f"collate: {_where(ex)} {name} shape {v.shape}, "
                         f"expected ({txt_lens[r]},) like input_ids")
      arr[r, :txt_lens[r]] = v
    out[name] = arr
  for name, (dtype, pad) in _IMG.items():
    if name not in fields:
      continue
    tail = np.shape(examples[0][name])[1:]
    arr = _filled((b, li) + tail, pad, dtype)
    for r, ex in enumerate(examples):
      v = np.asarray(ex[name])
      if v.shape != (num_bbs[r],) + tail:
        raise ValueError(f"collate: {_where(ex)} {name} shape {v.shape}, "
                         f"expected {(num_bbs[r],) + tail}")
      arr[r, :num_bbs[r]] = v
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
