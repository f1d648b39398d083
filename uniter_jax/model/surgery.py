"""Initialising one head's model from another head's params, strictly.

The official code, after `from_pretrained`, changes a few tensors so that a
checkpoint of one head can start another:

- NLVR2 (`init_type_embedding`): the type table grows to 3 rows, row 2 a
  copy of row 1 (image);
- VCR and VCR pretraining: 4 rows, rows 2 and 3 copies of row 0 (text);
  `init_word_embedding(81)` appends 81 rows drawn N(0, 0.02);
- retrieval (`init_output`): `rank_output` := the match row of `itm_output`
  when the source has no `rank_output`;
- VCR pretraining re-creates the MLM head (`cls`), so it starts fresh.

`merge_params` applies these and copies every other parameter by name, and
is strict, like big_vision's `merge_params`: a target parameter that the
source lacks must be declared new (`allow_new` patterns), and a parameter
whose shapes the surgery cannot reconcile is an error; every problem is
listed in one `MergeError`. What it did (loaded, new, unused, surgered) comes
back as a `MergeReport` that prints as a few log lines. Why strict: silently
keeping the fresh initialisation of a mistyped or mis-sized tensor gives a
run that trains, but from the wrong start.

Paths are '/'-joined per-layer Flax paths (`uniter/encoder/layer/3/...`),
whatever the layout (per-layer or `nn.scan`-stacked) of either side.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from uniter_jax.convert import names

Path = tuple[str, ...]

_TYPES = ("uniter", "embeddings", "token_type_embeddings", "embedding")
_WORDS = ("uniter", "embeddings", "word_embeddings", "embedding")
_RANK = {("rank_output", "kernel"): ("itm_output", "kernel"),
         ("rank_output", "bias"): ("itm_output", "bias")}
_VCR_HEADS = ("vcr", "pretrain-vcr")


class MergeError(ValueError):
  """Source params cannot initialise the target model (every problem listed)."""


@dataclasses.dataclass
class MergeReport:
  """What `merge_params` did; paths are '/'-joined per-layer Flax paths.

  Attributes:
    source: what the params came from (a file, a directory), for messages.
    from_head: the head of the source params.
    to_head: the head of the target model.
    loaded: target params copied unchanged from the source.
    new: target params taken from the fresh initialisation (absent from the
      source and declared new, re-created by the surgery, or `reinit`).
    unused: source params that no target param took.
    surgered: target param -> what the surgery did to build it from the
      source (type table growth, extra words, rank_output).
    notes: other things worth a log line (e.g. a head re-created fresh).
  """
  source: str
  from_head: str
  to_head: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  new: list[str] = dataclasses.field(default_factory=list)
  unused: list[str] = dataclasses.field(default_factory=list)
  surgered: dict[str, str] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)

  def lines(self) -> list[str]:
    return report_lines(self)

  def __str__(self) -> str:
    return "\n".join(self.lines())


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def summarize_paths(paths: Iterable[str], max_groups: int = 4) -> str:
  """'a/b/..., c/d' for a list of paths: one entry per top-level module.

  A group of several paths shows their common prefix and '...'; a single
  path is shown whole. Beyond `max_groups` groups the rest are counted, so a
  report stays one line however many params a head has.
  """
  groups: dict[str, list[list[str]]] = {}
  for p in sorted(paths):
    parts = p.split("/")
    groups.setdefault(parts[0], []).append(parts)
  shown = []
  for members in groups.values():
    if len(members) == 1:
      shown.append("/".join(members[0]))
      continue
    common = members[0]
    for m in members[1:]:
      n = 0
      while n < min(len(common), len(m)) and common[n] == m[n]:
        n += 1
      common = common[:n]
    shown.append("/".join(common) + "/...")
  if len(shown) > max_groups:
    shown = shown[:max_groups] + [f"{len(shown) - max_groups} more"]
  return ", ".join(shown)


def report_lines(report: MergeReport) -> list[str]:
  """The report as a few log lines (long lists summarised by prefix)."""
  r = report
  parts = [f"{len(r.loaded)} params loaded"]
  if r.surgered:
    parts.append(f"{len(r.surgered)} by surgery")
  parts.append(f"{len(r.new)} new" +
               (f" ({summarize_paths(r.new)})" if r.new else ""))
  parts.append(f"{len(r.unused)} unused" +
               (f" ({summarize_paths(r.unused)})" if r.unused else ""))
  lines = [f"initialised from {r.source} (head '{r.from_head}' -> "
           f"'{r.to_head}'): " + ", ".join(parts)]
  done = dict.fromkeys(r.surgered.values())
  if done:
    lines.append("  surgery: " + "; ".join(done))
  lines += [f"  note: {n}" for n in r.notes]
  return lines


# --------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------


def _flat(tree: Mapping) -> dict[Path, Any]:
  return traverse_util.flatten_dict(dict(tree))


def _per_layer(flat: Mapping[Path, Any]) -> dict[Path, tuple[Path, int | None]]:
  """per-layer path -> (path in `flat`, layer index or None if not scanned)."""
  out = {}
  for path, leaf in flat.items():
    if names.is_scanned_layer(path):
      for i, p in enumerate(names.unscanned_paths(path, leaf.shape[0])):
        out[p] = (path, i)
    else:
      out[path] = (path, None)
  return out


def _is_abstract(x) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct)


def _match(path: str, patterns: Sequence[str]) -> str | None:
  return next((p for p in patterns if fnmatch.fnmatchcase(path, p)), None)


def _s(shape) -> str:
  return str(tuple(int(d) for d in shape))


# --------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------


def merge_params(source: Mapping, target: Mapping, *, to_head: str,
                 from_head: str = "pretrain", allow_new: Sequence[str] = (),
                 reinit: Sequence[str] = (), rng: jax.Array | None = None,
                 initializer_range: float = 0.02,
                 init_fn: Callable[[], Mapping] | None = None,
                 source_name: str = "source params"
                 ) -> tuple[dict, MergeReport]:
  """Target-model params built from `source` params, strictly.

  Args:
    source: params of the source model, nested dicts of arrays (numpy
      preferred: they are read on the host), per-layer or scanned layout.
    target: params of the target model, fresh or abstract (leaves may be
      `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`); gives the
      structure, layout, shapes and dtypes of the result.
    to_head: the target head (a key of `uniter_jax.model.HEADS`); decides
      the surgery (type table rows, re-created `cls`, `rank_output`).
    from_head: the head of the source params.
    allow_new: glob patterns over '/'-joined per-layer paths (fnmatch, '*'
      crosses '/') of target params that may be absent from the source,
      e.g. `("vqa_output/*",)`; they keep the fresh initialisation.
    reinit: patterns of target params to take fresh even though the source
      has them (each must match at least one target param).
    rng: draws the extra word-embedding rows; `jax.random.key(0)` if None.
    initializer_range: std of those rows (the model config's).
    init_fn: called at most once for the fresh values of new params when
      `target` is abstract; otherwise new params come from `target`.
    source_name: names the source in the report and errors.

  Returns:
    (params, report). Params have the target's structure and layout; loaded
    and surgered leaves are host numpy arrays in the target dtype, new
    leaves are the fresh leaves as given (so already-placed arrays stay
    where they are).

  Raises:
    MergeError: listing every target param missing from the source and not
      declared new, every shape the surgery cannot reconcile (both shapes),
      and every `reinit` pattern that matches nothing.
  """
  tgt_flat = _flat(target)
  tgt = _per_layer(tgt_flat)
  src_flat = _flat(source)
  src = _per_layer(src_flat)

  def src_value(p: Path) -> np.ndarray:
    path, i = src[p]
    v = np.asarray(src_flat[path])
    return v if i is None else v[i]

  def tgt_shape(p: Path) -> tuple[int, ...]:
    path, i = tgt[p]
    shape = tuple(tgt_flat[path].shape)
    return shape if i is None else shape[1:]

  surgery_fresh = ()
  if to_head == "pretrain-vcr" and from_head != "pretrain-vcr":
    surgery_fresh = ("cls/*",)
  fresh_patterns = tuple(reinit) + surgery_fresh
  report = MergeReport(source=source_name, from_head=from_head,
                       to_head=to_head)
  values: dict[Path, Any] = {}   # per-layer path -> value (new: absent)
  used: set[Path] = set()
  mis_shaped, missing = [], []

  for p in tgt:
    name = "/".join(p)
    shape = tgt_shape(p)
    if _match(name, fresh_patterns):
      report.new.append(name)
      continue
    if p in src:
      v = src_value(p)
      used.add(p)
      note = None
      if (p == _TYPES and v.ndim == 2 and v.shape[0] < shape[0] and
          v.shape[1:] == shape[1:]):
        v, note = _grow_types(v, shape[0], to_head)
      elif (p == _WORDS and v.ndim == 2 and v.shape[0] < shape[0] and
            v.shape[1:] == shape[1:]):
        v, note = _grow_words(v, shape[0], rng, initializer_range)
      if tuple(v.shape) != shape:
        mis_shaped.append(f"  mis-shaped {name}: source {_s(v.shape)}, "
                          f"target {_s(shape)}")
        continue
      values[p] = v
      if note:
        report.surgered[name] = note
      else:
        report.loaded.append(name)
      continue
    if to_head == "itm" and p in _RANK and _RANK[p] in src and not any(
        q in src for q in _RANK):
      v = src_value(_RANK[p])
      v = v[:, 1:2] if v.ndim == 2 else v[1:2]
      used.add(_RANK[p])
      if tuple(v.shape) != shape:
        mis_shaped.append(f"  mis-shaped {name}: from itm_output "
                          f"{_s(v.shape)}, target {_s(shape)}")
        continue
      values[p] = v
      report.surgered[name] = ("rank_output := the match row of itm_output "
                               "(official init_output)")
      continue
    if _match(name, allow_new):
      report.new.append(name)
      continue
    missing.append(p)

  unmatched = [pat for pat in reinit
               if not any(fnmatch.fnmatchcase("/".join(p), pat) for p in tgt)]
  if mis_shaped or missing or unmatched:
    raise MergeError(_problems(report, mis_shaped, missing, unmatched,
                               tgt_shape))
  report.unused = ["/".join(p) for p in src if p not in used]
  if surgery_fresh and any(_match(n, surgery_fresh) for n in report.new):
    report.notes.append("cls/... re-created fresh for VCR pretraining (as the "
                        "official init_word_embedding)")
  params = _assemble(tgt_flat, tgt, values, report, init_fn)
  return params, report


def _problems(report: MergeReport, mis_shaped, missing, unmatched,
              tgt_shape) -> str:
  counts = []
  if missing:
    counts.append(f"{len(missing)} missing")
  if mis_shaped:
    counts.append(f"{len(mis_shaped)} mis-shaped")
  if unmatched:
    counts.append(f"{len(unmatched)} reinit patterns matching nothing")
  lines = [f"cannot initialise the '{report.to_head}' model from "
           f"{report.source} (head '{report.from_head}'): " +
           ", ".join(counts)]
  lines += mis_shaped
  lines += [f"  missing    {'/'.join(p)} {_s(tgt_shape(p))}: not in the "
            "source" for p in missing]
  lines += [f"  reinit pattern {pat!r} matches no target parameter"
            for pat in unmatched]
  if mis_shaped:
    lines.append("  (to take a mis-shaped param fresh instead of loading it, "
                 "list it in reinit)")
  if missing:
    tops = tuple(dict.fromkeys(f"{p[0]}/*" for p in missing))
    lines.append(f"  (to start these from the fresh initialisation, declare "
                 f"them new: allow_new={tops!r})")
  return "\n".join(lines)


def _assemble(tgt_flat, tgt, values, report: MergeReport, init_fn):
  """Target-layout leaves from per-layer values; fresh leaves for new ones."""
  fresh_flat = None

  def fresh(path: Path):
    nonlocal fresh_flat
    leaf = tgt_flat[path]
    if not _is_abstract(leaf):
      return leaf
    if init_fn is None:
      raise MergeError(
          f"{report.source} -> '{report.to_head}': params "
          f"{summarize_paths(report.new)} are new, but the target params are "
          "abstract (ShapeDtypeStruct); pass concrete fresh params as "
          "`target`, or an `init_fn` that makes them")
    if fresh_flat is None:
      fresh_flat = _flat(init_fn())
    return fresh_flat[path]

  layers: dict[Path, list[Path]] = {}
  for p, (path, _) in tgt.items():
    layers.setdefault(path, []).append(p)
  out = {}
  for path, leaf in tgt_flat.items():
    dtype = np.dtype(leaf.dtype)
    ps = layers[path]
    if all(p not in values for p in ps):
      out[path] = fresh(path)
    elif tgt[ps[0]][1] is None:
      out[path] = np.asarray(values[ps[0]], dtype)
    else:
      parts = [values[p] if p in values else np.asarray(fresh(path))[i]
               for i, p in enumerate(ps)]
      out[path] = np.stack(parts).astype(dtype, copy=False)
  return traverse_util.unflatten_dict(out)


def _grow_types(table: np.ndarray, rows: int, to_head: str):
  copy_from = 0 if to_head in _VCR_HEADS else 1
  n = table.shape[0]
  extra = [table[copy_from]] * (rows - n)
  new_rows = ", ".join(str(r) for r in range(n, rows))
  return (np.concatenate([table, np.stack(extra)], 0),
          f"type table {n} -> {rows} rows (row {new_rows} = row {copy_from})")


def _grow_words(table: np.ndarray, rows: int, rng, std: float):
  if rng is None:
    rng = jax.random.key(0)
  n = table.shape[0]
  extra = std * jax.random.normal(rng, (rows - n,) + table.shape[1:])
  return (np.concatenate([table, np.asarray(extra, table.dtype)], 0),
          f"word embeddings {n} -> {rows} rows ({rows - n} new rows ~ "
          f"N(0, {std:g}))")


# --------------------------------------------------------------------------
# The lenient form, for existing callers
# --------------------------------------------------------------------------


def adapt_params(source: dict, target_init: dict, to_task: str,
                 rng: jax.Array, initializer_range: float = 0.02) -> dict:
  """Target-head params from `source` (e.g. pretrained) params, leniently.

  The surgery of `merge_params`, but every target param the source lacks
  keeps `target_init`'s value without complaint (a mis-shaped one still
  raises). Prefer `merge_params` (or `uniter_jax.convert.init`), which
  makes the new params explicit and reports what happened.

  Args:
    source: params of the source model (per-layer or scanned layout).
    target_init: freshly initialised params of the target model.
    to_task: the target head name.
    rng: for the new word-embedding rows.
  """
  params, _ = merge_params(source, target_init, to_head=to_task,
                           allow_new=("*",), rng=rng,
                           initializer_range=initializer_range)
  return params
