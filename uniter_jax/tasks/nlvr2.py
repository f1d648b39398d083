"""NLVR2: is a statement true of a pair of images? (paired, triplet, attn).

One task, `nlvr2`, trains the three official heads; which one is the run's
model (`config.model_task`) decides how a record of two images becomes
rows, as the official `data/nlvr2.py` datasets do with `use_img_type`:

* `nlvr2-paired` and `nlvr2-attn` (official `paired`, `paired-attn`): two
  rows per example, (text, img0) with image type id 1 and (text, img1) with
  image type id 2 (`pair_rows`; `rows_per_example = 2`, the length index
  counts the larger image);
* `nlvr2-triplet`: one row, the text then img0's regions (type 1) then
  img1's (type 2) (`triplet_row`; the length index counts both images).

The type table of these heads has 3 rows; initialised from a pretraining
checkpoint, row 2 is a copy of row 1, as the official `init_type_embedding`
does (`uniter_jax.model.surgery`). The label is one per example: `targets`
1 (True) / 0 (False), -1 when the record has none (a hidden test split).

Loss: 2-way cross-entropy, mean over the batch's examples (the official
`train_nlvr2.py` takes `loss.mean()` of the per-example cross-entropy).
Examples without a label and the padding of exact evaluation batches
(`example_mask`) count for nothing, so the mean is over labelled examples;
a training split has none of either, so training is exactly the official
mean. Metric: accuracy of the argmax (1 = True).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uniter_jax.data import contract
from uniter_jax.data import schema
from uniter_jax.tasks import losses
from uniter_jax.tasks.base import loss_weight_of, register_task, Task

HEADS = ("nlvr2-attn", "nlvr2-paired", "nlvr2-triplet")
# The official base and large configs train `paired-attn`.
DEFAULT_HEAD = "nlvr2-attn"
# Image keys of a joined example that belong to one image (`ImageStore.load`).
_IMAGE_KEYS = ("img_feat", "img_pos_feat", "img_key", "img_soft_labels")
# Parameters each head adds to the encoder (fresh from a pretraining
# checkpoint); globs over '/'-joined Flax paths.
NEW_PARAMS = {
    "nlvr2-paired": ("nlvr2_output/*",),
    "nlvr2-triplet": ("nlvr2_output/*",),
    "nlvr2-attn": ("nlvr2_output/*", "attn1/*", "attn2/*", "fc/*",
                   "attn_pool/*"),
}
_WHERE = "NLVR2 (task 'nlvr2')"


def _two_images(example: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The record's two image parts, or a DataError naming the record."""
  images = example.get("_images")
  n = 1 if images is None else len(images)
  if n != 2:
    raise schema.DataError(
        _WHERE, example.get("_id", example.get("_index", "?")),
        f"names {n} image(s); an NLVR2 record names exactly 2 "
        "(img_keys = [left, right], i.e. img0 and img1)")
  return images


def _text_part(example: Mapping[str, Any]) -> dict[str, Any]:
  """The example without its image arrays, with its label (-1 if none)."""
  out = {k: v for k, v in example.items()
         if k not in _IMAGE_KEYS and k != "_images"}
  out["targets"] = np.int32(example.get("targets", schema.NO_TARGET))
  return out


def _type_ids(num_regions: int, image: int) -> np.ndarray:
  # Official `use_img_type`: the i-th image (0-based) gets type id i + 1.
  return np.full(num_regions, image + 1, np.int32)


def pair_rows(example: dict[str, Any], rng: np.random.Generator, ctx
              ) -> list[dict[str, Any]]:
  """Data op of the paired heads: rows (text, img0) and (text, img1).

  Each row holds the whole text, one image's regions with image type id
  1 (img0) or 2 (img1), and the example's label.
  """
  del rng, ctx
  text = _text_part(example)
  rows = []
  for i, image in enumerate(_two_images(example)):
    row = dict(text)
    row.update(image)
    row["img_type_ids"] = _type_ids(len(image["img_feat"]), i)
    rows.append(row)
  return rows


def triplet_row(example: dict[str, Any], rng: np.random.Generator, ctx
                ) -> dict[str, Any]:
  """Data op of the triplet head: one row, text | img0 | img1 regions,
  image type ids 1 then 2."""
  del rng, ctx
  images = _two_images(example)
  out = _text_part(example)
  for key in ("img_feat", "img_pos_feat", "img_soft_labels"):
    if key in images[0]:
      out[key] = np.concatenate([im[key] for im in images], axis=0)
  out["img_type_ids"] = np.concatenate(
      [_type_ids(len(im["img_feat"]), i) for i, im in enumerate(images)])
  out["img_key"] = "+".join(str(im["img_key"]) for im in images)
  return out


def _real_examples(batch: Mapping[str, Any], rows_per_example: int):
  """[E] bool: the batch's real examples (False on exact-evaluation
  padding), or None when the batch has no `example_mask`."""
  if "example_mask" not in batch:
    return None
  return jnp.asarray(batch["example_mask"])[::rows_per_example].astype(bool)


@register_task
class Nlvr2(Task):
  """NLVR2 with any of the three official heads (see the module docstring).

  Args:
    head: the model's head, one of `HEADS` (from `config.model_task`);
      sets the rows per example, the data op and the new parameters.
    loss_weight: multiplier on the loss (1.0 officially).
  """

  name = "nlvr2"
  heads = HEADS
  fields = (contract.Field("targets", np.int32, "example"),)
  metric_weights = {"nlvr2_loss": "nlvr2_n", "nlvr2_acc": "nlvr2_n"}
  hidden_metrics = ("nlvr2_n",)

  def __init__(self, *, head: str = DEFAULT_HEAD, loss_weight: float = 1.0):
    super().__init__(loss_weight=loss_weight)
    if head not in HEADS:
      raise ValueError(f"task 'nlvr2': head {head!r} is none of {HEADS}")
    self.head = head

  @classmethod
  def from_config(cls, config) -> "Nlvr2":
    # Another head is left to `check_head`, which names it.
    head = config.model_task if config.model_task in HEADS else DEFAULT_HEAD
    return cls(head=head, loss_weight=loss_weight_of(config, cls.name))

  @property
  def triplet(self) -> bool:
    return self.head == "nlvr2-triplet"

  @property
  def rows_per_example(self) -> int:  # type: ignore[override]
    return 1 if self.triplet else 2

  @property
  def row_regions(self) -> str:  # type: ignore[override]
    return "sum" if self.triplet else "max"

  @property
  def new_params(self) -> tuple[str, ...]:  # type: ignore[override]
    return NEW_PARAMS[self.head]

  def check_head(self, head: str) -> None:
    super().check_head(head)
    if head != self.head:
      raise ValueError(f"task 'nlvr2' was built for head '{self.head}' but "
                       f"the model is '{head}' (config.model_task)")

  def data_ops(self):
    return {self.name: triplet_row if self.triplet else pair_rows}

  def loss(self, outputs, batch):
    logits = losses.get(outputs, "logits", self.name, "outputs")
    targets = jnp.asarray(losses.get(batch, "targets", self.name)
                          ).astype(jnp.int32)
    if logits.shape[0] != targets.shape[0]:
      raise ValueError(f"task 'nlvr2': {logits.shape[0]} logits rows for "
                       f"{targets.shape[0]} examples (head '{self.head}')")
    valid = targets >= 0
    real = _real_examples(batch, self.rows_per_example)
    if real is not None:
      valid = valid & real
    safe = jnp.where(valid, targets, 0)
    logits = logits.astype(jnp.float32)
    ce = (jax.nn.logsumexp(logits, axis=-1)
          - jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0])
    w = valid.astype(jnp.float32)
    n = jnp.sum(w)
    loss = jnp.sum(ce * w) / jnp.maximum(n, 1.0)
    hit = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32) * w
    acc = jnp.sum(hit) / jnp.maximum(n, 1.0)
    return loss, {"nlvr2_loss": loss, "nlvr2_acc": acc, "nlvr2_n": n}

