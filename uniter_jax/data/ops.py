"""Task hook: per-example ops applied after the text-image join.

An op is `op(example, rng, ctx) -> example`:

* `example` is the per-example dict of the batch contract (numpy arrays;
  `input_ids` already holds [CLS] first and [SEP] last). `img_key` (str) and
  keys starting with `_` (`_id`, `_index`, `_target_labels`,
  `_target_scores`, and `_images` for a record of several images) are
  bookkeeping for ops and are dropped by the collate step.
* An op may return a list of row dicts instead of the dict: the example
  then has several rows (`UniterData(rows_per_example=...)`); later ops run
  on each row (see `apply_ops`).
* `rng` is a `np.random.Generator` derived from `(seed, epoch, example index)`
  only, so the result does not depend on worker count, host count or order.
  All ops of one example share it, in the order they are listed.
* `ctx` is an `OpContext`: special ids, `v_range`, `sample_image` for
  ITM negatives, and `sample_images` / `sample_texts` (several distinct
  negatives at once, for retrieval).

Ops are not registered by name: a task declares its ops
(`uniter_jax.tasks.Task.data_ops`), and a pipeline takes them as a mapping of
names to callables, or a sequence of callables (named by `__name__`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator, "OpContext"], Example]

def resolve_ops(ops: Sequence[Op] | Mapping[str, Op] | None
                ) -> list[tuple[str, Op]]:
  """(name, callable) pairs of `ops`."""
  if ops is None:
    return []
  if isinstance(ops, Mapping):
    return [(str(k), v) for k, v in ops.items()]
  out = []
  for op in ops:
    if callable(op):
      out.append((getattr(op, "__name__", repr(op)), op))
    else:
      raise TypeError(f"data op must be a callable (a task's op), got "
                      f"{op!r}")
  return out


@dataclasses.dataclass
class OpContext:
  """What per-example ops may need besides the example itself.

  Attributes:
    cls_id, sep_id, mask_id, pad_id: special token ids (`meta.json`).
    v_range: [lo, hi) of ids MLM may draw random replacements from.
    meta: the text dataset's metadata dict.
    max_txt: text slots (Lt) of the batch being built; an op that lengthens
      the text must stay within it.
    max_img: region slots (Li) of the batch being built.
    params: op hyper-parameters, also readable as attributes
      (`ctx.mlm_prob`); from `UniterData(op_params=...)`.
  """
  cls_id: int
  sep_id: int
  mask_id: int
  pad_id: int
  v_range: tuple[int, int]
  meta: Mapping[str, Any]
  max_txt: int
  max_img: int
  _sample_image: Callable[[np.random.Generator, str | None, int], Example]
  params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # (rng, n, exclude_key, max_img) -> n distinct image parts; and
  # (rng, n, exclude_img_key, max_txt) -> n distinct text parts.
  _sample_images: Callable[..., list[Example]] | None = None
  _sample_texts: Callable[..., list[Example]] | None = None

  def __getattr__(self, name: str) -> Any:
    # Op hyper-parameters (e.g. mlm_prob, mrm_prob, itm_neg_prob) read as
    # attributes; only reached when `name` is not a regular field.
    params = self.__dict__.get("params", {})
    if name in params:
      return params[name]
    raise AttributeError(name)

  def sample_image(self, rng: np.random.Generator,
                   exclude_key: str | None = None) -> Example:
    """Image part (img_feat, img_pos_feat[, img_soft_labels], img_key) of a
    random image of the same text split, other than `exclude_key`.

    Only images with at most `max_img` regions are drawn, so the example still
    fits its batch's static shape (the batch's positives obey the same bound).
    """
    return self._sample_image(rng, exclude_key, self.max_img)

  def sample_images(self, rng: np.random.Generator, n: int,
                    exclude_key: str | None = None) -> list[Example]:
    """Image parts (as `sample_image`) of `n` DISTINCT random images of the
    same text split, none of them `exclude_key`, each with at most
    `max_img` regions (drawn without replacement, as the official
    retrieval `sample_negative` does)."""
    if self._sample_images is None:
      raise ValueError("this OpContext cannot sample several images")
    return self._sample_images(rng, int(n), exclude_key, self.max_img)

  def sample_texts(self, rng: np.random.Generator, n: int,
                   exclude_img_key: str | None = None) -> list[Example]:
    """`n` DISTINCT random texts of the same split, none of them a text of
    the image `exclude_img_key` (the official retrieval excludes every
    caption of the true image), each with at most `max_txt` tokens with
    [CLS] and [SEP]. Each is `{"input_ids", "_id", "_index"}` (no image)."""
    if self._sample_texts is None:
      raise ValueError("this OpContext cannot sample texts")
    return self._sample_texts(rng, int(n), exclude_img_key, self.max_txt)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The per-example generator: a pure function of (seed, epoch, index)."""
  return np.random.default_rng([seed, epoch, index])


def apply_ops(example: Example, ops: Sequence[tuple[str, Op]],
              rng: np.random.Generator, ctx: OpContext
              ) -> Example | list[Example]:
  """Runs `ops` in order on one example.

  An op may return a list of row dicts instead of one dict (an example of
  several rows, e.g. one row per image of an NLVR2 pair); the ops after it
  then run on each of those rows in turn, all with the example's `rng`,
  so a later op (e.g. masking) needs no knowledge of how rows were made.
  Returns the dict, or the list of row dicts.
  """
  for name, op in ops:
    if isinstance(example, list):
      out = [op(row, rng, ctx) for row in example]
      bad = [type(o).__name__ for o in out if not isinstance(o, dict)]
      if bad:
        raise TypeError(f"data op {name!r} returned {bad[0]} for a row of a "
                        "multi-row example, expected the row dict")
    else:
      out = op(example, rng, ctx)
      if isinstance(out, (list, tuple)):
        out = list(out)
        if not out or not all(isinstance(o, dict) for o in out):
          raise TypeError(f"data op {name!r} returned a {type(out).__name__}"
                          " that is not a non-empty list of row dicts")
      elif not isinstance(out, dict):
        raise TypeError(f"data op {name!r} returned {type(out).__name__}, "
                        "expected the example dict (or a list of row dicts)")
    example = out
  return example
