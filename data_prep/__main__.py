"""`python -m data_prep <source> ...`: build one dataset and print a summary.

Sources: synthetic | img_db | txt_db | butd | coco_captions | vqa |
snli_ve | nlvr2 | karpathy. Each writes TFDS ArrayRecord datasets under
`--data_dir` (default, as TFDS: $TFDS_DATA_DIR or ~/tensorflow_datasets)
from the files in `--manual_dir` (default, as TFDS:
<data_dir>/downloads/manual); see docs/data_prep.md.

A mistake of the person running it (a missing or wrong path, a folder of
the wrong kind or level, bad source data, a dataset that is already built)
prints one line `error: <what> (<where>): <fix>` and exits with status 1,
or 2 for a usage error; `--verbose` shows the traceback. Any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from data_prep import common
from uniter_jax import cli
from uniter_jax.data import schema


_SYNTH_INT_FIELDS = ("seed", "num_train_images", "num_val_images",
                     "captions_per_image", "num_classes", "min_regions",
                     "max_regions", "min_objects", "max_objects")


def _default_data_dir() -> str:
  """TFDS's default data_dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      os.path.join("~", "tensorflow_datasets"))


def _split_arg(values: list[str]) -> dict[str, str]:
  out = {}
  for v in values or []:
    split, sep, files = v.partition("=")
    if not sep:
      cli.usage_error(f"--split {v!r} has no '='", "--split",
                      "write NAME=FILE[,FILE], e.g. --split dev=dev.json")
    out[split] = files
  return out


def _parser() -> argparse.ArgumentParser:
  p = cli.OneLineParser(prog="python -m data_prep",
                        description=__doc__.splitlines()[0])
  p.add_argument("--verbose", action="store_true",
                 help="show the traceback of an error")
  sub = p.add_subparsers(dest="source", required=True)

  def add(name, help_, manual=True):
    s = sub.add_parser(name, help=help_)
    s.add_argument("--data_dir", default=None,
                   help="TFDS data_dir to write into (default, as TFDS: "
                   "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
    if manual:
      s.add_argument("--manual_dir", default=None,
                     help="folder holding the source files (default, as "
                     "TFDS: <data_dir>/downloads/manual)")
    s.add_argument("--name", default=None, required=manual,
                   help="config name of the dataset (e.g. coco_train2014); "
                   "the tfds name becomes <builder>/<name>:1.0.0")
    s.add_argument("--overwrite", action="store_true",
                   help="rebuild a dataset that is already built (without "
                   "it, an existing dataset is an error)")
    s.add_argument("--verbose", action="store_true",
                   default=argparse.SUPPRESS,
                   help="show the traceback of an error")
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
                 help="the image folder, e.g. img/coco_train2014, whose db "
                 "the region rule picks as the official reader does, or a "
                 "db folder itself, e.g. img/coco_train2014/"
                 "feat_th0.2_max100_min10; relative to --manual_dir, or "
                 "absolute (then --manual_dir is not needed)")
  s.add_argument("--conf_th", type=float, default=None,
                 help="region rule: confidence threshold (default 0.2; -1: "
                 "a fixed --num_bb per image)")
  s.add_argument("--max_bb", type=int, default=None,
                 help="region rule: most regions (default 100)")
  s.add_argument("--min_bb", type=int, default=None,
                 help="region rule: fewest regions (default 10)")
  s.add_argument("--num_bb", type=int, default=None,
                 help="regions per image with --conf_th -1 (default 36)")
  s.add_argument("--compressed_db", action="store_true", default=None,
                 help="read the _compressed db (default: the plain one "
                 "where both exist, else the one there is)")

  s = add("txt_db", "official UNITER txt_db LMDB")
  s.add_argument("--txt_db", default="",
                 help="the txt_db folder (holding meta.json), relative to "
                 "--manual_dir, or absolute (then --manual_dir is not "
                 "needed)")
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
      cli.usage_error(f"synthetic: overriding {sorted(over)} of preset "
                      f"{preset.name!r} without a name", "--name",
                      "give --name NAME for the custom corpus")
    if not over and args.name in (None, preset.name):
      cfg = preset   # the built-in config itself (TFDS refuses a copy of it)
    elif args.name in {c.name for c in synthetic.UniterSyntheticImages.
                       BUILDER_CONFIGS}:
      cli.usage_error(f"synthetic: {args.name!r} is a built-in preset's name",
                      "--name", "choose another name for a custom corpus")
    else:
      cfg = dataclasses.replace(preset, name=args.name, **over)
      try:
        synthetic._check_config(cfg)  # pylint: disable=protected-access
      except ValueError as e:
        cli.usage_error(f"synthetic: {e}",
                        ", ".join(f"--{k}" for k in sorted(over)),
                        "change those overrides (see docs/data_prep.md)")
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in synthetic_tasks.TASKS]
    if unknown:
      cli.usage_error(f"synthetic: unknown task {','.join(unknown)}", "--tasks",
                      f"name some of {','.join(synthetic_tasks.TASKS)}")
    return [synthetic.UniterSyntheticImages(config=cfg, **kw),
            synthetic.UniterSyntheticText(config=cfg, **kw)] + [
                synthetic_tasks.BUILDERS[t](config=cfg, **kw) for t in tasks]
  name = args.name
  if name == "default":
    cli.usage_error("'default' is the builders' built-in config", "--name",
                    "choose another name")
  if args.source == "img_db":
    return [uniter_db.UniterImgDb(config=uniter_db.ImgDbConfig(
        name=name, img_db=args.img_db, conf_th=args.conf_th,
        max_bb=args.max_bb, min_bb=args.min_bb, num_bb=args.num_bb,
        compressed=args.compressed_db), **kw)]
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


def _resolve_dirs(args) -> None:
  """Fills in the TFDS defaults of `--data_dir` / `--manual_dir`."""
  args.data_dir = (os.path.expanduser(args.data_dir) if args.data_dir
                   else _default_data_dir())
  if not hasattr(args, "manual_dir"):
    return
  folder = getattr(args, args.source, "") if args.source in (
      "img_db", "txt_db") else ""
  if folder:
    folder = os.path.expanduser(folder)
    setattr(args, args.source, folder)
  if args.manual_dir:
    manual = os.path.expanduser(args.manual_dir)
  elif folder and os.path.isabs(folder):
    manual = folder   # the absolute folder is all the build reads
  else:
    manual = os.path.join(args.data_dir, "downloads", "manual")
  args.manual_dir = manual


def _check_sources(args) -> None:
  """Checks that the manual folder can be read (TFDS's own check is an
  assertion) and an official db folder, before TFDS starts: a wrong path
  fails before any progress output (the builders check again)."""
  if not hasattr(args, "manual_dir"):
    return
  manual = args.manual_dir
  folder = getattr(args, args.source, "") if args.source in (
      "img_db", "txt_db") else ""
  if folder and os.path.isabs(folder):
    pass   # the db checks below name the folder given
  elif not os.path.isdir(manual):
    raise common.MissingInputError(
        "manual_dir does not exist", manual, "pass --manual_dir, the folder "
        "holding the source files (default: <data_dir>/downloads/manual); "
        + common.folder_listing(manual))
  elif not os.listdir(manual):
    raise common.BadInputError(
        "manual_dir is empty", manual, "put the source files there, or pass "
        "--manual_dir the folder that holds them")
  from data_prep import uniter_db  # pylint: disable=g-import-not-at-top
  if args.source == "img_db":
    uniter_db.choose_img_db(
        os.path.join(args.manual_dir, args.img_db), conf_th=args.conf_th,
        max_bb=args.max_bb, min_bb=args.min_bb, num_bb=args.num_bb,
        compressed=args.compressed_db)
  elif args.source == "txt_db":
    uniter_db.check_txt_db_folder(os.path.join(args.manual_dir, args.txt_db))


def _run(args) -> int:
  _resolve_dirs(args)
  builders = _builders(args)   # usage errors first
  _check_sources(args)
  # TFDS would reuse a dataset already built under the same name and say
  # nothing, even when its source or options were others.
  for b in builders:
    if not args.overwrite and b.is_prepared():
      raise common.BadInputError(
          f"{common.full_name(b)} is already built", os.fspath(b.data_path),
          "pass --overwrite to rebuild it, or another --name")
  for b in builders:
    summary = common.build(b, manual_dir=getattr(args, "manual_dir", None),
                           overwrite=args.overwrite)
    print(summary, flush=True)
    if args.source == "img_db":
      print(f"  read {schema.read_meta(summary.path).get('db_choice')}",
            flush=True)
    if args.source == "synthetic" and b.name == "uniter_synthetic_text":
      from data_prep import synthetic  # pylint: disable=g-import-not-at-top
      path = os.path.join(summary.path, "vocab.txt")
      synthetic.write_vocab_file(path)
      print(f"  vocab: {path}", flush=True)
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns the exit status (usage errors raise
  `cli.UsageExit`, status 2, as argparse's)."""
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except KeyboardInterrupt:
    print("interrupted: the unfinished dataset is not kept (TFDS writes it "
          "into a temporary folder); rerun the command", file=sys.stderr)
    return 130
  except common.CLI_ERRORS as e:
    # A person's mistake or bad source data: one line, no traceback (as
    # run.py with `uniter_jax.train.RUN_ERRORS`), unless asked for.
    if getattr(args, "verbose", False):
      raise
    print(f"error: {common.describe_error(e)}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
  sys.exit(main())
