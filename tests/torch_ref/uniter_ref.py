"""A compact PyTorch reference of the official UNITER model and its heads.

Written from the facts of the official implementation (ChenRocks/UNITER,
`model/*.py`; listed in docs/model.md, "Official facts the PyTorch reference
is written from") to check the Flax model and the checkpoint converter
against. Two things must hold:

* the computation is the official one in float32: post-LN BERT layers with the
  exact erf GELU, LayerNorm eps 1e-12 (``torch.nn.LayerNorm`` stands in for
  apex ``FusedLayerNorm``), dropout on the attention probabilities, the
  additive ``(1 - mask) * -10000`` attention mask, ``gather_index`` packing of
  ``[text_i | regions_i | pad]``, the pooler on position 0;
* every module has the official attribute name, so ``state_dict()`` keys and
  shapes equal those of the official model for the same head.

Inputs are official ("packed") batches; :mod:`torch_ref.packing` converts the
project's static layout into them. The one addition to the official
behaviour: ``UniterModel.forward`` with both modalities and
``gather_index=None`` concatenates ``[text (Lt) | regions (Li)]`` without
packing (the project's static layout); the official code always packs.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

IMG_DIM = 2048
IMG_LABEL_DIM = 1601
LN_EPS = 1e-12

_CONFIG_DEFAULTS = dict(
    vocab_size=28996,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    initializer_range=0.02,
)


class UniterConfig:
  """The official model config: the fields of `config/uniter-base.json`.

  Attributes are set from keyword arguments on top of the base defaults;
  unknown keys are kept as attributes, as the official class does.
  """

  def __init__(self, **fields: Any):
    for key, value in {**_CONFIG_DEFAULTS, **fields}.items():
      setattr(self, key, value)

  @classmethod
  def from_dict(cls, json_object: Mapping[str, Any]) -> "UniterConfig":
    return cls(**dict(json_object))

  @classmethod
  def from_json_file(cls, path: str) -> "UniterConfig":
    with open(path, "r", encoding="utf-8") as f:
      return cls.from_dict(json.load(f))

  def to_dict(self) -> dict[str, Any]:
    return dict(self.__dict__)

  def to_json_string(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

  def __repr__(self) -> str:
    return f"UniterConfig({self.to_dict()})"


def base_config() -> UniterConfig:
  """UNITER-base (`config/uniter-base.json`)."""
  return UniterConfig()


def large_config() -> UniterConfig:
  """UNITER-large (`config/uniter-large.json`)."""
  return UniterConfig(hidden_size=1024, num_hidden_layers=24,
                      num_attention_heads=16, intermediate_size=4096)


def tiny_config(**overrides: Any) -> UniterConfig:
  """A small config for fast tests (hidden 64, 2 layers, 4 heads, vocab 100)."""
  fields = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128)
  fields.update(overrides)
  return UniterConfig(**fields)


# --------------------------------------------------------------------------
# BERT layers (official model/layer.py).
# --------------------------------------------------------------------------


def gelu(x: torch.Tensor) -> torch.Tensor:
  """The exact (erf) GELU of the official code."""
  return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def swish(x: torch.Tensor) -> torch.Tensor:
  return x * torch.sigmoid(x)


ACT2FN = {"gelu": gelu, "relu": F.relu, "swish": swish}


def _activation(name_or_fn):
  if isinstance(name_or_fn, str):
    if name_or_fn not in ACT2FN:
      raise ValueError(f"hidden_act {name_or_fn!r} is not one of "
                       f"{sorted(ACT2FN)}")
    return ACT2FN[name_or_fn]
  return name_or_fn


class GELU(nn.Module):
  """Parameter-free GELU module (slot `net.1` / `vqa_output.1` etc.)."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return gelu(x)


def LayerNorm(size: int) -> nn.LayerNorm:  # pylint: disable=invalid-name
  """Stand-in for apex FusedLayerNorm(size, eps=1e-12): same math and keys."""
  return nn.LayerNorm(size, eps=LN_EPS)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention with separate query/key/value projections."""

  def __init__(self, config: UniterConfig):
    super().__init__()
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(
          f"hidden_size {config.hidden_size} is not a multiple of "
          f"num_attention_heads {config.num_attention_heads}")
    self.num_attention_heads = config.num_attention_heads
    self.attention_head_size = config.hidden_size // config.num_attention_heads
    self.all_head_size = self.num_attention_heads * self.attention_head_size
    self.query = nn.Linear(config.hidden_size, self.all_head_size)
    self.key = nn.Linear(config.hidden_size, self.all_head_size)
    self.value = nn.Linear(config.hidden_size, self.all_head_size)
    self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

  def _heads(self, x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, self.num_attention_heads,
                  self.attention_head_size).permute(0, 2, 1, 3)

  def forward(self, hidden_states: torch.Tensor,
              attention_mask: torch.Tensor) -> torch.Tensor:
    q = self._heads(self.query(hidden_states))
    k = self._heads(self.key(hidden_states))
    v = self._heads(self.value(hidden_states))
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores / math.sqrt(self.attention_head_size) + attention_mask
    probs = self.dropout(torch.softmax(scores, dim=-1))
    context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
    return context.view(context.shape[0], context.shape[1],
                        self.all_head_size)


class BertSelfOutput(nn.Module):

  def __init__(self, config: UniterConfig):
    super().__init__()
    self.dense = nn.Linear(config.hidden_size, config.hidden_size)
    self.LayerNorm = LayerNorm(config.hidden_size)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(config.hidden_dropout_prob)

  def forward(self, hidden_states, input_tensor):
    return self.LayerNorm(self.dropout(self.dense(hidden_states))
                          + input_tensor)


class BertAttention(nn.Module):

  def __init__(self, config: UniterConfig):
    super().__init__()
    self.self = BertSelfAttention(config)
    self.output = BertSelfOutput(config)

  def forward(self, input_tensor, attention_mask):
    return self.output(self.self(input_tensor, attention_mask), input_tensor)


class BertIntermediate(nn.Module):

  def __init__(self, config: UniterConfig):
    super().__init__()
    self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
    self.intermediate_act_fn = _activation(config.hidden_act)

  def forward(self, hidden_states):
    return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):

  def __init__(self, config: UniterConfig):
    super().__init__()
    self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
    self.LayerNorm = LayerNorm(config.hidden_size)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(config.hidden_dropout_prob)

  def forward(self, hidden_states, input_tensor):
    return self.LayerNorm(self.dropout(self.dense(hidden_states))
                          + input_tensor)


class BertLayer(nn.Module):
  """One post-LN transformer layer."""

  def __init__(self, config: UniterConfig):
    super().__init__()
    self.attention = BertAttention(config)
    self.intermediate = BertIntermediate(config)
    self.output = BertOutput(config)

  def forward(self, hidden_states, attention_mask):
    attention_output = self.attention(hidden_states, attention_mask)
    return self.output(self.intermediate(attention_output), attention_output)


class BertPooler(nn.Module):
  """tanh(dense(h[:, 0])): the [CLS] position."""

  def __init__(self, config: UniterConfig):
    super().__init__()
    self.dense = nn.Linear(config.hidden_size, config.hidden_size)
    self.activation = nn.Tanh()

  def forward(self, hidden_states):
    return self.activation(self.dense(hidden_states[:, 0]))


class BertPredictionHeadTransform(nn.Module):

  def __init__(self, config: UniterConfig):
    super().__init__()
    self.dense = nn.Linear(config.hidden_size, config.hidden_size)
    self.transform_act_fn = _activation(config.hidden_act)
    self.LayerNorm = LayerNorm(config.hidden_size)  # pylint: disable=invalid-name

  def forward(self, hidden_states):
    return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
  """MLM head: transform, then the decoder TIED to the word embeddings."""

  def __init__(self, config: UniterConfig, embedding_weight: nn.Parameter):
    super().__init__()
    self.transform = BertPredictionHeadTransform(config)
    vocab, hidden = embedding_weight.shape
    self.decoder = nn.Linear(hidden, vocab, bias=False)
    self.decoder.weight = embedding_weight  # Tied: the same Parameter.
    self.bias = nn.Parameter(torch.zeros(vocab,
                                         device=embedding_weight.device))

  def forward(self, hidden_states):
    return self.decoder(self.transform(hidden_states)) + self.bias


class BertOnlyMLMHead(nn.Module):

  def __init__(self, config: UniterConfig, embedding_weight: nn.Parameter):
    super().__init__()
    self.predictions = BertLMPredictionHead(config, embedding_weight)

  def forward(self, sequence_output):
    return self.predictions(sequence_output)


# --------------------------------------------------------------------------
# UNITER embeddings, encoder and model (official model/model.py).
# --------------------------------------------------------------------------


class UniterTextEmbeddings(nn.Module):
  """LayerNorm(word + position + token type) -> dropout."""

  def __init__(self, config: UniterConfig):
    super().__init__()
    self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                        padding_idx=0)
    self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                            config.hidden_size)
    self.token_type_embeddings = nn.Embedding(config.type_vocab_size,
                                              config.hidden_size)
    self.LayerNorm = LayerNorm(config.hidden_size)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(config.hidden_dropout_prob)

  def forward(self, input_ids, position_ids, token_type_ids=None):
    if token_type_ids is None:
      token_type_ids = torch.zeros_like(input_ids)
    emb = (self.word_embeddings(input_ids)
           + self.position_embeddings(position_ids)
           + self.token_type_embeddings(token_type_ids))
    return self.dropout(self.LayerNorm(emb))


class UniterImageEmbeddings(nn.Module):
  """Region features and 7-d boxes -> hidden; no sequence position embedding.

  Registration order (and so state_dict order) is the official one.
  """

  def __init__(self, config: UniterConfig, img_dim: int):
    super().__init__()
    self.img_linear = nn.Linear(img_dim, config.hidden_size)
    self.img_layer_norm = LayerNorm(config.hidden_size)
    self.pos_layer_norm = LayerNorm(config.hidden_size)
    self.pos_linear = nn.Linear(7, config.hidden_size)
    self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
    self.LayerNorm = LayerNorm(config.hidden_size)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(config.hidden_dropout_prob)

  def forward(self, img_feat, img_pos_feat, type_embeddings, img_masks=None):
    if img_masks is not None:
      # As the official code: row 0 is forced to zero (in place, on every
      # call with masks), so only masked regions get mask_embedding[1].
      self.mask_embedding.weight.data[0, :].fill_(0)
      img_feat = img_feat + self.mask_embedding(img_masks.long())
    transformed_im = self.img_layer_norm(self.img_linear(img_feat))
    transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))
    emb = transformed_im + transformed_pos + type_embeddings
    return self.dropout(self.LayerNorm(emb))


class UniterEncoder(nn.Module):

  def __init__(self, config: UniterConfig):
    super().__init__()
    self.layer = nn.ModuleList(
        [BertLayer(config) for _ in range(config.num_hidden_layers)])

  def forward(self, hidden_states, attention_mask,
              output_all_encoded_layers=True):
    all_layers = []
    for layer_module in self.layer:
      hidden_states = layer_module(hidden_states, attention_mask)
      if output_all_encoded_layers:
        all_layers.append(hidden_states)
    if not output_all_encoded_layers:
      all_layers.append(hidden_states)
    return all_layers


class UniterPreTrainedModel(nn.Module):
  """Holds the config and the official weight initialisation."""

  def __init__(self, config: UniterConfig):
    super().__init__()
    if not isinstance(config, UniterConfig):
      raise ValueError(f"{type(self).__name__} needs a UniterConfig, got "
                       f"{type(config).__name__}")
    self.config = config

  def init_weights(self, module: nn.Module) -> None:
    """N(0, initializer_range) Linear/Embedding weights, zero Linear biases,
    LayerNorm weight 1 and bias 0 (official `init_weights`)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
      module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
    elif isinstance(module, nn.LayerNorm):
      module.bias.data.zero_()
      module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
      module.bias.data.zero_()

  def encode(self, batch: Mapping[str, Any]) -> torch.Tensor:
    """Final-layer sequence output [B, out_size, H] of an official batch.

    Works on a head (through ``self.uniter``) or on a bare ``UniterModel``;
    passes the optional ``img_masks``, ``txt_type_ids`` and ``img_type_ids``.
    """
    uniter = self if isinstance(self, UniterModel) else self.uniter
    b = defaultdict(lambda: None, batch)
    return uniter(b["input_ids"], b["position_ids"], b["img_feat"],
                  b["img_pos_feat"], b["attn_masks"], b["gather_index"],
                  img_masks=b["img_masks"], output_all_encoded_layers=False,
                  txt_type_ids=b["txt_type_ids"],
                  img_type_ids=b["img_type_ids"])


class UniterModel(UniterPreTrainedModel):
  """The single-stream encoder over text tokens and image regions."""

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM):
    super().__init__(config)
    self.embeddings = UniterTextEmbeddings(config)
    self.img_embeddings = UniterImageEmbeddings(config, img_dim)
    self.encoder = UniterEncoder(config)
    self.pooler = BertPooler(config)
    self.apply(self.init_weights)

  def _compute_txt_embeddings(self, input_ids, position_ids,
                              txt_type_ids=None):
    return self.embeddings(input_ids, position_ids, txt_type_ids)

  def _compute_img_embeddings(self, img_feat, img_pos_feat, img_masks=None,
                              img_type_ids=None):
    if img_type_ids is None:
      # Regions take token type 1 from the TEXT type table.
      img_type_ids = torch.ones_like(img_feat[:, :, 0].long())
    type_emb = self.embeddings.token_type_embeddings(img_type_ids)
    return self.img_embeddings(img_feat, img_pos_feat, type_emb, img_masks)

  def _compute_img_txt_embeddings(self, input_ids, position_ids, img_feat,
                                  img_pos_feat, gather_index, img_masks=None,
                                  txt_type_ids=None, img_type_ids=None):
    txt_emb = self._compute_txt_embeddings(input_ids, position_ids,
                                           txt_type_ids)
    img_emb = self._compute_img_embeddings(img_feat, img_pos_feat, img_masks,
                                           img_type_ids)
    both = torch.cat([txt_emb, img_emb], dim=1)
    if gather_index is None:
      return both  # Static layout (not in the official code).
    index = gather_index.unsqueeze(-1).expand(-1, -1, both.shape[-1])
    return torch.gather(both, dim=1, index=index)

  def forward(self, input_ids, position_ids, img_feat, img_pos_feat,
              attention_mask, gather_index=None, img_masks=None,
              output_all_encoded_layers=True, txt_type_ids=None,
              img_type_ids=None):
    dtype = next(self.parameters()).dtype
    ext_mask = attention_mask[:, None, None, :].to(dtype=dtype)
    ext_mask = (1.0 - ext_mask) * -10000.0
    if input_ids is None:  # Image only.
      emb = self._compute_img_embeddings(img_feat, img_pos_feat, img_masks,
                                         img_type_ids)
    elif img_feat is None:  # Text only.
      emb = self._compute_txt_embeddings(input_ids, position_ids,
                                         txt_type_ids)
    else:
      emb = self._compute_img_txt_embeddings(
          input_ids, position_ids, img_feat, img_pos_feat, gather_index,
          img_masks, txt_type_ids, img_type_ids)
    layers = self.encoder(emb, ext_mask,
                          output_all_encoded_layers=output_all_encoded_layers)
    return layers if output_all_encoded_layers else layers[-1]


# --------------------------------------------------------------------------
# Heads.
# --------------------------------------------------------------------------


def _batch(batch: Mapping[str, Any]) -> defaultdict:
  return defaultdict(lambda: None, batch)


def _masked_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  """Rows of ``hidden [B, N, H]`` where ``mask [B, N]`` is set, row-major."""
  return hidden[mask.bool()].contiguous().view(-1, hidden.shape[-1])


class RegionFeatureRegression(nn.Module):
  """MRFR head: Linear -> GELU -> LN, then x @ img_linear.weight + own bias."""

  def __init__(self, hidden_size: int, feat_dim: int,
               img_linear_weight: nn.Parameter):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), GELU(),
                             LayerNorm(hidden_size))
    self.weight = img_linear_weight  # Tied: img_linear.weight [H, feat_dim].
    self.bias = nn.Parameter(torch.zeros(feat_dim,
                                         device=img_linear_weight.device))

  def forward(self, x):
    return F.linear(self.net(x), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
  """MRC head: Linear -> GELU -> LN -> Linear(label_dim)."""

  def __init__(self, hidden_size: int, label_dim: int):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), GELU(),
                             LayerNorm(hidden_size),
                             nn.Linear(hidden_size, label_dim))

  def forward(self, x):
    return self.net(x)


class UniterForPretraining(UniterPreTrainedModel):
  """MLM, MRFR, MRC / MRC-kl and ITM heads over one UniterModel.

  ``forward(batch, task, compute_loss)`` with task in mlm, mrfr, mrc, mrckl,
  itm. Outputs are the official ones: MLM logits [N_masked_tokens, V] and
  MRFR / MRC predictions [N_masked_regions, D] in row-major (example, then
  position) order; ITM returns ``(itm_scores [B, 2], None)``. WRA (the
  ``ot_inputs`` of the official ITM batch) is not part of this reference.
  """

  # The second-stage VCR variant also feeds txt_type_ids to the encoder.
  _use_txt_type_ids = False

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM,
               img_label_dim: int = IMG_LABEL_DIM):
    super().__init__(config)
    self.uniter = UniterModel(config, img_dim)
    self.cls = BertOnlyMLMHead(config,
                               self.uniter.embeddings.word_embeddings.weight)
    self.feat_regress = RegionFeatureRegression(
        config.hidden_size, img_dim, self.uniter.img_embeddings.img_linear.weight)
    self.region_classifier = RegionClassification(config.hidden_size,
                                                  img_label_dim)
    self.itm_output = nn.Linear(config.hidden_size, 2)
    self.apply(self.init_weights)

  def _sequence(self, b, img_masks=None):
    txt_type_ids = b["txt_type_ids"] if self._use_txt_type_ids else None
    return self.uniter(b["input_ids"], b["position_ids"], b["img_feat"],
                       b["img_pos_feat"], b["attn_masks"], b["gather_index"],
                       img_masks=img_masks, output_all_encoded_layers=False,
                       txt_type_ids=txt_type_ids)

  def forward(self, batch, task: str, compute_loss: bool = True):
    b = _batch(batch)
    if task == "mlm":
      return self.forward_mlm(b, compute_loss)
    if task == "mrfr":
      return self.forward_mrfr(b, compute_loss)
    if task == "itm" and not self._use_txt_type_ids:
      return self.forward_itm(b, compute_loss)
    if task.startswith("mrc"):
      return self.forward_mrc(b, task, compute_loss)
    raise ValueError(f"invalid task {task!r} for {type(self).__name__}")

  def forward_mlm(self, b, compute_loss=True):
    seq = self._sequence(b)
    txt_labels = b["txt_labels"]
    # Text part of the packed output; positions past a row's text length
    # hold its regions but have label -1.
    seq = seq[:, :b["input_ids"].shape[1], :]
    scores = self.cls(_masked_rows(seq, txt_labels != -1))
    if compute_loss:
      return F.cross_entropy(scores, txt_labels[txt_labels != -1],
                             reduction="none")
    return scores

  def forward_mrfr(self, b, compute_loss=True):
    seq = self._sequence(b, img_masks=b["img_masks"])
    pred = self.feat_regress(_masked_rows(seq, b["img_mask_tgt"]))
    if compute_loss:
      return F.mse_loss(pred, b["feat_targets"], reduction="none")
    return pred

  def forward_mrc(self, b, task, compute_loss=True):
    seq = self._sequence(b, img_masks=b["img_masks"])
    pred = self.region_classifier(_masked_rows(seq, b["img_mask_tgt"]))
    if not compute_loss:
      return pred
    targets = b["label_targets"]
    if "kl" in task:
      return F.kl_div(F.log_softmax(pred, dim=-1), targets, reduction="none")
    # Background class 0 is never the target.
    hard = torch.max(targets[:, 1:], dim=-1)[1] + 1
    return F.cross_entropy(pred, hard, ignore_index=0, reduction="none")

  def forward_itm(self, b, compute_loss=True):
    if b["ot_inputs"] is not None:
      raise NotImplementedError(
          "torch_ref: the WRA/OT branch of ITM (batch['ot_inputs']) is not "
          "part of the reference")
    seq = self._sequence(b)
    scores = self.itm_output(self.uniter.pooler(seq))
    if compute_loss:
      return F.cross_entropy(scores, b["targets"], reduction="none"), None
    return scores, None


def _grow_type_embedding(model: UniterPreTrainedModel, num_rows: int,
                         extra_from: int) -> None:
  """Official `init_type_embedding`: a new table, rows 0-1 copied, rows 2..
  copied from row ``extra_from`` (1 for NLVR2, 0 for VCR)."""
  old = model.uniter.embeddings.token_type_embeddings.weight.data
  new_emb = nn.Embedding(num_rows, model.uniter.config.hidden_size,
                         device=old.device)
  new_emb.apply(model.init_weights)
  new_emb.weight.data[:2, :].copy_(old[:2, :])
  for row in range(2, num_rows):
    new_emb.weight.data[row, :].copy_(old[extra_from, :])
  model.uniter.embeddings.token_type_embeddings = new_emb


def _grow_word_embedding(model: UniterPreTrainedModel,
                         num_special_tokens: int) -> None:
  """Official `init_word_embedding`: vocabulary + n rows, new rows N(0, 0.02).

  The new table has no padding_idx, as the official one.
  """
  old = model.uniter.embeddings.word_embeddings.weight.data
  n = old.shape[0]
  new_emb = nn.Embedding(n + num_special_tokens,
                         model.uniter.config.hidden_size, device=old.device)
  new_emb.apply(model.init_weights)
  new_emb.weight.data[:n, :].copy_(old)
  model.uniter.embeddings.word_embeddings = new_emb


class UniterForPretrainingForVCR(UniterForPretraining):
  """Second-stage VCR pretraining (mlm, mrfr, mrc*; uses txt_type_ids)."""

  _use_txt_type_ids = True

  def init_type_embedding(self) -> None:
    _grow_type_embedding(self, 4, extra_from=0)

  def init_word_embedding(self, num_special_tokens: int) -> None:
    """Grows the vocabulary and, as the official code, re-creates ``cls``
    (tied to the new table; transform and bias get PyTorch default init)."""
    _grow_word_embedding(self, num_special_tokens)
    self.cls = BertOnlyMLMHead(self.uniter.config,
                               self.uniter.embeddings.word_embeddings.weight)


class UniterForVisualQuestionAnswering(UniterPreTrainedModel):
  """VQA: Linear(H, 2H) -> GELU -> LN -> Linear(num_answer) on the pooler."""

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM,
               num_answer: int = 3129):
    super().__init__(config)
    h = config.hidden_size
    self.uniter = UniterModel(config, img_dim)
    self.vqa_output = nn.Sequential(nn.Linear(h, h * 2), GELU(),
                                    LayerNorm(h * 2),
                                    nn.Linear(h * 2, num_answer))
    self.apply(self.init_weights)

  def forward(self, batch, compute_loss: bool = True):
    b = _batch(batch)
    seq = self.encode({k: b[k] for k in (
        "input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks",
        "gather_index")})
    scores = self.vqa_output(self.uniter.pooler(seq))
    if compute_loss:
      return F.binary_cross_entropy_with_logits(scores, b["targets"],
                                                reduction="none")
    return scores


class UniterForVisualEntailment(UniterForVisualQuestionAnswering):
  """SNLI-VE: the VQA head with 3 answers."""

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM):
    super().__init__(config, img_dim, 3)


class UniterForImageTextRetrieval(UniterPreTrainedModel):
  """Retrieval: ``rank_output`` on the pooler (plus the unused itm_output)."""

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM,
               margin: float = 0.2):
    super().__init__(config)
    self.uniter = UniterModel(config, img_dim)
    self.itm_output = nn.Linear(config.hidden_size, 2)
    self.rank_output = nn.Linear(config.hidden_size, 1)
    self.margin = margin
    self.apply(self.init_weights)

  def init_output(self) -> None:
    """Copy the "match" row (1) of itm_output into rank_output."""
    self.rank_output.weight.data = self.itm_output.weight.data[1:, :]
    self.rank_output.bias.data = self.itm_output.bias.data[1:]

  def forward(self, batch, compute_loss: bool = True):
    b = _batch(batch)
    seq = self.encode({k: b[k] for k in (
        "input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks",
        "gather_index")})
    scores = self.rank_output(self.uniter.pooler(seq))
    if compute_loss:
      sig = torch.sigmoid(scores).contiguous().view(-1, b["sample_size"])
      return torch.clamp(self.margin + sig[:, 1:] - sig[:, :1], 0)
    return scores


class _Nlvr2Base(UniterPreTrainedModel):
  """Shared by the NLVR2 heads: type table grown to 3 rows (row 2 = row 1)."""

  def init_type_embedding(self) -> None:
    _grow_type_embedding(self, 3, extra_from=1)

  def _sequence(self, b):
    return self.encode({k: b[k] for k in (
        "input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks",
        "gather_index", "img_type_ids")})

  def _loss(self, scores, b, compute_loss):
    if compute_loss:
      return F.cross_entropy(scores, b["targets"], reduction="none")
    return scores


class UniterForNlvr2Paired(_Nlvr2Base):
  """Rows 2i, 2i+1 are (text, img0) and (text, img1); their poolers are
  concatenated into Linear(2H, 2)."""

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM):
    super().__init__(config)
    self.uniter = UniterModel(config, img_dim)
    self.nlvr2_output = nn.Linear(config.hidden_size * 2, 2)
    self.apply(self.init_weights)

  def forward(self, batch, compute_loss: bool = True):
    b = _batch(batch)
    pooled = self.uniter.pooler(self._sequence(b))
    pairs = pooled.contiguous().view(pooled.shape[0] // 2, -1)
    return self._loss(self.nlvr2_output(pairs), b, compute_loss)


class UniterForNlvr2Triplet(_Nlvr2Base):
  """One row per example: text, img0 regions (type 1), img1 regions (type 2)."""

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM):
    super().__init__(config)
    self.uniter = UniterModel(config, img_dim)
    self.nlvr2_output = nn.Linear(config.hidden_size, 2)
    self.apply(self.init_weights)

  def forward(self, batch, compute_loss: bool = True):
    b = _batch(batch)
    pooled = self.uniter.pooler(self._sequence(b))
    return self._loss(self.nlvr2_output(pooled), b, compute_loss)


class AttentionPool(nn.Module):
  """softmax(relu(Linear(H, 1)) - 1e4 * pad) weighted sum over positions."""

  def __init__(self, hidden_size: int, drop: float = 0.0):
    super().__init__()
    self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
    self.dropout = nn.Dropout(drop)

  def forward(self, x, mask=None):
    """x [B, T, D]; mask [B, T], True at padding."""
    score = self.fc(x).squeeze(-1)
    if mask is not None:
      score = score + mask.to(dtype=x.dtype) * -1e4
    weights = self.dropout(F.softmax(score, dim=1))
    return weights.unsqueeze(1).matmul(x).squeeze(1)


class UniterForNlvr2PairedAttn(_Nlvr2Base):
  """"pair-biattn": cross attention between the two rows of a pair, a shared
  fc, attention pooling, Linear(2H, 2).

  ``torch.nn.MultiheadAttention`` has the keys of the official copy
  (in_proj_weight, in_proj_bias, out_proj.*) and the same math.
  """

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM):
    super().__init__(config)
    h = config.hidden_size
    self.uniter = UniterModel(config, img_dim)
    self.attn1 = nn.MultiheadAttention(h, config.num_attention_heads,
                                       config.attention_probs_dropout_prob)
    self.attn2 = nn.MultiheadAttention(h, config.num_attention_heads,
                                       config.attention_probs_dropout_prob)
    self.fc = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(),
                            nn.Dropout(config.hidden_dropout_prob))
    self.attn_pool = AttentionPool(h, config.attention_probs_dropout_prob)
    self.nlvr2_output = nn.Linear(2 * h, 2)
    self.apply(self.init_weights)

  def forward(self, batch, compute_loss: bool = True):
    b = _batch(batch)
    seq = self._sequence(b)
    bs, n, d = seq.shape
    left, right = seq.contiguous().view(bs // 2, n * 2, d).chunk(2, dim=1)
    pad = b["attn_masks"] == 0
    left_pad, right_pad = pad.contiguous().view(bs // 2, n * 2).chunk(2, dim=1)
    left = left.transpose(0, 1)  # [T, B/2, D], sequence first.
    right = right.transpose(0, 1)
    l2r, _ = self.attn1(left, right, right, key_padding_mask=right_pad)
    r2l, _ = self.attn2(right, left, left, key_padding_mask=left_pad)
    left = self.fc(torch.cat([l2r, left], dim=-1)).transpose(0, 1)
    right = self.fc(torch.cat([r2l, right], dim=-1)).transpose(0, 1)
    left = self.attn_pool(left, left_pad)
    right = self.attn_pool(right, right_pad)
    scores = self.nlvr2_output(torch.cat([left, right], dim=-1))
    return self._loss(scores, b, compute_loss)


class UniterForReferringExpressionComprehension(UniterPreTrainedModel):
  """RE: a score per region from ``re_output``; non-objects get -1e4.

  The batch needs ``txt_lens``, ``num_bbs`` (sequences of ints) and
  ``obj_masks`` [B, max(num_bbs)] (True where there is no object).
  """

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM,
               loss: str = "cls", margin: float = 0.2,
               hard_ratio: float = 0.3, mlp: int = 1):
    super().__init__(config)
    h = config.hidden_size
    self.uniter = UniterModel(config, img_dim)
    if mlp == 1:
      self.re_output = nn.Linear(h, 1)
    elif mlp == 2:
      self.re_output = nn.Sequential(nn.Linear(h, h), GELU(), LayerNorm(h),
                                     nn.Linear(h, 1))
    else:
      raise ValueError(f"RE mlp must be 1 or 2, got {mlp}")
    if loss not in ("cls", "rank"):
      raise ValueError(f"RE loss must be 'cls' or 'rank', got {loss!r}")
    self.loss = loss
    self.margin = margin
    self.hard_ratio = hard_ratio
    self.apply(self.init_weights)

  @staticmethod
  def _get_image_hidden(seq, txt_lens, num_bbs):
    """Regions of each packed row, zero-padded to [B, max(num_bbs), H]."""
    max_bb = max(int(n) for n in num_bbs)
    out = seq.new_zeros(seq.shape[0], max_bb, seq.shape[-1])
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
      tl, nbb = int(tl), int(nbb)
      out[i, :nbb] = seq[i, tl:tl + nbb]
    return out

  def forward(self, batch, compute_loss: bool = True):
    b = _batch(batch)
    seq = self.encode({k: b[k] for k in (
        "input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks",
        "gather_index")})
    img_hidden = self._get_image_hidden(seq, b["txt_lens"], b["num_bbs"])
    scores = self.re_output(img_hidden).squeeze(2)
    scores = scores.masked_fill(b["obj_masks"].bool(), -1e4)
    if not compute_loss:
      return scores
    targets = b["targets"]
    if self.loss == "cls":
      return F.cross_entropy(scores, targets.view(-1), reduction="none")
    return self._rank_loss(scores, targets.view(-1), b["num_bbs"])

  def _rank_loss(self, scores, targets, num_bbs):
    """Sigmoid hinge against one negative per row: with probability
    ``hard_ratio`` the best-scoring non-target, else a random non-target."""
    order = torch.argsort(scores, dim=-1, descending=True)
    neg = []
    for i, nbb in enumerate(num_bbs):
      tgt = int(targets[i])
      if float(torch.rand(())) < self.hard_ratio:
        neg.append(next(int(j) for j in order[i] if int(j) != tgt))
      else:
        cands = [j for j in range(int(nbb)) if j != tgt]
        neg.append(cands[int(torch.randint(len(cands), ()))])
    neg = torch.tensor(neg, dtype=targets.dtype, device=scores.device)
    pos_sc = torch.sigmoid(scores.gather(1, targets.view(-1, 1))).view(-1)
    neg_sc = torch.sigmoid(scores.gather(1, neg.view(-1, 1))).view(-1)
    return torch.clamp(self.margin + neg_sc - pos_sc, 0)


class UniterForVisualCommonsenseReasoning(UniterPreTrainedModel):
  """VCR: Linear(H, 2H) -> ReLU -> LN -> Linear(2) on the pooler.

  ``forward(compute_loss=False)`` returns column 1 only ([B, 1]), as the
  official; :meth:`logits` gives both columns.
  """

  def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM):
    super().__init__(config)
    h = config.hidden_size
    self.uniter = UniterModel(config, img_dim)
    self.vcr_output = nn.Sequential(nn.Linear(h, h * 2), nn.ReLU(),
                                    LayerNorm(h * 2), nn.Linear(h * 2, 2))
    self.apply(self.init_weights)

  def init_type_embedding(self) -> None:
    """4 rows: 0 and 1 copied, 2 and 3 copies of row 0 (text)."""
    _grow_type_embedding(self, 4, extra_from=0)

  def init_word_embedding(self, num_special_tokens: int) -> None:
    _grow_word_embedding(self, num_special_tokens)

  def logits(self, batch) -> torch.Tensor:
    b = _batch(batch)
    seq = self.encode({k: b[k] for k in (
        "input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks",
        "gather_index", "txt_type_ids")})
    return self.vcr_output(self.uniter.pooler(seq))

  def forward(self, batch, compute_loss: bool = True):
    scores = self.logits(batch)
    if compute_loss:
      return F.cross_entropy(scores, batch["targets"].view(-1),
                             reduction="mean")
    return scores[:, 1:]
