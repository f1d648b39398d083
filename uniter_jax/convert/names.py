"""The name table between Flax parameter paths and official PyTorch keys.

Flax modules are named after the official PyTorch module tree, so the table
is a handful of leaf rules:

| Flax leaf                 | PyTorch leaf          | transform |
|---------------------------|-----------------------|-----------|
| `.../kernel` (Dense)      | `.../weight` (Linear) | transpose |
| `.../scale` (LayerNorm)   | `.../weight`          | -         |
| `.../embedding` (Embed)   | `.../weight`          | -         |
| `.../bias`                | `.../bias`            | -         |
| `img_embeddings/mask_embedding` | `img_embeddings.mask_embedding.weight` | - |
| `.../in_proj_kernel` (MHA) | `.../in_proj_weight` | transpose |

plus the scanned encoder (`encoder/layer/...` with a leading layer axis,
which is `encoder.layer.{i}....` in PyTorch) and the two tied tensors of
the pretraining head, which PyTorch lists under both names.
"""

from __future__ import annotations

from typing import Iterable

# (pytorch key of the tied copy, pytorch key of the tensor it shares)
TIED_KEYS = {
    "cls.predictions.decoder.weight":
        "uniter.embeddings.word_embeddings.weight",
    "feat_regress.weight": "uniter.img_embeddings.img_linear.weight",
}

FlaxPath = tuple[str, ...]


def flax_to_torch(path: FlaxPath) -> tuple[str, bool]:
  """(torch key, transpose?) of an unscanned Flax parameter path."""
  *mods, leaf = path
  if leaf == "kernel":
    return ".".join([*mods, "weight"]), True
  if leaf in ("scale", "embedding"):
    return ".".join([*mods, "weight"]), False
  if leaf == "bias":
    return ".".join([*mods, "bias"]), False
  if leaf == "mask_embedding":
    return ".".join([*mods, "mask_embedding", "weight"]), False
  if leaf == "in_proj_kernel":
    return ".".join([*mods, "in_proj_weight"]), True
  if leaf == "in_proj_bias":
    return ".".join([*mods, "in_proj_bias"]), False
  raise KeyError(f"no PyTorch name rule for Flax parameter {'/'.join(path)}")


def is_scanned_layer(path: FlaxPath) -> bool:
  """True for a param of the scanned encoder (`.../encoder/layer/<not int>`)."""
  for i in range(len(path) - 2):
    if path[i] == "encoder" and path[i + 1] == "layer":
      return not path[i + 2].isdigit()
  return False


def unscanned_paths(path: FlaxPath, num_layers: int) -> list[FlaxPath]:
  """The per-layer paths of a scanned encoder param."""
  for i in range(len(path) - 2):
    if path[i] == "encoder" and path[i + 1] == "layer":
      return [path[:i + 2] + (str(n),) + path[i + 2:]
              for n in range(num_layers)]
  raise ValueError(f"{'/'.join(path)} is not a scanned encoder parameter")


def rename_legacy(keys: Iterable[str]) -> dict[str, str]:
  """old key -> new key for LayerNorm `gamma`/`beta` (official from_pretrained)."""
  out = {}
  for k in keys:
    if k.endswith(".gamma"):
      out[k] = k[:-len("gamma")] + "weight"
    elif k.endswith(".beta"):
      out[k] = k[:-len("beta")] + "bias"
  return out
