"""Initialising one task's model from another task's params, as the
official code does after `from_pretrained`:

- NLVR2 (`init_type_embedding`): the type table grows to 3 rows, row 2 a
  copy of row 1 (image);
- VCR and VCR pretraining: 4 rows, rows 2 and 3 copies of row 0 (text);
  `init_word_embedding(81)` appends 81 rows drawn N(0, 0.02);
- retrieval (`init_output`): `rank_output` := the match row of `itm_output`
  when the source has no `rank_output`;
- VCR pretraining re-creates the MLM head (`cls`), so it starts fresh.

Every other parameter present in both with the same shape is copied; the
rest keep the target model's fresh initialisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from uniter_jax.model import heads

_TYPES = ("uniter", "embeddings", "token_type_embeddings", "embedding")
_WORDS = ("uniter", "embeddings", "word_embeddings", "embedding")


def adapt_params(source: dict, target_init: dict, to_task: str,
                 rng: jax.Array, initializer_range: float = 0.02) -> dict:
  """Target-task params from `source` (e.g. pretrained) params.

  Args:
    source: params of the source model (unscanned or scanned, same layout
      as `target_init`).
    target_init: freshly initialised params of the target model.
    to_task: the target task name.
    rng: for the new word-embedding rows.
  """
  src = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, source))
  out = dict(traverse_util.flatten_dict(target_init))
  fresh_prefixes = [("cls",)] if to_task == "pretrain-vcr" else []
  for path, init in list(out.items()):
    if any(path[:len(p)] == p for p in fresh_prefixes) or path not in src:
      continue
    value = src[path]
    if path == _TYPES and value.shape[0] < init.shape[0]:
      value = _grow_types(value, init.shape[0], to_task)
    elif path == _WORDS and value.shape[0] < init.shape[0]:
      extra = initializer_range * jax.random.normal(
          rng, (init.shape[0] - value.shape[0], value.shape[1]), jnp.float32)
      value = np.concatenate([value, np.asarray(extra)], 0)
    if tuple(value.shape) != tuple(init.shape):
      raise ValueError(f"cannot initialise {'/'.join(path)} {init.shape} "
                       f"from a tensor of shape {value.shape}")
    out[path] = jnp.asarray(value, init.dtype)
  params = traverse_util.unflatten_dict(out)
  if to_task == "itm" and ("rank_output", "kernel") not in src and (
      ("itm_output", "kernel") in src):
    params = heads.init_rank_output(params)
  return params


def _grow_types(table: np.ndarray, rows: int, to_task: str) -> np.ndarray:
  copy_from = 0 if to_task in ("vcr", "pretrain-vcr") else 1
  extra = [table[copy_from]] * (rows - table.shape[0])
  return np.concatenate([table, np.stack(extra)], 0)
