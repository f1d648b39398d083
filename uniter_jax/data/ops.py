"""Task hook: per-example ops applied after the text-image join.

An op is `op(example, rng, ctx) -> example`:

* `example` is the per-example dict of the batch contract (numpy arrays;
  `input_ids` already holds [CLS] first and [SEP] last). `img_key` (str) and
  keys starting with `_` (`_id`, `_index`, `_target_labels`,
  `_target_scores`) are bookkeeping for ops and are dropped by the collate
  step.
* `rng` is a `np.random.Generator` derived from `(seed, epoch, example index)`
  only, so the result does not depend on worker count, host count or order.
  All ops of one example share it, in the order they are listed.
* `ctx` is an `OpContext`: special ids, `v_range`, and `sample_image` for
  ITM negatives.

Ops are registered by name (`register_op("mlm", fn)`) so configs can name
them; a pipeline takes a sequence of names or callables.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator, "OpContext"], Example]

_REGISTRY: dict[str, Op] = {}


def register_op(name: str, fn: Op | None = None, *, overwrite: bool = False):
  """Registers `fn` under `name`; usable as a decorator `@register_op(name)`."""
  def _add(f: Op) -> Op:
    if name in _REGISTRY and _REGISTRY[name] is not f and not overwrite:
      raise ValueError(f"op {name!r} is already registered")
    _REGISTRY[name] = f
    return f
  return _add if fn is None else _add(fn)


def get_op(name: str) -> Op:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise KeyError(f"unknown data op {name!r}; registered: "
                   f"{sorted(_REGISTRY)}") from None


def registered_ops() -> list[str]:
  return sorted(_REGISTRY)


def resolve_ops(ops: Sequence[str | Op] | Mapping[str, Op] | None
                ) -> list[tuple[str, Op]]:
  """Names and callables of `ops` (names are looked up in the registry)."""
  if ops is None:
    return []
  if isinstance(ops, Mapping):
    return [(str(k), v) for k, v in ops.items()]
  out = []
  for op in ops:
    if isinstance(op, str):
      out.append((op, get_op(op)))
    elif callable(op):
      out.append((getattr(op, "__name__", repr(op)), op))
    else:
      raise TypeError(f"data op must be a name or a callable, got {op!r}")
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


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The per-example generator: a pure function of (seed, epoch, index)."""
  return np.random.default_rng([seed, epoch, index])


def apply_ops(example: Example, ops: Sequence[tuple[str, Op]],
              rng: np.random.Generator, ctx: OpContext) -> Example:
  for name, op in ops:
    out = op(example, rng, ctx)
    if not isinstance(out, dict):
      raise TypeError(f"data op {name!r} returned {type(out).__name__}, "
                      "expected the example dict")
    example = out
  return example
