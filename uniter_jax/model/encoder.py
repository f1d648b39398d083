"""The UNITER encoder as pure Flax linen modules.

Module and parameter names follow the official PyTorch module tree
(`model/model.py`, `model/layer.py`), so a PyTorch key such as
``encoder.layer.3.attention.self.query.weight`` is the Flax path
``encoder/layer/3/attention/self/query/kernel`` (transposed). With
``scan_layers`` the layers share one path, ``encoder/layer/...``, with the
layer index as a leading parameter axis.

Sequence layout: ``[CLS text SEP pad.. (Lt) | regions pad.. (Li)]`` with one
attention mask over ``Lt + Li``. There is no gather_index packing: attention
is permutation-equivariant, so outputs at valid positions equal the official
packed layout's (positions are embedded before concatenation).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import ml_collections

from uniter_jax.model import config as config_lib

Array = jax.Array
Batch = Mapping[str, Array]

LN_EPS = 1e-12
# The official additive attention mask value for padded keys.
MASK_VALUE = -10000.0


def dense_init(cfg) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=cfg.initializer_range)


def partitioned(init, axes: tuple[str | None, ...]):
  """Attaches logical axis names to a parameter initializer."""
  return nn.with_logical_partitioning(init, axes)


def compute_dtype(cfg) -> jnp.dtype:
  return jnp.dtype(cfg.dtype)


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, as `model/layer.py: gelu`."""
  return nn.gelu(x, approximate=False)


def dense(features: int, cfg, axes, name: str) -> nn.Dense:
  """A Dense layer whose params sit at `<name>/{kernel,bias}`."""
  return nn.Dense(
      features,
      dtype=compute_dtype(cfg),
      param_dtype=jnp.float32,
      kernel_init=partitioned(dense_init(cfg), axes),
      bias_init=partitioned(nn.initializers.zeros, (axes[1],)),
      name=name,
  )


def layer_norm(cfg, name: str, axis_name: str = "embed") -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=LN_EPS,
      dtype=compute_dtype(cfg),
      param_dtype=jnp.float32,
      scale_init=partitioned(nn.initializers.ones, (axis_name,)),
      bias_init=partitioned(nn.initializers.zeros, (axis_name,)),
      name=name,
  )


def embed(num: int, features: int, cfg, axes, name: str) -> nn.Embed:
  return nn.Embed(
      num,
      features,
      dtype=compute_dtype(cfg),
      param_dtype=jnp.float32,
      embedding_init=partitioned(dense_init(cfg), axes),
      name=name,
  )


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  """Logical sharding constraint on an activation (no-op without a mesh)."""
  return nn.with_logical_constraint(x, axes)


class TextEmbeddings(nn.Module):
  """`UniterTextEmbeddings`: LN(word + position + type) -> dropout."""
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size, cfg,
                                  ("vocab", "embed"), "word_embeddings")
    self.position_embeddings = embed(cfg.max_position_embeddings,
                                      cfg.hidden_size, cfg, (None, "embed"),
                                      "position_embeddings")
    self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.hidden_size,
                                        cfg, (None, "embed"),
                                        "token_type_embeddings")
    self.LayerNorm = layer_norm(cfg, "LayerNorm")  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, input_ids, position_ids, txt_type_ids, *,
               deterministic: bool) -> Array:
    emb = (self.word_embeddings(input_ids) +
           self.position_embeddings(position_ids) +
           self.token_type_embeddings(txt_type_ids))
    emb = self.LayerNorm(emb)
    return self.dropout(emb, deterministic=deterministic)

  def type_embed(self, type_ids: Array) -> Array:
    return self.token_type_embeddings(type_ids)

  def attend(self, hidden: Array) -> Array:
    """Logits against the (tied) word-embedding table."""
    return self.word_embeddings.attend(hidden)


class ImageEmbeddings(nn.Module):
  """`UniterImageEmbeddings`: regions and 7-d boxes to the hidden size."""
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.img_linear = dense(cfg.hidden_size, cfg, ("img_feat", "embed"),
                             "img_linear")
    self.img_layer_norm = layer_norm(cfg, "img_layer_norm")
    self.pos_layer_norm = layer_norm(cfg, "pos_layer_norm")
    self.pos_linear = dense(cfg.hidden_size, cfg, (None, "embed"),
                             "pos_linear")
    # Row 0 is "not masked" and always acts as zero; row 1 is the learned
    # mask embedding added to masked (zeroed) region features.
    self.mask_embedding = self.param(
        "mask_embedding",
        partitioned(dense_init(cfg), (None, "img_feat")),
        (2, cfg.img_dim), jnp.float32)
    self.LayerNorm = layer_norm(cfg, "LayerNorm")  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, img_feat, img_pos_feat, type_emb, img_masks, *,
               deterministic: bool) -> Array:
    dtype = compute_dtype(self.cfg)
    if img_feat.dtype == jnp.float16:
      # Features sent as the stored fp16 (half the host-to-device bytes):
      # widened here, on the device, so that every later value is the one
      # the fp32 batch gives (fp16 -> fp32 is exact).
      img_feat = img_feat.astype(jnp.float32)
    if img_masks is not None:
      mask_row = jnp.asarray(self.mask_embedding)[1].astype(img_feat.dtype)
      img_feat = img_feat + jnp.where(img_masks[..., None].astype(bool),
                                      mask_row, jnp.zeros_like(mask_row))
    emb = (self.img_layer_norm(self.img_linear(img_feat)) +
           self.pos_layer_norm(self.pos_linear(img_pos_feat.astype(dtype))) +
           type_emb)
    emb = self.LayerNorm(emb)
    return self.dropout(emb, deterministic=deterministic)

  def img_linear_kernel(self) -> Array:
    """The `img_linear` kernel [img_dim, H], tied to the MRFR output."""
    return nn.unbox(self.img_linear.variables["params"]["kernel"])


def _check_cudnn(dtype) -> None:
  """attention_impl='cudnn' runs only where cuDNN's fused attention does."""
  backend = jax.default_backend()
  if backend != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU (cuDNN); "
                     f"this run's backend is {backend!r}: use 'fused' or "
                     "'explicit'")
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention_impl='cudnn' computes in bfloat16 or "
                     f"float16 only; the model's dtype gives {jnp.dtype(dtype)}"
                     ": set dtype='bfloat16' or use 'fused'")


class SelfAttention(nn.Module):
  """`BertSelfAttention` (query/key/value projections and attention)."""
  cfg: Any

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, deterministic: bool) -> Array:
    cfg = self.cfg
    n_heads = cfg.num_attention_heads
    d_head = cfg.hidden_size // n_heads
    b, l, _ = x.shape

    def proj(name):
      y = dense(cfg.hidden_size, cfg, ("embed", "qkv"), name)(x)
      y = checkpoint_name(y, f"{name}_proj")
      return y.reshape(b, l, n_heads, d_head)

    q, k, v = proj("query"), proj("key"), proj("value")
    q = constrain(q, ("act_batch", "act_length", "act_heads", "act_kv"))
    k = constrain(k, ("act_batch", "act_length", "act_heads", "act_kv"))
    v = constrain(v, ("act_batch", "act_length", "act_heads", "act_kv"))
    if cfg.attention_impl in ("fused", "cudnn"):
      if not deterministic and cfg.attention_probs_dropout_prob > 0:
        raise ValueError(
            f"attention_impl={cfg.attention_impl!r} has no "
            "attention-probability dropout; set attention_probs_dropout_prob"
            "=0 or use attention_impl='explicit' for training")
      impl = None
      if cfg.attention_impl == "cudnn":
        _check_cudnn(q.dtype)
        impl = "cudnn"
      ctx = jax.nn.dot_product_attention(
          q, k, v, mask=mask[:, None, None, :].astype(bool),
          scale=1.0 / math.sqrt(d_head), implementation=impl)
    else:
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d_head)
      add = (1.0 - mask[:, None, None, :].astype(scores.dtype)) * MASK_VALUE
      probs = jax.nn.softmax((scores + add).astype(jnp.float32), axis=-1)
      probs = nn.Dropout(cfg.attention_probs_dropout_prob)(
          probs, deterministic=deterministic).astype(v.dtype)
      ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return ctx.reshape(b, l, cfg.hidden_size)


class Attention(nn.Module):
  """`BertAttention`: self-attention, then LN(dropout(dense(ctx)) + x)."""
  cfg: Any

  @nn.compact
  def __call__(self, x, mask, *, deterministic):
    cfg = self.cfg
    ctx = SelfAttention(cfg, name="self")(x, mask, deterministic=deterministic)
    return _Output(cfg, ("qkv", "embed"), name="output")(
        ctx, x, deterministic=deterministic)


class _Output(nn.Module):
  """`BertSelfOutput` / `BertOutput`: LN(dropout(dense(h)) + residual)."""
  cfg: Any
  axes: tuple[str, str]

  @nn.compact
  def __call__(self, h, residual, *, deterministic):
    cfg = self.cfg
    h = dense(cfg.hidden_size, cfg, self.axes, "dense")(h)
    h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    return layer_norm(cfg, "LayerNorm")(h + residual)


class _Intermediate(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x):
    h = dense(self.cfg.intermediate_size, self.cfg, ("embed", "mlp"),
               "dense")(x)
    return gelu(h)


class BertLayer(nn.Module):
  """One post-LN transformer layer (`model/layer.py: BertLayer`)."""
  cfg: Any
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    cfg = self.cfg
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    attn = Attention(cfg, name="attention")(
        x, mask, deterministic=self.deterministic)
    h = _Intermediate(cfg, name="intermediate")(attn)
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    out = _Output(cfg, ("mlp", "embed"), name="output")(
        h, attn, deterministic=self.deterministic)
    return constrain(out, ("act_batch", "act_length", "act_embed"))


class _ScanBody(BertLayer):
  """BertLayer with the (carry, broadcast) -> (carry, out) scan signature."""

  def __call__(self, x, mask):  # pytype: disable=signature-mismatch
    return super().__call__(x, mask), None


def remat_policy(name: str):
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "minimal":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name == "save_qkv_proj":
    return jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj")
  raise ValueError(f"unknown remat_policy {name!r}")


class _LayerStack(nn.Module):
  """`encoder.layer.{i}`: a container whose children are named '0'..'L-1'."""
  cfg: Any
  deterministic: bool

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.cfg
    layer_cls = BertLayer
    if cfg.remat_policy != "none":
      layer_cls = nn.remat(BertLayer, policy=remat_policy(cfg.remat_policy))
    for i in range(cfg.num_hidden_layers):
      x = layer_cls(cfg, self.deterministic, name=str(i))(x, mask)
    return x


class Encoder(nn.Module):
  """`UniterEncoder`: a stack of BertLayers, looped or scanned."""
  cfg: Any

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, deterministic: bool) -> Array:
    cfg = self.cfg
    if not cfg.scan_layers:
      return _LayerStack(cfg, deterministic, name="layer")(x, mask)
    body = _ScanBody
    if cfg.remat_policy != "none":
      body = nn.remat(body, policy=remat_policy(cfg.remat_policy),
                      prevent_cse=False)
    scanned = nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,),
        length=cfg.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scanned(cfg, deterministic, name="layer")(x, mask)
    return x


class Pooler(nn.Module):
  """`BertPooler`: tanh(dense(h[:, 0]))."""
  cfg: Any

  @nn.compact
  def __call__(self, seq: Array) -> Array:
    cfg = self.cfg
    return jnp.tanh(dense(cfg.hidden_size, cfg, ("embed", "mlp"),
                           "dense")(seq[:, 0]))


def freeze_config(cfg) -> ml_collections.FrozenConfigDict:
  if isinstance(cfg, ml_collections.FrozenConfigDict):
    return cfg
  if isinstance(cfg, ml_collections.ConfigDict):
    cfg = cfg.to_dict()
  merged = config_lib.base()
  merged.update(dict(cfg))
  config_lib.validate(merged)
  return ml_collections.FrozenConfigDict(merged)


class UniterModel(nn.Module):
  """`UniterModel`: text + image embeddings, encoder, pooler.

  Call with a batch dict (official field names, static layout):
    input_ids [B, Lt], position_ids [B, Lt] or [1, Lt], img_feat [B, Li, D],
    img_pos_feat [B, Li, 7], attn_masks [B, Lt+Li]; optional img_masks
    [B, Li] (bool), txt_type_ids [B, Lt] (default 0), img_type_ids [B, Li]
    (default 1).
  Returns {"sequence_output": [B, Lt+Li, H], "pooled_output": [B, H]}.
  """
  cfg: Any

  def setup(self):
    self.embeddings = TextEmbeddings(self.cfg)
    self.img_embeddings = ImageEmbeddings(self.cfg)
    self.encoder = Encoder(self.cfg)
    self.pooler = Pooler(self.cfg)

  def __call__(self, batch: Batch, *, deterministic: bool = True,
               use_img_masks: bool = True) -> dict[str, Array]:
    input_ids = batch["input_ids"]
    b, lt = input_ids.shape
    img_feat = batch["img_feat"]
    li = img_feat.shape[1]
    attn_masks = batch["attn_masks"]
    if attn_masks.shape != (b, lt + li):
      raise ValueError(
          f"attn_masks has shape {attn_masks.shape}; expected {(b, lt + li)} "
          f"= [batch, Lt + Li] for input_ids {input_ids.shape} and img_feat "
          f"{img_feat.shape}")
    position_ids = batch.get("position_ids")
    if position_ids is None:
      position_ids = jnp.arange(lt, dtype=jnp.int32)[None]
    position_ids = jnp.broadcast_to(position_ids, (b, lt))
    txt_type_ids = batch.get("txt_type_ids")
    if txt_type_ids is None:
      txt_type_ids = jnp.zeros((b, lt), jnp.int32)
    img_type_ids = batch.get("img_type_ids")
    if img_type_ids is None:
      img_type_ids = jnp.ones((b, li), jnp.int32)
    img_masks = batch.get("img_masks") if use_img_masks else None

    txt_emb = self.embeddings(input_ids, position_ids, txt_type_ids,
                              deterministic=deterministic)
    img_emb = self.img_embeddings(
        img_feat.astype(compute_dtype(self.cfg)), batch["img_pos_feat"],
        self.embeddings.type_embed(img_type_ids), img_masks,
        deterministic=deterministic)
    x = jnp.concatenate([txt_emb, img_emb], axis=1)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    seq = self.encoder(x, attn_masks, deterministic=deterministic)
    return {"sequence_output": seq, "pooled_output": self.pooler(seq)}

  def word_logits(self, hidden: Array) -> Array:
    return self.embeddings.attend(hidden)

  def img_linear_kernel(self) -> Array:
    return self.img_embeddings.img_linear_kernel()
