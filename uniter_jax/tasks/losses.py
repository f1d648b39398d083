"""Pretraining losses and metrics with static shapes (float32).

Masked positions are handled in one of two static layouts, both giving the
official per-batch mean exactly:

* **full**: the head predicts every text position (MLM, ``[B, Lt, V]``) or
  every region (MRM, ``[B, Li, ...]``) and the loss masks with
  ``txt_labels != -1`` / ``img_masks``;
* **gathered**: the batch carries ``mlm_positions`` / ``mrm_positions``
  ``[B, P]`` (made by :func:`add_masked_positions`) and ``mlm_valid`` /
  ``mrm_valid``; the model runs its head only at those ``P`` slots, and the
  loss masks with the validity. This is what the official code gains by
  packing the masked rows, without dynamic shapes. It is exact whenever no
  example has more than ``P`` masked positions; ``P`` from
  :func:`max_masked_count` makes an overflow (which would drop the extra
  positions from the loss, reported as ``*_dropped``) negligibly rare.

Official reductions (model/pretrain.py and pretrain.py): MLM cross-entropy
mean over the masked tokens; MRFR squared error mean over masked regions x
feature dims; MRC cross-entropy against ``argmax(soft[1:]) + 1`` (background
is never a target) mean over masked regions; MRC-kl ``KL(soft || softmax)``
elementwise, mean over masked regions x classes; ITM 2-way cross-entropy mean
plus ``itm_ot_lambda`` times the WRA term.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uniter_jax import ot as ot_lib

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")


# ----------------------------------------------------------------------------
# Gathering masked positions to a static maximum.
# ----------------------------------------------------------------------------
def max_masked_count(length: int, prob: float = 0.15,
                     tail: float = 1e-6) -> int:
  """Smallest ``P`` with ``Pr[Binomial(length, prob) > P] <= tail``.

  Use it to size the gathered layout for a bucket: e.g. ``length`` = text
  tokens without CLS/SEP for MLM, or the region count for MRM. At least 1
  (the ops always mask at least one position).
  """
  if length <= 0:
    return 1
  tail_mass = 1.0
  for k in range(length + 1):
    log_pmf = (math.lgamma(length + 1) - math.lgamma(k + 1)
               - math.lgamma(length - k + 1) + k * math.log(prob)
               + (length - k) * math.log1p(-prob))
    tail_mass -= math.exp(log_pmf)
    if tail_mass <= tail:
      return max(k, 1)
  return length


def masked_positions(mask, max_count: int):
  """Indices of the True entries of each row, padded/truncated to ``P``.

  Args:
    mask: [B, L] bool (numpy or jax array).
    max_count: static ``P``.

  Returns:
    ``(positions [B, P] int32, valid [B, P] bool)``. Valid slots hold the
    masked positions in increasing order; invalid slots point at unmasked
    positions (or repeat nothing useful) and must be ignored.
  """
  xp = np if isinstance(mask, np.ndarray) else jnp
  mask = xp.asarray(mask).astype(bool)
  order = xp.argsort(~mask, axis=1, stable=True)[:, :max_count]
  if order.shape[1] < max_count:  # P larger than L: pad with position 0.
    pad = xp.zeros((order.shape[0], max_count - order.shape[1]), order.dtype)
    order = xp.concatenate([order, pad], axis=1)
    valid = xp.take_along_axis(mask, order, axis=1)
    valid = valid & (xp.arange(max_count)[None, :] < mask.shape[1])
  else:
    valid = xp.take_along_axis(mask, order, axis=1)
  return order.astype(xp.int32), valid


def add_masked_positions(batch: Batch, task: str, max_count: int) -> dict:
  """Returns ``batch`` plus the gathered-layout keys for ``task``.

  'mlm' adds ``mlm_positions``/``mlm_valid`` from ``txt_labels != -1``;
  'mrfr', 'mrc', 'mrckl' add ``mrm_positions``/``mrm_valid`` from
  ``img_masks``. Other tasks return the batch unchanged.
  """
  out = dict(batch)
  if task == "mlm":
    pos, valid = masked_positions(_get(batch, "txt_labels", task) != -1,
                                  max_count)
    out["mlm_positions"], out["mlm_valid"] = pos, valid
  elif task in ("mrfr", "mrc", "mrckl"):
    pos, valid = masked_positions(_get(batch, "img_masks", task), max_count)
    out["mrm_positions"], out["mrm_valid"] = pos, valid
  return out


# ----------------------------------------------------------------------------
# Losses on arrays (masked means; valid is [B, P] bool).
# ----------------------------------------------------------------------------
def _count(valid: jax.Array) -> jax.Array:
  return jnp.sum(valid.astype(jnp.float32))


def _masked_mean(values: jax.Array, valid: jax.Array,
                 per_slot: int = 1) -> jax.Array:
  w = valid.astype(jnp.float32)
  return jnp.sum(values * w) / jnp.maximum(_count(valid) * per_slot, 1.0)


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return logz - picked


def mlm_loss(logits, labels, valid):
  """Cross-entropy mean over valid slots, and accuracy. logits [B, P, V]."""
  labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  loss = _masked_mean(_ce(logits, labels), valid)
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  acc = _count(correct) / jnp.maximum(_count(valid), 1.0)
  return loss, acc


def mrfr_loss(pred, target, valid):
  """Squared error mean over valid regions x feature dims. pred [B, R, D]."""
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  sq = jnp.sum(diff * diff, axis=-1)
  return _masked_mean(sq, valid, per_slot=pred.shape[-1])


def mrc_loss(logits, soft, valid):
  """CE against argmax(soft[..., 1:]) + 1 (never background); and accuracy."""
  target = jnp.argmax(soft[..., 1:], axis=-1).astype(jnp.int32) + 1
  loss = _masked_mean(_ce(logits, target), valid)
  # Official validation accuracy: argmax of the non-background scores.
  hit = (jnp.argmax(logits[..., 1:], axis=-1) + 1 == target) & valid
  return loss, _count(hit) / jnp.maximum(_count(valid), 1.0)


def mrckl_loss(logits, soft, valid):
  """KL(soft || softmax(logits)) elementwise, mean over valid x classes."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  soft = soft.astype(jnp.float32)
  pos = soft > 0
  plogp = jnp.where(pos, soft * jnp.log(jnp.where(pos, soft, 1.0)), 0.0)
  kl = jnp.sum(plogp - soft * logp, axis=-1)
  loss = _masked_mean(kl, valid, per_slot=logits.shape[-1])
  hit = (jnp.argmax(logits, axis=-1) == jnp.argmax(soft, axis=-1)) & valid
  return loss, _count(hit) / jnp.maximum(_count(valid), 1.0)


def itm_loss(logits, targets):
  """2-way softmax cross-entropy mean, and accuracy."""
  targets = targets.astype(jnp.int32)
  loss = jnp.mean(_ce(logits, targets))
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
  return loss, acc


# ----------------------------------------------------------------------------
# Task dispatch on the model's output dict.
# ----------------------------------------------------------------------------
def _get(d: Mapping[str, Any], key: str, task: str, what: str = "batch"):
  if key not in d:
    raise KeyError(f"pretrain_loss(task={task!r}): {what} has no '{key}' "
                   f"(has {sorted(d)}).")
  return d[key]


def _select(batch: Batch, task: str, full_key: str, full_mask: jax.Array,
            pos_key: str, valid_key: str, n_slots: int):
  """Targets' gather index and validity for the full or gathered layout.

  Returns ``(positions or None, valid [B, n_slots], dropped)``.
  """
  if pos_key in batch:
    pos = jnp.asarray(batch[pos_key]).astype(jnp.int32)
    valid = jnp.asarray(_get(batch, valid_key, task)).astype(bool)
    if pos.shape[1] != n_slots:
      raise ValueError(f"pretrain_loss(task={task!r}): batch['{pos_key}'] "
                       f"has {pos.shape[1]} slots but the model output has "
                       f"{n_slots}.")
    valid = valid & jnp.take_along_axis(full_mask, pos, axis=1)
    dropped = _count(full_mask) - _count(valid)
    return pos, valid, dropped
  if full_mask.shape[1] != n_slots:
    raise ValueError(
        f"pretrain_loss(task={task!r}): the model output has {n_slots} "
        f"positions but batch['{full_key}'] has {full_mask.shape[1]}; pass "
        f"batch['{pos_key}'] for the gathered layout.")
  return None, full_mask, jnp.zeros((), jnp.float32)


def _take_rows(x, pos):
  """x [B, L, ...] gathered at pos [B, P] along axis 1 (None: unchanged)."""
  x = jnp.asarray(x)
  if pos is None:
    return x
  idx = pos.reshape(pos.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def pretrain_loss(task: str, outputs: Mapping[str, jax.Array], batch: Batch,
                  *, itm_ot_lambda: float = 0.1,
                  ot: ot_lib.OTConfig = ot_lib.OTConfig()
                  ) -> tuple[jax.Array, Metrics]:
  """Loss and metrics of one pretraining task on a batch.

  Args:
    task: 'mlm', 'mrfr', 'mrc', 'mrckl' or 'itm'.
    outputs: the model's output dict (batch_contract.md): ``mlm_logits``,
      ``mrfr_pred``, ``mrc_logits`` or ``itm_logits`` (+ ``txt_output``,
      ``img_output`` for WRA).
    batch: the batch dict (``txt_labels``, ``img_masks``, ``feat_targets``,
      ``label_targets``, ``targets``, ``attn_masks`` as needed, and the
      gathered-layout keys if the model used them).
    itm_ot_lambda: weight of the WRA term in the ITM loss (0 disables WRA).
    ot: WRA solver settings.

  Returns:
    ``(loss, metrics)``, float32 scalars. Metrics follow the official
    logging: ``{task}_loss`` always; ``mlm_acc``; ``itm_xe``, ``itm_acc``,
    ``itm_ot``, ``itm_ot_pos``, ``itm_ot_neg`` (mean distances of matched
    and mismatched pairs), ``mrc_acc`` / ``mrckl_acc``; ``n_masked`` and
    ``{task}_dropped`` for the masked tasks.
  """
  if task == "mlm":
    logits = _get(outputs, "mlm_logits", task, "outputs")
    labels_full = jnp.asarray(_get(batch, "txt_labels", task))
    pos, valid, dropped = _select(batch, task, "txt_labels",
                                  labels_full != -1, "mlm_positions",
                                  "mlm_valid", logits.shape[1])
    loss, acc = mlm_loss(logits, _take_rows(labels_full, pos), valid)
    return loss, {"mlm_loss": loss, "mlm_acc": acc, "n_masked": _count(valid),
                  "mlm_dropped": dropped}

  if task in ("mrfr", "mrc", "mrckl"):
    out_key = "mrfr_pred" if task == "mrfr" else "mrc_logits"
    tgt_key = "feat_targets" if task == "mrfr" else "label_targets"
    pred = _get(outputs, out_key, task, "outputs")
    masks = jnp.asarray(_get(batch, "img_masks", task)).astype(bool)
    pos, valid, dropped = _select(batch, task, "img_masks", masks,
                                  "mrm_positions", "mrm_valid",
                                  pred.shape[1])
    target = _take_rows(_get(batch, tgt_key, task), pos)
    metrics = {"n_masked": _count(valid), f"{task}_dropped": dropped}
    if task == "mrfr":
      loss = mrfr_loss(pred, target, valid)
    elif task == "mrc":
      loss, metrics["mrc_acc"] = mrc_loss(pred, target, valid)
    else:
      loss, metrics["mrckl_acc"] = mrckl_loss(pred, target, valid)
    metrics[f"{task}_loss"] = loss
    return loss, metrics

  if task == "itm":
    logits = _get(outputs, "itm_logits", task, "outputs")
    targets = jnp.asarray(_get(batch, "targets", task)).astype(jnp.int32)
    xe, acc = itm_loss(logits, targets)
    metrics = {"itm_xe": xe, "itm_acc": acc}
    loss = xe
    if itm_ot_lambda > 0:
      txt = _get(outputs, "txt_output", task, "outputs")
      img = _get(outputs, "img_output", task, "outputs")
      attn = jnp.asarray(_get(batch, "attn_masks", task))
      lt = txt.shape[1]
      if attn.shape[1] != lt + img.shape[1]:
        raise ValueError(
            f"pretrain_loss(task='itm'): attn_masks has {attn.shape[1]} "
            f"columns, expected Lt + Li = {lt} + {img.shape[1]}.")
      dist = ot_lib.wra_distance(txt, img, attn[:, :lt] > 0, attn[:, lt:] > 0,
                                 ot)
      ot_loss = ot_lib.wra_loss(dist, targets)
      is_pos = (targets == 1).astype(jnp.float32)
      n_pos, n_neg = jnp.sum(is_pos), jnp.sum(1.0 - is_pos)
      metrics["itm_ot"] = ot_loss
      metrics["itm_ot_pos"] = jnp.sum(dist * is_pos) / jnp.maximum(n_pos, 1.)
      metrics["itm_ot_neg"] = (jnp.sum(dist * (1.0 - is_pos))
                               / jnp.maximum(n_neg, 1.0))
      loss = xe + itm_ot_lambda * ot_loss
    metrics["itm_loss"] = loss
    return loss, metrics

  raise ValueError(f"pretrain_loss: unknown task {task!r}; expected one of "
                   f"{TASKS}.")
