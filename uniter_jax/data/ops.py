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
* Deferred images: an op that never reads or writes the image ARRAYS of an
  example (`img_feat`, `img_pos_feat`, `img_soft_labels`), only moves
  whole image parts around (ITM swapping in a negative) or touches the
  text (MLM), says so with `@no_image_arrays`. Before such an op the
  pipeline need not have read the example's image: the example may carry
  only `img_key` and `_img_index` (the image-store index, `DEFERRED_IMAGE`),
  and `ctx.sample_image(s)` hand it image parts of that form too (the draw
  from `rng` is the same). `apply_ops` loads deferred images before the
  first op without the mark and after the last op, the example's own one
  into the caller's buffer (a row of the batch). So an image that an ITM
  negative replaces is never read, and a negative's features are written
  straight into the batch. Ops without the mark see full arrays, as ever.

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

# Bookkeeping key of a deferred image part: the image-store index of an
# image whose arrays have not been read yet (with `img_key` beside it).
DEFERRED_IMAGE = "_img_index"


def no_image_arrays(op: Op) -> Op:
  """Marks `op` as one that reads and writes no image arrays (see the
  module docstring, "Deferred images"); returns `op` itself."""
  op.reads_image_arrays = False
  return op


def reads_image_arrays(op: Op) -> bool:
  """False only for ops marked with `no_image_arrays`."""
  return getattr(op, "reads_image_arrays", True) is not False


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
  # (image-store index, img_feat_out) -> image part: loads deferred images.
  # When set, `_sample_image(s)` also take `load=False` (deferred parts).
  _load_image: Callable[..., Example] | None = None
  # Set by `apply_ops` while an op marked `no_image_arrays` runs.
  _defer_images: bool = False

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
    Inside an op marked `no_image_arrays` the part may be deferred
    (`img_key` and `DEFERRED_IMAGE` only); the draw is the same.
    """
    if self._defers():
      return self._sample_image(rng, exclude_key, self.max_img, load=False)
    return self._sample_image(rng, exclude_key, self.max_img)

  def _defers(self) -> bool:
    return self._defer_images and self._load_image is not None

  def sample_images(self, rng: np.random.Generator, n: int,
                    exclude_key: str | None = None) -> list[Example]:
    """Image parts (as `sample_image`) of `n` DISTINCT random images of the
    same text split, none of them `exclude_key`, each with at most
    `max_img` regions (drawn without replacement, as the official
    retrieval `sample_negative` does)."""
    if self._sample_images is None:
      raise ValueError("this OpContext cannot sample several images")
    if self._defers():
      return self._sample_images(rng, int(n), exclude_key, self.max_img,
                                 load=False)
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
  """The per-example generator: a pure function of (seed, epoch, index).

  The same generator as `np.random.default_rng([seed, epoch, index])`,
  built without `default_rng`'s argument handling (~8 us less a call).
  """
  return np.random.Generator(np.random.PCG64(
      np.random.SeedSequence([seed, epoch, index])))


def _load_deferred(example: Example | list[Example], ctx: OpContext,
                img_feat_out: np.ndarray | None = None
                ) -> tuple[Example | list[Example], np.ndarray | None]:
  """Loads the deferred image parts of an example (a dict or its rows).

  A one-dict example's image goes into `img_feat_out` (see
  `ImageStore.load`); rows of a multi-row example get arrays of their own,
  shared by rows naming the same image. Returns the example (a new dict
  or list where something was loaded; the input is not modified) and
  `img_feat_out`, or None once it holds an image.
  """
  load = ctx._load_image  # pylint: disable=protected-access
  if load is None:   # without a loader nothing can have been deferred
    return example, img_feat_out
  if isinstance(example, dict):
    if DEFERRED_IMAGE not in example:
      return example, img_feat_out
    out = dict(example)
    index = int(out.pop(DEFERRED_IMAGE))
    out.update(load(index, img_feat_out=img_feat_out))
    return out, None
  if not any(isinstance(r, dict) and DEFERRED_IMAGE in r for r in example):
    return example, img_feat_out
  parts: dict[int, Example] = {}
  rows = []
  for row in example:
    if isinstance(row, dict) and DEFERRED_IMAGE in row:
      row = dict(row)
      index = int(row.pop(DEFERRED_IMAGE))
      if index not in parts:
        parts[index] = load(index)
      row.update(parts[index])
    rows.append(row)
  return rows, img_feat_out


def apply_ops(example: Example, ops: Sequence[tuple[str, Op]],
              rng: np.random.Generator, ctx: OpContext,
              img_feat_out: np.ndarray | None = None
              ) -> Example | list[Example]:
  """Runs `ops` in order on one example.

  An op may return a list of row dicts instead of one dict (an example of
  several rows, e.g. one row per image of an NLVR2 pair); the ops after it
  then run on each of those rows in turn, all with the example's `rng`,
  so a later op (e.g. masking) needs no knowledge of how rows were made.
  Deferred images (module docstring) are loaded before the first op not
  marked `no_image_arrays` and after the last op; the first image loaded
  into a one-dict example gets its fp32 features written into
  `img_feat_out` (a float32 [>= regions, D] array, e.g. a row of the
  batch), later ones get arrays of their own. Returns the dict, or the
  list of row dicts, with every image loaded.
  """
  # Images are deferred only with a context that can load them later.
  lazy = (isinstance(ctx, OpContext)
          and ctx._load_image is not None)  # pylint: disable=protected-access
  for name, op in ops:
    defer = lazy and not reads_image_arrays(op)
    if lazy and not defer:
      example, img_feat_out = _load_deferred(example, ctx, img_feat_out)
    if lazy:
      ctx._defer_images = defer  # pylint: disable=protected-access
    try:
      if isinstance(example, list):
        out = [op(row, rng, ctx) for row in example]
        bad = [type(o).__name__ for o in out if not isinstance(o, dict)]
        if bad:
          raise TypeError(f"data op {name!r} returned {bad[0]} for a row of "
                          "a multi-row example, expected the row dict")
      else:
        out = op(example, rng, ctx)
        if isinstance(out, (list, tuple)):
          out = list(out)
          if not out or not all(isinstance(o, dict) for o in out):
            raise TypeError(f"data op {name!r} returned a "
                            f"{type(out).__name__} that is not a non-empty "
                            "list of row dicts")
        elif not isinstance(out, dict):
          raise TypeError(f"data op {name!r} returned {type(out).__name__}, "
                          "expected the example dict (or a list of row "
                          "dicts)")
    finally:
      if lazy:
        ctx._defer_images = False  # pylint: disable=protected-access
    example = out
  if lazy:
    example = _load_deferred(example, ctx, img_feat_out)[0]
  return example
