"""Command line: convert UNITER checkpoints between PyTorch and Flax.

  python -m uniter_jax.convert to-flax [--task vqa] [--model-config C.json] \
      [--vocab bert-base-cased/vocab.txt] uniter-vqa.pt out_dir
  python -m uniter_jax.convert to-torch [--task vqa] out_dir uniter-vqa.pt
  python -m uniter_jax.convert bert-to-uniter bert/pytorch_model.bin \
      uniter-base-init.pt        # or a directory: a Flax checkpoint

A mistake of the person running it (a missing or wrong path, a `.pt`
without torch installed, a checkpoint of another task, an existing
destination without --force, a bad model config) prints
`error: <what> (<where>): <fix>` and exits with status 1 (2 for a usage
error); a checkpoint that matches no model follows that line with the keys
or shapes at fault. `--verbose` shows the traceback. Any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import numpy as np

from uniter_jax import cli
from uniter_jax import model as um
from uniter_jax.convert import core

# What the CLI prints as an error line instead of a traceback (as run.py
# with `uniter_jax.train.RUN_ERRORS`): checkpoints and paths a person fixes.
CLI_ERRORS = (core.ConversionError, FileNotFoundError, IsADirectoryError,
              NotADirectoryError, PermissionError)

_TORCH_SUFFIXES = (".pt", ".bin", ".pth")


def _fail(what: str, where: str, fix: str) -> NoReturn:
  raise core.ConversionError(f"{what} ({where}): {fix}")


def _listing(path: str) -> str:
  """What the nearest existing folder of `path` holds (for a path fix)."""
  here = os.path.abspath(path)
  while not os.path.isdir(here) and os.path.dirname(here) != here:
    here = os.path.dirname(here)
  try:
    names = sorted(os.listdir(here))
  except OSError:
    return ""
  shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
  return f"; {here} holds {shown or 'nothing'}"


def _need_torch(path: str, doing: str) -> None:
  """Fails in one line when torch, needed for `.pt` files, is missing."""
  try:
    core._torch()  # pylint: disable=protected-access
  except ImportError as e:
    raise core.ConversionError(
        f"{doing} needs torch, which is not installed ({path}): pip install "
        "torch (the CPU build is enough), or use a .safetensors "
        "checkpoint") from e


def _check_checkpoint_file(path: str) -> None:
  """SRC of to-flax / bert-to-uniter: an existing state_dict file."""
  if not os.path.exists(path):
    _fail("checkpoint file does not exist", path,
          "check the path" + _listing(path))
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(core.export_dir(path), core.FLAX_META)):
      _fail("this is a converted Flax directory, not a PyTorch checkpoint",
            path, "to-torch converts it back; uniter_jax.load_checkpoint "
            "reads it as it is")
    files = [n for n in sorted(os.listdir(path))
             if n.endswith(_TORCH_SUFFIXES + (".safetensors",))]
    _fail("this is a folder, not a checkpoint file", path,
          f"pass the file inside it ({', '.join(files)})" if files else
          "pass the .pt / .bin / .safetensors file")
  if not path.endswith(".safetensors"):
    _need_torch(path, "reading a PyTorch checkpoint")


def _check_destination(path: str, force: bool) -> None:
  """Fails before any reading when DST exists (writers create parents)."""
  if os.path.exists(path) and not force:
    _fail("the destination already exists", path,
          "pass --force to replace it, or choose another destination")


def _model_config(path: str | None):
  """The model config of `--model-config` (None: not given)."""
  if path is None:
    return None
  if not os.path.isfile(path):
    _fail("model config file does not exist", path,
          "pass the official JSON (e.g. config/uniter-base.json), or leave "
          "--model-config out to infer the size from the checkpoint")
  try:
    return core._model_cfg(path)  # pylint: disable=protected-access
  except ValueError as e:   # not JSON, missing or invalid fields
    raise core.ConversionError(
        f"not an official model config: {e} ({path}): pass the official "
        "uniter-base.json / uniter-large.json, or leave --model-config out"
    ) from e


def _text_settings(args, task: str):
  """(vocab, text_config) to store with a converted directory."""
  from uniter_jax import processor as processor_lib  # pylint: disable=g-import-not-at-top
  vocab = None
  if args.vocab:
    if not os.path.isfile(args.vocab):
      _fail("vocabulary file does not exist", args.vocab,
            "pass --vocab a vocab.txt (e.g. bert-base-cased/vocab.txt), or "
            "leave it out" + _listing(args.vocab))
    vocab = processor_lib.read_vocab(args.vocab)
  return vocab, processor_lib.official_text_config(task)


def _guess_task(sd) -> str | None:
  try:
    return core.infer_task(sd)
  except core.ConversionError:
    return None


def _to_flax(args) -> None:
  if args.dst.endswith(_TORCH_SUFFIXES + (".safetensors",)):
    _fail("to-flax writes a directory, not a checkpoint file", args.dst,
          "pass a directory name (to-torch writes .pt files)")
  _check_destination(args.dst, args.force)
  _check_checkpoint_file(args.src)
  cfg = _model_config(args.model_config)
  sd, dtype = core.read_state_dict(args.src)
  if args.task is None:
    args.task = core.infer_task(sd, source=args.src)
    print(f"task '{args.task}' (from the checkpoint's head keys; --task "
          "overrides)")
  try:
    if cfg is None:
      try:
        cfg, summary = core.infer_model_config(sd, args.task, source=args.src)
      except ValueError as e:   # also shapes that give no valid config
        if isinstance(e, core.ConversionError):
          raise
        raise core.ConversionError(
            f"cannot infer the model size: {e} ({args.src}): pass "
            "--model-config uniter-base.json / uniter-large.json") from e
      print(summary)
    head_kwargs = core.infer_head_kwargs(args.task, sd)
    params = core.torch_to_flax(sd, args.task, cfg,
                                scan_layers=args.scan_layers,
                                source=args.src, **head_kwargs)
  except core.ConversionError as e:
    # The commonest cause of a mismatch: a checkpoint of another head. Say
    # so in one line instead of listing every key the heads do not share.
    guess = _guess_task(sd)
    if guess is not None and guess != args.task:
      raise core.ConversionError(
          f"this is a '{guess}' checkpoint, not '{args.task}' ({args.src}): "
          f"pass --task {guess}") from e
    raise
  vocab, text_config = _text_settings(args, args.task)
  core.save_flax(args.dst, params, args.task, cfg, head_kwargs=head_kwargs,
                 source_dtype=dtype, overwrite=args.force, vocab=vocab,
                 text_config=text_config)
  print(f"converted {len(sd)} tensors ({core.count_params(sd):,} "
        f"parameters, {dtype}) for task '{args.task}' -> "
        f"{os.path.abspath(args.dst)}")
  if vocab is None:
    print("note: no vocabulary stored; pass --vocab bert-base-cased/vocab.txt "
          "so that Processor.from_pretrained(DST_DIR) works without one")


def _to_torch(args) -> None:
  src = core.export_dir(args.src)
  if not os.path.exists(src):
    _fail("converted directory does not exist", src,
          "check the path" + _listing(src))
  if not os.path.isdir(src):
    if src.endswith(_TORCH_SUFFIXES + (".safetensors",)):
      _fail("this is a PyTorch checkpoint; to-torch takes a converted "
            "directory", src, "to-flax converts a .pt to Flax")
    _fail("not a directory", src, "pass the directory written by to-flax")
  if not os.path.isfile(os.path.join(src, core.FLAX_META)):
    _fail(f"not a converted directory (no {core.FLAX_META})", src,
          "pass the directory written by to-flax, or a training workdir "
          "(its export_flax/)")
  _check_destination(args.dst, args.force)
  _need_torch(args.dst, "writing a PyTorch checkpoint")
  params, meta = core.load_flax(src)
  task = meta["task"] if args.task is None else args.task
  if meta["task"] != task:
    _fail(f"the directory was converted for task '{meta['task']}', not "
          f"'{task}'", src, "leave --task out (to-torch reads the task from "
          f"the directory), or pass --task {meta['task']}")
  dtype = meta.get("source_dtype", "float32") if args.dtype == "source" \
      else args.dtype
  sd = core.flax_to_torch(params, task, meta["model_config"],
                          dtype=np.dtype(dtype), **meta.get("head_kwargs", {}))
  core.write_state_dict(sd, args.dst)
  print(f"wrote {len(sd)} tensors ({core.count_params(sd):,} parameters, "
        f"{dtype}) for task '{task}' -> {os.path.abspath(args.dst)}")


def _bert_to_uniter(args) -> None:
  to_torch = args.dst.endswith((".pt", ".bin"))
  _check_destination(args.dst, args.force)
  _check_checkpoint_file(args.src)
  if to_torch:
    _need_torch(args.dst, "writing a PyTorch checkpoint")
  # pylint: disable-next=protected-access
  cfg = core._model_cfg(_model_config(args.model_config))  # None: base
  bert, _ = core.read_state_dict(args.src)
  sd = core.bert_to_uniter(bert, cfg, seed=args.seed, source=args.src)
  if to_torch:
    core.write_state_dict(sd, args.dst)
  else:
    params = core.torch_to_flax(sd, "pretrain", cfg, source=args.src)
    vocab, text_config = _text_settings(args, "pretrain")
    core.save_flax(args.dst, params, "pretrain", cfg, overwrite=args.force,
                   vocab=vocab, text_config=text_config)
  print(f"UNITER pretraining init from {args.src} -> "
        f"{os.path.abspath(args.dst)}")


def _parser() -> argparse.ArgumentParser:
  p = cli.OneLineParser(prog="python -m uniter_jax.convert",
                        description=__doc__,
                        formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--verbose", action="store_true",
                 help="show the traceback of an error")
  sub = p.add_subparsers(dest="cmd", required=True)
  tasks = sorted(um.HEADS)

  def add(name, help_):
    s = sub.add_parser(name, help=help_)
    s.add_argument("--verbose", action="store_true",
                   default=argparse.SUPPRESS,
                   help="show the traceback of an error")
    return s

  a = add("to-flax", "official .pt -> Flax directory")
  a.add_argument("--task", default=None, choices=tasks,
                 help="default: inferred from the checkpoint's head keys")
  a.add_argument("--model-config", default=None,
                 help="official JSON model config (default: inferred from "
                 "the checkpoint's shapes, heads = hidden / 64)")
  a.add_argument("--vocab", default=None, metavar="VOCAB.txt",
                 help="tokenizer vocabulary to store with the model (e.g. "
                 "bert-base-cased/vocab.txt), for Processor.from_pretrained")
  a.add_argument("--scan-layers", action="store_true",
                 help="store the encoder in the stacked nn.scan layout")
  a.add_argument("--force", action="store_true", help="replace DST_DIR")
  a.add_argument("src", metavar="SRC.pt")
  a.add_argument("dst", metavar="DST_DIR")
  a.set_defaults(fn=_to_flax)

  b = add("to-torch", "Flax directory -> official .pt")
  b.add_argument("--task", default=None, choices=tasks,
                 help="default: the task recorded in SRC_DIR")
  b.add_argument("--dtype", default="source",
                 choices=["source", "float32", "float16"],
                 help="tensor dtype (default: that of the converted .pt)")
  b.add_argument("--force", action="store_true", help="replace DST.pt")
  b.add_argument("src", metavar="SRC_DIR",
                 help="a converted directory, or a training workdir (its "
                 "export_flax/)")
  b.add_argument("dst", metavar="DST.pt")
  b.set_defaults(fn=_to_torch)

  c = add("bert-to-uniter", "HuggingFace BERT state_dict -> UNITER init")
  c.add_argument("--model-config", default=None)
  c.add_argument("--vocab", default=None, metavar="VOCAB.txt",
                 help="with a DST_DIR: the vocabulary to store with it")
  c.add_argument("--seed", type=int, default=0,
                 help="seed of the fresh image-embedding / head weights")
  c.add_argument("--force", action="store_true")
  c.add_argument("src", metavar="BERT.{bin,pt,safetensors}")
  c.add_argument("dst", metavar="DST.pt|DST_DIR")
  c.set_defaults(fn=_bert_to_uniter)
  return p


def _error_lines(e: BaseException) -> list[str]:
  if isinstance(e, OSError) and e.filename is not None:
    return [f"{e.strerror or type(e).__name__} ({e.filename}): check the "
            "path"]
  return str(e).splitlines() or [type(e).__name__]


def main(argv=None) -> int:
  """Runs one command; returns the exit status (usage errors raise
  `cli.UsageExit`, status 2, as argparse's)."""
  args = _parser().parse_args(argv)
  try:
    args.fn(args)
  except KeyboardInterrupt:
    print("interrupted: nothing was written (outputs appear only when "
          "complete)", file=sys.stderr)
    return 130
  except CLI_ERRORS as e:
    if getattr(args, "verbose", False):
      raise
    lines = _error_lines(e)
    # One error line; a checkpoint that matches no model adds the keys or
    # shapes at fault below it.
    print(f"error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
      print(line, file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
