"""Inference helpers: one calling convention for every head.

Every model `load_checkpoint` returns answers

    out = model.apply({"params": params}, batch)

with a dict holding `sequence_output` [B, Lt+Li, H], `pooled_output`
[B, H] and the head's outputs (`logits`; the retrieval head also
`itm_logits`; the pretraining models `itm_logits`, plus `txt_output` /
`img_output`). On top of it:

* `apply(model, params, batch)`: the same, compiled once per model and
  batch shape (`jax.jit`, cached).
* `encode(model, params, batch)`: the encoder's outputs, split into the
  text part and the image part with their masks.
* `score_pairs(model, params, batch)`: the probability that each row's
  text and image match, for the models with a matching head
  (`match_score_kind` says which score a model gives).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

Batch = Mapping[str, Any]

# What `score_pairs` returns, per kind of score.
SCORE_KINDS = {
    "rank": "sigmoid of the retrieval head's rank score (`rank_output`), "
            "the official retrieval score (`model/itm.py`, `train_itm.py`)",
    "itm": "softmax probability of the ITM 'match' class (row 1 of "
           "`itm_output`), the pretraining ITM objective",
}


@functools.partial(jax.jit, static_argnames=("model", "output"))
def _apply_jit(model, params, batch, output=None):
  args = () if output is None else (output,)
  return model.apply({"params": params}, batch, *args)


def _is_pretraining(model) -> bool:
  from uniter_jax.model import pretrain  # pylint: disable=g-import-not-at-top
  return isinstance(model, pretrain.UniterForPretraining)


def _arrays(batch: Batch) -> dict[str, Any]:
  """The array fields of a batch (jit takes no strings or None)."""
  out = {}
  for k, v in batch.items():
    if v is None or isinstance(v, (str, bytes)):
      continue
    out[k] = v
  return out


def apply(model, params, batch: Batch, *, output: str | None = None,
          jit: bool = True) -> dict:
  """`model.apply({"params": params}, batch)` (deterministic), compiled
  once per model, batch shape and `output` when `jit` (the default).

  `output`: for the pretraining models, the head to compute (`"itm"`,
  `"mlm"`, ...; see `UniterForPretraining`); None: the model's default.
  """
  if output is not None and not _is_pretraining(model):
    raise ValueError(f"output={output!r}: only the pretraining models take "
                     "an output name; the other heads compute one output")
  if output is None and _is_pretraining(model):
    from uniter_jax.model import pretrain  # pylint: disable=g-import-not-at-top
    if not any(batch.get(k) is not None for k in pretrain.MASKING_FIELDS):
      output = "itm"    # what the default call computes: one compiled program
  if jit:
    return _apply_jit(model, params, _arrays(batch), output)
  args = () if output is None else (output,)
  return model.apply({"params": params}, batch, *args)


def head_name(model) -> str:
  """The head (`uniter_jax.model.HEADS` key) a model is; for a class that
  serves two heads (the pretraining model), the one its config shows."""
  from uniter_jax import model as um  # pylint: disable=g-import-not-at-top
  cls = type(model)
  names = [k for k, v in um.HEADS.items() if v.head is cls]
  if not names:
    raise TypeError(f"{cls.__name__} is not a UNITER head; expected a model "
                    "from uniter_jax.load_checkpoint / model.build_model")
  if len(names) > 1:   # pretrain / pretrain-vcr
    vcr = getattr(model.cfg, "type_vocab_size", 2) >= 4
    names = [n for n in names if n.endswith("-vcr") == vcr] or names
  return names[0]


def match_score_kind(model, score: str | None = None) -> str:
  """Which score `score_pairs` gives for `model`: "rank" or "itm" (see
  `SCORE_KINDS`). The retrieval head gives "rank" by default ("itm" on
  request); the pretraining models give "itm"; other heads have no
  image-text match score (ValueError naming what they output instead)."""
  from uniter_jax import model as um  # pylint: disable=g-import-not-at-top
  if score is not None and score not in SCORE_KINDS:
    raise ValueError(f"score must be one of {sorted(SCORE_KINDS)} or None, "
                     f"got {score!r}")
  if isinstance(model, um.UniterForImageTextRetrieval):
    return score or "rank"
  if isinstance(model, um.UniterForPretraining):
    if score == "rank":
      raise ValueError("the pretraining model has no rank_output; use "
                       "score='itm' (the default) or convert to the 'itm' "
                       "head, whose rank_output starts as the ITM match row")
    return "itm"
  task = head_name(model)
  what = {
      "vqa": "answer scores: out['logits'] [B, num_answer] (sigmoid per "
             "answer, trained with BCE)",
      "ve": "entailment classes: out['logits'] [B, 3] (contradiction, "
            "entailment, neutral)",
      "nlvr2-paired": "out['logits'] [B/2, 2] per image pair (1 = True)",
      "nlvr2-attn": "out['logits'] [B/2, 2] per image pair (1 = True)",
      "nlvr2-triplet": "out['logits'] [B, 2] (1 = True)",
      "re": "one score per region: out['logits'] [B, Li]",
      "vcr": "out['logits'] [B, 2] per (question, choice) row; rank the "
             "choices by out['logits'][:, 1]",
  }.get(task, "out['logits']")
  raise ValueError(f"the '{task}' head has no image-text match score; use "
                   f"model.apply(...): {what}")


def encode(model, params, batch: Batch, *, jit: bool = True) -> dict:
  """The encoder outputs of any head.

  Returns a dict of jax arrays: `sequence_output` [B, Lt+Li, H],
  `pooled_output` [B, H] (tanh(dense) of the [CLS] position; the pooler of
  the checkpoint), `txt_output` [B, Lt, H], `img_output` [B, Li, H],
  `txt_mask` [B, Lt] and `img_mask` [B, Li] (True on real tokens /
  regions; padding positions hold meaningless vectors). For multi-row
  heads (NLVR2 paired, VCR) the rows are the batch's rows.
  """
  # The pretraining models: the encoder with the ITM head only (no MRM
  # masks applied, no masked-prediction heads), whatever the batch holds.
  out = apply(model, params, batch, jit=jit,
              output="itm" if _is_pretraining(model) else None)
  lt = batch["input_ids"].shape[1]
  seq = out["sequence_output"]
  mask = jnp.asarray(batch["attn_masks"]) > 0
  return {"sequence_output": seq, "pooled_output": out["pooled_output"],
          "txt_output": seq[:, :lt], "img_output": seq[:, lt:],
          "txt_mask": mask[:, :lt], "img_mask": mask[:, lt:]}


def score_pairs(model, params, batch: Batch, *, score: str | None = None,
                jit: bool = True) -> jax.Array:
  """Match probability [B] of each row's text and image.

  * retrieval head (`itm`): `sigmoid(rank_output(pooled))`, the official
    retrieval score (default; `score="itm"`: the 2-way ITM softmax);
  * pretraining models (`pretrain`, `pretrain-vcr`): `softmax(itm_logits)
    [:, 1]`, the ITM head's probability of "match" (the VCR second-stage
    pretraining does not train ITM; its scores come from the checkpoint it
    started from).

  Other heads raise ValueError naming their own outputs. Values are
  probabilities in [0, 1]; for ranking, the order is that of the logits.
  """
  kind = match_score_kind(model, score)
  out = apply(model, params, batch, jit=jit,
              output="itm" if _is_pretraining(model) else None)
  if kind == "rank":
    return jax.nn.sigmoid(out["logits"][:, 0].astype(jnp.float32))
  return jax.nn.softmax(out["itm_logits"].astype(jnp.float32), axis=-1)[:, 1]


__all__ = ["SCORE_KINDS", "apply", "encode", "head_name", "match_score_kind",
           "score_pairs"]
