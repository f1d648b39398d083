"""Downstream-task heads with the official parameter structure.

Every head holds the encoder as ``uniter`` and returns a dict with at least
``sequence_output``, ``pooled_output`` and ``logits`` (the head's raw output,
what the official ``forward(batch, compute_loss=False)`` returns).
Sub-module names mirror the official `nn.Sequential` indices
(``vqa_output/0``, ``vqa_output/2`` ...), so conversion is a name table.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniter_jax.model import encoder as enc

Array = jax.Array


class SequentialMLP(nn.Module):
  """Linear(H->hidden), act, LN(hidden), Linear(hidden->out).

  Named as the official `nn.Sequential`: children '0' (Linear), '2' (LN),
  '3' (Linear); index 1 is the parameter-free activation.
  """
  cfg: Any
  hidden: int
  out: int
  act: str = "gelu"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    h = enc.dense(self.hidden, cfg, ("embed", "mlp"), "0")(x)
    h = enc.gelu(h) if self.act == "gelu" else nn.relu(h)
    h = enc.layer_norm(cfg, "2", "mlp")(h)
    return enc.dense(self.out, cfg, ("mlp", None), "3")(h)


def _base_outputs(uniter: enc.UniterModel, batch, deterministic):
  return dict(uniter(batch, deterministic=deterministic))


class UniterForVisualQuestionAnswering(nn.Module):
  """`model/vqa.py`: MLP on the pooled output to `num_answer` scores."""
  cfg: Any
  num_answer: int = 3129

  def setup(self):
    self.uniter = enc.UniterModel(self.cfg)
    self.vqa_output = SequentialMLP(self.cfg, 2 * self.cfg.hidden_size,
                                    self.num_answer, "gelu")

  def __call__(self, batch, *, deterministic: bool = True):
    out = _base_outputs(self.uniter, batch, deterministic)
    out["logits"] = self.vqa_output(out["pooled_output"])
    return out


class UniterForVisualEntailment(UniterForVisualQuestionAnswering):
  """`model/ve.py`: the VQA head with 3 classes."""
  num_answer: int = 3


class UniterForImageTextRetrieval(nn.Module):
  """`model/itm.py`: `itm_output` (2-way) and `rank_output` (1 score)."""
  cfg: Any

  def setup(self):
    self.uniter = enc.UniterModel(self.cfg)
    self.itm_output = enc.dense(2, self.cfg, ("embed", None), "itm_output")
    self.rank_output = enc.dense(1, self.cfg, ("embed", None), "rank_output")

  def __call__(self, batch, *, deterministic: bool = True):
    out = _base_outputs(self.uniter, batch, deterministic)
    pooled = out["pooled_output"]
    out["itm_logits"] = self.itm_output(pooled)
    out["logits"] = self.rank_output(pooled)
    return out


def init_rank_output(params: dict) -> dict:
  """The official `init_output()`: `rank_output` := row 1 of `itm_output`.

  Works on Flax params of `UniterForImageTextRetrieval` (row 1 is the
  "match" logit; a Flax kernel is [H, out], so it is column 1).
  """
  params = dict(params)
  itm = params["itm_output"]
  params["rank_output"] = {"kernel": itm["kernel"][:, 1:2],
                           "bias": itm["bias"][1:2]}
  return params


class UniterForNlvr2Paired(nn.Module):
  """`model/nlvr2.py` paired: rows (text, img0), (text, img1) per example.

  The batch holds 2N rows; the two pooled vectors of an example are
  concatenated (row 2k then 2k+1) and classified: logits [N, 2].
  """
  cfg: Any

  def setup(self):
    self.uniter = enc.UniterModel(self.cfg)
    self.nlvr2_output = enc.dense(2, self.cfg, ("mlp", None), "nlvr2_output")

  def __call__(self, batch, *, deterministic: bool = True):
    out = _base_outputs(self.uniter, batch, deterministic)
    pooled = out["pooled_output"]
    n2, h = pooled.shape
    if n2 % 2:
      raise ValueError(f"NLVR2 paired needs an even number of rows, got {n2}")
    out["logits"] = self.nlvr2_output(pooled.reshape(n2 // 2, 2 * h))
    return out


class UniterForNlvr2Triplet(nn.Module):
  """`model/nlvr2.py` triplet: one row [text | img0 | img1], pooled -> 2."""
  cfg: Any

  def setup(self):
    self.uniter = enc.UniterModel(self.cfg)
    self.nlvr2_output = enc.dense(2, self.cfg, ("embed", None), "nlvr2_output")

  def __call__(self, batch, *, deterministic: bool = True):
    out = _base_outputs(self.uniter, batch, deterministic)
    out["logits"] = self.nlvr2_output(out["pooled_output"])
    return out


class MultiheadAttention(nn.Module):
  """The multi-head attention of `model/attention.py` (torch's layout).

  Parameters: `in_proj_kernel` [H, 3H] (the transpose of torch's
  `in_proj_weight`, q|k|v blocks), `in_proj_bias` [3H], `out_proj`.
  Keys marked True in `key_padding_mask` are ignored.
  """
  cfg: Any

  @nn.compact
  def __call__(self, query, key, value, key_padding_mask, *, deterministic):
    cfg = self.cfg
    h = cfg.hidden_size
    n_heads = cfg.num_attention_heads
    d = h // n_heads
    dtype = enc.compute_dtype(cfg)
    w = self.param("in_proj_kernel",
                   enc.partitioned(nn.initializers.xavier_uniform(),
                                   ("embed", "qkv")), (h, 3 * h), jnp.float32)
    bias = self.param("in_proj_bias",
                      enc.partitioned(nn.initializers.zeros, ("qkv",)),
                      (3 * h,), jnp.float32)
    w, bias = jnp.asarray(w, dtype), jnp.asarray(bias, dtype)
    q = query.astype(dtype) @ w[:, :h] + bias[:h]
    k = key.astype(dtype) @ w[:, h:2 * h] + bias[h:2 * h]
    v = value.astype(dtype) @ w[:, 2 * h:] + bias[2 * h:]
    b, lq, _ = q.shape
    lk = k.shape[1]
    q = (q * (d ** -0.5)).reshape(b, lq, n_heads, d)
    k = k.reshape(b, lk, n_heads, d)
    v = v.reshape(b, lk, n_heads, d)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = jnp.where(key_padding_mask[:, None, None, :], -jnp.inf, scores)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(
        probs, deterministic=deterministic).astype(dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, h)
    return enc.dense(h, cfg, ("qkv", "embed"), "out_proj")(ctx)


class AttentionPool(nn.Module):
  """`AttentionPool`: relu(Linear(H->1)) scores, masked softmax, sum."""
  cfg: Any

  @nn.compact
  def __call__(self, x, pad_mask, *, deterministic):
    score = nn.relu(_FC0(self.cfg, name="fc")(x))[..., 0].astype(jnp.float32)
    score = score + pad_mask.astype(jnp.float32) * -1e4
    probs = jax.nn.softmax(score, axis=1)
    probs = nn.Dropout(self.cfg.attention_probs_dropout_prob)(
        probs, deterministic=deterministic).astype(x.dtype)
    return jnp.einsum("bt,btd->bd", probs, x)


class _FC0(nn.Module):
  """`nn.Sequential(Linear(H->1), ReLU)`: the Linear is child '0'."""
  cfg: Any

  @nn.compact
  def __call__(self, x):
    return enc.dense(1, self.cfg, ("embed", None), "0")(x)


class _FuseFC(nn.Module):
  """`fc = Sequential(Linear(2H->H), ReLU, Dropout)`."""
  cfg: Any

  @nn.compact
  def __call__(self, x, *, deterministic):
    h = enc.dense(self.cfg.hidden_size, self.cfg, ("mlp", "embed"), "0")(x)
    return nn.Dropout(self.cfg.hidden_dropout_prob)(
        nn.relu(h), deterministic=deterministic)


class UniterForNlvr2PairedAttn(nn.Module):
  """`model/nlvr2.py` paired-attn ("pair-biattn").

  The two rows of an example attend to each other (attn1: left->right,
  attn2: right->left), are fused with their own outputs, attention-pooled
  and concatenated for the 2-way classifier.
  """
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.uniter = enc.UniterModel(cfg)
    self.attn1 = MultiheadAttention(cfg)
    self.attn2 = MultiheadAttention(cfg)
    self.fc = _FuseFC(cfg)
    self.attn_pool = AttentionPool(cfg)
    self.nlvr2_output = enc.dense(2, cfg, ("mlp", None), "nlvr2_output")

  def __call__(self, batch, *, deterministic: bool = True):
    out = _base_outputs(self.uniter, batch, deterministic)
    seq = out["sequence_output"]
    n2, l, h = seq.shape
    if n2 % 2:
      raise ValueError(f"NLVR2 paired-attn needs an even number of rows, "
                       f"got {n2}")
    pair = seq.reshape(n2 // 2, 2, l, h)
    left, right = pair[:, 0], pair[:, 1]
    pad = (batch["attn_masks"] == 0).reshape(n2 // 2, 2, l)
    left_pad, right_pad = pad[:, 0], pad[:, 1]
    l2r = self.attn1(left, right, right, right_pad, deterministic=deterministic)
    r2l = self.attn2(right, left, left, left_pad, deterministic=deterministic)
    left = self.fc(jnp.concatenate([l2r, left.astype(l2r.dtype)], -1),
                   deterministic=deterministic)
    right = self.fc(jnp.concatenate([r2l, right.astype(r2l.dtype)], -1),
                    deterministic=deterministic)
    left = self.attn_pool(left, left_pad, deterministic=deterministic)
    right = self.attn_pool(right, right_pad, deterministic=deterministic)
    out["logits"] = self.nlvr2_output(jnp.concatenate([left, right], -1))
    return out


class UniterForReferringExpressionComprehension(nn.Module):
  """`model/re.py`: one score per region; non-objects get -1e4.

  `batch['obj_masks']` [B, Li] (True = not an object) defaults to the
  padded regions of `attn_masks`. logits: [B, Li].
  """
  cfg: Any
  mlp: int = 1

  @nn.compact
  def __call__(self, batch, *, deterministic: bool = True):
    cfg = self.cfg
    if self.mlp not in (1, 2):
      raise ValueError(f"re mlp must be 1 or 2, got {self.mlp}")
    out = _base_outputs(enc.UniterModel(cfg, name="uniter"), batch,
                        deterministic)
    lt = batch["input_ids"].shape[1]
    img_out = out["sequence_output"][:, lt:]
    if self.mlp == 1:
      scores = enc.dense(1, cfg, ("embed", None), "re_output")(img_out)
    else:
      scores = SequentialMLP(cfg, cfg.hidden_size, 1, "gelu",
                             name="re_output")(img_out)
    scores = scores[..., 0].astype(jnp.float32)
    obj_masks = batch.get("obj_masks")
    if obj_masks is None:
      obj_masks = batch["attn_masks"][:, lt:] == 0
    out["logits"] = jnp.where(obj_masks, -1e4, scores)
    return out


class UniterForVisualCommonsenseReasoning(nn.Module):
  """`model/vcr.py`: MLP (ReLU) on the pooled output to 2 logits."""
  cfg: Any

  def setup(self):
    self.uniter = enc.UniterModel(self.cfg)
    self.vcr_output = SequentialMLP(self.cfg, 2 * self.cfg.hidden_size, 2,
                                    "relu")

  def __call__(self, batch, *, deterministic: bool = True):
    out = _base_outputs(self.uniter, batch, deterministic)
    out["logits"] = self.vcr_output(out["pooled_output"])
    return out
