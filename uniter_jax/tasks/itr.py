"""Image-text retrieval finetuning with online hard negatives (task `itr`).

The official `train_itm_hard_negatives.py` trains the retrieval head
(`rank_output`, one score per text-image pair) with a hinge loss on hard
negatives chosen online: per step it takes a text with its image and
`negative_size` random other images, and an image with its text and
`negative_size` random texts of other images; the model scores every
candidate without gradients in eval mode, keeps the `hard_neg_size`
highest-scoring negatives of each anchor, and trains
`clamp(margin + sigmoid(s_neg) - sigmoid(s_pos), 0)` on the true pair plus
those negatives, in train mode (dropout).

Here the same scheme has static shapes. An example is one caption and has
`rows_per_example = 2 * (1 + N)` rows (N = `negative_size`), two groups of
1 + N in this order:

  text-anchored  (image retrieval):  (text, its image), (text, N images)
  image-anchored (text retrieval):   (text, its image), (N texts, image)

The first row of each group is the true pair. `ImageTextRetrieval.outputs`
runs the model once over all rows, deterministic and with the parameters
under `stop_gradient`, picks each group's top `hard_neg_size` negatives with
`jax.lax.top_k`, gathers those rows (and the true one) of every batch field
example by example, and runs the model again on these 2 * (1 + k) rows per
example with dropout as asked: the gradient flows through this second pass
only. The official code draws the text-anchored and the image-anchored
sample from two independently shuffled loaders; here both anchors come
from the same caption (the same distribution of samples).

Loss reduction (official): each anchor's hinge is averaged over its k
negatives; a step's loss is that mean divided by `train_batch_size` (the
official accumulation count, one text- and one image-anchored sample per
step), and gradients are summed over accumulation steps and GPUs. So an
update's gradient is, per device, the mean over its examples of
(text-anchored mean + image-anchored mean), summed over devices. With
`train.sum_grads=True` (summed accumulation and device sum, as the trainer
does it) the task returns the per-example mean divided by
`train.gradient_accumulation_steps` (`loss_divisor`), which gives exactly
that gradient; the metric `itr_loss` is the undivided per-example loss.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uniter_jax.tasks import losses
from uniter_jax.tasks.base import loss_weight_of, register_task, Task

# Official defaults (`train-itm-*-16gpu-hn.json`).
NEGATIVE_SIZE = 399
HARD_NEG_SIZE = 31
MARGIN = 0.2
# The two anchor groups of an example, in row order.
GROUPS = ("ir", "tr")


def itr_op(example: dict[str, Any], rng: np.random.Generator, ctx
           ) -> list[dict[str, Any]]:
  """One caption -> its 2 * (1 + N) rows (module docstring for the order).

  Negative images are `ctx.negative_size` distinct images other than the
  caption's; negative texts the same number of distinct captions of other
  images (`OpContext.sample_images` / `sample_texts`, drawn within the
  batch shape's slots).
  """
  n = int(ctx.negative_size)
  key = example["img_key"]
  text = {"input_ids": example["input_ids"]}
  image = {"img_feat": example["img_feat"],
           "img_pos_feat": example["img_pos_feat"]}
  info = {k: example[k] for k in ("_id", "_index") if k in example}
  true_pair = {**text, **image, **info}
  rows = [true_pair]
  for neg in ctx.sample_images(rng, n, exclude_key=key):
    if neg.get("img_key") == key:
      raise ValueError(f"itr_op: ctx.sample_images returned the true image "
                       f"{key!r} as a negative")
    rows.append({**text, "img_feat": neg["img_feat"],
                 "img_pos_feat": neg["img_pos_feat"]})
  rows.append(dict(true_pair))
  for neg in ctx.sample_texts(rng, n, exclude_img_key=key):
    rows.append({"input_ids": neg["input_ids"], **image})
  return rows


def hard_negative_index(scores: jax.Array, hard_neg_size: int) -> jax.Array:
  """Rows to train on per anchor group: the true pair, then the top-k.

  Args:
    scores: [E, G, 1 + N] candidate scores per group, the true pair first.
    hard_neg_size: k <= N.

  Returns:
    int32 [E, G, 1 + k]: 0 (the true pair), then the indices (within the
    group) of the k highest-scoring negatives, highest first
    (`jax.lax.top_k`: among equal scores the lower index first).
  """
  n = scores.shape[-1] - 1
  if not 1 <= hard_neg_size <= n:
    raise ValueError(f"hard_neg_size={hard_neg_size} must be in [1, "
                     f"negative_size={n}]")
  _, top = jax.lax.top_k(scores[..., 1:], hard_neg_size)
  zero = jnp.zeros(scores.shape[:-1] + (1,), jnp.int32)
  return jnp.concatenate([zero, top.astype(jnp.int32) + 1], axis=-1)


def gather_rows(batch: Mapping[str, Any], rows: jax.Array,
                rows_per_example: int) -> dict[str, jax.Array]:
  """The rows `rows` [E, R] (indices within each example) of every per-row
  field of `batch` ([E * rows_per_example, ...] -> [E * R, ...]).

  Gathered example by example (a batched gather over the example axis), so
  a batch sharded by whole examples needs no communication. Fields whose
  leading dim is not the row count (per-example fields) are kept as they
  are.
  """
  e, r = rows.shape
  b = e * rows_per_example
  take = jax.vmap(lambda x, i: x[i])
  out = {}
  for name, value in batch.items():
    value = jnp.asarray(value)
    if value.ndim and value.shape[0] == b:
      grouped = value.reshape((e, rows_per_example) + value.shape[1:])
      out[name] = take(grouped, rows).reshape((e * r,) + value.shape[1:])
    else:
      out[name] = value
  return out


def hinge_loss(scores: jax.Array, margin: float) -> jax.Array:
  """Official ranking hinge per anchor: [..., 1 + k] raw scores (the true
  pair first) -> [...] mean over the k negatives of
  `max(margin + sigmoid(s_neg) - sigmoid(s_pos), 0)`."""
  prob = jax.nn.sigmoid(scores.astype(jnp.float32))
  return jnp.mean(jax.nn.relu(margin + prob[..., 1:] - prob[..., :1]),
                  axis=-1)


@register_task
class ImageTextRetrieval(Task):
  """Retrieval finetuning of the `itm` head with online hard negatives.

  Options (from `config.train`): `negative_size` (N, official 399),
  `hard_neg_size` (k, official 31), `margin` (0.2); `loss_divisor` is
  `train.gradient_accumulation_steps` when `train.sum_grads` (module
  docstring), else 1.

  Metrics: `itr_loss` (per example: text-anchored + image-anchored hinge
  means, the official per-step loss before its division),
  `itr_loss_ir` / `itr_loss_tr` (the text-anchored / image-anchored part),
  `itr_r1_ir` / `itr_r1_tr` (share of anchors whose true pair scores
  strictly above all N sampled candidates in the no-gradient pass).
  """

  name = "itr"
  heads = ("itm",)

  def __init__(self, *, loss_weight: float = 1.0,
               negative_size: int = NEGATIVE_SIZE,
               hard_neg_size: int = HARD_NEG_SIZE,
               margin: float = MARGIN, loss_divisor: float = 1.0):
    super().__init__(loss_weight=loss_weight)
    self.negative_size = int(negative_size)
    self.hard_neg_size = int(hard_neg_size)
    self.margin = float(margin)
    self.loss_divisor = float(loss_divisor)
    if self.negative_size < 1:
      raise ValueError(f"task 'itr': negative_size={negative_size} must be "
                       ">= 1")
    if not 1 <= self.hard_neg_size <= self.negative_size:
      raise ValueError(f"task 'itr': hard_neg_size={hard_neg_size} must be "
                       f"in [1, negative_size={negative_size}]")
    if self.loss_divisor <= 0:
      raise ValueError(f"task 'itr': loss_divisor={loss_divisor} must be > 0")

  @classmethod
  def from_config(cls, config) -> "ImageTextRetrieval":
    t = config.train
    divisor = (int(t.gradient_accumulation_steps)
               if t.get("sum_grads", False) else 1)
    return cls(loss_weight=loss_weight_of(config, cls.name),
               negative_size=t.get("negative_size", NEGATIVE_SIZE),
               hard_neg_size=t.get("hard_neg_size", HARD_NEG_SIZE),
               margin=t.get("margin", MARGIN), loss_divisor=divisor)

  @property
  def rows_per_example(self) -> int:  # type: ignore[override]
    return len(GROUPS) * (1 + self.negative_size)

  def data_ops(self):
    return {self.name: itr_op}

  def op_params(self) -> dict[str, Any]:
    return {"negative_size": self.negative_size}

  def _examples(self, batch) -> int:
    b = int(np.shape(losses.get(batch, "input_ids", self.name))[0])
    if b % self.rows_per_example:
      raise ValueError(f"task 'itr': a batch of {b} rows is no whole number "
                       f"of examples of {self.rows_per_example} rows "
                       f"(2 x (1 + negative_size={self.negative_size}))")
    return b // self.rows_per_example

  def outputs(self, model, params, batch, *, deterministic: bool = True,
              rngs: Mapping[str, jax.Array] | None = None) -> dict:
    """Scores every candidate without gradients, then runs the model on the
    true pairs and hard negatives (module docstring).

    Returns the second pass's outputs (`logits` [E * 2 * (1 + k), 1], in
    example, group, candidate order), plus `all_scores` [E, 2, 1 + N]
    (first pass, float32) and `hard_index` [E, 2, 1 + k] (the candidates
    trained on, within their group).
    """
    e = self._examples(batch)
    g, n1 = len(GROUPS), 1 + self.negative_size
    frozen = jax.lax.stop_gradient(params)
    first = model.apply({"params": frozen}, batch, deterministic=True)
    scores = jax.lax.stop_gradient(
        losses.get(first, "logits", self.name, "outputs")[:, 0]
    ).astype(jnp.float32).reshape(e, g, n1)
    index = hard_negative_index(scores, self.hard_neg_size)
    rows = (index + (jnp.arange(g, dtype=jnp.int32) * n1)[None, :, None]
            ).reshape(e, -1)
    hard = gather_rows(batch, rows, self.rows_per_example)
    out = dict(model.apply({"params": params}, hard,
                           deterministic=deterministic, rngs=rngs or {}))
    out["all_scores"] = scores
    out["hard_index"] = index
    return out

  def loss(self, outputs, batch):
    e = self._examples(batch)
    k1 = 1 + self.hard_neg_size
    logits = losses.get(outputs, "logits", self.name, "outputs")
    if logits.shape[0] != e * len(GROUPS) * k1:
      raise ValueError(f"task 'itr': outputs['logits'] has {logits.shape[0]} "
                       f"rows, expected {e} examples x {len(GROUPS)} groups x "
                       f"(1 + hard_neg_size={self.hard_neg_size}) (from "
                       "ImageTextRetrieval.outputs)")
    per_anchor = hinge_loss(logits[:, 0].reshape(e, len(GROUPS), k1),
                            self.margin)                        # [E, 2]
    if "example_mask" in batch:   # exact evaluation batches: drop padding
      mask = jnp.asarray(batch["example_mask"]).reshape(
          e, self.rows_per_example)[:, 0].astype(jnp.float32)
    else:
      mask = jnp.ones((e,), jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)

    def mean(x):
      return jnp.sum(x * mask) / count

    per_example = jnp.sum(per_anchor, axis=1)
    itr_loss = mean(per_example)
    metrics = {"itr_loss": itr_loss}
    scores = losses.get(outputs, "all_scores", self.name, "outputs")
    first = jnp.all(scores[..., :1] > scores[..., 1:], axis=-1)  # [E, 2]
    for j, group in enumerate(GROUPS):
      metrics[f"itr_loss_{group}"] = mean(per_anchor[:, j])
      metrics[f"itr_r1_{group}"] = mean(first[:, j].astype(jnp.float32))
    return itr_loss / self.loss_divisor, metrics
