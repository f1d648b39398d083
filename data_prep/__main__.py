"""`python -m data_prep <source> ...`: build one dataset and print a summary.

Sources: synthetic | img_db | txt_db | butd | coco_captions | vqa |
snli_ve | nlvr2 | karpathy. Each writes TFDS ArrayRecord datasets under
`--data_dir`; see docs/data_prep.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from data_prep import common


_SYNTH_INT_FIELDS = ("seed", "num_train_images", "num_val_images",
                     "captions_per_image", "num_classes", "min_regions",
                     "max_regions", "min_objects", "max_objects")


def _split_arg(values: list[str]) -> dict[str, str]:
  out = {}
  for v in values or []:
    split, sep, files = v.partition("=")
    if not sep:
      raise SystemExit(f"--split {v!r}: expected NAME=FILE[,FILE]")
    out[split] = files
  return out


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m data_prep",
                              description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="source", required=True)

  def add(name, help_, manual=True):
    s = sub.add_parser(name, help=help_)
    s.add_argument("--data_dir", required=True, help="TFDS data_dir")
    if manual:
      s.add_argument("--manual_dir", required=True,
                     help="folder holding the source files")
    s.add_argument("--name", default=None, required=manual,
                   help="config name of the dataset (e.g. coco_train2014); "
                   "the tfds name becomes <builder>/<name>:1.0.0")
    s.add_argument("--overwrite", action="store_true")
    return s

  s = add("synthetic", "synthetic corpus (images, then text)", manual=False)
  s.add_argument("--preset", default="default", choices=["default", "tiny", "demo"])
  for f in _SYNTH_INT_FIELDS:
    s.add_argument(f"--{f}", type=int, default=None)
  s.add_argument("--noise", type=float, default=None)
  s.add_argument("--tasks", default="",
                 help="also build these synthetic finetuning tasks, comma "
                 "separated: vqa,ve,nlvr2 (default: captions only)")

  s = add("img_db", "official UNITER img_db LMDB")
  s.add_argument("--img_db", default="",
                 help="db folder relative to manual_dir, e.g. "
                      "coco_train2014/feat_th0.2_max100_min10")

  s = add("txt_db", "official UNITER txt_db LMDB")
  s.add_argument("--txt_db", default="", help="folder relative to manual_dir")
  s.add_argument("--img_store", required=True,
                 help="image store it refers to, builder/config:version")
  s.add_argument("--split", default="train")
  s.add_argument("--task", default="pretrain")
  s.add_argument("--max_txt_len", type=int, default=60)
  s.add_argument("--vocab", default="", help="vocab.txt to check against "
                 "meta.json")
  s.add_argument("--ans2label", default="",
                 help="VQA: ans2label.json (e.g. the official "
                 "utils/ans2label.json); default: the txt_db folder's "
                 "ans2label.json, if any")

  s = add("butd", "BUTD / LXMERT TSV features")
  s.add_argument("--tsv_glob", default="*.tsv")

  for name in ("coco_captions", "vqa"):
    s = add(name, f"{name} annotations tokenised with vocab.txt")
    s.add_argument("--vocab", required=True,
                   help="vocab.txt (absolute or relative to manual_dir)")
    s.add_argument("--img_store", required=True)
    s.add_argument("--img_key_format", default="{image_id}")
    s.add_argument("--lowercase", action="store_true")
    s.add_argument("--max_txt_len", type=int, default=60)
    s.add_argument("--split", action="append", required=True,
                   help="NAME=FILE (vqa: NAME=QUESTIONS[,ANNOTATIONS])")
    if name == "vqa":
      s.add_argument("--ans2label", required=True)

  raw = {
      "snli_ve": ("SNLI-VE jsonl (3-way visual entailment)",
                  "flickr30k_{image_id:012d}.npz",
                  "NAME=FILE, e.g. dev=snli_ve_dev.jsonl (default: train, "
                  "dev and test from snli_ve_{train,dev,test}.jsonl)"),
      "nlvr2": ("NLVR2 JSON lines (statements about image pairs)",
                "nlvr2_{pair}-img{side}.npz", "NAME=FILE, e.g. dev=dev.json"),
      "karpathy": ("Flickr30K / COCO Karpathy-split captions (retrieval)",
                   "flickr30k_{image_id:012d}.npz or "
                   "coco_{folder}_{image_id:012d}.npz, from the file's "
                   "dataset field",
                   "NAME=KARPATHY_SPLITS, e.g. train=train,restval "
                   "(default: one split per Karpathy split)"),
  }
  for name, (help_, key_format, split_help) in raw.items():
    s = add(name, help_)
    s.add_argument("--vocab", required=True,
                   help="vocab.txt (absolute or relative to manual_dir)")
    s.add_argument("--img_store", required=True,
                   help="image store it refers to, builder/config:version")
    s.add_argument("--img_key_format", default=None,
                   help="image key format (default: the official img_db "
                   f"names, {key_format})")
    s.add_argument("--lowercase", action="store_true")
    s.add_argument("--max_txt_len", type=int, default=-1,
                   help="drop longer texts (default -1: keep all)")
    s.add_argument("--split", action="append", required=name == "nlvr2",
                   help=split_help)
    s.add_argument("--skip_missing_images", action="store_true",
                   help="drop (and count) texts whose image is not in the "
                   "store instead of stopping")
    if name == "karpathy":
      s.add_argument("--json", required=True,
                     help="dataset_flickr30k.json or dataset_coco.json")
      s.add_argument("--fold_restval", action="store_true",
                     help="write restval into train (official COCO)")
  return p


def _builders(args) -> list:
  """Builders to run, in order, for the parsed arguments."""
  # pylint: disable=g-import-not-at-top
  from data_prep import annotations, butd, synthetic, synthetic_tasks
  from data_prep import uniter_db
  # pylint: enable=g-import-not-at-top
  kw = {"data_dir": args.data_dir}
  if args.source == "synthetic":
    preset = synthetic.PRESETS[args.preset]
    over = {f: getattr(args, f) for f in _SYNTH_INT_FIELDS + ("noise",)
            if getattr(args, f) is not None}
    if over and not args.name:
      raise SystemExit("synthetic: give --name when overriding a preset "
                       f"({sorted(over)})")
    if not over and args.name in (None, preset.name):
      cfg = preset   # the built-in config itself (TFDS refuses a copy of it)
    elif args.name in {c.name for c in synthetic.UniterSyntheticImages.
                       BUILDER_CONFIGS}:
      raise SystemExit(f"synthetic: --name {args.name} is a built-in preset; "
                       "choose another name for a custom corpus")
    else:
      cfg = dataclasses.replace(preset, name=args.name, **over)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in synthetic_tasks.TASKS]
    if unknown:
      raise SystemExit(f"synthetic: --tasks {','.join(unknown)}: expected "
                       f"some of {','.join(synthetic_tasks.TASKS)}")
    return [synthetic.UniterSyntheticImages(config=cfg, **kw),
            synthetic.UniterSyntheticText(config=cfg, **kw)] + [
                synthetic_tasks.BUILDERS[t](config=cfg, **kw) for t in tasks]
  name = args.name
  if name == "default":
    raise SystemExit("--name default is taken by the builders' built-in "
                     "config; choose another name")
  if args.source == "img_db":
    return [uniter_db.UniterImgDb(config=uniter_db.ImgDbConfig(
        name=name, img_db=args.img_db), **kw)]
  if args.source == "txt_db":
    return [uniter_db.UniterTxtDb(config=uniter_db.TxtDbConfig(
        name=name, txt_db=args.txt_db, img_store=args.img_store,
        split=args.split, task=args.task, max_txt_len=args.max_txt_len,
        vocab=args.vocab, ans2label=args.ans2label), **kw)]
  if args.source == "butd":
    return [butd.UniterButdImages(config=butd.ButdConfig(
        name=name, tsv_glob=args.tsv_glob), **kw)]
  if args.source in ("snli_ve", "nlvr2", "karpathy"):
    cls, cfg_cls = {
        "snli_ve": (annotations.UniterSnliVe, annotations.SnliVeConfig),
        "nlvr2": (annotations.UniterNlvr2, annotations.Nlvr2Config),
        "karpathy": (annotations.UniterKarpathyCaptions,
                     annotations.KarpathyConfig)}[args.source]
    fields = dict(name=name, vocab=args.vocab, img_store=args.img_store,
                  lowercase=args.lowercase, max_txt_len=args.max_txt_len,
                  skip_missing_images=args.skip_missing_images)
    if args.img_key_format is not None:
      fields["img_key_format"] = args.img_key_format
    if args.split:
      fields["splits"] = _split_arg(args.split)
    if args.source == "karpathy":
      fields.update(karpathy_json=args.json, fold_restval=args.fold_restval)
    return [cls(config=cfg_cls(**fields), **kw)]
  cfg = butd.AnnConfig(
      name=name, vocab=args.vocab, img_store=args.img_store,
      img_key_format=args.img_key_format, lowercase=args.lowercase,
      max_txt_len=args.max_txt_len, splits=_split_arg(args.split),
      ans2label=getattr(args, "ans2label", ""))
  cls = butd.UniterCocoCaptions if args.source == "coco_captions" else (
      butd.UniterVqa)
  return [cls(config=cfg, **kw)]


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  manual = getattr(args, "manual_dir", None)
  for b in _builders(args):
    summary = common.build(b, manual_dir=manual, overwrite=args.overwrite)
    print(summary, flush=True)
    if args.source == "synthetic" and b.name == "uniter_synthetic_text":
      from data_prep import synthetic  # pylint: disable=g-import-not-at-top
      path = os.path.join(summary.path, "vocab.txt")
      synthetic.write_vocab_file(path)
      print(f"  vocab: {path}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
