"""Readers and TFDS builders for the official UNITER `txt_db` / `img_db`.

Formats (facts of the official code, see docs/data_prep.md):
* txt_db: an LMDB whose values are `lz4.frame(msgpack(dict))` with numpy
  arrays msgpack_numpy-encoded, plus `meta.json`, `id2len.json`,
  `txt2img.json`, `img2txts.json`. Records longer than `max_txt_len` (by
  `id2len`) are dropped, as the official `TxtTokLmdb` does; they are counted.
* img_db: an LMDB directory named `feat_th{t}_max{M}_min{m}` (dynamic cut),
  `feat_numbb{N}` (fixed cut) or `all`, with `_compressed` when values are
  `np.savez_compressed` bytes instead of msgpack dicts; the `__keys__` entry
  lists the image names; `nbb_th{t}_max{M}_min{m}.json` beside a dynamic db
  holds each image's region count.

Both builders read from TFDS's `manual_dir`; a config names the folder
relative to it (empty: `manual_dir` itself). For an img_db that folder is
either the db folder or the image folder above it (`img/coco_train2014`),
whose db is chosen by the region rule as the official `DetectFeatLmdb`
chooses it (`choose_img_db`); each image keeps the regions that reader
keeps (`iter_img_db`). A folder of the wrong kind or level is an
`common.InputError` that says what to pass instead.

Answer vocabularies: a txt_db of task "ve" gets the official VE labels
(`annotations.VE_LABEL2ANS`); one whose config names an `ans2label` JSON
(e.g. the official `utils/ans2label.json` for VQA), or whose folder holds
`ans2label.json`, gets its `label2ans` and `num_answers`, and every target
label must be below `num_answers`. These go into the text metadata.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from typing import Any, Iterator

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import tensorflow_datasets as tfds

from data_prep import annotations
from data_prep import common
from data_prep import tokenizer
from uniter_jax.data import schema

_DB_NAME = re.compile(
    r"^(?:feat_th(?P<th>[-0-9.]+)_max(?P<max>\d+)_min(?P<min>\d+)"
    r"|feat_numbb(?P<num>\d+)|all)(?P<compressed>_compressed)?$")


def _np_hook(obj):
  """msgpack_numpy's decoder, refusing pickled object arrays (unsafe)."""
  if b"nd" in obj and obj.get(b"kind") == b"O":
    raise ValueError("refusing a pickled object array")
  return msgpack_numpy.decode(obj)


# ----------------------------------------------------------------------------
# img_db
# ----------------------------------------------------------------------------
# `num_bb` of the official reader when `conf_th` is -1 (`DetectFeatLmdb`);
# the other defaults are the schema's (0.2, 100, 10).
DEFAULT_NUM_BB = 36
_LMDB_FILE = "data.mdb"


def parse_img_db_name(db_dir: str) -> dict[str, Any]:
  """Variant of an img_db folder from its name (`feat_th0.2_max100_min10`)."""
  name = os.path.basename(os.path.normpath(db_dir))
  m = _DB_NAME.match(name)
  if not m:
    raise common.BadInputError(
        "not an official img_db folder name", db_dir,
        "pass a folder named feat_th{t}_max{M}_min{m}, feat_numbb{N} or "
        "all (optionally _compressed), or the image folder holding one")
  compressed = bool(m.group("compressed"))
  if m.group("th") is not None:
    cut = {"conf_th": float(m.group("th")), "min_bb": int(m.group("min")),
           "max_bb": int(m.group("max")), "num_bb": None}
    nbb_file = os.path.join(
        os.path.dirname(os.path.normpath(db_dir)),
        f"nbb_th{m.group('th')}_max{m.group('max')}_min{m.group('min')}.json")
  elif m.group("num") is not None:
    cut = {"conf_th": -1.0, "min_bb": None, "max_bb": None,
           "num_bb": int(m.group("num"))}
    nbb_file = None
  else:
    cut, nbb_file = None, None
  return {"name": name, "compressed": compressed, "db_cut": cut,
          "nbb_file": nbb_file}


def rule_db_names(conf_th: float, max_bb: int, min_bb: int, num_bb: int
                  ) -> tuple[str, str | None]:
  """(db folder, nbb json) names that `DetectFeatLmdb` opens for a rule.

  The folder name lacks the `_compressed` suffix; the official code formats
  `conf_th` as the float it parsed (`0.2`, `1.0` for "1"), and so does this.
  """
  conf_th = float(conf_th)
  if conf_th == -1:
    return f"feat_numbb{int(num_bb)}", None
  rule = f"th{conf_th}_max{int(max_bb)}_min{int(min_bb)}"
  return f"feat_{rule}", f"nbb_{rule}.json"


def official_num_bb(conf: np.ndarray, conf_th: float, min_bb: int,
                    max_bb: int) -> int:
  """`compute_num_bb` of the official reader, over the whole `conf` array.

  Not capped at the number of stored regions: the reader slices with it,
  which is what caps it.
  """
  k = int(np.sum(np.asarray(conf) > conf_th))
  return int(min(int(max_bb), max(int(min_bb), k)))


def _is_lmdb(path: str) -> bool:
  return os.path.isfile(os.path.join(path, _LMDB_FILE))


def _dbs_in(folder: str) -> list[str]:
  """Names of the official img_db folders directly inside `folder`."""
  try:
    names = sorted(os.listdir(folder))
  except OSError:
    return []
  return [n for n in names
          if _DB_NAME.match(n) and _is_lmdb(os.path.join(folder, n))]


def _options_for(db_name: str) -> str:
  """The `python -m data_prep img_db` options that choose `db_name`."""
  m = _DB_NAME.match(db_name)
  comp = " --compressed_db" if m.group("compressed") else ""
  if m.group("th") is not None:
    return (f"--conf_th {m.group('th')} --max_bb {m.group('max')} "
            f"--min_bb {m.group('min')}{comp}")
  if m.group("num") is not None:
    return f"--conf_th -1 --num_bb {m.group('num')}{comp}"
  return f"a rule without its nbb_*.json{comp}"


@dataclasses.dataclass(frozen=True)
class ImgDbChoice:
  """The LMDB a build reads and how many regions of each image it keeps.

  At most one of `nbb_file`, `num_bb` and `rule` decides the count (as
  the official reader's `name2nbb`); with none, every stored region is
  kept. `db_cut` goes into the metadata: the rule the stored records
  follow (None: all regions, the pipeline applies its rule when reading).
  """
  db_dir: str
  compressed: bool
  db_cut: dict[str, Any] | None
  how: str
  nbb_file: str | None = None
  num_bb: int | None = None
  rule: dict[str, Any] | None = None


def choose_img_db(path: str, conf_th: float | None = None,
                  max_bb: int | None = None, min_bb: int | None = None,
                  num_bb: int | None = None, compressed: bool | None = None
                  ) -> ImgDbChoice:
  """The db to read from `path`: a db folder itself, or an image folder.

  An image folder (e.g. `img/coco_train2014`, as the official scripts
  download it) is read as the official `DetectFeatLmdb` reads it, with the
  region rule's options (None: the official 0.2 / 100 / 10, num_bb 36):
  `conf_th` -1 opens `feat_numbb{num_bb}`; otherwise, when
  `nbb_th{t}_max{M}_min{m}.json` is present, `feat_th{t}_max{M}_min{m}`
  with those counts, else `all` with counts from each image's `conf`. A
  `feat_th` db whose json is missing (where the official reader would fail)
  is used with its stored counts, which `convert_imgdir.py` cut by that
  rule. `compressed` None takes the plain db, else the `_compressed` one
  (the official training scripts' `--compressed_db` is off by default).

  Raises `common.InputError` naming the folder and the fix: a path that is
  missing, a txt_db, the folder above an image folder, or an image folder
  without a db for the rule (listing the dbs it holds and their options).
  """
  path = os.path.normpath(os.fspath(path))
  if not os.path.exists(path):
    raise common.MissingInputError(
        "img_db folder does not exist", path,
        f"check --manual_dir and --img_db; {common.folder_listing(path)}")
  if not os.path.isdir(path):
    raise common.BadInputError(
        "not a folder", path, "pass the image folder of an official "
        "download (e.g. img/coco_train2014) or a db folder inside it")
  given = {k: v for k, v in (("conf_th", conf_th), ("max_bb", max_bb),
                             ("min_bb", min_bb), ("num_bb", num_bb),
                             ("compressed", compressed)) if v is not None}
  if _DB_NAME.match(os.path.basename(path)):
    return _db_folder_choice(path, given)
  if any(os.path.isfile(os.path.join(path, f))
         for f in ("id2len.json", "meta.json")):
    raise common.BadInputError(
        "this is a txt_db (it holds meta.json / id2len.json), not an img_db",
        path, "build it with python -m data_prep txt_db; img_db takes the "
        "image folder, e.g. img/coco_train2014")
  found = _dbs_in(path)
  if not found:
    below = [os.path.join(path, n) for n in sorted(os.listdir(path))
             if os.path.isdir(os.path.join(path, n))
             and _dbs_in(os.path.join(path, n))]
    if below:
      shown = ", ".join(below[:4]) + (", ..." if len(below) > 4 else "")
      raise common.BadInputError(
          "holds no img_db, but the image folders inside it do", path,
          f"pass one of them as --img_db (e.g. {shown})")
    raise common.BadInputError(
        "holds no img_db (a folder feat_th{t}_max{M}_min{m}, feat_numbb{N} "
        "or all, optionally _compressed, with data.mdb)", path,
        "pass the image folder of an official download or the db folder "
        f"itself; {common.folder_listing(path)}")
  return _rule_choice(path, found, given)


def _db_folder_choice(path: str, given: dict[str, Any]) -> ImgDbChoice:
  """A db folder given itself: its name decides the variant."""
  info = parse_img_db_name(path)
  name, cut = info["name"], info["db_cut"]
  if not _is_lmdb(path):
    raise common.BadInputError(
        f"no {_LMDB_FILE} in this db folder", path,
        "extract the download again, or pass the image folder holding a "
        "complete db")
  implied = {"compressed": info["compressed"]}
  if cut is not None and cut["num_bb"] is not None:
    implied.update(conf_th=-1.0, num_bb=cut["num_bb"])
  elif cut is not None:
    implied.update(conf_th=cut["conf_th"], max_bb=cut["max_bb"],
                   min_bb=cut["min_bb"])
  bad = [k for k, v in given.items()
         if k in implied and implied[k] != (float(v) if k == "conf_th"
                                            else v)]
  if bad:
    flags = " ".join(
        ("--compressed_db" if given[k] else "no --compressed_db")
        if k == "compressed" else f"--{k} {given[k]}" for k in bad)
    raise common.BadInputError(
        f"the db folder's name says another region rule or encoding than "
        f"{flags}", path, "drop those options (a db folder's name "
        "decides), or pass the image folder above it to choose a db by "
        "the rule")
  comp = info["compressed"]
  if cut is None:
    rule_given = {k: given[k] for k in ("conf_th", "max_bb", "min_bb",
                                        "num_bb") if k in given}
    if not rule_given:   # every region; the pipeline's rule applies later
      return ImgDbChoice(path, comp, None, f"{name}: every stored region")
    th = float(rule_given.get("conf_th", schema.DEFAULT_CONF_TH))
    if th == -1:
      n = int(rule_given.get("num_bb", DEFAULT_NUM_BB))
      return ImgDbChoice(path, comp, {"conf_th": -1.0, "min_bb": None,
                                      "max_bb": None, "num_bb": n},
                         f"{name}: {n} regions per image (--conf_th -1)",
                         num_bb=n)
    rule = {"conf_th": th,
            "min_bb": int(rule_given.get("min_bb", schema.DEFAULT_MIN_BB)),
            "max_bb": int(rule_given.get("max_bb", schema.DEFAULT_MAX_BB)),
            "num_bb": None}
    return ImgDbChoice(path, comp, rule, f"{name}: region counts by the "
                       "rule from each image's conf", rule=rule)
  if cut["num_bb"] is not None:
    return ImgDbChoice(path, comp, cut, f"{name}: {cut['num_bb']} regions "
                       "per image", num_bb=cut["num_bb"])
  if os.path.isfile(info["nbb_file"]):
    return ImgDbChoice(path, comp, cut, f"{name}: region counts from "
                       f"{os.path.basename(info['nbb_file'])}",
                       nbb_file=info["nbb_file"])
  return ImgDbChoice(path, comp, cut, f"{name}: stored region counts (no "
                     f"{os.path.basename(info['nbb_file'])} beside it)")


def _rule_choice(folder: str, found: list[str], given: dict[str, Any]
                 ) -> ImgDbChoice:
  """The db of an image folder that `DetectFeatLmdb` opens for the rule."""
  th = float(given.get("conf_th", schema.DEFAULT_CONF_TH))
  max_bb = int(given.get("max_bb", schema.DEFAULT_MAX_BB))
  min_bb = int(given.get("min_bb", schema.DEFAULT_MIN_BB))
  num_bb = int(given.get("num_bb", DEFAULT_NUM_BB))
  compressed = given.get("compressed")
  base, nbb_name = rule_db_names(th, max_bb, min_bb, num_bb)
  order = [False, True] if compressed is None else [bool(compressed)]

  def pick(stem):
    for comp in order:
      name = stem + ("_compressed" if comp else "")
      if name in found:
        return os.path.join(folder, name), comp
    return None

  looked = [base]
  if th == -1:
    cut = {"conf_th": -1.0, "min_bb": None, "max_bb": None,
           "num_bb": num_bb}
    rule_txt = f"conf_th -1, num_bb {num_bb}"
    hit = pick(base)
    if hit:
      return ImgDbChoice(*hit, cut, f"{os.path.basename(hit[0])}: {num_bb} "
                         "regions per image (--conf_th -1)", num_bb=num_bb)
  else:
    cut = {"conf_th": th, "min_bb": min_bb, "max_bb": max_bb,
           "num_bb": None}
    rule_txt = f"conf_th {th}, max_bb {max_bb}, min_bb {min_bb}"
    nbb_file = os.path.join(folder, nbb_name)
    hit = pick(base) if os.path.isfile(nbb_file) else None
    if hit:
      return ImgDbChoice(*hit, cut, f"{os.path.basename(hit[0])}: region "
                         f"counts from {nbb_name}", nbb_file=nbb_file)
    hit = pick("all")
    if hit:
      return ImgDbChoice(*hit, cut, f"{os.path.basename(hit[0])}: region "
                         f"counts by the rule from each image's conf (no "
                         f"{nbb_name} with a {base} db)", rule=cut)
    hit = pick(base)
    if hit:
      return ImgDbChoice(*hit, cut, f"{os.path.basename(hit[0])}: stored "
                         f"region counts (no {nbb_name})")
    looked = [f"{base} with {nbb_name}", "all"]
  kind = {None: "plain or _compressed", True: "_compressed",
          False: "plain"}[compressed]
  dbs = "; ".join(f"{d} ({_options_for(d)})" for d in found)
  raise common.BadInputError(
      f"no img_db for the region rule {rule_txt}: no "
      f"{', no '.join(looked)} ({kind})", folder,
      f"it holds {dbs}: pass those options, or the db folder itself")


def decode_img_value(raw: bytes, compressed: bool) -> dict[str, np.ndarray]:
  """One img_db value -> {name: array} (raises on corrupted bytes)."""
  if compressed:
    with io.BytesIO(raw) as f:
      npz = np.load(f, allow_pickle=False)
      return {k: npz[k] for k in npz.files}
  out = msgpack.unpackb(raw, raw=False, object_hook=_np_hook)
  if not isinstance(out, dict):
    raise ValueError(f"expected a msgpack dict, got {type(out).__name__}")
  return {k: np.asarray(v) for k, v in out.items()}


def iter_img_db(db: ImgDbChoice | str, dataset: str
                ) -> Iterator[dict[str, Any]]:
  """Yields image-store records of an official img_db, in `__keys__` order.

  `db`: a choice of `choose_img_db`, or a folder for it. Each record keeps
  the regions the official reader keeps: it slices every array with the
  image's count (`nbb_*.json`, the fixed `num_bb`, or the rule on the whole
  `conf`), and the regions are the feature rows left; arrays longer than
  that (e.g. a `conf` over every detection beside cut `features`) are cut
  to it. A count in `nbb_*.json` below the stored rows is refused: the file
  belongs to another conversion. Errors (`DataError`) name the dataset
  being built and the LMDB it reads.
  """
  choice = db if isinstance(db, ImgDbChoice) else choose_img_db(db)
  db_dir = choice.db_dir
  dataset = f"{dataset} from {db_dir}"
  nbb = None
  if choice.nbb_file:
    nbb = common.read_json(choice.nbb_file, "region count file")
  env = lmdb.open(db_dir, readonly=True, create=False, lock=False,
                  readahead=False)
  try:
    with env.begin(buffers=False) as txn:
      raw_keys = txn.get(b"__keys__")
      if raw_keys is None:
        raise schema.DataError(dataset, "__keys__",
                               f"{db_dir} has no __keys__ entry")
      keys = json.loads(raw_keys.decode("utf-8"))
      for key in keys:
        raw = txn.get(key.encode("utf-8"))
        if raw is None:
          raise schema.DataError(dataset, key, "listed in __keys__ but "
                                 "missing from the LMDB")
        try:
          dump = decode_img_value(raw, choice.compressed)
        except Exception as e:  # pylint: disable=broad-except
          raise schema.DataError(
              dataset, key, f"corrupted record ({type(e).__name__}: {e})"
          ) from e
        for field in ("features", "norm_bb", "conf"):
          if field not in dump:
            raise schema.DataError(dataset, key, f"no {field!r} array "
                                   f"(has {sorted(dump)})")
        feats = dump["features"]
        stored = feats.shape[0] if feats.ndim else 0
        if nbb is not None and key in nbb:
          k = int(nbb[key])
          if k < stored:
            raise schema.DataError(
                dataset, key, f"{stored} stored regions but "
                f"{choice.nbb_file} says {k}")
        elif choice.num_bb is not None:
          k = choice.num_bb
        elif choice.rule is not None:
          r = choice.rule
          k = official_num_bb(dump["conf"], r["conf_th"], r["min_bb"],
                              r["max_bb"])
        else:
          k = stored
        n = min(k, stored)
        soft = dump.get("soft_labels")
        # Shorter arrays stay as they are: the record check refuses them.
        yield {"img_key": key, "features": feats[:n],
               "norm_bb": dump["norm_bb"][:n], "conf": dump["conf"][:n],
               "soft_labels": None if soft is None else soft[:n],
               "image_w": 0, "image_h": 0}
  finally:
    env.close()


def _first_has_soft_labels(choice: ImgDbChoice) -> bool:
  env = lmdb.open(choice.db_dir, readonly=True, create=False, lock=False)
  try:
    with env.begin() as txn:
      raw = txn.get(b"__keys__")
      keys = json.loads(raw.decode("utf-8")) if raw else []
      if not keys or txn.get(keys[0].encode()) is None:
        return False
      try:
        return "soft_labels" in decode_img_value(txn.get(keys[0].encode()),
                                                 choice.compressed)
      except Exception:  # pylint: disable=broad-except
        return False  # the record check reports it while building
  finally:
    env.close()


@dataclasses.dataclass(eq=False)
class ImgDbConfig(tfds.core.BuilderConfig):
  """One official img_db.

  Attributes:
    img_db: relative to `manual_dir` ("" = manual_dir itself): the image
      folder (e.g. `img/coco_train2014`), whose db the region rule picks, or
      a db folder itself (e.g. `coco_train2014/feat_th0.2_max100_min10`).
    conf_th, max_bb, min_bb, num_bb: the region rule of the official
      reader (None: 0.2, 100, 10, 36); an image folder's db is chosen by it
      (`choose_img_db`), a db folder's name must agree with the ones given.
    compressed: None takes the plain db where both exist; True / False
      the `_compressed` one / the plain one.
  """
  img_db: str = ""
  conf_th: float | None = None
  max_bb: int | None = None
  min_bb: int | None = None
  num_bb: int | None = None
  compressed: bool | None = None


class UniterImgDb(common.ImageStoreBuilder):
  """Image store from an official UNITER img_db LMDB (in `manual_dir`)."""

  BUILDER_CONFIGS = [ImgDbConfig(
      name="default", description="manual_dir is the img_db folder itself")]
  SOURCE = "uniter_img_db"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download an official UNITER img_db (e.g. with the official "
      "scripts/download_*.sh) and pass --manual_dir pointing at the folder "
      "holding it; name the image folder (e.g. 'img/coco_train2014') or the "
      "db folder (e.g. 'img/coco_train2014/feat_th0.2_max100_min10') in the "
      "config's `img_db` field.")

  def _image_meta(self):
    c = self._choice
    return {"has_soft_labels": _first_has_soft_labels(c), "db_cut": c.db_cut,
            "db_name": os.path.basename(c.db_dir), "db_choice": c.how}

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    self._choice = choose_img_db(
        os.path.join(os.fspath(dl_manager.manual_dir), cfg.img_db),
        conf_th=cfg.conf_th, max_bb=cfg.max_bb, min_bb=cfg.min_bb,
        num_bb=cfg.num_bb, compressed=cfg.compressed)
    return super()._split_generators(dl_manager)

  def _iter_images(self, dl_manager):
    has_soft = self.info.metadata["has_soft_labels"]
    for rec in iter_img_db(self._choice, common.full_name(self)):
      if (rec["soft_labels"] is not None) != has_soft:
        raise schema.DataError(
            common.full_name(self), rec["img_key"],
            f"soft_labels present={not has_soft} but the db's first record "
            f"has present={has_soft}")
      yield rec


# ----------------------------------------------------------------------------
# txt_db
# ----------------------------------------------------------------------------
def check_txt_db_folder(path: str) -> None:
  """Raises `common.InputError` unless `path` is an official txt_db folder.

  The message names what `path` is instead (missing, an img_db, the folder
  above the txt_dbs) and what to pass.
  """
  if not os.path.exists(path):
    raise common.MissingInputError(
        "txt_db folder does not exist", path,
        f"check --manual_dir and --txt_db; {common.folder_listing(path)}")
  if os.path.isfile(os.path.join(path, "meta.json")):
    if not _is_lmdb(path):
      raise common.BadInputError(
          f"no {_LMDB_FILE} beside meta.json", path,
          "extract the txt_db download again (a txt_db folder holds the "
          "LMDB and its json files)")
    return
  name = os.path.basename(os.path.normpath(path))
  if _DB_NAME.match(name) or (os.path.isdir(path) and (
      _dbs_in(path) or any(n.startswith("nbb_") for n in os.listdir(path)))):
    raise common.BadInputError(
        "this is an img_db, not a txt_db", path,
        "build it with python -m data_prep img_db; txt_db takes a folder "
        "holding meta.json, id2len.json and data.mdb (e.g. "
        "txt/itm_coco_train.db)")
  below = []
  if os.path.isdir(path):
    below = [n for n in sorted(os.listdir(path))
             if os.path.isfile(os.path.join(path, n, "meta.json"))]
  if below:
    shown = ", ".join(below[:6]) + (", ..." if len(below) > 6 else "")
    raise common.BadInputError(
        "holds no txt_db, but the folders inside it are txt_dbs", path,
        f"pass one of them as --txt_db ({shown})")
  raise common.MissingInputError(
      "no meta.json: not an official txt_db folder", path,
      "pass the folder holding meta.json, id2len.json and data.mdb; "
      + common.folder_listing(path))


def decode_txt_value(raw: bytes) -> dict[str, Any]:
  """One txt_db value -> dict (raises on corrupted bytes)."""
  out = msgpack.unpackb(lz4.frame.decompress(raw), raw=False,
                        object_hook=_np_hook)
  if not isinstance(out, dict):
    raise ValueError(f"expected a msgpack dict, got {type(out).__name__}")
  return out


def check_vocab_against_meta(vocab: list[str], meta: dict[str, Any],
                             dataset: str) -> None:
  """Raises unless `vocab` gives meta.json's special ids and v_range."""
  for tok in ("CLS", "SEP", "MASK", "UNK"):
    if tok not in meta:
      continue
    i = int(meta[tok])
    got = vocab[i] if 0 <= i < len(vocab) else None
    if got != f"[{tok}]":
      raise schema.DataError(
          dataset, "meta.json", f"vocab does not match meta.json: "
          f"{tok}={i} but vocab[{i}] is {got!r}")
  hi = int(meta["v_range"][1])
  if hi > len(vocab):
    raise schema.DataError(
        dataset, "meta.json", f"vocab does not match meta.json: v_range "
        f"ends at {hi} but the vocab has {len(vocab)} tokens")


def _targets(dump: dict[str, Any], rid: str, dataset: str) -> dict[str, Any]:
  """Schema target fields from an official example's `target`."""
  t = dump.get("target")
  if t is None:
    return {"target": None}
  if isinstance(t, dict):   # VQA / VE soft targets
    labels = list(t.get("labels") or [])
    scores = list(t.get("scores") or [])
    if len(labels) != len(scores):
      raise schema.DataError(dataset, rid, "target labels and scores "
                             "differ in length")
    return {"target": None, "target_labels": labels, "target_scores": scores}
  if isinstance(t, (bool, int, np.integer)):
    return {"target": int(t)}
  raise schema.DataError(dataset, rid, f"unsupported target {t!r}")


def iter_txt_db(db_dir: str, dataset: str, max_txt_len: int, drop,
                ) -> Iterator[dict[str, Any]]:
  """Yields text records of an official txt_db in `id2len.json` order.

  `drop(reason)` is called for each record the official loader would skip.
  Errors (`DataError`) name the dataset being built and the LMDB it reads.
  """
  dataset = f"{dataset} from {db_dir}"
  id2len = common.read_json(os.path.join(db_dir, "id2len.json"),
                            "id2len.json of the txt_db")
  txt2img_path = os.path.join(db_dir, "txt2img.json")
  txt2img = (common.read_json(txt2img_path, "txt2img.json of the txt_db")
             if os.path.exists(txt2img_path) else {})
  env = lmdb.open(db_dir, readonly=True, create=False, lock=False,
                  readahead=False)
  try:
    with env.begin(buffers=False) as txn:
      for rid, n in id2len.items():
        if max_txt_len != -1 and n > max_txt_len:
          drop("over_max_txt_len")
          continue
        raw = txn.get(rid.encode("utf-8"))
        if raw is None:
          raise schema.DataError(dataset, rid, "in id2len.json but "
                                 "missing from the LMDB")
        try:
          dump = decode_txt_value(raw)
        except Exception as e:  # pylint: disable=broad-except
          raise schema.DataError(
              dataset, rid, f"corrupted record ({type(e).__name__}: {e})"
          ) from e
        if "input_ids" not in dump or "img_fname" not in dump:
          raise schema.DataError(dataset, rid, "record lacks input_ids "
                                 f"or img_fname (has {sorted(dump)})")
        ids = list(dump["input_ids"])
        if len(ids) != n:
          raise schema.DataError(dataset, rid, f"{len(ids)} tokens but "
                                 f"id2len.json says {n}")
        fname = dump["img_fname"]
        keys = [fname] if isinstance(fname, str) else list(fname)
        if rid in txt2img and txt2img[rid] not in (fname, keys):
          if not (isinstance(txt2img[rid], list) and
                  list(txt2img[rid]) == keys):
            raise schema.DataError(
                dataset, rid, f"img_fname {fname!r} but txt2img.json says "
                f"{txt2img[rid]!r}")
        rec = {"id": rid, "input_ids": ids, "img_keys": keys}
        rec.update(_targets(dump, rid, dataset))
        yield rec
  finally:
    env.close()


@dataclasses.dataclass(eq=False)
class TxtDbConfig(tfds.core.BuilderConfig):
  """One official txt_db.

  Attributes:
    txt_db: folder relative to `manual_dir` ("" = manual_dir itself).
    img_store: tfds name of the image store its `img_fname`s refer to,
      "builder/config:version" (built first, in the same data_dir).
    split: split name to write.
    task: free label stored in the metadata ("itm", "vqa", "nlvr2", ...).
    max_txt_len: longer texts are dropped and counted (-1 keeps all).
    vocab: optional path to a `vocab.txt` that must match meta.json.
    ans2label: optional `{answer: label}` JSON (absolute, or relative to
      manual_dir); "" reads the txt_db folder's `ans2label.json` if any.
  """
  txt_db: str = ""
  img_store: str = ""
  split: str = "train"
  task: str = "pretrain"
  max_txt_len: int = 60
  vocab: str = ""
  ans2label: str = ""


class UniterTxtDb(common.TextBuilder):
  """Text dataset from an official UNITER txt_db LMDB (in `manual_dir`)."""

  BUILDER_CONFIGS = [TxtDbConfig(
      name="default", description="manual_dir is the txt_db folder itself",
      img_store="uniter_img_db/default:1.0.0")]
  SOURCE = "uniter_txt_db"
  MANUAL_DOWNLOAD_INSTRUCTIONS = UniterImgDb.MANUAL_DOWNLOAD_INSTRUCTIONS

  def _text_meta(self, dl_manager):
    cfg = self.builder_config
    name = common.full_name(self)
    self._db = os.path.join(os.fspath(dl_manager.manual_dir), cfg.txt_db)
    check_txt_db_folder(self._db)
    meta_path = os.path.join(self._db, "meta.json")
    meta = common.read_json(meta_path, "meta.json of the txt_db")
    if not isinstance(meta, dict):
      raise schema.DataError(name, "meta.json", f"{meta_path} is not a "
                             "JSON object")
    missing = [k for k in ("CLS", "SEP", "MASK", "v_range") if k not in meta]
    if missing:
      raise schema.DataError(name, "meta.json", f"{meta_path} lacks {missing}")
    out = {k: int(meta[k]) for k in ("CLS", "SEP", "MASK")}
    out["v_range"] = [int(x) for x in meta["v_range"]]
    out["vocab_size"] = int(meta["v_range"][1])
    out["UNK"] = int(meta.get("UNK", 100))
    if cfg.vocab:
      if not os.path.isfile(cfg.vocab):
        raise common.MissingInputError(
            "vocab file does not exist", cfg.vocab, "pass --vocab the "
            "vocab.txt of the tokenizer the txt_db was made with (e.g. "
            "bert-base-cased/vocab.txt), or leave --vocab out")
      vocab = tokenizer.read_vocab(cfg.vocab)
      check_vocab_against_meta(vocab, meta, name)
      out["vocab_size"] = len(vocab)
    if not cfg.img_store:
      raise common.BadInputError(
          f"{name}: no image store named", "img_store",
          "pass --img_store builder/config:version, e.g. "
          "uniter_img_db/coco_train2014:1.0.0")
    out.update({"task": cfg.task, "img_store": cfg.img_store,
                "max_txt_len": cfg.max_txt_len,
                "tokenizer": meta.get("toker", meta.get("tokenizer"))})
    label2ans = self._label2ans(dl_manager)
    if label2ans is not None:
      out.update(label2ans=label2ans, num_answers=len(label2ans))
    return out

  def _label2ans(self, dl_manager) -> list[str] | None:
    """The answer list of the db, or None (see the module docstring)."""
    cfg = self.builder_config
    if cfg.task == "ve":
      return list(annotations.VE_LABEL2ANS)
    if cfg.ans2label:
      path = os.path.join(os.fspath(dl_manager.manual_dir), cfg.ans2label)
      if not os.path.exists(path):
        raise common.MissingInputError(
            f"{common.full_name(self)}: ans2label file does not exist", path,
            "pass --ans2label an {answer: label} JSON (e.g. the official "
            "utils/ans2label.json), absolute or relative to --manual_dir")
    else:
      path = os.path.join(self._db, "ans2label.json")
      if not os.path.exists(path):
        return None
    ans2label = common.read_json(path, "ans2label file")
    return annotations.label2ans_from_ans2label(
        ans2label, f"{common.full_name(self)} from {path}")

  def _split_iters(self, dl_manager):
    cfg = self.builder_config
    records = iter_txt_db(self._db, common.full_name(self), cfg.max_txt_len,
                          self.drop)
    n = self.info.metadata.get("num_answers")
    if n is not None:
      records = _check_labels(records, int(n),
                              f"{common.full_name(self)} from {self._db}")
    return {cfg.split: records}


def _check_labels(records, num_answers: int, dataset: str):
  """Passes records on, refusing a soft-target label >= `num_answers`."""
  for rec in records:
    labels = rec.get("target_labels") or []
    bad = [int(x) for x in labels if not 0 <= int(x) < num_answers]
    if bad:
      raise schema.DataError(dataset, rec["id"], f"target labels {bad} "
                             f"outside the {num_answers} answers")
    yield rec
