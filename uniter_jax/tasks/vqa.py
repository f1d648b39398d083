"""VQA and SNLI-VE finetuning: soft answer scores and instance-level BCE.

Both tasks train the same head (an MLP on the pooled output, `vqa_output`)
the way the official `train_vqa.py` / `train_ve.py` do:

* **Targets.** A record's soft targets (`target_labels`, `target_scores`:
  answer indices and their VQA scores in [0, 1]) are scattered into a dense
  float32 row `targets` [num_answers]; a record without labels gets zeros,
  as the official `_get_vqa_target` gives it (VQA training questions whose
  answers are all outside the answer vocabulary train towards all-zero
  targets, and the official loader keeps them). SNLI-VE is the same with 3
  answers and one label of score 1.0 (contradiction 0, entailment 1,
  neutral 2).
* **Loss.** Binary cross-entropy with logits per answer, averaged over the
  batch and the answers, times the answer count (the official
  `loss.mean() * targets.size(1)`, "instance-level BCE"): the sum over
  answers, averaged over the batch's examples.
* **Metric.** The soft score of the argmax answer (official
  `compute_score_with_logits`): the target score of the predicted answer,
  averaged over examples. For SNLI-VE this is the accuracy.

The answer count is the model head's output width. The train loop builds a
head with its defaults (`uniter_jax.model.HEADS`: 3129 answers for "vqa",
the official `ans2label.json`; 3 for "ve"), so `from_config` takes that
width; the constructor's `num_answers` is for other callers. A dataset with
fewer answers (the synthetic one) uses the first `len(label2ans)` columns;
a label outside the head is an error naming the record.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uniter_jax.data import contract
from uniter_jax.model import heads as heads_lib
from uniter_jax.tasks import losses
from uniter_jax.tasks.base import loss_weight_of, register_task, Task

# The official VQA answer vocabulary (`utils/ans2label.json`) and SNLI-VE
# labels (`utils/misc.py`), as the heads' default widths.
VQA_NUM_ANSWERS = int(heads_lib.UniterForVisualQuestionAnswering.num_answer)
VE_LABELS = ("contradiction", "entailment", "neutral")
VE_NUM_ANSWERS = int(heads_lib.UniterForVisualEntailment.num_answer)


def dense_targets(labels: np.ndarray | None, scores: np.ndarray | None,
                  num_answers: int, record: Any = "?") -> np.ndarray:
  """The float32 [num_answers] target row of one record's soft targets.

  Zeros where the record has no labels (an unlabelled question, or one
  whose answers are all outside the vocabulary). A repeated label keeps its
  last score. Raises ValueError naming `record` for a label outside
  [0, num_answers) or a score that is not finite.
  """
  row = np.zeros(num_answers, np.float32)
  if labels is None or len(labels) == 0:
    return row
  labels = np.asarray(labels, np.int64)
  scores = np.asarray(scores, np.float32)
  if labels.shape != scores.shape:
    raise ValueError(f"record {record!r}: {labels.shape[0]} answer labels "
                     f"but {scores.shape[0]} scores")
  bad = labels[(labels < 0) | (labels >= num_answers)]
  if bad.size:
    raise ValueError(f"record {record!r}: answer label {int(bad[0])} is "
                     f"outside the model head's {num_answers} answers")
  if not np.isfinite(scores).all():
    raise ValueError(f"record {record!r}: answer scores {scores.tolist()} "
                     "are not all finite")
  row[labels] = scores
  return row


def targets_op(example: dict, rng: np.random.Generator, ctx) -> dict:
  """Per-example op: `targets` [ctx.num_answers] float32 from the record's
  `_target_labels` / `_target_scores` (zeros when it has none)."""
  del rng
  n = int(ctx.num_answers)
  have = ctx.meta.get("num_answers") if ctx.meta else None
  if have is not None and int(have) > n:
    raise ValueError(f"text dataset has {int(have)} answers (metadata "
                     f"num_answers) but the model head has {n}")
  out = dict(example)
  # A record's int `target` (none for VQA/VE in the agreed layout) would
  # otherwise reach the batch under the same name with another dtype.
  out["targets"] = dense_targets(example.get("_target_labels"),
                                 example.get("_target_scores"), n,
                                 example.get("_id", "?"))
  return out


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy with logits, the numerically stable
  form torch's `binary_cross_entropy_with_logits` uses."""
  return (jnp.maximum(logits, 0.0) - logits * targets
          + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def argmax_score(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[B] target score of each row's argmax answer (official
  `compute_score_with_logits`, summed over answers). Ties take the first
  maximum."""
  pred = jnp.argmax(logits, axis=-1)
  return jnp.take_along_axis(targets, pred[:, None], axis=-1)[:, 0]


def instance_bce(logits: jax.Array, targets: jax.Array,
                 weights: jax.Array | None = None) -> jax.Array:
  """The official loss: elementwise BCE, mean over rows and answers, times
  the answer count. `weights` [B] (0/1) leaves padding rows out."""
  per_row = jnp.mean(bce_with_logits(logits, targets), axis=-1)
  if weights is None:
    return jnp.mean(per_row) * logits.shape[-1]
  n = jnp.maximum(jnp.sum(weights), 1.0)
  return jnp.sum(per_row * weights) / n * logits.shape[-1]


class AnswerTask(Task):
  """Shared data and loss of VQA and SNLI-VE (soft-score answer heads)."""

  default_answers: int = 0
  score_name = "score"

  def __init__(self, *, loss_weight: float = 1.0,
               num_answers: int | None = None):
    super().__init__(loss_weight=loss_weight)
    n = self.default_answers if num_answers is None else int(num_answers)
    if n < 1:
      raise ValueError(f"task {self.name!r}: num_answers must be >= 1, "
                       f"got {num_answers}")
    self.num_answers = n

  @classmethod
  def from_config(cls, config) -> "AnswerTask":
    # The answer count is the head's width; the loop builds the head with
    # its default (see the module docstring).
    return cls(loss_weight=loss_weight_of(config, cls.name))

  @property
  def fields(self) -> tuple[contract.Field, ...]:  # type: ignore[override]
    return (contract.Field("targets", np.float32, "row",
                           (self.num_answers,)),)

  @property
  def metric_names(self) -> tuple[str, str]:
    """(loss metric, score metric) names, e.g. ("vqa_loss", "vqa_score")."""
    return f"{self.name}_loss", f"{self.name}_{self.score_name}"

  @property
  def metric_weights(self) -> Mapping[str, str]:  # type: ignore[override]
    return {m: "n_examples" for m in self.metric_names}

  @property
  def hidden_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
    return ("n_examples",)

  def data_ops(self):
    return {f"{self.name}_targets": targets_op}

  def op_params(self) -> dict[str, Any]:
    return {"num_answers": self.num_answers}

  def logits_and_targets(self, outputs, batch) -> tuple[jax.Array, jax.Array]:
    """The head's logits and the batch's targets, float32, shape-checked."""
    logits = jnp.asarray(losses.get(outputs, "logits", self.name, "outputs"),
                         jnp.float32)
    targets = jnp.asarray(losses.get(batch, "targets", self.name),
                          jnp.float32)
    if logits.shape[-1] != self.num_answers:
      raise ValueError(
          f"task {self.name!r}: the model head gives {logits.shape[-1]} "
          f"answer logits but the task has num_answers={self.num_answers}")
    if targets.shape != logits.shape:
      raise ValueError(f"task {self.name!r}: batch['targets'] has shape "
                       f"{targets.shape}, the logits {logits.shape}")
    return logits, targets

  def loss(self, outputs, batch):
    logits, targets = self.logits_and_targets(outputs, batch)
    # Exact-evaluation batches mark their padding rows; training batches
    # hold real rows only.
    weights = (jnp.asarray(batch["example_mask"], jnp.float32)
               if "example_mask" in batch else None)
    loss = instance_bce(logits, targets, weights)
    score = argmax_score(logits, targets)
    w = jnp.ones_like(score) if weights is None else weights
    n = jnp.sum(w)
    loss_name, score_name = self.metric_names
    return loss, {loss_name: loss,
                  score_name: jnp.sum(score * w) / jnp.maximum(n, 1.0),
                  "n_examples": n}


@register_task
class VQA(AnswerTask):
  """VQA v2: 3129 soft-scored answers; the head `vqa_output` is new."""

  name = "vqa"
  heads = ("vqa",)
  new_params = ("vqa_output/*",)
  default_answers = VQA_NUM_ANSWERS
  score_name = "score"


@register_task
class VE(AnswerTask):
  """SNLI-VE: the VQA head with 3 answers, trained with the same BCE."""

  name = "ve"
  heads = ("ve",)
  new_params = ("vqa_output/*",)
  default_answers = VE_NUM_ANSWERS
  score_name = "acc"
