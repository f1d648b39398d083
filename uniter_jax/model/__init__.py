"""UNITER models: the encoder, every head, and the registry of heads.

A *head* is a model class plus the encoder changes it needs (type table,
extra words); `HEADS` maps its name (the `--task` of the converter and the
`task` argument of `load_checkpoint`) to it. Training objectives are tasks
(`uniter_jax.tasks`), which name the head they train.

    from uniter_jax import model as um
    cfg = um.config.base()
    net = um.build_model("vqa", cfg)
    params = um.init_params(net, jax.random.key(0))
    out = net.apply({"params": params}, batch)   # dict, see heads.py
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from uniter_jax.model import config
from uniter_jax.model import encoder
from uniter_jax.model import heads
from uniter_jax.model import pretrain
from uniter_jax.model.encoder import UniterModel
from uniter_jax.model.heads import (
    UniterForImageTextRetrieval, UniterForNlvr2Paired,
    UniterForNlvr2PairedAttn, UniterForNlvr2Triplet,
    UniterForReferringExpressionComprehension,
    UniterForVisualCommonsenseReasoning, UniterForVisualEntailment,
    UniterForVisualQuestionAnswering, init_rank_output)
from uniter_jax.model.pretrain import UniterForPretraining


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """A head's model class and how it changes the encoder config."""
  head: Callable[..., nn.Module]
  type_vocab_size: int = 2
  extra_vocab: int = 0
  # Rows per example in a batch (NLVR2 paired formats use two).
  rows_per_example: int = 1


HEADS: dict[str, HeadSpec] = {
    "pretrain": HeadSpec(UniterForPretraining),
    "vqa": HeadSpec(UniterForVisualQuestionAnswering),
    "ve": HeadSpec(UniterForVisualEntailment),
    "itm": HeadSpec(UniterForImageTextRetrieval),
    "nlvr2-paired": HeadSpec(UniterForNlvr2Paired, type_vocab_size=3,
                             rows_per_example=2),
    "nlvr2-triplet": HeadSpec(UniterForNlvr2Triplet, type_vocab_size=3),
    "nlvr2-attn": HeadSpec(UniterForNlvr2PairedAttn, type_vocab_size=3,
                           rows_per_example=2),
    "re": HeadSpec(UniterForReferringExpressionComprehension),
    "vcr": HeadSpec(UniterForVisualCommonsenseReasoning, type_vocab_size=4,
                    extra_vocab=config.VCR_NUM_SPECIAL_TOKENS),
    # Second-stage VCR pretraining: the pretraining heads on the VCR
    # vocabulary and type table.
    "pretrain-vcr": HeadSpec(UniterForPretraining, type_vocab_size=4,
                             extra_vocab=config.VCR_NUM_SPECIAL_TOKENS),
}


def head_spec(task: str) -> HeadSpec:
  if task not in HEADS:
    raise ValueError(f"unknown head {task!r}; expected one of {sorted(HEADS)}")
  return HEADS[task]


def head_config(task: str, cfg) -> ml_collections.FrozenConfigDict:
  """The encoder config of `task` built from a base model config.

  `cfg` is the official model config (`uniter-base.json` layout, 2 types,
  28996 words); NLVR2 grows the type table to 3 rows and VCR to 4 rows
  plus 81 extra words, as the official `init_type_embedding` /
  `init_word_embedding` do.
  """
  spec = head_spec(task)
  d = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict)
           else cfg)
  d["type_vocab_size"] = max(d.get("type_vocab_size", 2),
                             spec.type_vocab_size)
  d["vocab_size"] = d["vocab_size"] + spec.extra_vocab
  return encoder.freeze_config(d)


def build_model(task: str, cfg, *, task_cfg_ready: bool = False,
                **head_kwargs: Any) -> nn.Module:
  """The Flax module for `task` (see HEADS).

  Args:
    task: a key of HEADS.
    cfg: the base model config (ConfigDict or dict); adjusted for the task
      unless `task_cfg_ready` says it already is.
    **head_kwargs: head options, e.g. num_answer for vqa, mlp for re.
  """
  spec = head_spec(task)
  tcfg = (encoder.freeze_config(cfg) if task_cfg_ready
          else head_config(task, cfg))
  return spec.head(tcfg, **head_kwargs)


def dummy_batch(cfg, task: str = "pretrain", batch_size: int = 2,
                txt_len: int = 8, num_regions: int = 4) -> dict[str, Any]:
  """A well-formed batch of the right shapes, e.g. for `init` or eval_shape."""
  b = batch_size * head_spec(task).rows_per_example
  return {
      "input_ids": jnp.ones((b, txt_len), jnp.int32),
      "position_ids": jnp.broadcast_to(
          jnp.arange(txt_len, dtype=jnp.int32), (b, txt_len)),
      "img_feat": jnp.zeros((b, num_regions, cfg.img_dim), jnp.float32),
      "img_pos_feat": jnp.zeros((b, num_regions, 7), jnp.float32),
      "attn_masks": jnp.ones((b, txt_len + num_regions), jnp.int32),
  }


def init_params(model: nn.Module, rng: jax.Array, batch=None,
                unbox: bool = True):
  """Initialises all parameters of `model` (every head included)."""
  if batch is None:
    task = next((k for k, v in HEADS.items() if isinstance(model, v.head)),
                "pretrain")
    batch = dummy_batch(model.cfg, task)
  variables = model.init({"params": rng, "dropout": rng}, batch)
  params = variables["params"]
  return nn.unbox(params) if unbox else params


__all__ = [
    "HEADS", "HeadSpec", "build_model", "config", "dummy_batch", "encoder",
    "heads", "init_params", "init_rank_output", "pretrain", "head_config",
    "head_spec", "UniterModel", "UniterForPretraining",
    "UniterForVisualQuestionAnswering", "UniterForVisualEntailment",
    "UniterForImageTextRetrieval", "UniterForNlvr2Paired",
    "UniterForNlvr2Triplet", "UniterForNlvr2PairedAttn",
    "UniterForReferringExpressionComprehension",
    "UniterForVisualCommonsenseReasoning",
]
