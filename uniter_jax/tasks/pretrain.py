"""The five pretraining objectives as tasks: MLM, MRFR, MRC, MRC-kl, ITM.

Each trains the `pretrain` head (or `pretrain-vcr`, the second-stage VCR
model with the same heads) under conditional masking: the per-example ops
of `masking` mask one modality, a batch op adds the fixed-size index arrays
of the masked positions (so the heads run only there, with static shapes),
and `loss` reduces as the official code does (see `losses`). ITM adds the
word-region alignment term (`uniter_jax.ot`) weighted by `itm_ot_lambda`.

Options come from the run config (`from_config`): `train.mlm_prob`,
`train.mrm_prob`, `train.itm_neg_prob`, `train.itm_ot_lambda`, `train.ot`
and the task's `train.loss_weights` entry.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from uniter_jax import ot as ot_lib
from uniter_jax.data import contract
from uniter_jax.tasks import losses
from uniter_jax.tasks import masking
from uniter_jax.tasks.base import loss_weight_of, register_task, Task

_FIELDS = {f.name: f for f in contract.PRETRAIN_FIELDS}


def _fields(*names: str) -> tuple[contract.Field, ...]:
  return tuple(_FIELDS[n] for n in names)


class PretrainTask(Task):
  """Shared options and data settings of the pretraining tasks."""

  heads = ("pretrain", "pretrain-vcr")
  masked_metrics: tuple[str, ...] = ()

  def __init__(self, *, loss_weight: float = 1.0,
               mlm_prob: float = masking.MLM_PROB,
               mrm_prob: float = masking.MRM_PROB,
               itm_neg_prob: float = masking.ITM_NEG_PROB):
    super().__init__(loss_weight=loss_weight)
    self.mlm_prob = float(mlm_prob)
    self.mrm_prob = float(mrm_prob)
    self.itm_neg_prob = float(itm_neg_prob)

  @classmethod
  def _options(cls, config) -> dict[str, Any]:
    t = config.train
    return {"loss_weight": loss_weight_of(config, cls.name),
            "mlm_prob": t.mlm_prob, "mrm_prob": t.mrm_prob,
            "itm_neg_prob": t.itm_neg_prob}

  @classmethod
  def from_config(cls, config) -> "PretrainTask":
    return cls(**cls._options(config))

  def op_params(self) -> dict[str, Any]:
    # Every pretraining task hands the ops all three rates (they are part
    # of the data fingerprint that a resumed run checks).
    return {"mlm_prob": self.mlm_prob, "mrm_prob": self.mrm_prob,
            "itm_neg_prob": self.itm_neg_prob}

  @property
  def metric_weights(self) -> Mapping[str, str]:  # type: ignore[override]
    return {m: "n_masked" for m in self.masked_metrics}

  @property
  def hidden_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
    return ("n_masked", f"{self.name}_dropped") if self.masked_metrics else ()


@register_task
class MLM(PretrainTask):
  """Masked language modelling conditioned on the whole image."""

  name = "mlm"
  head_output = "mlm"
  fields = _fields("txt_labels", "mlm_positions", "mlm_valid")
  masked_metrics = ("mlm_loss", "mlm_acc")

  def data_ops(self):
    return {self.name: masking.mlm_op}

  def batch_ops(self):
    return (self.add_positions,)

  def add_positions(self, batch: dict) -> dict:
    """Adds `mlm_positions`/`mlm_valid` [B, P] from `txt_labels != -1`,
    P sized for the batch's text slots (`losses.max_masked_count`)."""
    lt = batch["input_ids"].shape[1]
    p = losses.max_masked_count(max(lt - 2, 1), self.mlm_prob)
    out = dict(batch)
    out["mlm_positions"], out["mlm_valid"] = losses.masked_positions(
        np.asarray(batch["txt_labels"]) != -1, p)
    return out

  def loss(self, outputs, batch):
    logits = losses.get(outputs, "mlm_logits", self.name, "outputs")
    labels_full = jnp.asarray(losses.get(batch, "txt_labels", self.name))
    pos, valid, dropped = losses.select(
        batch, self.name, "txt_labels", labels_full != -1, "mlm_positions",
        "mlm_valid", logits.shape[1])
    loss, acc = losses.mlm_loss(logits, losses.take_rows(labels_full, pos),
                                valid)
    return loss, {"mlm_loss": loss, "mlm_acc": acc,
                  "n_masked": losses.count(valid), "mlm_dropped": dropped}


class _RegionTask(PretrainTask):
  """Shared masking, positions and loss plumbing of MRFR, MRC and MRC-kl."""

  out_key = ""
  target_key = ""

  def data_ops(self):
    return {self.name: masking.mrm_op}

  def batch_ops(self):
    return (self.add_positions,)

  def add_positions(self, batch: dict) -> dict:
    """Adds `mrm_positions`/`mrm_valid` [B, P] from `img_masks`, P sized
    for the batch's region slots."""
    li = batch["img_feat"].shape[1]
    p = losses.max_masked_count(li, self.mrm_prob)
    out = dict(batch)
    out["mrm_positions"], out["mrm_valid"] = losses.masked_positions(
        np.asarray(batch["img_masks"]).astype(bool), p)
    return out

  def region_loss(self, pred, target, valid):
    """`(loss, accuracy or None)` on the masked regions."""
    raise NotImplementedError

  def loss(self, outputs, batch):
    pred = losses.get(outputs, self.out_key, self.name, "outputs")
    masks = jnp.asarray(losses.get(batch, "img_masks", self.name)
                        ).astype(bool)
    pos, valid, dropped = losses.select(batch, self.name, "img_masks", masks,
                                        "mrm_positions", "mrm_valid",
                                        pred.shape[1])
    gathered = "mrm_" + self.target_key   # already at mrm_positions
    target = (jnp.asarray(batch[gathered]) if gathered in batch and
              pos is not None else
              losses.take_rows(losses.get(batch, self.target_key, self.name),
                               pos))
    metrics = {"n_masked": losses.count(valid),
               f"{self.name}_dropped": dropped}
    loss, acc = self.region_loss(pred, target, valid)
    if acc is not None:
      metrics[f"{self.name}_acc"] = acc
    metrics[f"{self.name}_loss"] = loss
    return loss, metrics


def zero_masked_regions(batch: dict) -> dict:
  """Zeroes the masked rows of the batch's `img_feat`, in place (the
  region tasks' ops leave the features as read, in the batch's rows)."""
  np.asarray(batch["img_feat"])[np.asarray(batch["img_masks"], bool)] = 0
  return batch


@register_task
class MRFR(_RegionTask):
  """Masked region feature regression (L2 to the original features)."""

  name = "mrfr"
  head_output = "mrfr"
  out_key = "mrfr_pred"
  target_key = "feat_targets"
  # The targets come gathered (`mrm_feat_targets` [B, P, D], the masked
  # rows only, as the official loader's), not as a [B, Li, D] copy of the
  # features.
  fields = _fields("img_masks", "mrm_feat_targets", "mrm_positions",
                   "mrm_valid")
  masked_metrics = ("mrfr_loss",)

  def data_ops(self):
    return {self.name: masking.mrfr_op}

  def batch_ops(self):
    return (self.add_positions, self.gather_targets)

  def gather_targets(self, batch: dict) -> dict:
    """`mrm_feat_targets` [B, P, D] float32: the original features at
    `mrm_positions`; then the masked rows of `img_feat` are zeroed, in the
    batch itself (the values `mrm_op` gives, without a copy per example)."""
    out = dict(batch)
    # A plain ndarray view: the batch may live in shared memory (an input
    # worker's pool), and a gather from that array type would claim to.
    feat = np.asarray(batch["img_feat"])
    rows = np.arange(feat.shape[0])[:, None]
    out["mrm_feat_targets"] = feat[rows, batch["mrm_positions"]].astype(
        np.float32)
    return zero_masked_regions(out)

  def region_loss(self, pred, target, valid):
    return losses.mrfr_loss(pred, target, valid), None


@register_task
class MRC(_RegionTask):
  """Masked region classification against the detector's top class."""

  name = "mrc"
  head_output = "mrc"
  out_key = "mrc_logits"
  target_key = "label_targets"
  with_soft_labels = True
  # Only what the loss reads: the masked regions' soft labels, gathered
  # (`mrm_label_targets` [B, P, 1601]); no [B, Li, >= 1601] arrays.
  fields = _fields("img_masks", "mrm_label_targets", "mrm_positions",
                   "mrm_valid")
  masked_metrics = ("mrc_loss", "mrc_acc")

  def data_ops(self):
    return {self.name: masking.mrc_op}

  def batch_ops(self):
    return (self.add_positions, zero_masked_regions)

  def region_loss(self, pred, target, valid):
    return losses.mrc_loss(pred, target, valid)


@register_task
class MRCKL(MRC):
  """Masked region classification with KL to the detector distribution."""

  name = "mrckl"
  head_output = "mrckl"
  masked_metrics = ("mrckl_loss", "mrckl_acc")

  def region_loss(self, pred, target, valid):
    return losses.mrckl_loss(pred, target, valid)


@register_task
class ITM(PretrainTask):
  """Image-text matching, plus word-region alignment by optimal transport."""

  name = "itm"
  head_output = "itm"
  fields = _fields("targets")

  def __init__(self, *, itm_ot_lambda: float = 0.1,
               ot: ot_lib.OTConfig = ot_lib.OTConfig(), **kwargs):
    super().__init__(**kwargs)
    self.itm_ot_lambda = float(itm_ot_lambda)
    self.ot = ot

  @classmethod
  def from_config(cls, config) -> "ITM":
    t = config.train
    return cls(itm_ot_lambda=t.itm_ot_lambda,
               ot=ot_lib.OTConfig(solver=t.ot.solver, epsilon=t.ot.epsilon,
                                  num_iters=t.ot.num_iters),
               **cls._options(config))

  def data_ops(self):
    return {self.name: masking.itm_op}

  def loss(self, outputs, batch):
    logits = losses.get(outputs, "itm_logits", self.name, "outputs")
    targets = jnp.asarray(losses.get(batch, "targets", self.name)
                          ).astype(jnp.int32)
    xe, acc = losses.itm_loss(logits, targets)
    metrics = {"itm_xe": xe, "itm_acc": acc}
    loss = xe
    if self.itm_ot_lambda > 0:
      txt = losses.get(outputs, "txt_output", self.name, "outputs")
      img = losses.get(outputs, "img_output", self.name, "outputs")
      attn = jnp.asarray(losses.get(batch, "attn_masks", self.name))
      lt = txt.shape[1]
      if attn.shape[1] != lt + img.shape[1]:
        raise ValueError(
            f"task 'itm': attn_masks has {attn.shape[1]} columns, expected "
            f"Lt + Li = {lt} + {img.shape[1]}.")
      dist = ot_lib.wra_distance(txt, img, attn[:, :lt] > 0, attn[:, lt:] > 0,
                                 self.ot)
      ot_loss = ot_lib.wra_loss(dist, targets)
      is_pos = (targets == 1).astype(jnp.float32)
      n_pos, n_neg = jnp.sum(is_pos), jnp.sum(1.0 - is_pos)
      metrics["itm_ot"] = ot_loss
      metrics["itm_ot_pos"] = jnp.sum(dist * is_pos) / jnp.maximum(n_pos, 1.)
      metrics["itm_ot_neg"] = (jnp.sum(dist * (1.0 - is_pos))
                               / jnp.maximum(n_neg, 1.0))
      loss = xe + self.itm_ot_lambda * ot_loss
    metrics["itm_loss"] = loss
    return loss, metrics
