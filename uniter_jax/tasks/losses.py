"""Pretraining losses and metrics on arrays, with static shapes (float32).

The tasks in `uniter_jax.tasks.pretrain` call these on the model's outputs.

Masked positions are handled in one of two static layouts, both giving the
official per-batch mean exactly:

* **full**: the head predicts every text position (MLM, ``[B, Lt, V]``) or
  every region (MRM, ``[B, Li, ...]``) and the loss masks with
  ``txt_labels != -1`` / ``img_masks``;
* **gathered**: the batch carries ``mlm_positions`` / ``mrm_positions``
  ``[B, P]`` (made by :func:`masked_positions` in the tasks' batch ops) and ``mlm_valid`` /
  ``mrm_valid``; the model runs its head only at those ``P`` slots, and the
  loss masks with the validity. This is what the official code gains by
  packing the masked rows, without dynamic shapes. It is exact whenever no
  example has more than ``P`` masked positions; ``P`` from
  :func:`max_masked_count` makes an overflow (which would drop the extra
  positions from the loss, reported as ``*_dropped``) negligibly rare.

Official reductions (the official model and training code): MLM cross-entropy
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


Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


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


# ----------------------------------------------------------------------------
# Losses on arrays (masked means; valid is [B, P] bool).
# ----------------------------------------------------------------------------
def count(valid: jax.Array) -> jax.Array:
  return jnp.sum(valid.astype(jnp.float32))


def _masked_mean(values: jax.Array, valid: jax.Array,
                 per_slot: int = 1) -> jax.Array:
  w = valid.astype(jnp.float32)
  return jnp.sum(values * w) / jnp.maximum(count(valid) * per_slot, 1.0)


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
  acc = count(correct) / jnp.maximum(count(valid), 1.0)
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
  return loss, count(hit) / jnp.maximum(count(valid), 1.0)


def mrckl_loss(logits, soft, valid):
  """KL(soft || softmax(logits)) elementwise, mean over valid x classes."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  soft = soft.astype(jnp.float32)
  pos = soft > 0
  plogp = jnp.where(pos, soft * jnp.log(jnp.where(pos, soft, 1.0)), 0.0)
  kl = jnp.sum(plogp - soft * logp, axis=-1)
  loss = _masked_mean(kl, valid, per_slot=logits.shape[-1])
  hit = (jnp.argmax(logits, axis=-1) == jnp.argmax(soft, axis=-1)) & valid
  return loss, count(hit) / jnp.maximum(count(valid), 1.0)


def itm_loss(logits, targets):
  """2-way softmax cross-entropy mean, and accuracy."""
  targets = targets.astype(jnp.int32)
  loss = jnp.mean(_ce(logits, targets))
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
  return loss, acc


# ----------------------------------------------------------------------------
# Reading the model's outputs and the batch in either layout.
# ----------------------------------------------------------------------------
def get(d: Mapping[str, Any], key: str, task: str, what: str = "batch"):
  """`d[key]`, or a KeyError naming the task, the dict and what it has."""
  if key not in d:
    raise KeyError(f"task {task!r}: {what} has no '{key}' (has "
                   f"{sorted(d)}).")
  return d[key]


def select(batch: Batch, task: str, full_key: str, full_mask: jax.Array,
            pos_key: str, valid_key: str, n_slots: int):
  """Targets' gather index and validity for the full or gathered layout.

  Returns ``(positions or None, valid [B, n_slots], dropped)``.
  """
  if pos_key in batch:
    pos = jnp.asarray(batch[pos_key]).astype(jnp.int32)
    valid = jnp.asarray(get(batch, valid_key, task)).astype(bool)
    if pos.shape[1] != n_slots:
      raise ValueError(f"task {task!r}: batch['{pos_key}'] "
                       f"has {pos.shape[1]} slots but the model output has "
                       f"{n_slots}.")
    valid = valid & jnp.take_along_axis(full_mask, pos, axis=1)
    dropped = count(full_mask) - count(valid)
    return pos, valid, dropped
  if full_mask.shape[1] != n_slots:
    raise ValueError(
        f"task {task!r}: the model output has {n_slots} "
        f"positions but batch['{full_key}'] has {full_mask.shape[1]}; pass "
        f"batch['{pos_key}'] for the gathered layout.")
  return None, full_mask, jnp.zeros((), jnp.float32)


def take_rows(x, pos):
  """x [B, L, ...] gathered at pos [B, P] along axis 1 (None: unchanged)."""
  x = jnp.asarray(x)
  if pos is None:
    return x
  idx = pos.reshape(pos.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)
