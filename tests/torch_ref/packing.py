"""Conversion between the project's static batch layout and official batches.

Static layout (docs/model.md, "The static batch"): each row is
``[CLS text SEP pad.. (Lt) | regions pad.. (Li)]`` with one ``attn_masks``
of width ``Lt + Li``. The official collate functions instead trim text to the
longest text of the batch (``max_tl``) and regions to ``max_nbb``, and the
model packs each row as ``[text_i | regions_i | pad]`` with ``gather_index``
(``data/data.py: get_gather_index``); ``attn_masks`` then has width
``max_i(tl_i + nbb_i)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

# Fields of the static batch that are [B, Lt, ...] (text) or [B, Li, ...]
# (regions), with the dtype of the official batch.
_TEXT_FIELDS = {"input_ids": torch.long, "txt_type_ids": torch.long,
                "txt_labels": torch.long}
_IMG_FIELDS = {"img_feat": torch.float32, "img_pos_feat": torch.float32,
               "img_type_ids": torch.long, "img_masks": torch.bool}


def _t(x: Any) -> torch.Tensor:
  if isinstance(x, torch.Tensor):
    return x
  return torch.as_tensor(np.asarray(x))


def _ints(x: Any) -> list[int]:
  return [int(v) for v in _t(x).reshape(-1).tolist()]


def lengths_from_static(batch: Mapping[str, Any]) -> tuple[list[int], list[int]]:
  """``(txt_lens, num_bbs)``: the batch's own fields, else from attn_masks.

  When both are present they must agree with ``attn_masks``; a mismatch
  raises ValueError naming the row.
  """
  lt = _t(batch["input_ids"]).shape[1]
  masks = _t(batch["attn_masks"]) if "attn_masks" in batch else None
  if "txt_lens" in batch and "num_bbs" in batch:
    txt_lens, num_bbs = _ints(batch["txt_lens"]), _ints(batch["num_bbs"])
  elif masks is not None:
    txt_lens = _ints(masks[:, :lt].sum(1))
    num_bbs = _ints(masks[:, lt:].sum(1))
  else:
    raise ValueError("static batch needs txt_lens and num_bbs, or attn_masks")
  if masks is not None:
    li = masks.shape[1] - lt
    expect = torch.zeros_like(masks, dtype=torch.long)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
      expect[i, :tl] = 1
      expect[i, lt:lt + nbb] = 1
    bad = [i for i in range(masks.shape[0])
           if not torch.equal(expect[i], masks[i].long())]
    if bad or any(tl > lt for tl in txt_lens) or any(n > li for n in num_bbs):
      raise ValueError(
          f"static batch: attn_masks rows {bad} do not match txt_lens "
          f"{txt_lens} / num_bbs {num_bbs} in the [text (Lt={lt}) | regions "
          f"(Li={li})] layout")
  return txt_lens, num_bbs


def gather_index(txt_lens: Sequence[int], num_bbs: Sequence[int],
                 max_tl: int, out_size: int) -> torch.Tensor:
  """Official packing index into ``cat([text (max_tl) | regions])``."""
  index = torch.arange(out_size, dtype=torch.long).repeat(len(txt_lens), 1)
  for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
    index[i, tl:tl + nbb] = torch.arange(max_tl, max_tl + nbb)
  return index


def static_to_packed(batch: Mapping[str, Any], trim: bool = True
                     ) -> dict[str, Any]:
  """A static-layout batch (numpy or torch) as an official batch (torch).

  Args:
    batch: fields of the static batch (docs/model.md).
      ``txt_lens``/``num_bbs`` are read from the batch or from
      ``attn_masks``.
    trim: True (official collate): text cut to ``max(txt_lens)``, regions to
      ``max(num_bbs)``, ``attn_masks``/``gather_index`` of width
      ``max(tl + nbb)``. False: keep the static ``Lt``/``Li`` and width
      ``Lt + Li`` (more padding; the outputs at valid positions must not
      change).

  Returns:
    input_ids, position_ids [1, max_tl], img_feat, img_pos_feat, attn_masks,
    gather_index, txt_lens and num_bbs (lists), and when present in the static
    batch: txt_type_ids, img_type_ids, img_masks, txt_labels, targets, plus
    img_mask_tgt [B, width] (img_masks in packed positions), feat_targets /
    label_targets as rows of the masked regions [N, D] (row-major), and
    obj_masks [B, max(num_bbs)] (True where no region) for RE.
  """
  txt_lens, num_bbs = lengths_from_static(batch)
  lt = _t(batch["input_ids"]).shape[1]
  li = _t(batch["img_feat"]).shape[1]
  bsz = len(txt_lens)
  if trim:
    max_tl, max_nbb = max(txt_lens), max(num_bbs)
    width = max(tl + nbb for tl, nbb in zip(txt_lens, num_bbs))
  else:
    max_tl, max_nbb, width = lt, li, lt + li

  out: dict[str, Any] = {"txt_lens": txt_lens, "num_bbs": num_bbs}
  for key, dtype in _TEXT_FIELDS.items():
    if key in batch:
      out[key] = _t(batch[key])[:, :max_tl].to(dtype)
  for key, dtype in _IMG_FIELDS.items():
    if key in batch:
      out[key] = _t(batch[key])[:, :max_nbb].to(dtype)
  out["position_ids"] = torch.arange(max_tl, dtype=torch.long)[None]
  attn = torch.zeros(bsz, width, dtype=torch.long)
  for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
    attn[i, :tl + nbb] = 1
  out["attn_masks"] = attn
  out["gather_index"] = gather_index(txt_lens, num_bbs, max_tl, width)

  if "img_masks" in batch:
    img_masks = _t(batch["img_masks"]).bool()
    tgt = torch.zeros(bsz, width, dtype=torch.bool)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
      tgt[i, tl:tl + nbb] = img_masks[i, :nbb]
    out["img_mask_tgt"] = tgt
    valid = torch.zeros_like(img_masks)
    for i, nbb in enumerate(num_bbs):
      valid[i, :nbb] = True
    sel = img_masks & valid
    for key in ("feat_targets", "label_targets"):
      if key in batch:
        out[key] = _t(batch[key]).float()[sel]
  if "targets" in batch:
    out["targets"] = _t(batch["targets"])
    if not out["targets"].is_floating_point():
      out["targets"] = out["targets"].long()
  obj = torch.ones(bsz, max(num_bbs), dtype=torch.bool)
  for i, nbb in enumerate(num_bbs):
    obj[i, :nbb] = False
  out["obj_masks"] = obj
  return out


def pack_static_sequence(x: torch.Tensor, txt_lens: Sequence[int],
                         num_bbs: Sequence[int], lt: int,
                         width: int | None = None) -> torch.Tensor:
  """Static ``[B, Lt + Li, ...]`` -> packed ``[B, width, ...]``, zero padding.

  ``width`` defaults to ``max(tl + nbb)``. Inverse of :func:`packed_to_static`
  at valid positions.
  """
  x = _t(x)
  if width is None:
    width = max(int(t) + int(n) for t, n in zip(txt_lens, num_bbs))
  out = x.new_zeros((x.shape[0], width) + tuple(x.shape[2:]))
  for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
    tl, nbb = int(tl), int(nbb)
    out[i, :tl] = x[i, :tl]
    out[i, tl:tl + nbb] = x[i, lt:lt + nbb]
  return out


def packed_to_static(seq_out: torch.Tensor, txt_lens: Sequence[int],
                     num_bbs: Sequence[int], lt: int, li: int) -> torch.Tensor:
  """Packed ``[B, width, ...]`` -> static ``[B, Lt + Li, ...]``, zeros at
  padding: text of row i at ``0..tl_i-1``, its regions at ``Lt..Lt+nbb_i-1``.
  """
  seq_out = _t(seq_out)
  txt_lens, num_bbs = _ints(txt_lens), _ints(num_bbs)
  if max(txt_lens) > lt or max(num_bbs) > li:
    raise ValueError(f"packed_to_static: lengths exceed Lt={lt} / Li={li} "
                     f"(txt_lens {txt_lens}, num_bbs {num_bbs})")
  out = seq_out.new_zeros((seq_out.shape[0], lt + li)
                          + tuple(seq_out.shape[2:]))
  for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
    out[i, :tl] = seq_out[i, :tl]
    out[i, lt:lt + nbb] = seq_out[i, tl:tl + nbb]
  return out


def static_valid_mask(txt_lens: Sequence[int], num_bbs: Sequence[int],
                      lt: int, li: int) -> torch.Tensor:
  """Bool [B, Lt + Li]: True at real text tokens and real regions."""
  mask = torch.zeros(len(txt_lens), lt + li, dtype=torch.bool)
  for i, (tl, nbb) in enumerate(zip(_ints(txt_lens), _ints(num_bbs))):
    mask[i, :tl] = True
    mask[i, lt:lt + nbb] = True
  return mask


def random_static_batch(seed: int, txt_lens: Sequence[int],
                        num_bbs: Sequence[int], lt: int, li: int,
                        vocab_size: int, img_dim: int = 2048,
                        pretrain: bool = False,
                        img_label_dim: int = 1601) -> dict[str, np.ndarray]:
  """A random batch in the static layout (numpy), padded as docs/model.md says.

  With ``pretrain``: also txt_labels (about a third of the real tokens,
  at least one per row), img_masks (at least one real region per row, the
  masked features zeroed as the official collate does), feat_targets,
  label_targets (soft labels summing to 1) and ITM targets.
  """
  rng = np.random.default_rng(seed)
  bsz = len(txt_lens)
  if max(txt_lens) > lt or max(num_bbs) > li:
    raise ValueError("random_static_batch: lengths exceed Lt/Li")
  tmask = np.arange(lt)[None] < np.asarray(txt_lens)[:, None]
  imask = np.arange(li)[None] < np.asarray(num_bbs)[:, None]
  batch = {
      "input_ids": np.where(tmask, rng.integers(1, vocab_size, (bsz, lt)),
                            0).astype(np.int32),
      "position_ids": np.tile(np.arange(lt, dtype=np.int32), (bsz, 1)),
      "img_feat": np.where(imask[..., None],
                           rng.normal(size=(bsz, li, img_dim)),
                           0).astype(np.float32),
      "img_pos_feat": np.where(imask[..., None],
                               rng.uniform(size=(bsz, li, 7)),
                               0).astype(np.float32),
      "attn_masks": np.concatenate([tmask, imask], 1).astype(np.int32),
      "txt_lens": np.asarray(txt_lens, np.int32),
      "num_bbs": np.asarray(num_bbs, np.int32),
  }
  if pretrain:
    sel = tmask & (rng.uniform(size=(bsz, lt)) < 0.35)
    sel[np.arange(bsz), 0] = True
    batch["txt_labels"] = np.where(
        sel, rng.integers(1, vocab_size, (bsz, lt)), -1).astype(np.int32)
    img_masks = imask & (rng.uniform(size=(bsz, li)) < 0.35)
    img_masks[np.arange(bsz), 0] = True
    batch["img_masks"] = img_masks
    batch["feat_targets"] = batch["img_feat"].copy()
    batch["img_feat"] = np.where(img_masks[..., None], 0,
                                 batch["img_feat"]).astype(np.float32)
    logits = rng.normal(size=(bsz, li, img_label_dim))
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    batch["label_targets"] = np.where(imask[..., None], soft,
                                      0).astype(np.float32)
    batch["targets"] = rng.integers(0, 2, bsz).astype(np.int32)
  return batch
