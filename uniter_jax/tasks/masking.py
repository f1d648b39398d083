"""Per-example pretraining ops: MLM, MRM (MRFR / MRC / MRC-kl) and ITM.

Each op has the data-pipeline hook signature ``op(example, rng, ctx) ->
example``: ``example`` is the per-example dict of the batch contract
(``input_ids`` with [CLS] first and [SEP] last, ``img_feat``, ...), ``rng`` a
``np.random.Generator`` and ``ctx`` the task context (attribute access or a
mapping) with ``cls_id``, ``sep_id``, ``mask_id``, ``v_range`` and
``sample_image(rng, exclude_key)``; optional ``mlm_prob`` (0.15),
``mrm_prob`` (0.15) and ``itm_neg_prob`` (0.5).

The ops are pure: they never modify their input and, given the same example,
generator state and context, return the same output. Masking is conditional
(one modality at a time), as in UNITER: MLM leaves the image whole and MRM
leaves the text whole.

Semantics follow the official data/mlm.py, data/mrm.py and data/itm.py:

* MLM: every token between [CLS] and [SEP] is selected with probability
  0.15; a selected token becomes [MASK] (80%), a uniformly random id from
  ``range(*v_range)`` (10%) or stays (10%). If nothing was selected, the first
  token after [CLS] is selected and replaced by [MASK]. ``txt_labels`` holds
  the original id at selected positions and -1 elsewhere.
* MRM: every region is masked with probability ``mrm_prob``; if none is, one
  uniformly chosen region is. Masked features are zeroed (the model adds the
  mask embedding). ``mrm_op`` does it all per example, with whole
  ``feat_targets`` (the original float32 features) and ``label_targets``
  (the detector soft labels). The built-in tasks use ``mrfr_op`` and
  ``mrc_op``: the same draws, the targets only at the masked positions
  (as the official loader's), and the zeroing left to the task's batch op,
  so no example's features are copied whole.
* ITM: with probability ``itm_neg_prob`` the image is replaced by
  ``ctx.sample_image(rng, exclude_key=example['img_key'])`` (target 0),
  otherwise kept (target 1).

MLM and ITM never read image arrays and are marked so
(``ops.no_image_arrays``): in the input pipeline they may see an example's
image as its key only (a deferred image part), and the pipeline reads
whichever image the example ends up with once, straight into the batch.
ITM moves image parts whole, deferred or not.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from uniter_jax.data import ops as ops_lib
from uniter_jax.tasks import losses

Example = dict[str, Any]

MLM_PROB = 0.15
MRM_PROB = 0.15
ITM_NEG_PROB = 0.5
# Image fields that belong to one image and travel together in ITM (the
# last one: the store index of a deferred image, see `ops.DEFERRED_IMAGE`).
_IMAGE_FIELDS = ("img_feat", "img_pos_feat", "img_soft_labels", "img_key",
                 "img_type_ids", ops_lib.DEFERRED_IMAGE)


_MISSING = object()


def _ctx(ctx: Any, name: str, default: Any = None, required: bool = True):
  """Reads ``name`` from a context given as an object or a mapping."""
  if isinstance(ctx, Mapping):
    if name in ctx:
      return ctx[name]
  else:
    value = getattr(ctx, name, _MISSING)
    if value is not _MISSING:
      return value
  if required and default is None:
    raise KeyError(f"task context: missing '{name}' (needed by the "
                   "pretraining op).")
  return default


def _field(example: Mapping[str, Any], name: str, op: str) -> Any:
  if name not in example:
    raise KeyError(f"{op}: example has no field '{name}' (has "
                   f"{sorted(example)}).")
  return example[name]


@ops_lib.no_image_arrays
def mlm_op(example: Mapping[str, Any], rng: np.random.Generator,
           ctx: Any) -> Example:
  """Masks text tokens for MLM; returns new ``input_ids`` and ``txt_labels``."""
  ids = np.asarray(_field(example, "input_ids", "mlm_op"))
  cls_id, sep_id = _ctx(ctx, "cls_id"), _ctx(ctx, "sep_id")
  mask_id = _ctx(ctx, "mask_id")
  lo, hi = _ctx(ctx, "v_range")
  prob = float(_ctx(ctx, "mlm_prob", MLM_PROB))
  if ids.ndim != 1 or ids.shape[0] < 3:
    raise ValueError("mlm_op: 'input_ids' must be 1-D [CLS] tokens.. [SEP] "
                     f"with at least one token, got shape {ids.shape}.")
  if ids[0] != cls_id or ids[-1] != sep_id:
    raise ValueError(
        f"mlm_op: 'input_ids' must start with [CLS]={cls_id} and end with "
        f"[SEP]={sep_id}, got {ids[0]} ... {ids[-1]}.")
  n = ids.shape[0] - 2
  draw = rng.random(n)
  random_ids = rng.integers(lo, hi, size=n, dtype=np.int32)
  # Only the selected positions (a few) change: visited one by one, which
  # is cheaper than whole-row passes for caption lengths. Inner position k
  # is k + 1 in the row; [CLS] and [SEP] stay.
  new = ids.astype(np.int32)   # a copy
  labels = np.full(n + 2, -1, np.int32)
  selected = np.flatnonzero(draw < prob).tolist()
  for k in selected:
    labels[k + 1] = new[k + 1]
    scaled = draw[k] / prob
    if scaled < 0.8:
      new[k + 1] = mask_id
    elif scaled < 0.9:
      new[k + 1] = random_ids[k]
  if not selected:
    labels[1] = new[1]
    new[1] = mask_id
  out = dict(example)
  out["input_ids"] = new
  out["txt_labels"] = labels
  return out


def mrm_op(example: Mapping[str, Any], rng: np.random.Generator,
           ctx: Any) -> Example:
  """Masks regions with whole targets (for a custom region task; the
  built-in ones use `mrfr_op` / `mrc_op`).

  Adds ``img_masks`` [nb] bool, ``feat_targets`` [nb, D] float32 (original
  features) and, when the example has ``img_soft_labels``, ``label_targets``
  [nb, C] float32; zeroes the masked rows of ``img_feat``.
  """
  return _mask_regions(example, rng, ctx, "mrm_op")


def mrc_op(example: Mapping[str, Any], rng: np.random.Generator,
           ctx: Any) -> Example:
  """MRC / MRC-kl: ``img_masks`` from the same draws as `mrm_op`, and the
  soft labels of the masked regions only, already in the batch's gathered
  layout: ``mrm_label_targets`` [P, C] float32, row j the label of the
  region at the row's j-th `mrm_positions` slot (P from the bucket's region
  slots, `ctx.max_img`, as the task's batch op sizes it; a slot past the
  regions gets zeros, as the padded full layout would give). The features
  are left as they are; the task's batch op zeroes the masked rows in the
  batch. ``img_soft_labels`` is dropped: the batch carries no
  [B, Li, 1601] label array (the official loader keeps only the masked
  rows' labels too)."""
  masks = _draw_region_masks(example, rng, ctx, "mrc_op")
  soft = np.asarray(_field(example, "img_soft_labels", "mrc_op"))
  nb = masks.shape[0]
  if soft.ndim != 2 or soft.shape[0] != nb:
    raise ValueError(f"mrc_op: 'img_soft_labels' has shape {soft.shape}; "
                     f"expected ({nb}, C) for the {nb} regions.")
  li = int(_ctx(ctx, "max_img"))
  slots = losses.max_masked_count(li, float(_ctx(ctx, "mrm_prob", MRM_PROB)))
  row = np.zeros(li, bool)
  row[:nb] = masks
  pos = losses.masked_positions(row[None], slots)[0][0]
  targets = np.zeros((slots, soft.shape[1]), np.float32)
  real = pos < nb
  targets[real] = soft[pos[real]]
  out = dict(example)
  del out["img_soft_labels"]
  out["img_masks"] = masks
  out["mrm_label_targets"] = targets
  return out


def mrfr_op(example: Mapping[str, Any], rng: np.random.Generator,
            ctx: Any) -> Example:
  """MRFR's masks only: ``img_masks`` [nb] bool from the same draws as
  `mrm_op`; the features are left as they are (in the pipeline, the
  image's row of the batch). The task's batch op then gathers the masked
  rows' targets and zeroes those rows in the batch (`tasks.MRFR`), so no
  example's features are copied whole."""
  out = dict(example)
  out["img_masks"] = _draw_region_masks(example, rng, ctx, "mrfr_op")
  return out


def _draw_region_masks(example: Mapping[str, Any], rng: np.random.Generator,
                       ctx: Any, op: str) -> np.ndarray:
  feat = _field(example, "img_feat", op)
  shape = np.shape(feat)
  if len(shape) != 2 or shape[0] == 0:
    raise ValueError(f"{op}: 'img_feat' must be [num_bb >= 1, D], got "
                     f"shape {shape}.")
  prob = float(_ctx(ctx, "mrm_prob", MRM_PROB))
  nb = shape[0]
  masks = rng.random(nb) < prob
  if not masks.any():
    masks[rng.integers(nb)] = True
  return masks


def _mask_regions(example: Mapping[str, Any], rng: np.random.Generator,
                  ctx: Any, op: str) -> Example:
  masks = _draw_region_masks(example, rng, ctx, op)
  feat = np.asarray(example["img_feat"], np.float32)
  nb = feat.shape[0]
  out = dict(example)
  out["img_masks"] = masks
  out["feat_targets"] = feat.copy()
  out["img_feat"] = np.where(masks[:, None], np.float32(0), feat)
  if "img_soft_labels" in example:
    soft = np.asarray(example["img_soft_labels"], np.float32)
    if soft.shape[0] != nb:
      raise ValueError(f"{op}: 'img_soft_labels' has {soft.shape[0]} rows "
                       f"but 'img_feat' has {nb}.")
    out["label_targets"] = soft.copy()
  return out


@ops_lib.no_image_arrays
def itm_op(example: Mapping[str, Any], rng: np.random.Generator,
           ctx: Any) -> Example:
  """Draws the ITM label; for a negative swaps in a different image."""
  prob = float(_ctx(ctx, "itm_neg_prob", ITM_NEG_PROB))
  out = dict(example)
  if rng.random() < prob:
    key = _field(example, "img_key", "itm_op")
    sample_image = _ctx(ctx, "sample_image")
    neg = sample_image(rng, key)
    if neg.get("img_key") == key:
      raise ValueError(f"itm_op: ctx.sample_image returned the true image "
                       f"{key!r} for a negative.")
    for name in _IMAGE_FIELDS:
      out.pop(name, None)
    for name in _IMAGE_FIELDS:
      if name in neg:
        out[name] = neg[name]
    out["targets"] = np.int32(0)
  else:
    out["targets"] = np.int32(1)
  return out
