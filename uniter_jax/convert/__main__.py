"""Command line: convert UNITER checkpoints between PyTorch and Flax.

  python -m uniter_jax.convert to-flax --task vqa [--model-config C.json] \
      [--vocab bert-base-cased/vocab.txt] uniter-vqa.pt out_dir
  python -m uniter_jax.convert to-torch [--task vqa] out_dir uniter-vqa.pt
  python -m uniter_jax.convert bert-to-uniter bert/pytorch_model.bin \
      uniter-base-init.pt        # or a directory: a Flax checkpoint
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from uniter_jax import model as um
from uniter_jax.convert import core


def _text_settings(args, task: str):
  """(vocab, text_config) to store with a converted directory."""
  from uniter_jax import processor as processor_lib  # pylint: disable=g-import-not-at-top
  vocab = None
  if args.vocab:
    if not os.path.isfile(args.vocab):
      raise core.ConversionError(f"{args.vocab}: no such vocabulary file "
                                 "(--vocab takes a vocab.txt)")
    vocab = processor_lib.read_vocab(args.vocab)
  return vocab, processor_lib.official_text_config(task)


def _to_flax(args) -> None:
  sd, dtype = core.read_state_dict(args.src)
  if args.model_config is None:
    cfg, summary = core.infer_model_config(sd, args.task, source=args.src)
    print(summary)
  else:
    cfg = core._model_cfg(args.model_config)  # pylint: disable=protected-access
  head_kwargs = core.infer_head_kwargs(args.task, sd)
  params = core.torch_to_flax(sd, args.task, cfg, scan_layers=args.scan_layers,
                              source=args.src, **head_kwargs)
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
  params, meta = core.load_flax(args.src)
  task = meta["task"] if args.task is None else args.task
  if meta["task"] != task:
    raise core.ConversionError(
        f"{args.src}: converted for task '{meta['task']}', not '{task}'")
  if os.path.exists(args.dst) and not args.force:
    raise core.ConversionError(f"{args.dst}: already exists (use --force)")
  dtype = meta.get("source_dtype", "float32") if args.dtype == "source" \
      else args.dtype
  sd = core.flax_to_torch(params, task, meta["model_config"],
                          dtype=np.dtype(dtype), **meta.get("head_kwargs", {}))
  core.write_state_dict(sd, args.dst)
  print(f"wrote {len(sd)} tensors ({core.count_params(sd):,} parameters, "
        f"{dtype}) for task '{task}' -> {os.path.abspath(args.dst)}")


def _bert_to_uniter(args) -> None:
  bert, _ = core.read_state_dict(args.src)
  cfg = core._model_cfg(args.model_config)  # pylint: disable=protected-access
  sd = core.bert_to_uniter(bert, cfg, seed=args.seed, source=args.src)
  if args.dst.endswith((".pt", ".bin")):
    if os.path.exists(args.dst) and not args.force:
      raise core.ConversionError(f"{args.dst}: already exists (use --force)")
    core.write_state_dict(sd, args.dst)
  else:
    params = core.torch_to_flax(sd, "pretrain", cfg, source=args.src)
    vocab, text_config = _text_settings(args, "pretrain")
    core.save_flax(args.dst, params, "pretrain", cfg, overwrite=args.force,
                   vocab=vocab, text_config=text_config)
  print(f"UNITER pretraining init from {args.src} -> "
        f"{os.path.abspath(args.dst)}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m uniter_jax.convert",
                              description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  tasks = sorted(um.HEADS)

  a = sub.add_parser("to-flax", help="official .pt -> Flax directory")
  a.add_argument("--task", required=True, choices=tasks)
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

  b = sub.add_parser("to-torch", help="Flax directory -> official .pt")
  b.add_argument("--task", default=None, choices=tasks,
                 help="default: the task recorded in SRC_DIR")
  b.add_argument("--dtype", default="source",
                 choices=["source", "float32", "float16"],
                 help="tensor dtype (default: that of the converted .pt)")
  b.add_argument("--force", action="store_true", help="replace DST.pt")
  b.add_argument("src", metavar="SRC_DIR")
  b.add_argument("dst", metavar="DST.pt")
  b.set_defaults(fn=_to_torch)

  c = sub.add_parser("bert-to-uniter",
                     help="HuggingFace BERT state_dict -> UNITER init")
  c.add_argument("--model-config", default=None)
  c.add_argument("--vocab", default=None, metavar="VOCAB.txt",
                 help="with a DST_DIR: the vocabulary to store with it")
  c.add_argument("--seed", type=int, default=0,
                 help="seed of the fresh image-embedding / head weights")
  c.add_argument("--force", action="store_true")
  c.add_argument("src", metavar="BERT.{bin,pt,safetensors}")
  c.add_argument("dst", metavar="DST.pt|DST_DIR")
  c.set_defaults(fn=_bert_to_uniter)

  args = p.parse_args(argv)
  try:
    args.fn(args)
  except (core.ConversionError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
