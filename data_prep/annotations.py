"""Raw finetuning annotations: SNLI-VE, NLVR2 and Karpathy-split captions.

Each builder tokenises the public annotation files with the user's
`vocab.txt` (`tokenizer.WordPiece`, as `butd._AnnBuilder`, whose set-up
they share) and names images by the keys the official UNITER img_dbs use,
so a text dataset joins an image store built from an official img_db
(`python -m data_prep img_db`) without renaming:

* SNLI-VE (`snli_ve_{train,dev,test}.jsonl`): one hypothesis a line
  (`pairID`, `Flikr30kID`, `sentence2`, `gold_label`). Targets as the
  official txt_db stores them: `target_labels=[k]`, `target_scores=[1.0]`,
  k in `VE_LABEL2ANS` order. Image key `flickr30k_{image_id:012d}.npz`,
  `image_id` the number of `Flikr30kID` ("3416050480.jpg").
* NLVR2 (`train.json`, `dev.json`, `test1.json`, JSON lines): `identifier`
  `split-set_id-pair_id-sentence_id`, `sentence`, `label` "True"/"False"
  (target 1/0; absent: unlabelled, target -1). The two images are
  `nlvr2_{pair}-img0.npz` / `-img1.npz`, `pair` the identifier without
  its last part (as the official `prepro.py`).
* Karpathy splits (`dataset_flickr30k.json`, `dataset_coco.json`): one
  TFDS split per Karpathy split (train, restval, val, test), optionally
  restval folded into train; one record per sentence, id `sentid`. Image
  keys `flickr30k_{image_id:012d}.npz` (the number in the file name) or
  `coco_{folder}_{image_id:012d}.npz` (`folder` train2014 / val2014).

Every key format is a config option (`img_key_format`). By default texts
are kept whatever their length (`max_txt_len=-1`): the official code drops
long texts only when it trains, and evaluation needs every example.
Bad input (a missing file, a line that is not JSON, a missing field, an
unknown label) stops the build with a `schema.DataError` naming the file,
the record and the problem; nothing is left half written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import tensorflow_datasets as tfds

from data_prep import butd
from data_prep import common
from uniter_jax.data import schema

# The official SNLI-VE label order (contradiction 0, entailment 1, neutral 2).
VE_LABEL2ANS = ("contradiction", "entailment", "neutral")
NLVR2_LABELS = {"true": 1, "false": 0}
KARPATHY_SPLITS = ("train", "restval", "val", "test")
# Image keys of the official img_dbs.
FLICKR_KEY_FORMAT = "flickr30k_{image_id:012d}.npz"
COCO_KEY_FORMAT = "coco_{folder}_{image_id:012d}.npz"
NLVR2_KEY_FORMAT = "nlvr2_{pair}-img{side}.npz"


@dataclasses.dataclass(eq=False)
class RawConfig(butd.AnnConfig):
  """`butd.AnnConfig` (vocab, img_store, img_key_format, lowercase,
  max_txt_len, splits {split: file}) plus:

  Attributes:
    skip_missing_images: drop (and count, `missing_image`) a record whose
      image is not in the image store, as the official NLVR2 `prepro.py`
      does with `--missing_imgs`; False: such a record is an error.
  """
  max_txt_len: int = -1
  skip_missing_images: bool = False


@dataclasses.dataclass(eq=False)
class SnliVeConfig(RawConfig):
  img_key_format: str = FLICKR_KEY_FORMAT
  img_store: str = "uniter_img_db/flickr30k:1.0.0"
  splits: dict[str, str] = dataclasses.field(default_factory=lambda: {
      s: f"snli_ve_{s}.jsonl" for s in ("train", "dev", "test")})


@dataclasses.dataclass(eq=False)
class Nlvr2Config(RawConfig):
  img_key_format: str = NLVR2_KEY_FORMAT
  img_store: str = "uniter_img_db/nlvr2_dev:1.0.0"
  splits: dict[str, str] = dataclasses.field(default_factory=lambda: {
      "dev": "dev.json"})


@dataclasses.dataclass(eq=False)
class KarpathyConfig(RawConfig):
  """Karpathy-split captions.

  Attributes:
    karpathy_json: `dataset_flickr30k.json` / `dataset_coco.json`.
    splits: {TFDS split: comma-separated Karpathy splits}; the default
      writes one TFDS split per Karpathy split present in the file.
    fold_restval: with the default `splits`, write restval into `train`
      (the official COCO training set is itm_coco_train + itm_coco_restval)
      and no `restval` split.
    img_key_format: "" picks the official img_db names from the file's
      `dataset` field (flickr30k or coco); fields {image_id} (int),
      {folder} (COCO: train2014 / val2014), {filename} (file name without
      extension), {imgid} (Karpathy's image index).
  """
  karpathy_json: str = "dataset_flickr30k.json"
  splits: dict[str, str] = dataclasses.field(
      default_factory=lambda: {s: s for s in KARPATHY_SPLITS})
  fold_restval: bool = False
  img_key_format: str = ""
  img_store: str = "uniter_img_db/flickr30k:1.0.0"


def _format_key(fmt: str, dataset: str, rid: str, **fields) -> str:
  try:
    return fmt.format(**fields)
  except (KeyError, IndexError, ValueError) as e:
    raise schema.DataError(dataset, rid, f"img_key_format {fmt!r} does not "
                           f"format with fields {sorted(fields)} "
                           f"({type(e).__name__}: {e})") from e


def read_jsonl(path: str, dataset: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) of each non-empty line of a JSON-lines file.

  Raises `DataError` naming the file and line for a missing file, a line
  that is not JSON, or one that is not a JSON object.
  """
  where = f"{dataset} from {path}"
  if not os.path.isfile(path):
    raise schema.DataError(where, "*", "annotation file does not exist")
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise schema.DataError(where, f"line {n}", f"not JSON ({e})") from e
      if not isinstance(obj, dict):
        raise schema.DataError(where, f"line {n}", "expected a JSON object, "
                               f"got {type(obj).__name__}")
      yield n, obj


def _field(obj: dict, name: str, where: str, rid: str) -> Any:
  if name not in obj:
    raise schema.DataError(where, rid, f"no field {name!r} (has "
                           f"{sorted(obj)})")
  return obj[name]


class _RawBuilder(butd._AnnBuilder):  # pylint: disable=protected-access
  """Shared checks of the raw-annotation builders."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the annotation files and vocab.txt in --manual_dir and name them "
      "in the config (splits, vocab).")

  def _text_meta(self, dl_manager):
    vocab = self._path(dl_manager, self.builder_config.vocab)
    if not os.path.isfile(vocab):
      raise schema.DataError(common.full_name(self), "*", f"vocab file "
                             f"{vocab} does not exist")
    return super()._text_meta(dl_manager)

  def _where(self, split: str, path: str) -> str:
    return f"{common.full_name(self)}[{split}] from {path}"

  def _images_known(self, keys: list[str]) -> bool:
    """False (counted) when `skip_missing_images` drops the record."""
    if self.builder_config.skip_missing_images and any(
        k not in self._img_index for k in keys):
      self.drop("missing_image")
      return False
    return True

  def _count(self, key: str, split: str, n: int) -> None:
    self.info.metadata.setdefault(key, {})[split] = n


class UniterSnliVe(_RawBuilder):
  """SNLI-VE hypotheses (JSON lines) with 3-way targets."""

  BUILDER_CONFIGS = [SnliVeConfig(name="default")]
  SOURCE = "snli_ve"
  TASK = "ve"

  def _text_meta(self, dl_manager):
    meta = super()._text_meta(dl_manager)
    meta.update(label2ans=list(VE_LABEL2ANS), num_answers=len(VE_LABEL2ANS))
    return meta

  def _split_iters(self, dl_manager):
    return {split: self._records(split, self._path(dl_manager, rel))
            for split, rel in self.builder_config.splits.items()}

  def _records(self, split: str, path: str):
    where = self._where(split, path)
    fmt = self.builder_config.img_key_format
    unlabelled = 0
    for n, obj in read_jsonl(path, f"{common.full_name(self)}[{split}]"):
      rid = str(_field(obj, "pairID", where, f"line {n}"))
      fname = str(_field(obj, "Flikr30kID", where, rid))
      stem = fname.split(".")[0]
      if not stem.isdigit():
        raise schema.DataError(where, rid, f"Flikr30kID {fname!r}: expected "
                               "a Flickr30K file name such as 123456.jpg")
      key = _format_key(fmt, where, rid, image_id=int(stem), fname=fname)
      rec = {"id": rid, "img_keys": [key]}
      if "gold_label" in obj:
        label = str(obj["gold_label"])
        if label not in VE_LABEL2ANS:
          raise schema.DataError(where, rid, f"gold_label {label!r}: expected "
                                 f"one of {list(VE_LABEL2ANS)}")
        rec.update(target_labels=[VE_LABEL2ANS.index(label)],
                   target_scores=[1.0])
      else:
        unlabelled += 1
      text = _field(obj, "sentence2", where, rid)
      ids = self._tokenize(rid, str(text))
      if ids is None or not self._images_known(rec["img_keys"]):
        continue
      rec["input_ids"] = ids
      yield rec
    self._count("unlabelled", split, unlabelled)


def nlvr2_image_keys(identifier: str, fmt: str = NLVR2_KEY_FORMAT,
                     dataset: str = "nlvr2") -> list[str]:
  """[left, right] image keys of an NLVR2 identifier.

  The identifier is `split-set_id-pair_id-sentence_id`; the image pair is
  the identifier without its last part, e.g. "dev-850-0-1" ->
  ["nlvr2_dev-850-0-img0.npz", "nlvr2_dev-850-0-img1.npz"].
  """
  parts = identifier.split("-")
  if len(parts) != 4 or not all(parts):
    raise schema.DataError(dataset, identifier, "identifier: expected "
                           "split-set_id-pair_id-sentence_id")
  pair = "-".join(parts[:-1])
  return [_format_key(fmt, dataset, identifier, pair=pair, side=side,
                      identifier=identifier) for side in (0, 1)]


class UniterNlvr2(_RawBuilder):
  """NLVR2 statements (JSON lines) about image pairs, target 1/0."""

  BUILDER_CONFIGS = [Nlvr2Config(name="default")]
  SOURCE = "nlvr2"
  TASK = "nlvr2"

  def _split_iters(self, dl_manager):
    return {split: self._records(split, self._path(dl_manager, rel))
            for split, rel in self.builder_config.splits.items()}

  def _records(self, split: str, path: str):
    where = self._where(split, path)
    fmt = self.builder_config.img_key_format
    unlabelled = 0
    for n, obj in read_jsonl(path, f"{common.full_name(self)}[{split}]"):
      rid = str(_field(obj, "identifier", where, f"line {n}"))
      keys = nlvr2_image_keys(rid, fmt, where)
      target = None
      if "label" in obj:
        label = str(obj["label"]).lower()
        if label not in NLVR2_LABELS:
          raise schema.DataError(where, rid, f"label {obj['label']!r}: "
                                 "expected 'True' or 'False'")
        target = NLVR2_LABELS[label]
      else:
        unlabelled += 1
      ids = self._tokenize(rid, str(_field(obj, "sentence", where, rid)))
      if ids is None or not self._images_known(keys):
        continue
      yield {"id": rid, "input_ids": ids, "img_keys": keys, "target": target}
    self._count("unlabelled", split, unlabelled)


def karpathy_image_fields(img: dict, dataset: str, where: str
                          ) -> dict[str, Any]:
  """{image_id, folder, filename, imgid} of one Karpathy `images[]` entry.

  Flickr30K: `image_id` is the number in the file name ("1000092795.jpg").
  COCO: `image_id` is `cocoid` (else the number ending the file name) and
  `folder` the `filepath` (else the file name's middle part,
  "COCO_val2014_000000391895.jpg" -> "val2014").
  """
  fname = str(_field(img, "filename", where, f"imgid {img.get('imgid')}"))
  stem = os.path.splitext(fname)[0]
  last = stem.split("_")[-1]
  image_id = img.get("cocoid") if dataset == "coco" else None
  if image_id is None:
    if not last.isdigit():
      raise schema.DataError(where, fname, "no image number in the file "
                             "name (and no cocoid)")
    image_id = int(last)
  folder = img.get("filepath") or (stem.split("_")[1] if stem.count("_") >= 2
                                   else "")
  return {"image_id": int(image_id), "folder": str(folder), "filename": stem,
          "imgid": img.get("imgid", -1)}


def load_karpathy(path: str, dataset: str) -> dict[str, Any]:
  """The Karpathy split JSON (raises `DataError` naming the file)."""
  where = f"{dataset} from {path}"
  if not os.path.isfile(path):
    raise schema.DataError(where, "*", "annotation file does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise schema.DataError(where, "*", f"not JSON ({e})") from e
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise schema.DataError(where, "*", "expected an object with an "
                           "'images' list (Karpathy split format)")
  return data


class UniterKarpathyCaptions(_RawBuilder):
  """Flickr30K / COCO captions of the Karpathy splits (retrieval)."""

  BUILDER_CONFIGS = [KarpathyConfig(name="default")]
  SOURCE = "karpathy"
  TASK = "captions"

  def _text_meta(self, dl_manager):
    cfg = self.builder_config
    self._json_path = self._path(dl_manager, cfg.karpathy_json)
    self._data = load_karpathy(self._json_path, common.full_name(self))
    self._dataset = str(self._data.get("dataset", "")).lower()
    fmt = cfg.img_key_format
    if not fmt:
      if self._dataset not in ("flickr30k", "coco"):
        raise schema.DataError(
            f"{common.full_name(self)} from {self._json_path}", "*",
            f"dataset {self._dataset!r}: give img_key_format (the default "
            "is known for flickr30k and coco only)")
      fmt = FLICKR_KEY_FORMAT if self._dataset == "flickr30k" else (
          COCO_KEY_FORMAT)
    self._fmt = fmt
    self._splits = self._split_map()
    meta = super()._text_meta(dl_manager)
    meta.update(karpathy_dataset=self._dataset, img_key_format=fmt,
                karpathy_splits=self._splits)
    return meta

  def _split_map(self) -> dict[str, list[str]]:
    cfg = self.builder_config
    out = {k: [s for s in str(v).split(",") if s]
           for k, v in cfg.splits.items()}
    if out == {s: [s] for s in KARPATHY_SPLITS}:   # the default
      present = {img.get("split") for img in self._data["images"]
                 if isinstance(img, dict)}
      out = {s: [s] for s in KARPATHY_SPLITS if s in present}
      if cfg.fold_restval and "restval" in out:
        del out["restval"]
        out["train"] = out.get("train", []) + ["restval"]
    elif cfg.fold_restval:
      raise common.BadInputError(
          f"{common.full_name(self)}: --fold_restval applies to the default "
          "splits only", "--split", "drop --fold_restval and name restval "
          "in a split instead (e.g. --split train=train,restval)")
    for tfds_split, sources in out.items():
      bad = [s for s in sources if s not in KARPATHY_SPLITS]
      if bad or not sources:
        raise common.BadInputError(
            f"{common.full_name(self)}: split {tfds_split!r} takes Karpathy "
            f"splits {sources}", "--split", f"name some of "
            f"{','.join(KARPATHY_SPLITS)} (e.g. --split train=train,restval)")
    return out

  def _split_iters(self, dl_manager):
    return {s: self._records(s, set(src)) for s, src in self._splits.items()}

  def _records(self, split: str, sources: set[str]):
    where = self._where(split, self._json_path)
    for i, img in enumerate(self._data["images"]):
      if not isinstance(img, dict):
        raise schema.DataError(where, f"images[{i}]", "expected an object")
      s = _field(img, "split", where, f"images[{i}]")
      if s not in KARPATHY_SPLITS:
        raise schema.DataError(where, f"images[{i}]", f"split {s!r}: "
                               f"expected one of {KARPATHY_SPLITS}")
      if s not in sources:
        continue
      fields = karpathy_image_fields(img, self._dataset, where)
      key = _format_key(self._fmt, where, fields["filename"], **fields)
      for sent in _field(img, "sentences", where, fields["filename"]):
        rid = str(_field(sent, "sentid", where, fields["filename"]))
        ids = self._tokenize(rid, str(_field(sent, "raw", where, rid)))
        if ids is None or not self._images_known([key]):
          continue
        yield {"id": rid, "input_ids": ids, "img_keys": [key]}


def label2ans_from_ans2label(ans2label: Any, dataset: str) -> list[str]:
  """The answer list (index = label) of an `ans2label` {answer: label} map.

  Labels must be 0..n-1, each once (as the official utils/ans2label.json).
  """
  if not isinstance(ans2label, dict) or not ans2label:
    raise schema.DataError(dataset, "ans2label", "expected a non-empty JSON "
                           "object {answer: label}")
  n = len(ans2label)
  out = [None] * n
  for ans, label in ans2label.items():
    if not isinstance(label, int) or not 0 <= label < n or (
        out[label] is not None):
      raise schema.DataError(dataset, "ans2label", f"answer {ans!r} has "
                             f"label {label!r}; labels must be 0..{n - 1}, "
                             "each once")
    out[label] = str(ans)
  return out
