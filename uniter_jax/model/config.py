"""Model configurations for UNITER, as ml-collections ConfigDicts.

The architecture fields use the names of the official JSON model configs
(`config/uniter-base.json`), so an official config file loads as it is with
:func:`from_official_json`. The extra fields (``dtype``, ``scan_layers``,
``remat_policy``, ``attention_impl``, ``img_dim``, ``img_label_dim``) choose
how the model is computed, never which parameters it has, except that
``scan_layers`` stacks the layer parameters along a leading axis.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

# Fields that an official JSON model config holds.
OFFICIAL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
)

IMG_DIM = 2048
IMG_LABEL_DIM = 1601
# Extra WordPiece ids that the VCR models append to the vocabulary.
VCR_NUM_SPECIAL_TOKENS = 81

REMAT_POLICIES = ("none", "minimal", "save_qkv_proj", "full")
ATTENTION_IMPLS = ("explicit", "fused", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")


def _common(**arch: Any) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.vocab_size = 28996
  cfg.hidden_act = "gelu"
  cfg.hidden_dropout_prob = 0.1
  cfg.attention_probs_dropout_prob = 0.1
  cfg.max_position_embeddings = 512
  cfg.type_vocab_size = 2
  cfg.initializer_range = 0.02
  cfg.update(arch)
  # How the model is computed.
  cfg.img_dim = IMG_DIM
  cfg.img_label_dim = IMG_LABEL_DIM
  # Compute dtype of matmuls and activations; parameters stay float32.
  cfg.dtype = "float32"
  # Run the layers with nn.scan (one compiled layer body, stacked params).
  cfg.scan_layers = False
  # Rematerialisation of each layer in the backward pass.
  cfg.remat_policy = "none"
  # "explicit": softmax(QK^T/sqrt(d) + mask) with dropout on the attention
  # probabilities, as the official model trains. "fused":
  # jax.nn.dot_product_attention (fused kernels on GPU); it has no
  # attention-probability dropout, so it requires that rate to be 0 when
  # training (deterministic=False). "cudnn": the same call with
  # implementation="cudnn" (cuDNN's fused attention; NVIDIA GPUs, bfloat16
  # or float16 compute only), under the same dropout rule.
  cfg.attention_impl = "explicit"
  return cfg


def base() -> ml_collections.ConfigDict:
  """UNITER-base (`config/uniter-base.json`)."""
  return _common(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072)


def large() -> ml_collections.ConfigDict:
  """UNITER-large (`config/uniter-large.json`)."""
  return _common(hidden_size=1024, num_hidden_layers=24,
                 num_attention_heads=16, intermediate_size=4096)


def tiny() -> ml_collections.ConfigDict:
  """A 2-layer, hidden-64 model for tests and quick local runs."""
  return _common(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64, img_dim=IMG_DIM)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config` entry so this file works as an ml-collections config file.

  Args:
    arg: "base" (default), "large" or "tiny".
  """
  variants = {"base": base, "large": large, "tiny": tiny}
  name = arg or "base"
  if name not in variants:
    raise ValueError(f"unknown model config {name!r}; expected one of "
                     f"{sorted(variants)}")
  return variants[name]()


def validate(cfg: Mapping[str, Any]) -> None:
  """Raises ValueError naming the field when a config cannot build a model."""
  missing = [k for k in OFFICIAL_FIELDS if k not in cfg]
  if missing:
    raise ValueError(f"model config lacks fields {missing}")
  if cfg["hidden_size"] % cfg["num_attention_heads"]:
    raise ValueError(
        f"model config: hidden_size {cfg['hidden_size']} is not divisible by "
        f"num_attention_heads {cfg['num_attention_heads']}")
  if cfg["hidden_act"] != "gelu":
    raise ValueError(f"model config: hidden_act {cfg['hidden_act']!r} is not "
                     "supported; UNITER uses 'gelu' (exact erf form)")
  if cfg.get("remat_policy", "none") not in REMAT_POLICIES:
    raise ValueError(f"model config: remat_policy {cfg['remat_policy']!r}; "
                     f"expected one of {REMAT_POLICIES}")
  if cfg.get("attention_impl", "explicit") not in ATTENTION_IMPLS:
    raise ValueError(f"model config: attention_impl {cfg['attention_impl']!r}"
                     f"; expected one of {ATTENTION_IMPLS}")
  if cfg.get("dtype", "float32") not in DTYPES:
    raise ValueError(f"model config: dtype {cfg['dtype']!r}; expected one of "
                     f"{DTYPES}")


def from_official_dict(d: Mapping[str, Any],
                       source: str = "model config") -> ml_collections.ConfigDict:
  """Builds a config from the fields of an official JSON model config."""
  missing = [k for k in OFFICIAL_FIELDS if k not in d]
  if missing:
    raise ValueError(f"{source}: missing fields {missing} (expected the "
                     "layout of the official uniter-base.json)")
  cfg = _common(**{k: d[k] for k in OFFICIAL_FIELDS})
  for k in ("img_dim", "img_label_dim", "dtype", "scan_layers", "remat_policy",
            "attention_impl"):
    if k in d:
      cfg[k] = d[k]
  validate(cfg)
  return cfg


def from_official_json(path: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """Reads an official JSON model config (e.g. `uniter-base.json`)."""
  with open(path, encoding="utf-8") as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  return from_official_dict(d, source=str(path))


def to_official_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The official JSON fields of `cfg` (plus img dims), for export."""
  d = {k: cfg[k] for k in OFFICIAL_FIELDS}
  d["img_dim"] = cfg.get("img_dim", IMG_DIM)
  d["img_label_dim"] = cfg.get("img_label_dim", IMG_LABEL_DIM)
  return d
