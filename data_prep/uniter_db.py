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

Both builders read from TFDS's `manual_dir`; a config names the db folder
relative to it (empty: `manual_dir` is the db folder itself).

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
def parse_img_db_name(db_dir: str) -> dict[str, Any]:
  """Variant of an img_db folder from its name (`feat_th0.2_max100_min10`)."""
  name = os.path.basename(os.path.normpath(db_dir))
  m = _DB_NAME.match(name)
  if not m:
    raise ValueError(f"{db_dir}: not an official img_db folder name "
                     "(feat_th{t}_max{M}_min{m}, feat_numbb{N} or all, "
                     "optionally _compressed)")
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


def iter_img_db(db_dir: str, dataset: str) -> Iterator[dict[str, Any]]:
  """Yields image-store records of an official img_db, in `__keys__` order.

  Errors (`DataError`) name the dataset being built and the LMDB it reads.
  """
  dataset = f"{dataset} from {db_dir}"
  info = parse_img_db_name(db_dir)
  nbb = None
  if info["nbb_file"] and os.path.exists(info["nbb_file"]):
    with open(info["nbb_file"]) as f:
      nbb = json.load(f)
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
          dump = decode_img_value(raw, info["compressed"])
        except Exception as e:  # pylint: disable=broad-except
          raise schema.DataError(
              dataset, key, f"corrupted record ({type(e).__name__}: {e})"
          ) from e
        for field in ("features", "norm_bb", "conf"):
          if field not in dump:
            raise schema.DataError(dataset, key, f"no {field!r} array "
                                   f"(has {sorted(dump)})")
        n = dump["features"].shape[0]
        if nbb is not None and key in nbb and min(int(nbb[key]), n) != n:
          raise schema.DataError(
              dataset, key, f"{n} stored regions but {info['nbb_file']} "
              f"says {nbb[key]}")
        yield {"img_key": key, "features": dump["features"],
               "norm_bb": dump["norm_bb"], "conf": dump["conf"],
               "soft_labels": dump.get("soft_labels"),
               "image_w": 0, "image_h": 0}
  finally:
    env.close()


def _first_has_soft_labels(db_dir: str) -> bool:
  info = parse_img_db_name(db_dir)
  env = lmdb.open(db_dir, readonly=True, create=False, lock=False)
  try:
    with env.begin() as txn:
      raw = txn.get(b"__keys__")
      keys = json.loads(raw.decode("utf-8")) if raw else []
      if not keys or txn.get(keys[0].encode()) is None:
        return False
      try:
        return "soft_labels" in decode_img_value(txn.get(keys[0].encode()),
                                                 info["compressed"])
      except Exception:  # pylint: disable=broad-except
        return False  # the record check reports it while building
  finally:
    env.close()


@dataclasses.dataclass(eq=False)
class ImgDbConfig(tfds.core.BuilderConfig):
  """One official img_db: `img_db` is its folder relative to `manual_dir`."""
  img_db: str = ""


class UniterImgDb(common.ImageStoreBuilder):
  """Image store from an official UNITER img_db LMDB (in `manual_dir`)."""

  BUILDER_CONFIGS = [ImgDbConfig(
      name="default", description="manual_dir is the img_db folder itself")]
  SOURCE = "uniter_img_db"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download an official UNITER img_db (e.g. with the official "
      "scripts/download_*.sh) and pass --manual_dir pointing at the folder "
      "holding it; name the db folder in the config's `img_db` field "
      "(e.g. 'coco_train2014/feat_th0.2_max100_min10').")

  def _db_dir(self, dl_manager) -> str:
    return os.path.join(os.fspath(dl_manager.manual_dir),
                        self.builder_config.img_db)

  def _image_meta(self):
    info = parse_img_db_name(self._db)
    return {"has_soft_labels": _first_has_soft_labels(self._db),
            "db_cut": info["db_cut"], "db_name": info["name"]}

  def _split_generators(self, dl_manager):
    db_dir = self._db_dir(dl_manager)
    if not os.path.isdir(db_dir):
      raise FileNotFoundError(f"{common.full_name(self)}: img_db folder "
                              f"{db_dir} does not exist")
    parse_img_db_name(db_dir)   # raises on a name that is no official variant
    self._db = db_dir
    return super()._split_generators(dl_manager)

  def _iter_images(self, dl_manager):
    has_soft = self.info.metadata["has_soft_labels"]
    for rec in iter_img_db(self._db, common.full_name(self)):
      if (rec["soft_labels"] is not None) != has_soft:
        raise schema.DataError(
            common.full_name(self), rec["img_key"],
            f"soft_labels present={not has_soft} but the db's first record "
            f"has present={has_soft}")
      yield rec


# ----------------------------------------------------------------------------
# txt_db
# ----------------------------------------------------------------------------
def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


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
  id2len = _read_json(os.path.join(db_dir, "id2len.json"))
  txt2img_path = os.path.join(db_dir, "txt2img.json")
  txt2img = _read_json(txt2img_path) if os.path.exists(txt2img_path) else {}
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
    meta_path = os.path.join(self._db, "meta.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"{name}: {meta_path} does not exist")
    meta = _read_json(meta_path)
    missing = [k for k in ("CLS", "SEP", "MASK", "v_range") if k not in meta]
    if missing:
      raise schema.DataError(name, "meta.json", f"{meta_path} lacks {missing}")
    out = {k: int(meta[k]) for k in ("CLS", "SEP", "MASK")}
    out["v_range"] = [int(x) for x in meta["v_range"]]
    out["vocab_size"] = int(meta["v_range"][1])
    out["UNK"] = int(meta.get("UNK", 100))
    if cfg.vocab:
      vocab = tokenizer.read_vocab(cfg.vocab)
      check_vocab_against_meta(vocab, meta, name)
      out["vocab_size"] = len(vocab)
    if not cfg.img_store:
      raise ValueError(f"{name}: config needs img_store")
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
        raise FileNotFoundError(f"{common.full_name(self)}: ans2label file "
                                f"{path} does not exist")
    else:
      path = os.path.join(self._db, "ans2label.json")
      if not os.path.exists(path):
        return None
    try:
      ans2label = _read_json(path)
    except json.JSONDecodeError as e:
      raise schema.DataError(f"{common.full_name(self)} from {path}", "*",
                             f"not JSON ({e})") from e
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
