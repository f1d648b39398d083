"""Exact two-way conversion between official PyTorch checkpoints and Flax.

The PyTorch side is a plain state_dict with the official key names (it loads
with `strict=True` into the official model class of the task). The Flax side
is a directory holding an orbax checkpoint of the params (`params/`),
`uniter_config.json` (task, official model config, head options and, when
known, the text settings `text_config`) and, when given, the tokenizer
vocabulary `vocab.txt`: a self-describing export that `load_checkpoint(dir)`
and `Processor.from_pretrained(dir)` read with no other argument.

Conversion is strict: every missing, unexpected or mis-shaped tensor is
reported, all at once, with expected and found shapes. Outputs are written to
a temporary path and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from uniter_jax import model as um
from uniter_jax.convert import names
from uniter_jax.model import config as config_lib

FLAX_META = "uniter_config.json"
FLAX_PARAMS = "params"
FLAX_VOCAB = "vocab.txt"
FORMAT_VERSION = 1
# Head size of both official models (768 / 12 and 1024 / 16): what the
# number of attention heads is taken to be when only shapes are known.
HEAD_DIM = 64

StateDict = dict[str, np.ndarray]


class ConversionError(ValueError):
  """A checkpoint does not match the model it is converted for."""


# --------------------------------------------------------------------------
# Expected layout
# --------------------------------------------------------------------------


def _model_cfg(model_config) -> Any:
  if model_config is None:
    return config_lib.base()
  if isinstance(model_config, (str, os.PathLike)):
    return config_lib.from_official_json(model_config)
  return model_config


def infer_head_kwargs(task: str, sd: Mapping[str, Any]) -> dict[str, Any]:
  """Head options that a state_dict's keys or shapes decide.

  `sd` maps official keys to arrays or to shape tuples.
  """
  if task == "re":
    return {"mlp": 2 if "re_output.0.weight" in sd else 1}
  if task in ("vqa", "ve") and "vqa_output.3.weight" in sd:
    w = sd["vqa_output.3.weight"]
    return {"num_answer": int((w if isinstance(w, tuple) else np.shape(w))[0])}
  return {}


def _flax_as_torch_shapes(flat: Mapping[names.FlaxPath, Any]) -> dict:
  out = {}
  for path, v in flat.items():
    key, transpose = names.flax_to_torch(path)
    shape = tuple(np.shape(v))
    out[key] = tuple(reversed(shape)) if transpose else shape
  return out


def _flax_shapes(task: str, cfg, head_kwargs) -> dict[names.FlaxPath, tuple]:
  """Unscanned Flax param shapes of `task` (no weights are created)."""
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  d["scan_layers"] = False
  net = um.build_model(task, d, **head_kwargs)
  shapes = jax.eval_shape(
      lambda: um.init_params(net, jax.random.key(0)))
  flat = traverse_util.flatten_dict(shapes)
  return {k: tuple(v.shape) for k, v in flat.items()}


def expected_torch_shapes(task: str, model_config=None,
                          **head_kwargs) -> dict[str, tuple]:
  """The official state_dict keys and shapes of `task`."""
  cfg = _model_cfg(model_config)
  out = {}
  for path, shape in _flax_shapes(task, cfg, head_kwargs).items():
    key, transpose = names.flax_to_torch(path)
    out[key] = tuple(reversed(shape)) if transpose else shape
  for tied, src in names.TIED_KEYS.items():
    if src in out and um.head_spec(task).head is um.UniterForPretraining:
      out[tied] = out[src]
  return out


def _guess_task(keys) -> str | None:
  keys = set(keys)
  if "cls.predictions.bias" in keys:
    return "pretrain or pretrain-vcr"
  markers = [("vqa_output.3.weight", "vqa or ve"), ("rank_output.weight", "itm"),
             ("attn1.in_proj_weight", "nlvr2-attn"),
             ("vcr_output.3.weight", "vcr"), ("re_output.weight", "re"),
             ("re_output.0.weight", "re"), ("nlvr2_output.weight",
                                            "nlvr2-paired or nlvr2-triplet")]
  for key, task in markers:
    if key in keys:
      return task
  return None


def _shape(v) -> tuple:
  return tuple(v) if isinstance(v, (tuple, list)) else tuple(np.shape(v))


def _shapes_of(sd: Mapping[str, Any]) -> dict[str, tuple]:
  """key -> shape of a state_dict (arrays or shape tuples), LayerNorm
  `gamma`/`beta` renamed as the official `from_pretrained` does."""
  out = {k: _shape(v) for k, v in sd.items()}
  for old, new in names.rename_legacy(out).items():
    out[new] = out.pop(old)
  return out


def infer_task(sd: Mapping[str, Any], *, source: str = "state_dict") -> str:
  """The head an official state_dict is for, from its keys and shapes.

  Head keys decide (`cls.predictions` pretraining, `vqa_output` VQA/VE,
  `rank_output` retrieval, `nlvr2_output` / `attn1` NLVR2, `re_output`,
  `vcr_output`); where two heads share keys, shapes decide: 3 answers is VE
  (VQA has 3129), a 4-row type table is the VCR pretraining model, an
  NLVR2 classifier over 2H inputs is the paired head (triplet: H).
  """
  shapes = _shapes_of(sd)
  types = shapes.get("uniter.embeddings.token_type_embeddings.weight")
  word = shapes.get("uniter.embeddings.word_embeddings.weight")
  if "cls.predictions.bias" in shapes:
    return "pretrain-vcr" if types and types[0] == 4 else "pretrain"
  if "vqa_output.3.weight" in shapes:
    return "ve" if shapes["vqa_output.3.weight"][0] == 3 else "vqa"
  if "rank_output.weight" in shapes:
    return "itm"
  if "attn1.in_proj_weight" in shapes:
    return "nlvr2-attn"
  if "nlvr2_output.weight" in shapes:
    in_dim = shapes["nlvr2_output.weight"][-1]
    if word and in_dim == 2 * word[-1]:
      return "nlvr2-paired"
    return "nlvr2-triplet"
  if "vcr_output.3.weight" in shapes:
    return "vcr"
  if "re_output.weight" in shapes or "re_output.0.weight" in shapes:
    return "re"
  heads = sorted({k.split(".")[0] for k in shapes
                  if not k.startswith("uniter.")})
  raise ConversionError(
      f"{source}: cannot tell which head this checkpoint is for (its "
      f"non-encoder keys start with {heads or 'nothing'}); pass the task "
      f"(one of {sorted(um.HEADS)})")


def _layer_indices(shapes: Mapping[str, tuple]) -> list[int]:
  pat = re.compile(r"^uniter\.encoder\.layer\.(\d+)\.")
  return sorted({int(m.group(1)) for k in shapes
                 if (m := pat.match(k))})


def _shape_listing(shapes: Mapping[str, tuple], limit: int = 24) -> str:
  """The shapes that decide the model size (or, when none is there, the
  first keys), one per line."""
  keys = [k for k in shapes if k.startswith((
      "uniter.embeddings.", "uniter.encoder.layer.0.",
      "uniter.img_embeddings.img_linear."))]
  layers = _layer_indices(shapes)
  lines = [f"  {k}: {list(shapes[k])}" for k in sorted(keys)[:limit]]
  if not keys:
    first = sorted(shapes)[:limit]
    lines = [f"  {k}: {list(shapes[k])}" for k in first]
    if len(shapes) > len(first):
      lines.append(f"  ... and {len(shapes) - len(first)} more keys")
  else:
    lines.append(f"  encoder layers found: {len(layers)}"
                 + (f" (indices {layers[0]}..{layers[-1]})" if layers else ""))
  return "\n".join(lines) if lines else "  (no tensors)"


def infer_model_config(sd: Mapping[str, Any], task: str | None = None, *,
                       source: str = "state_dict"):
  """The official model config of a state_dict, read from its shapes.

  hidden size, layers, intermediate size, vocabulary, type vocabulary,
  position table and feature size come from the tensors; the number of
  attention heads cannot (any divisor of the hidden size fits the same
  shapes) and is taken as hidden / 64, as in both official sizes (base
  768 / 12, large 1024 / 16); dropouts, activation and init range are the
  official values. The head's own changes are undone (the VCR heads' 81
  extra words, the NLVR2 / VCR type tables of 3 / 4 rows), so the result is
  the base config the converter records. Raises ConversionError listing the
  shapes it saw when it cannot.

  Returns:
    (the config, a one-line summary naming the inferred sizes).
  """
  shapes = _shapes_of(sd)
  problems = []

  def get(key):
    if key not in shapes:
      problems.append(f"no '{key}'")
      return None
    return shapes[key]

  word = get("uniter.embeddings.word_embeddings.weight")
  pos = get("uniter.embeddings.position_embeddings.weight")
  types = get("uniter.embeddings.token_type_embeddings.weight")
  inter = get("uniter.encoder.layer.0.intermediate.dense.weight")
  img = get("uniter.img_embeddings.img_linear.weight")
  layers = _layer_indices(shapes)
  if not layers:
    problems.append("no 'uniter.encoder.layer.<i>.*' tensors")
  elif layers != list(range(len(layers))):
    problems.append(f"encoder layer indices {layers} are not "
                    f"0..{len(layers) - 1}")
  hidden = None
  if word is not None:
    if len(word) != 2:
      problems.append(f"word embeddings of rank {len(word)}")
    else:
      hidden = int(word[1])
  if hidden is not None and hidden % HEAD_DIM:
    problems.append(f"hidden size {hidden} is not a multiple of {HEAD_DIM}, "
                    "so the number of attention heads cannot be inferred")
  for name, s in (("position", pos), ("token type", types)):
    if s is not None and hidden is not None and (len(s) != 2 or
                                                 s[1] != hidden):
      problems.append(f"{name} embeddings {list(s)} do not match hidden "
                      f"size {hidden}")
  if inter is not None and hidden is not None and (len(inter) != 2 or
                                                   inter[1] != hidden):
    problems.append(f"intermediate weight {list(inter)} does not match "
                    f"hidden size {hidden}")
  spec = None
  if task is not None:
    try:
      spec = um.head_spec(task)
    except ValueError as e:
      problems.append(str(e))
  if problems:
    raise ConversionError(
        f"{source}: cannot infer the model size from the checkpoint's "
        f"shapes ({'; '.join(problems)}); pass the official model config "
        "(--model-config uniter-base.json / uniter-large.json, or "
        "model_config=). Shapes seen:\n" + _shape_listing(shapes))
  extra_vocab = spec.extra_vocab if spec else 0
  type_vocab = int(types[0])
  if spec and spec.type_vocab_size > 2 and type_vocab == spec.type_vocab_size:
    type_vocab = 2     # the head grew the official 2-row table
  d = {
      "vocab_size": int(word[0]) - extra_vocab,
      "hidden_size": hidden,
      "num_hidden_layers": len(layers),
      "num_attention_heads": hidden // HEAD_DIM,
      "intermediate_size": int(inter[0]),
      "hidden_act": "gelu",
      "hidden_dropout_prob": 0.1,
      "attention_probs_dropout_prob": 0.1,
      "max_position_embeddings": int(pos[0]),
      "type_vocab_size": type_vocab,
      "initializer_range": 0.02,
  }
  if img is not None and len(img) == 2:
    d["img_dim"] = int(img[1])
  rc = shapes.get("region_classifier.net.3.weight")
  if rc is not None:
    d["img_label_dim"] = int(rc[0])
  cfg = config_lib.from_official_dict(d, source=source)
  summary = (f"model config inferred from the checkpoint's shapes: hidden "
             f"{hidden}, {len(layers)} layers, intermediate "
             f"{d['intermediate_size']}"
             f", vocab {d['vocab_size']}, type vocab {type_vocab}, "
             f"{d['num_attention_heads']} attention heads (hidden / "
             f"{HEAD_DIM}, as both official sizes; pass the model config if "
             "yours differs)")
  return cfg, summary


def check_state_dict(sd_shapes: Mapping[str, tuple], expected: Mapping[str,
                                                                       tuple],
                     *, task: str, source: str) -> None:
  """Raises ConversionError listing every missing/unexpected/mis-shaped key."""
  missing = sorted(set(expected) - set(sd_shapes))
  unexpected = sorted(set(sd_shapes) - set(expected))
  mismatched = sorted(k for k in set(expected) & set(sd_shapes)
                      if tuple(expected[k]) != tuple(sd_shapes[k]))
  if not (missing or unexpected or mismatched):
    return
  lines = [f"{source}: does not match the '{task}' model "
           f"({len(missing)} missing, {len(unexpected)} unexpected, "
           f"{len(mismatched)} mis-shaped)"]
  guess = _guess_task(sd_shapes)
  if guess and (missing or unexpected):
    lines.append(f"  (its keys look like a '{guess}' checkpoint)")
  for k in mismatched:
    lines.append(f"  mis-shaped {k}: expected {list(expected[k])}, "
                 f"found {list(sd_shapes[k])}")
  for k in missing:
    lines.append(f"  missing    {k}: expected {list(expected[k])}")
  for k in unexpected:
    lines.append(f"  unexpected {k}: found {list(sd_shapes[k])}")
  raise ConversionError("\n".join(lines))


# --------------------------------------------------------------------------
# State dict <-> Flax params
# --------------------------------------------------------------------------


def torch_to_flax(state_dict: Mapping[str, np.ndarray], task: str,
                  model_config=None, *, scan_layers: bool = False,
                  source: str = "state_dict", **head_kwargs) -> dict:
  """Official state_dict (numpy arrays) -> Flax params (float32 numpy).

  Args:
    state_dict: key -> array, official key names (LayerNorm `gamma`/`beta`
      accepted, as the official `from_pretrained` renames them).
    task: a key of `uniter_jax.model.HEADS`.
    model_config: official model config (dict/ConfigDict/JSON path);
      UNITER-base when None. The number of heads cannot be read from
      shapes, so it comes from here.
    scan_layers: return the stacked (nn.scan) encoder layout.
    source: the file name, used in errors.
    **head_kwargs: head options; inferred from the keys when omitted.
  """
  cfg = _model_cfg(model_config)
  sd = dict(state_dict)
  for old, new in names.rename_legacy(sd).items():
    sd[new] = sd.pop(old)
  head_kwargs = {**infer_head_kwargs(task, sd), **head_kwargs}
  expected = expected_torch_shapes(task, cfg, **head_kwargs)
  check_state_dict({k: tuple(np.shape(v)) for k, v in sd.items()}, expected,
                   task=task, source=source)
  for tied, src in names.TIED_KEYS.items():
    if tied in expected and not np.array_equal(sd[tied], sd[src]):
      raise ConversionError(
          f"{source}: tied tensors differ: '{tied}' must equal '{src}' (the "
          "official model shares them)")
  flat = {}
  for path in _flax_shapes(task, cfg, head_kwargs):
    key, transpose = names.flax_to_torch(path)
    arr = np.asarray(sd[key])
    flat[path] = np.ascontiguousarray(arr.T if transpose else arr).astype(
        np.float32)
  params = traverse_util.unflatten_dict(flat)
  return scan_params(params) if scan_layers else params


def _is_scanned(flat: Mapping[names.FlaxPath, Any]) -> bool:
  return any(names.is_scanned_layer(p) for p in flat)


def scan_params(params: dict) -> dict:
  """Per-layer encoder params -> one stacked tree (the nn.scan layout)."""
  flat = traverse_util.flatten_dict(params)
  if _is_scanned(flat):
    return params
  out, stacks = {}, {}
  for path, v in flat.items():
    for i in range(len(path) - 2):
      if (path[i] == "encoder" and path[i + 1] == "layer" and
          path[i + 2].isdigit()):
        stacks.setdefault(path[:i + 2] + path[i + 3:], {})[int(path[i + 2])] = v
        break
    else:
      out[path] = v
  for path, layers in stacks.items():
    out[path] = np.stack([np.asarray(layers[i]) for i in sorted(layers)])
  return traverse_util.unflatten_dict(out)


def unscan_params(params: dict) -> dict:
  """The stacked (nn.scan) encoder layout -> per-layer params."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, v in flat.items():
    if names.is_scanned_layer(path):
      v = np.asarray(v)
      for n, p in enumerate(names.unscanned_paths(path, v.shape[0])):
        out[p] = v[n]
    else:
      out[path] = v
  return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Mapping, task: str, model_config=None, *,
                  dtype: Any = np.float32, **head_kwargs) -> StateDict:
  """Flax params -> official state_dict (numpy arrays, tied keys included)."""
  cfg = _model_cfg(model_config)
  flat = traverse_util.flatten_dict(unscan_params(
      jax.tree_util.tree_map(np.asarray, dict(params))))
  head_kwargs = {**infer_head_kwargs(task, _flax_as_torch_shapes(flat)),
                 **head_kwargs}
  expected = _flax_shapes(task, cfg, head_kwargs)
  check_state_dict({"/".join(p): tuple(v.shape) for p, v in flat.items()},
                   {"/".join(p): s for p, s in expected.items()}, task=task,
                   source="Flax params")
  sd = {}
  for path, v in flat.items():
    key, transpose = names.flax_to_torch(path)
    v = np.asarray(v)
    sd[key] = np.ascontiguousarray(v.T if transpose else v).astype(dtype)
  for tied, src in names.TIED_KEYS.items():
    if src in sd and um.head_spec(task).head is um.UniterForPretraining:
      sd[tied] = sd[src]
  return sd


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading or writing PyTorch checkpoints needs torch: "
                      "pip install torch==2.13.0 (the CPU build is enough)"
                      ) from e
  return torch


def read_state_dict(path: str | os.PathLike[str]) -> tuple[StateDict, str]:
  """Reads a `.pt`/`.bin` (torch) or `.safetensors` state_dict.

  Returns (key -> numpy array, dtype name of its floating tensors).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such checkpoint file")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      sd = dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"{path}: cannot read as safetensors ({e})") from e
  else:
    torch = _torch()
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(
          f"{path}: cannot read as a PyTorch checkpoint (truncated or not a "
          f"state_dict?): {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor)
        for k, v in obj.items()):
      raise ConversionError(
          f"{path}: expected a state_dict (a mapping of parameter names to "
          f"tensors), found {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
      v = v.detach()
      if v.dtype == torch.bfloat16:
        v = v.float()
      sd[k] = v.numpy()
  floats = [str(v.dtype) for v in sd.values()
            if np.issubdtype(v.dtype, np.floating)]
  dtype = max(set(floats), key=floats.count) if floats else "float32"
  return sd, dtype


def _umask() -> int:
  """The process umask. Linux reports it in /proc/self/status; elsewhere it
  is read by setting and restoring it at once (not thread-safe, hence the
  last resort)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  old = os.umask(0o022)
  os.umask(old)
  return old


def count_params(sd: Mapping[str, Any]) -> int:
  """Parameters in a state_dict, each distinct tensor once.

  A tied key (`names.TIED_KEYS`) adds nothing when the tensor it is tied to
  is present: a file read back gives the two keys as separate copies, while
  `flax_to_torch` gives one shared array, and both must count the same.
  """
  seen, n = set(), 0
  for k, v in sd.items():
    if names.TIED_KEYS.get(k) in sd or id(v) in seen:
      continue
    seen.add(id(v))
    n += int(np.prod(np.shape(v)))
  return n


def write_state_dict(sd: Mapping[str, np.ndarray],
                     path: str | os.PathLike[str]) -> None:
  """Writes a torch state_dict atomically (tmp file, then rename).

  Tied keys share one tensor, as in a state_dict saved by the official
  model.
  """
  torch = _torch()
  path = os.fspath(path)
  out, by_id = {}, {}
  for k, v in sd.items():
    out[k] = by_id.setdefault(id(v), torch.from_numpy(np.array(v)))
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
  os.close(fd)
  try:
    torch.save(out, tmp)
    # mkstemp creates the file 0600; the result should be readable by whom
    # any other file the user writes is (0644 under the usual umask 022).
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _check_export_text(task: str, cfg, vocab, text_config,
                       source: str) -> tuple[list[str] | None, dict | None]:
  """Validates what `save_flax` stores besides the params."""
  from uniter_jax import processor as processor_lib  # pylint: disable=g-import-not-at-top
  if vocab is not None:
    if isinstance(vocab, (str, bytes)) or not all(
        isinstance(t, str) for t in vocab):
      raise ConversionError(f"{source}: vocab must be a list of token "
                            "strings (line number = id)")
    vocab = list(vocab)
    words = int(cfg["vocab_size"]) + um.head_spec(task).extra_vocab
    if not 0 < len(vocab) <= words:
      raise ConversionError(
          f"{source}: a vocabulary of {len(vocab)} tokens for a model of "
          f"{words} word embeddings")
    bad = [t for t in vocab if "\n" in t]
    if bad:
      raise ConversionError(f"{source}: vocabulary tokens hold newlines: "
                            f"{bad[:3]!r}")
  if text_config is not None:
    try:
      text_config = processor_lib.check_text_config(
          text_config, vocab, f"{source}: text_config")
    except ValueError as e:
      raise ConversionError(str(e)) from e
    sp = text_config.get("special_ids", {})
    words = int(cfg["vocab_size"]) + um.head_spec(task).extra_vocab
    out = {k: v for k, v in sp.items() if not 0 <= v < words}
    if out:
      raise ConversionError(f"{source}: text_config special_ids {out} are "
                            f"outside the model's {words} words")
  return vocab, text_config


def save_flax(dst_dir: str | os.PathLike[str], params: Mapping, task: str,
              model_config=None, *, head_kwargs: Mapping | None = None,
              source_dtype: str = "float32", overwrite: bool = False,
              vocab: Sequence[str] | None = None,
              text_config: Mapping[str, Any] | None = None) -> None:
  """Writes a self-describing export to `dst_dir` atomically.

  The directory holds the params (orbax, `params/`), `uniter_config.json`
  (task, official model config, head options, params layout, source dtype
  and `text_config`) and `vocab.txt`, so that `load_checkpoint(dst_dir)` and
  `Processor.from_pretrained(dst_dir)` need no other argument.

  Args:
    dst_dir: the directory to write (replaced only with `overwrite`).
    params: Flax params of the head `task`.
    task: the head (a key of `uniter_jax.model.HEADS`).
    model_config: the official (base) model config; UNITER-base when None.
    head_kwargs: head options (num_answer, mlp).
    source_dtype: dtype of the checkpoint converted from (`to-torch`
      writes it back in it).
    overwrite: replace an existing `dst_dir`.
    vocab: the tokenizer vocabulary (tokens, line number = id), written as
      `vocab.txt`; None: no vocabulary is stored.
    text_config: the text / region settings (`uniter_jax.processor.
      make_text_config`: max_txt_len, region rule, special ids,
      lower-casing); checked against `vocab`; special ids are filled in
      from `vocab` when missing. None: nothing is stored (a processor then
      uses the official settings).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  cfg = _model_cfg(model_config)
  dst = os.path.abspath(os.fspath(dst_dir))
  if os.path.exists(dst) and not overwrite:
    raise ConversionError(f"{dst}: already exists (use --force to replace)")
  vocab, text_config = _check_export_text(task, cfg, vocab, text_config, dst)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700, as os.makedirs would
    flat = traverse_util.flatten_dict(dict(params))
    meta = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "model_config": config_lib.to_official_dict(cfg),
        "head_kwargs": dict(head_kwargs or {}),
        "scan_layers": _is_scanned(flat),
        "source_dtype": source_dtype,
    }
    if text_config is not None:
      meta["text_config"] = text_config
    if vocab is not None:
      from uniter_jax import processor as processor_lib  # pylint: disable=g-import-not-at-top
      processor_lib.write_vocab(vocab, os.path.join(tmp, FLAX_VOCAB))
      meta["vocab_file"] = FLAX_VOCAB
    ocp.PyTreeCheckpointer().save(
        os.path.join(tmp, FLAX_PARAMS),
        jax.tree_util.tree_map(np.asarray, dict(params)))
    with open(os.path.join(tmp, FLAX_META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    if os.path.exists(dst):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-",
                             dir=parent)
      os.replace(dst, os.path.join(old, "x"))
      os.replace(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_flax(src_dir: str | os.PathLike[str]) -> tuple[dict, dict]:
  """Reads a converted directory: (params, meta)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  src = os.path.abspath(os.fspath(src_dir))
  meta_path = os.path.join(src, FLAX_META)
  if not os.path.isfile(meta_path):
    raise ConversionError(
        f"{src}: not a converted uniter-jax checkpoint (no {FLAX_META})")
  with open(meta_path, encoding="utf-8") as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{meta_path}: not valid JSON ({e})") from e
  for field in ("task", "model_config"):
    if field not in meta:
      raise ConversionError(f"{meta_path}: missing field '{field}'")
  try:
    params = ocp.PyTreeCheckpointer().restore(os.path.join(src, FLAX_PARAMS))
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"{src}/{FLAX_PARAMS}: cannot restore the orbax "
                          f"checkpoint: {type(e).__name__}: {e}") from e
  return params, meta


def export_dir(path: str | os.PathLike[str]) -> str:
  """The export directory `path` names: itself, or a training workdir's
  `export_flax/`."""
  path = os.fspath(path)
  if (not os.path.isfile(os.path.join(path, FLAX_META))
      and os.path.isfile(os.path.join(path, "export_flax", FLAX_META))):
    return os.path.join(path, "export_flax")
  return path


def read_export_vocab(src_dir: str | os.PathLike[str]) -> list[str] | None:
  """The tokenizer vocabulary stored in an export (None when it has none)."""
  path = os.path.join(export_dir(src_dir), FLAX_VOCAB)
  if not os.path.isfile(path):
    return None
  from uniter_jax import processor as processor_lib  # pylint: disable=g-import-not-at-top
  return processor_lib.read_vocab(path)


def load_checkpoint(path: str | os.PathLike[str], task: str | None = None,
                    *, model_config=None, scan_layers: bool | None = None,
                    shardings=None, **model_overrides):
  """`(model, params)` from an official state_dict file or a converted dir.

  Args:
    path: `.pt`/`.bin`/`.safetensors` file, or a directory written by
      `save_flax` / `python -m uniter_jax.convert to-flax` (or a training
      workdir, whose `export_flax/` is read).
    task: the head the checkpoint is for (a key of
      `uniter_jax.model.HEADS`). None: a converted dir's recorded task, or
      for a state_dict file the head its keys and shapes show
      (`infer_task`). A converted dir recorded for another task is an
      error.
    model_config: official JSON model config (path, dict or ConfigDict) for
      a state_dict file; None: inferred from its shapes
      (`infer_model_config`: heads = hidden / 64, as both official sizes).
      Ignored for a converted dir, which records its own.
    scan_layers: the params layout to return; default: as stored (a
      state_dict gives the per-layer layout).
    shardings: where the params go: a pytree of `jax.sharding.Sharding`
      matching the returned params (layout included), or one Sharding for
      every leaf. Each leaf goes from host numpy straight to its shards, so
      the whole tree is never materialised on one device. None (default):
      every leaf on the default device.
    **model_overrides: model config fields that change how it computes
      (dtype, remat_policy, attention_impl).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = export_dir(path)
    params, meta = load_flax(path)
    if task is None:
      task = meta["task"]
    elif meta["task"] != task:
      raise ConversionError(f"{path}: converted for task '{meta['task']}', "
                            f"not '{task}'")
    cfg = config_lib.from_official_dict(meta["model_config"], source=path)
    head_kwargs = meta.get("head_kwargs", {})
    check_state_dict(
        {"/".join(p): tuple(np.shape(v)) for p, v in
         traverse_util.flatten_dict(unscan_params(params)).items()},
        {"/".join(p): s for p, s in
         _flax_shapes(task, cfg, head_kwargs).items()},
        task=task, source=path)
  else:
    sd, _ = read_state_dict(path)
    if task is None:
      task = infer_task(sd, source=path)
      logging.info("%s: read as a '%s' checkpoint (from its keys)", path,
                   task)
    if model_config is None:
      cfg, summary = infer_model_config(sd, task, source=path)
      logging.info("%s: %s", path, summary)
    else:
      cfg = _model_cfg(model_config)
    head_kwargs = infer_head_kwargs(task, sd)
    params = torch_to_flax(sd, task, cfg, source=path, **head_kwargs)
  flat = traverse_util.flatten_dict(params)
  scanned = _is_scanned(flat)
  if scan_layers is None:
    scan_layers = scanned
  params = scan_params(params) if scan_layers else unscan_params(params)
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  cfg.update(model_overrides)
  cfg["scan_layers"] = bool(scan_layers)
  model = um.build_model(task, cfg, **head_kwargs)
  if shardings is None:
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
  else:
    params = place_params(params, shardings, source=path)
  return model, params


def place_params(params, shardings, *, source: str = "params"):
  """Puts each leaf of `params` onto its Sharding, one leaf at a time.

  Why leaf-wise from the host: `tree_map(jnp.asarray, params)` first puts
  the whole model on one device, which a model sharded because it does not
  fit one device cannot afford; `jax.device_put(numpy_leaf, sharding)` sends
  each device only its shard.

  Args:
    params: a pytree of numpy arrays (or jax arrays, which are moved).
    shardings: a pytree of `jax.sharding.Sharding` with the structure of
      `params`, or one Sharding for every leaf.
    source: names the params in errors.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: _place(x, shardings), params)
  p_def = jax.tree_util.tree_structure(params)
  s_leaves, s_def = jax.tree_util.tree_flatten(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if s_def != p_def:
    p_paths = {jax.tree_util.keystr(k) for k, _ in
               jax.tree_util.tree_flatten_with_path(params)[0]}
    s_paths = {jax.tree_util.keystr(k) for k, _ in
               jax.tree_util.tree_flatten_with_path(
                   shardings, is_leaf=lambda x: isinstance(
                       x, jax.sharding.Sharding))[0]}
    extra = sorted(s_paths - p_paths)[:5]
    lacking = sorted(p_paths - s_paths)[:5]
    raise ValueError(
        f"{source}: `shardings` does not match the params tree (shardings "
        f"lack {lacking or 'nothing'}, have extra {extra or 'nothing'}); "
        "expected one Sharding per param, for the same layout (scanned or "
        "per-layer)")
  bad = [type(s).__name__ for s in s_leaves
         if not isinstance(s, jax.sharding.Sharding)]
  if bad:
    raise ValueError(f"{source}: `shardings` leaves must be "
                     f"jax.sharding.Sharding, found {sorted(set(bad))}")
  leaves = [_place(x, s) for x, s in zip(jax.tree_util.tree_leaves(params),
                                         s_leaves)]
  return jax.tree_util.tree_unflatten(p_def, leaves)


def _place(x, sharding: "jax.sharding.Sharding"):
  if isinstance(x, jax.Array) or sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  # Multi-process: every process holds the same host value; each one
  # builds only the shards of its own devices.
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


# --------------------------------------------------------------------------
# BERT -> UNITER init
# --------------------------------------------------------------------------

_BERT_DROP = ("cls.seq_relationship.", "cls.predictions.decoder.bias",
              "embeddings.position_ids")


def bert_to_uniter(bert_sd: Mapping[str, np.ndarray], model_config=None, *,
                   seed: int = 0, source: str = "BERT state_dict") -> StateDict:
  """A HuggingFace-layout BERT state_dict -> a UNITER pretraining init.

  Text embeddings, encoder, pooler and the MLM head come from BERT (its
  2-row segment table gives the text type 0 and the image type 1); the image
  embeddings, MRFR / MRC heads and `itm_output` are freshly initialised
  (N(0, 0.02) weights, zero biases, unit LayerNorms), as the official
  `uniter-base-init.pt` plus `init_weights` give. Returns an official
  pretraining state_dict.
  """
  cfg = _model_cfg(model_config)
  sd = {}
  for k, v in bert_sd.items():
    if any(d in k for d in _BERT_DROP):
      continue
    if k.startswith("bert."):
      k = "uniter." + k[len("bert."):]
    elif k.startswith(("embeddings.", "encoder.", "pooler.")):
      k = "uniter." + k
    sd[k] = np.asarray(v)
  for old, new in names.rename_legacy(sd).items():
    sd[new] = sd.pop(old)
  net = um.build_model("pretrain", cfg)
  fresh = flax_to_torch(um.init_params(net, jax.random.key(seed)), "pretrain",
                        cfg)
  from_bert = [k for k in sd if k in fresh]
  unknown = sorted(k for k in sd if k not in fresh)
  if unknown:
    raise ConversionError(f"{source}: keys with no UNITER counterpart: "
                          f"{unknown}")
  needed = [k for k in fresh if k.startswith(("uniter.embeddings.",
                                              "uniter.encoder.",
                                              "uniter.pooler.",
                                              "cls.predictions."))
            and k != "cls.predictions.decoder.weight"]
  missing = sorted(k for k in needed if k not in sd)
  bad = sorted(k for k in from_bert if tuple(sd[k].shape) !=
               tuple(fresh[k].shape))
  if missing or bad:
    lines = [f"{source}: not a BERT matching the UNITER model config"]
    lines += [f"  mis-shaped {k}: expected {list(fresh[k].shape)}, found "
              f"{list(sd[k].shape)}" for k in bad]
    lines += [f"  missing    {k}: expected {list(fresh[k].shape)}"
              for k in missing]
    raise ConversionError("\n".join(lines))
  out = dict(fresh)
  for k in from_bert:
    out[k] = sd[k].astype(np.float32)
  for tied, src in names.TIED_KEYS.items():
    out[tied] = out[src]
  return out
