"""Initial weights for a model, from any checkpoint this project reads.

`load_init_params(path, head=..., model_cfg=..., target=...)` is the one
entry for "start this model from that checkpoint". `path` may be

- an official state_dict (`.pt`, `.bin`, `.safetensors`); its head is
  `src_head` ("pretrain" unless told);
- a converted directory (`uniter_config.json` + `params/`, written by
  `save_flax` or `python -m uniter_jax.convert to-flax`, e.g. a run's
  `export_flax/`); its head is the one it records;
- a training workdir (it has `checkpoints/`): the params of its newest
  checkpoint (optimizer state is not read), head `model_task` of the config
  saved with that step (or `<workdir>/config.json`); or one step's folder
  `<workdir>/checkpoints/<step>` for that step.

The source params are merged into the target by
`uniter_jax.model.surgery.merge_params` (strict: new params must be declared,
mis-shapes fail) and each leaf is then put from host numpy straight onto
its sharding, so the full model never sits on one device. The report says
what was loaded, new, unused and surgered; `report.lines()` logs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from uniter_jax import model as um
from uniter_jax.convert import core
from uniter_jax.convert import names
from uniter_jax.model import surgery

ConversionError = core.ConversionError

_EXPECTED = ("expected an official state_dict file (.pt/.bin/.safetensors), a "
             f"converted directory (with {core.FLAX_META}) or a training "
             "workdir (with checkpoints/)")


@dataclasses.dataclass
class InitSource:
  """Params read from a checkpoint, before any merge.

  Attributes:
    params: nested dict of host numpy arrays, Flax paths, the layout stored
      (per-layer or scanned).
    head: the head the params belong to.
    model_config: the source's model config fields when it records them
      (converted dir, workdir), else None.
    description: the path (and step) for reports and errors.
  """
  params: dict
  head: str
  model_config: dict | None
  description: str


# --------------------------------------------------------------------------
# Reading each kind of source
# --------------------------------------------------------------------------


def _per_layer_paths(target: Mapping) -> list[tuple[str, ...]]:
  out = []
  for path, leaf in traverse_util.flatten_dict(dict(target)).items():
    if names.is_scanned_layer(path):
      out += names.unscanned_paths(path, leaf.shape[0])
    else:
      out.append(path)
  return out


def _guess_flax_path(key: str, value: np.ndarray) -> tuple[tuple[str, ...],
                                                           bool]:
  """(Flax path, transpose?) of a torch key that no target param names.

  Only names unused source params in the report, so a plausible Flax name
  is enough: the official Linear/LayerNorm/MultiheadAttention leaves.
  """
  *mods, leaf = key.split(".")
  if leaf == "weight":
    if mods and mods[-1] == "mask_embedding":
      return tuple(mods), False
    if np.ndim(value) == 2:
      return (*mods, "kernel"), True
    return (*mods, "scale"), False
  if leaf == "in_proj_weight":
    return (*mods, "in_proj_kernel"), True
  return (*mods, leaf), False


def state_dict_as_flax(sd: Mapping[str, np.ndarray], target: Mapping, *,
                       source: str = "state_dict") -> dict:
  """An official state_dict as Flax-named per-layer params, without a model.

  Why no model: the source head's config is not known (and need not match
  the target's), and strictness belongs to the merge, which names problems
  by Flax path with Flax-layout shapes. Keys are named from the target's
  params (`names.flax_to_torch`), the rest by the official leaf rules; the
  tied copies of the pretraining head are dropped after checking that they
  equal the tensors they share.
  """
  sd = dict(sd)
  for old, new in names.rename_legacy(sd).items():
    sd[new] = sd.pop(old)
  for tied, shared in names.TIED_KEYS.items():
    if tied in sd and shared in sd:
      if not np.array_equal(sd[tied], sd[shared]):
        raise ConversionError(
            f"{source}: tied tensors differ: '{tied}' must equal '{shared}' "
            "(the official model shares them)")
      del sd[tied]
  flat = {}
  for path in _per_layer_paths(target):
    try:
      key, transpose = names.flax_to_torch(path)
    except KeyError:
      continue
    if key in sd:
      v = np.asarray(sd.pop(key))
      flat[path] = v.T if transpose and v.ndim == 2 else v
  for key, v in sd.items():
    path, transpose = _guess_flax_path(key, v)
    v = np.asarray(v)
    flat[path] = v.T if transpose and v.ndim == 2 else v
  return traverse_util.unflatten_dict(flat)


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(d, dict):
    raise ConversionError(f"{path}: expected a JSON object, found "
                          f"{type(d).__name__}")
  return d


def _steps(ckpt_dir: str) -> list[int]:
  """Finished orbax steps (orbax writes to a temporary name, then renames)."""
  return sorted(int(n) for n in os.listdir(ckpt_dir)
                if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n,
                                                              "state")))


def _restore_params(state_dir: str) -> dict:
  """Only `params` of a saved TrainState, as host numpy."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = ocp.PyTreeCheckpointer()
  try:
    tree = ckpt.metadata(state_dir).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"{state_dir}: cannot read the orbax checkpoint "
                          f"metadata: {type(e).__name__}: {e}") from e
  if not isinstance(tree, Mapping) or "params" not in tree:
    found = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    raise ConversionError(f"{state_dir}: expected a saved train state with "
                          f"'params', found {found}")
  meta = tree["params"]
  item = {"params": jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)}
  args = {"params": jax.tree_util.tree_map(
      lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)}
  try:
    out = ckpt.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"{state_dir}: cannot restore the params: "
                          f"{type(e).__name__}: {e}") from e
  return out["params"]


def _read_step(workdir: str, step: int, src_head: str | None) -> InitSource:
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  cfg_paths = [os.path.join(step_dir, "config", "metadata"),
               os.path.join(workdir, "config.json")]
  config = next((c for c in map(_read_json, cfg_paths) if c is not None), {})
  head = config.get("model_task")
  if head is None and src_head is None:
    raise ConversionError(
        f"{workdir}: cannot tell the head of the checkpoint (no "
        f"'model_task' in {' or '.join(cfg_paths)}); pass src_head")
  if head is not None and src_head is not None and head != src_head:
    raise ConversionError(f"{workdir}: its checkpoints are of head '{head}' "
                          f"(config model_task), not src_head '{src_head}'")
  params = _restore_params(os.path.join(step_dir, "state"))
  model = config.get("model")
  return InitSource(params, head or src_head,
                    dict(model) if isinstance(model, Mapping) else None,
                    f"{workdir} (step {step})")


def read_init_source(path: str | os.PathLike[str], *,
                     src_head: str | None = None,
                     target: Mapping | None = None) -> InitSource:
  """Reads the params (and head) of any checkpoint `load_init_params` takes.

  Args:
    path: see the module docstring.
    src_head: the head of a state_dict file ("pretrain" if None); for a
      directory, which records its head, a different value is an error.
    target: target params (or abstract ones) whose names name a state_dict's
      keys; without it every key is named by the leaf rules alone.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if src_head is not None:
    um.head_spec(src_head)
  if os.path.isfile(path):
    sd, _ = core.read_state_dict(path)
    params = state_dict_as_flax(sd, target or {}, source=path)
    return InitSource(params, src_head or "pretrain", None, path)
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such file or directory; {_EXPECTED}")
  if os.path.isfile(os.path.join(path, core.FLAX_META)):
    params, meta = core.load_flax(path)
    if src_head is not None and meta["task"] != src_head:
      raise ConversionError(f"{path}: converted for head '{meta['task']}', "
                            f"not src_head '{src_head}'")
    params = jax.tree_util.tree_map(np.asarray, params)
    return InitSource(params, meta["task"], dict(meta["model_config"]),
                      f"{path} (converted)")
  ckpt_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpt_dir):
    steps = _steps(ckpt_dir)
    if not steps:
      raise ConversionError(f"{ckpt_dir}: no finished checkpoint in this "
                            "training workdir yet")
    return _read_step(path, steps[-1], src_head)
  parent = os.path.dirname(path)
  name = os.path.basename(path)
  if os.path.basename(parent) == "checkpoints" and name.isdigit() and (
      os.path.isdir(os.path.join(path, "state"))):
    return _read_step(os.path.dirname(parent), int(name), src_head)
  if name == "checkpoints" or _steps(path):
    raise ConversionError(
        f"{path}: this is the checkpoints folder of a training workdir; pass "
        f"the workdir itself ({parent}) for its newest checkpoint, or "
        f"{os.path.join(path, '<step>')} for one step")
  if name == core.FLAX_PARAMS and os.path.isfile(
      os.path.join(parent, core.FLAX_META)):
    raise ConversionError(f"{path}: this is the params folder of a converted "
                          f"directory; pass the directory itself ({parent})")
  entries = sorted(os.listdir(path))
  shown = entries[:8] + (["..."] if len(entries) > 8 else [])
  raise ConversionError(f"{path}: not a checkpoint; {_EXPECTED}; found "
                        f"{shown or 'an empty directory'}")


# --------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------


def _cfg_get(cfg, key: str):
  if cfg is None:
    return None
  try:
    return cfg[key]
  except (KeyError, AttributeError, TypeError):
    return None


def _check_architecture(src: InitSource, model_cfg) -> None:
  """Fails on config fields that shapes cannot reveal (head count, act)."""
  for key in ("num_attention_heads", "hidden_act"):
    a, b = _cfg_get(src.model_config, key), _cfg_get(model_cfg, key)
    if a is not None and b is not None and a != b:
      raise ConversionError(
          f"{src.description}: its model has {key}={a!r}, the target model "
          f"{key}={b!r}; the weights would load but compute something else")


def load_init_params(path: str | os.PathLike[str], *, head: str, model_cfg,
                     target: Mapping, shardings=None,
                     src_head: str | None = None,
                     allow_new: Sequence[str] = (),
                     reinit: Sequence[str] = (),
                     rng: jax.Array | None = None,
                     init_fn: Callable[[], Mapping] | None = None
                     ) -> tuple[Any, surgery.MergeReport]:
  """Params of a `head` model initialised from the checkpoint at `path`.

  Args:
    path: a state_dict file, a converted directory or a training workdir
      (see the module docstring).
    head: the target head (a key of `uniter_jax.model.HEADS`).
    model_cfg: the target model config (base or head-adjusted): the
      attention-head count and activation are checked against a source
      that records its config; `initializer_range` draws extra VCR words.
    target: the target model's params, concrete (fresh) or abstract
      (`jax.eval_shape` of the init, leaves `jax.ShapeDtypeStruct`); it
      fixes structure, layout (per-layer or scanned), shapes and dtypes.
      Params the source lacks (declared in `allow_new`) take their value
      from `target` when concrete; with an abstract target they come from
      `init_fn`, which is then required. An abstract target with nothing
      new never materialises a fresh model.
    shardings: a pytree of `jax.sharding.Sharding` matching `target`, or
      one Sharding for all leaves; None: the default device.
    src_head: the source head: required only when a state_dict is not
      "pretrain"; directories record theirs (a different value fails).
    allow_new: glob patterns (over '/'-joined per-layer paths) of target
      params that may be absent from the source, e.g. ("vqa_output/*",).
    reinit: patterns of target params to take fresh even if present.
    rng: draws extra word-embedding rows (VCR); `jax.random.key(0)` if None.
    init_fn: zero-argument callable returning fresh target params (e.g. a
      jitted init with `out_shardings`), called only if needed.

  Returns:
    (params, report): params laid out like `target`, each leaf on its
    sharding; a `surgery.MergeReport` (`report.lines()` for the log).

  Raises:
    ConversionError: the path is not a checkpoint (or is the wrong folder
      level), cannot be read, or its model differs in a way shapes hide.
    surgery.MergeError: params missing from the source and not declared
      new, or mis-shaped, all listed.
  """
  um.head_spec(head)
  src = read_init_source(path, src_head=src_head, target=target)
  _check_architecture(src, model_cfg)
  init_range = _cfg_get(model_cfg, "initializer_range") or 0.02
  params, report = surgery.merge_params(
      src.params, target, to_head=head, from_head=src.head,
      allow_new=allow_new, reinit=reinit, rng=rng,
      initializer_range=float(init_range), init_fn=init_fn,
      source_name=src.description)
  del src
  if shardings is None:
    params = jax.tree_util.tree_map(jax.device_put, params)
  else:
    params = core.place_params(params, shardings, source=report.source)
  return params, report
