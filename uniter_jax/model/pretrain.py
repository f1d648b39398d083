"""`UniterForPretraining`: the encoder with the MLM, MRFR, MRC and ITM heads.

Parameter structure follows `model/pretrain.py` of the official code:
- ``cls/predictions/{transform/{dense,LayerNorm}, bias}``; the decoder is
  tied to ``uniter/embeddings/word_embeddings`` (no parameter of its own);
- ``feat_regress/{net/0, net/2, bias}``; its projection to the feature size
  is the transpose of ``uniter/img_embeddings/img_linear`` (tied);
- ``region_classifier/net/{0, 2, 3}``;
- ``itm_output``.

Head outputs are computed only where the losses need them when the batch
says where (``mlm_positions`` / ``mrm_positions``, fixed-size index arrays),
which keeps every shape static.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniter_jax.model import encoder as enc
from uniter_jax.model import heads

Array = jax.Array

# What `UniterForPretraining(batch, output)` can compute: one head each
# (MRC and MRC-kl share the region classifier).
OUTPUTS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
# `output` when none is given: every head while initialising (so `init`
# creates all parameters) and for a batch prepared for the masked heads
# (it holds one of MASKING_FIELDS); else only ITM (an inference batch).
DEFAULT_OUTPUT = "default"
DEFAULT_APPLY_OUTPUT = "itm"
MASKING_FIELDS = ("txt_labels", "img_masks", "mlm_positions", "mrm_positions")


class _MLMTransform(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x):
    h = enc.dense(self.cfg.hidden_size, self.cfg, ("embed", "mlp"),
                  "dense")(x)
    return enc.layer_norm(self.cfg, "LayerNorm")(enc.gelu(h))


class _MLMPredictions(nn.Module):
  """`BertLMPredictionHead`: transform, tied decoder, own output bias."""
  cfg: Any

  @nn.compact
  def __call__(self, hidden, word_logits_fn):
    h = _MLMTransform(self.cfg, name="transform")(hidden)
    bias = self.param("bias", enc.partitioned(nn.initializers.zeros,
                                              ("vocab",)),
                      (self.cfg.vocab_size,), jnp.float32)
    return word_logits_fn(h) + jnp.asarray(bias, h.dtype)


class _MLMHead(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, hidden, word_logits_fn):
    return _MLMPredictions(self.cfg, name="predictions")(hidden,
                                                         word_logits_fn)


class _Net(nn.Module):
  """`Sequential(Linear(H->H), GELU, LayerNorm)` as children '0' and '2'."""
  cfg: Any

  @nn.compact
  def __call__(self, x):
    h = enc.dense(self.cfg.hidden_size, self.cfg, ("embed", "mlp"), "0")(x)
    return enc.layer_norm(self.cfg, "2")(enc.gelu(h))


class RegionFeatureRegression(nn.Module):
  """MRFR head: net, then the transpose of `img_linear` plus own bias."""
  cfg: Any

  @nn.compact
  def __call__(self, hidden, img_linear_kernel):
    h = _Net(self.cfg, name="net")(hidden)
    bias = self.param("bias", enc.partitioned(nn.initializers.zeros,
                                              ("img_feat",)),
                      (self.cfg.img_dim,), jnp.float32)
    kernel = jnp.asarray(img_linear_kernel, h.dtype)  # [img_dim, H]
    return h @ kernel.T + jnp.asarray(bias, h.dtype)


class RegionClassification(nn.Module):
  """MRC head: Linear, GELU, LayerNorm, Linear(H -> img_label_dim)."""
  cfg: Any

  @nn.compact
  def __call__(self, hidden):
    return heads.SequentialMLP(self.cfg, self.cfg.hidden_size,
                               self.cfg.img_label_dim, "gelu",
                               name="net")(hidden)


def _gather(x: Array, positions: Array | None) -> Array:
  """x[b, positions[b, p]] for every row; all positions when None."""
  if positions is None:
    return x
  return jnp.take_along_axis(x, positions[..., None].astype(jnp.int32),
                             axis=1)


class UniterForPretraining(nn.Module):
  """UNITER with all pretraining heads.

  `__call__(batch, output)` with `output` in `OUTPUTS` computes that head
  only; None computes every head. Without `output` (`model.apply(
  variables, batch)`, the calling convention of every head) it computes
  what the batch is prepared for: the ITM head for an inference batch
  (image-text matching; the encoder outputs), every head for a batch that
  carries masking (`txt_labels`, `img_masks`, `mlm_positions` or
  `mrm_positions`: the masked heads predict masked inputs), and every head
  while initialising, so that `init` creates all parameters. Returns a dict
  with `sequence_output`, `pooled_output`, `txt_output` [B, Lt, H],
  `img_output` [B, Li, H] and the head's `mlm_logits` / `mrfr_pred` /
  `mrc_logits` / `itm_logits`. The model computes no loss: the losses (and
  the WRA term) belong to the tasks in `uniter_jax.tasks`.
  """
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.uniter = enc.UniterModel(cfg)
    self.cls = _MLMHead(cfg)
    self.feat_regress = RegionFeatureRegression(cfg)
    self.region_classifier = RegionClassification(cfg)
    self.itm_output = enc.dense(2, cfg, ("embed", None), "itm_output")

  def __call__(self, batch, output: str | None = DEFAULT_OUTPUT, *,
               deterministic: bool = True):
    if output == DEFAULT_OUTPUT:
      masked = any(batch.get(k) is not None for k in MASKING_FIELDS)
      output = (None if self.is_initializing() or masked
                else DEFAULT_APPLY_OUTPUT)
    if output is not None and output not in OUTPUTS:
      raise ValueError(f"unknown pretraining head output {output!r}; "
                       f"expected one of {OUTPUTS}")
    use_img_masks = output is None or output in ("mrfr", "mrc", "mrckl")
    out = dict(self.uniter(batch, deterministic=deterministic,
                           use_img_masks=use_img_masks))
    lt = batch["input_ids"].shape[1]
    seq = out["sequence_output"]
    out["txt_output"] = seq[:, :lt]
    out["img_output"] = seq[:, lt:]
    if output in (None, "mlm"):
      h = _gather(out["txt_output"], batch.get("mlm_positions"))
      out["mlm_logits"] = self.cls(h, self.uniter.word_logits)
    if output in (None, "mrfr"):
      h = _gather(out["img_output"], batch.get("mrm_positions"))
      out["mrfr_pred"] = self.feat_regress(h, self.uniter.img_linear_kernel())
    if output is None or output in ("mrc", "mrckl"):
      h = _gather(out["img_output"], batch.get("mrm_positions"))
      out["mrc_logits"] = self.region_classifier(h)
    if output in (None, "itm"):
      out["itm_logits"] = self.itm_output(out["pooled_output"])
    return out
