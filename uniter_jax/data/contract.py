"""The batch contract as code: which arrays a batch holds, their dtypes,
shapes and padding.

Every batch the pipeline hands to a model is a dict of numpy arrays whose
rows follow one layout, `[CLS text SEP pad.. (Lt) | regions pad.. (Li)]`.
A `Field` declares one array, so that a task can add its own (VQA's 3129
soft scores, NLVR2's one label per image pair); collate pads by these
declarations, and `check_batch` checks a batch against them where it leaves
the pipeline, naming the field and what was expected, instead of a wrong
dtype or shape surfacing deep inside a jitted step.

Shapes use B (rows of the batch), Lt (text slots, `input_ids.shape[1]`),
Li (region slots, `img_feat.shape[1]`) and, for multi-row examples,
E = B // rows_per_example (examples of the batch). A field's `kind` says
how its leading dims follow from these:

* "text": per row [Lt], values up to the row's text length, then `pad`;
  batch [B, Lt, *tail].
* "image": per row [Li, *tail], values up to the row's region count, then
  `pad`; batch [B, Li, *tail].
* "row": per row [*tail] (ITM `targets`, VQA soft scores); batch [B, *tail].
* "example": per example [*tail] (one label per NLVR2 image pair); batch
  [E, *tail], taken from the first row of each example.
* "batch": made after collation, by collate itself (`attn_masks`) or by a
  batch op (`mlm_positions`); batch [B, *tail]; checked, never collated.

`tail` entries: an int is checked; None is any size (the same for every
row, since rows are stacked); "Lt", "Li" and "Lt+Li" are checked against
the batch's text and region slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from uniter_jax.data import schema

KINDS = ("text", "image", "row", "example", "batch")
# Kinds that collate builds from the per-row dicts.
COLLATED_KINDS = ("text", "image", "row", "example")
_SYMBOLIC = ("Lt", "Li", "Lt+Li")


@dataclasses.dataclass(frozen=True)
class Field:
  """One array of the batch contract.

  Attributes:
    name: the batch key.
    dtype: a numpy dtype, or a tuple of allowed dtypes (`img_feat` may be
      float32 or float16; collate then writes the first one unless told
      otherwise).
    kind: "text" | "image" | "row" | "example" | "batch" (module docstring).
    tail: trailing dims after the kind's leading dims: ints are checked,
      None is any size, "Lt" / "Li" / "Lt+Li" follow the batch's slots.
    pad: the value written after a row's text length ("text") or region
      count ("image"): e.g. -1 for `txt_labels` (ignored by the loss), 1
      for `img_type_ids`.
    optional: the field may be absent from a batch; when present it is in
      every row of the batch (collate refuses a batch where some rows carry
      it and others do not).
  """
  name: str
  dtype: Any
  kind: str
  tail: tuple = ()
  pad: Any = 0
  optional: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"field {self.name!r}: kind {self.kind!r} is not one "
                       f"of {KINDS}")
    for d in self.tail:
      if not (d is None or d in _SYMBOLIC
              or (isinstance(d, (int, np.integer)) and d >= 0)):
        raise ValueError(f"field {self.name!r}: tail entry {d!r} must be an "
                         f"int >= 0, None or one of {_SYMBOLIC}")
    # Normalised once here, so the per-batch check compares dtypes only.
    dtypes = self.dtype if isinstance(self.dtype, tuple) else (self.dtype,)
    object.__setattr__(self, "dtype", tuple(np.dtype(d) for d in dtypes)
                       if isinstance(self.dtype, tuple)
                       else np.dtype(self.dtype))
    object.__setattr__(self, "tail", tuple(self.tail))

  @property
  def dtypes(self) -> tuple[np.dtype, ...]:
    """The allowed dtypes (one unless `dtype` is a tuple)."""
    return self.dtype if isinstance(self.dtype, tuple) else (self.dtype,)

  @property
  def default_dtype(self) -> np.dtype:
    """What collate writes when nothing else decides: the first dtype."""
    return self.dtypes[0]


class BatchContractError(ValueError):
  """A batch does not match its declared fields; the message names the
  field and what was expected."""


# ---------------------------------------------------------------------------
# The field lists. Order matters to collate: within a kind, fields are
# written into the batch dict in this order.
# ---------------------------------------------------------------------------
BASE_FIELDS: tuple[Field, ...] = (
    Field("input_ids", np.int32, "text"),
    Field("txt_type_ids", np.int32, "text", optional=True),
    # Made by collate: every row's positions 0..Lt-1 (not padded).
    Field("position_ids", np.int32, "batch", ("Lt",)),
    # Made by collate: 1 on the row's real text tokens and regions.
    Field("attn_masks", np.int32, "batch", ("Lt+Li",)),
    Field("img_feat", (np.float32, np.float16), "image", (schema.FEAT_DIM,)),
    Field("img_pos_feat", np.float32, "image", (7,)),
    Field("img_type_ids", np.int32, "image", pad=1, optional=True),
    Field("txt_lens", np.int32, "batch"),
    Field("num_bbs", np.int32, "batch"),
    # Exact evaluation (`UniterData.exact_batches`): False on the rows that
    # only pad the last batch of a shape; the kept-record index, -1 there.
    Field("example_mask", np.bool_, "row", optional=True),
    Field("example_index", np.int64, "row", optional=True),
)

PRETRAIN_FIELDS: tuple[Field, ...] = (
    Field("txt_labels", np.int32, "text", pad=-1, optional=True),
    Field("img_soft_labels", np.float32, "image", (schema.NUM_LABELS,),
          optional=True),
    Field("img_masks", np.bool_, "image", pad=False, optional=True),
    Field("feat_targets", np.float32, "image", (schema.FEAT_DIM,),
          optional=True),
    Field("label_targets", np.float32, "image", (schema.NUM_LABELS,),
          optional=True),
    Field("targets", np.int32, "row", optional=True),
    # Batch ops of the masked objectives: the masked positions, padded to a
    # static count P per batch shape, and which of them are real.
    Field("mlm_positions", np.int32, "batch", (None,), optional=True),
    Field("mlm_valid", np.bool_, "batch", (None,), optional=True),
    Field("mrm_positions", np.int32, "batch", (None,), optional=True),
    Field("mrm_valid", np.bool_, "batch", (None,), optional=True),
    # MRFR's feature targets gathered at `mrm_positions` ([B, P, D]), made
    # by its batch op instead of [B, Li, D] `feat_targets`.
    Field("mrm_feat_targets", np.float32, "batch", (None, schema.FEAT_DIM),
          optional=True),
    # MRC's soft-label targets in the same layout ([B, P, C]), made per
    # row by its op instead of [B, Li, C] `label_targets`.
    Field("mrm_label_targets", np.float32, "row", (None, schema.NUM_LABELS),
          optional=True),
)

DEFAULT_FIELDS: tuple[Field, ...] = BASE_FIELDS + PRETRAIN_FIELDS


def field_table(fields: Sequence[Field]) -> dict[str, Field]:
  """{name: field}, refusing a name declared twice."""
  out: dict[str, Field] = {}
  for f in fields:
    if not isinstance(f, Field):
      raise TypeError(f"batch fields must be contract.Field, got {f!r}")
    if f.name in out and out[f.name] != f:
      raise ValueError(f"field {f.name!r} is declared twice, differently: "
                       f"{out[f.name]} and {f}")
    out[f.name] = f
  return out


def _dim(d, lt: int | None, li: int | None):
  if d == "Lt":
    return lt
  if d == "Li":
    return li
  if d == "Lt+Li":
    return None if lt is None or li is None else lt + li
  return d


def expected_shape(f: Field, b: int, lt: int | None, li: int | None,
                   rows_per_example: int = 1) -> tuple:
  """The shape `f` must have (None: any size) in a batch of `b` rows."""
  lead = {"text": (b, lt), "image": (b, li), "row": (b,),
          "example": (b // rows_per_example,), "batch": (b,)}[f.kind]
  return lead + tuple(_dim(d, lt, li) for d in f.tail)


def _fmt(shape) -> str:
  return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def check_batch(batch: Mapping[str, Any], fields: Sequence[Field], *,
                where: str, rows_per_example: int = 1) -> None:
  """Raises `BatchContractError` unless `batch` matches `fields`.

  Checks, per declared field present in the batch, its dtype and shape
  (leading dim B rows, or E = B // rows_per_example for "example" fields;
  Lt for "text" and Li for "image" fields, as `input_ids` and `img_feat`
  have them; the declared tail); that every required field is there; and
  that the batch holds no undeclared key. It reads only shapes and dtypes,
  so it is cheap enough to run on every batch.

  Args:
    batch: the batch dict (numpy or jax arrays).
    fields: the complete contract of this batch (e.g. `BASE_FIELDS` plus a
      task's fields).
    where: names the batch's source in the message (e.g. the dataset).
    rows_per_example: rows per example (multi-row examples).
  """
  table = field_table(fields)
  undeclared = sorted(k for k in batch if k not in table)
  if undeclared:
    raise BatchContractError(
        f"{where}: batch holds undeclared fields {undeclared}; declared: "
        f"{sorted(table)}")
  missing = sorted(n for n, f in table.items()
                   if not f.optional and n not in batch)
  if missing:
    raise BatchContractError(f"{where}: batch lacks the required fields "
                             f"{missing}")
  if not batch:
    return
  ref = "input_ids" if "input_ids" in batch else next(
      k for k in batch if table[k].kind != "example")
  b = np.shape(batch[ref])[0] if np.ndim(batch[ref]) else None
  if b is None:
    raise BatchContractError(f"{where}: {ref} is a scalar; expected [B, ...]")
  if rows_per_example < 1 or b % rows_per_example:
    raise BatchContractError(
        f"{where}: {b} rows are no whole number of examples of "
        f"rows_per_example={rows_per_example} rows")
  lt = np.shape(batch["input_ids"])[1] if (
      "input_ids" in batch and np.ndim(batch["input_ids"]) >= 2) else None
  li = np.shape(batch["img_feat"])[1] if (
      "img_feat" in batch and np.ndim(batch["img_feat"]) >= 2) else None
  for name, value in batch.items():
    f = table[name]
    dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else None
    if dtype not in f.dtypes:
      want = " or ".join(str(d) for d in f.dtypes)
      raise BatchContractError(f"{where}: field {name!r} has dtype {dtype}, "
                               f"expected {want}")
    want = expected_shape(f, b, lt, li, rows_per_example)
    got = tuple(np.shape(value))
    if len(got) != len(want) or any(
        w is not None and g != w for g, w in zip(got, want)):
      raise BatchContractError(
          f"{where}: field {name!r} ({f.kind}) has shape {_fmt(got)}, "
          f"expected {_fmt(want)} (B={b}, Lt={lt}, Li={li}"
          + (f", rows_per_example={rows_per_example}"
             if rows_per_example != 1 else "") + ")")
