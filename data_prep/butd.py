"""BUTD-style TSV features plus COCO captions / VQA v2 annotations.

TSV (tab separated, no header), one image a line, in one of three layouts,
told apart by the number of columns:
* 6: `image_id, image_w, image_h, num_boxes, boxes, features` (the
  bottom-up-attention `generate_tsv.py` output);
* 7: the same plus `cls_prob` ([num_boxes, 1601] float32: detector soft
  labels; confidence = the best non-background probability);
* 10: LXMERT's `img_id, img_h, img_w, objects_id, objects_conf, attrs_id,
  attrs_conf, num_boxes, boxes, features`.
Array columns are base64 of raw little-endian arrays (float32; int64 for the
LXMERT ids). Boxes are pixels x1, y1, x2, y2 and are normalised by the image
size to the 6-d `[x1, y1, x2, y2, w, h]`. Without a confidence column every
region gets confidence 1 (metadata `has_conf: False`), so the read-time rule
keeps min(max_bb, n) regions; without soft labels `has_soft_labels` is False.

Text is tokenised with the user's `vocab.txt` (`tokenizer.WordPiece`). An
annotation's image key is `img_key_format.format(image_id=...)`, which must
give the TSV's `image_id` strings.

VQA targets: each of the (usually 10) human answers is lower-cased and
stripped; an answer in `ans2label` gets score `min(1, count / 3)` (the
common simplification of the official VQA accuracy); answers outside
`ans2label` are ignored. Questions with no answer in `ans2label` keep an
empty target and are counted in the metadata (`no_target`).
"""
from __future__ import annotations

import base64
import collections
import csv
import dataclasses
import glob
import os
import sys
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_prep import common
from data_prep import tokenizer
from uniter_jax.data import schema

_LAYOUTS = {
    6: ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features"),
    7: ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features",
        "cls_prob"),
    10: ("image_id", "image_h", "image_w", "objects_id", "objects_conf",
         "attrs_id", "attrs_conf", "num_boxes", "boxes", "features"),
}


def _b64(s: str, dtype, n: int, dataset: str, key: str, field: str
         ) -> np.ndarray:
  try:
    arr = np.frombuffer(base64.b64decode(s, validate=True), dtype=dtype)
  except Exception as e:  # pylint: disable=broad-except
    raise schema.DataError(dataset, key, f"column {field}: bad base64 "
                           f"({e})") from e
  if n == 0 or arr.size % n:
    raise schema.DataError(dataset, key, f"column {field}: {arr.size} "
                           f"values do not split into {n} regions")
  return arr.reshape(n, -1)


def parse_tsv_row(row: list[str], dataset: str) -> dict[str, Any]:
  """One TSV line -> image-store record (raises on malformed input)."""
  key = row[0] if row else "?"
  fields = _LAYOUTS.get(len(row))
  if fields is None:
    raise schema.DataError(dataset, key, f"{len(row)} TSV columns; "
                           f"expected one of {sorted(_LAYOUTS)}")
  r = dict(zip(fields, row))
  try:
    w, h, n = int(r["image_w"]), int(r["image_h"]), int(r["num_boxes"])
  except ValueError as e:
    raise schema.DataError(dataset, key, f"bad integer column: {e}"
                           ) from e
  if n <= 0:
    raise schema.DataError(dataset, key, "zero regions")
  if w <= 0 or h <= 0:
    raise schema.DataError(dataset, key, f"bad image size {w}x{h}")
  boxes = _b64(r["boxes"], np.float32, n, dataset, key, "boxes")
  feats = _b64(r["features"], np.float32, n, dataset, key, "features")
  if boxes.shape[1] != 4 or feats.shape[1] != schema.FEAT_DIM:
    raise schema.DataError(dataset, key, f"boxes {boxes.shape} / "
                           f"features {feats.shape}: expected (n, 4) / "
                           f"(n, {schema.FEAT_DIM})")
  soft = None
  conf = np.ones((n,), np.float32)
  if "cls_prob" in r:
    soft = _b64(r["cls_prob"], np.float32, n, dataset, key, "cls_prob")
    if soft.shape[1] != schema.NUM_LABELS:
      raise schema.DataError(dataset, key, f"cls_prob {soft.shape}")
    conf = soft[:, 1:].max(axis=1)
  elif "objects_conf" in r:
    conf = _b64(r["objects_conf"], np.float32, n, dataset, key,
                "objects_conf")[:, 0]
  x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
  norm_bb = np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w,
                      (y2 - y1) / h], axis=1)
  return {"img_key": key, "features": feats, "norm_bb": norm_bb,
          "conf": conf, "soft_labels": soft, "image_w": w, "image_h": h}


def iter_tsv(paths: list[str], dataset: str) -> Iterator[dict[str, Any]]:
  """Yields image-store records from TSV files, in file and line order
  (errors name the dataset and the file)."""
  csv.field_size_limit(sys.maxsize)
  for path in paths:
    with open(path, newline="") as f:
      for row in csv.reader(f, delimiter="\t"):
        if row:
          yield parse_tsv_row(row, f"{dataset} from {path}")


@dataclasses.dataclass(eq=False)
class ButdConfig(tfds.core.BuilderConfig):
  """TSV files: a glob relative to `manual_dir`."""
  tsv_glob: str = "*.tsv"


class UniterButdImages(common.ImageStoreBuilder):
  """Image store from BUTD-style TSV feature files (in `manual_dir`)."""

  BUILDER_CONFIGS = [ButdConfig(name="default")]
  SOURCE = "butd_tsv"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the BUTD/LXMERT feature TSV files in --manual_dir (config field "
      "tsv_glob selects them, default '*.tsv').")

  def _paths(self, dl_manager) -> list[str]:
    pattern = os.path.join(os.fspath(dl_manager.manual_dir),
                           self.builder_config.tsv_glob)
    paths = sorted(glob.glob(pattern))
    if not paths:
      raise common.MissingInputError(
          f"{common.full_name(self)}: no TSV file matches", pattern,
          "check --manual_dir and --tsv_glob; "
          + common.folder_listing(os.path.dirname(pattern)))
    return paths

  def _image_meta(self):
    n_cols = self._first_line_columns
    return {"db_cut": None, "has_soft_labels": n_cols == 7,
            "has_conf": n_cols in (7, 10)}

  def _split_generators(self, dl_manager):
    self._tsv = self._paths(dl_manager)
    with open(self._tsv[0], newline="") as f:
      csv.field_size_limit(sys.maxsize)
      first = next(csv.reader(f, delimiter="\t"), [])
    self._first_line_columns = len(first)
    return super()._split_generators(dl_manager)

  def _iter_images(self, dl_manager):
    n_cols = None
    for rec in iter_tsv(self._tsv, common.full_name(self)):
      cols = (rec["soft_labels"] is not None, rec["image_w"] > 0)
      if n_cols is not None and cols != n_cols:
        raise schema.DataError(common.full_name(self), rec["img_key"],
                               "TSV layout changes between lines")
      n_cols = cols
      yield rec


@dataclasses.dataclass(eq=False)
class AnnConfig(tfds.core.BuilderConfig):
  """Raw annotations tokenised with a user vocab.

  Attributes:
    vocab: path of `vocab.txt` (absolute, or relative to manual_dir).
    img_store: tfds name of the image store, "builder/config:version".
    img_key_format: image key from an annotation's `image_id`.
    lowercase: lower-case before WordPiece (False: cased, bert-base-cased).
    max_txt_len: longer texts are dropped and counted (-1 keeps all).
    splits: {split name: annotation file(s) relative to manual_dir}. Captions:
      a COCO captions JSON. VQA: "questions.json" or
      "questions.json,annotations.json".
    ans2label: VQA only: JSON {answer: label index}.
  """
  vocab: str = "vocab.txt"
  img_store: str = "uniter_butd_images/default:1.0.0"
  img_key_format: str = "{image_id}"
  lowercase: bool = False
  max_txt_len: int = 60
  splits: dict[str, str] = dataclasses.field(default_factory=dict)
  ans2label: str = ""


class _AnnBuilder(common.TextBuilder):
  """Shared set-up of the annotation builders."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the annotation JSON files and vocab.txt in --manual_dir and name "
      "them in the config (splits, vocab, ans2label).")
  TASK = "?"

  def _path(self, dl_manager, rel: str) -> str:
    return os.path.join(os.fspath(dl_manager.manual_dir), rel)

  def _text_meta(self, dl_manager):
    cfg = self.builder_config
    if not cfg.splits:
      raise common.BadInputError(
          f"{common.full_name(self)}: no annotation files named", "splits",
          "pass --split NAME=FILE")
    vocab = self._path(dl_manager, cfg.vocab)
    if not os.path.isfile(vocab):
      raise common.MissingInputError(
          "vocab file does not exist", vocab, "pass --vocab a vocab.txt "
          "(e.g. bert-base-cased/vocab.txt), absolute or relative to "
          "--manual_dir")
    missing = [t for t in tokenizer.SPECIAL_TOKENS
               if t not in set(tokenizer.read_vocab(vocab))]
    if missing:
      raise common.BadInputError(
          f"vocab lacks the special tokens {missing}", vocab, "pass a BERT "
          "WordPiece vocab.txt (one token a line, with [PAD] [UNK] [CLS] "
          "[SEP] [MASK])")
    self._tok = tokenizer.WordPiece(vocab, lowercase=cfg.lowercase)
    meta = dict(self._tok.meta)
    meta.update({"task": self.TASK, "img_store": cfg.img_store,
                 "max_txt_len": cfg.max_txt_len, "lowercase": cfg.lowercase})
    return meta

  def _tokenize(self, rid: str, text: str):
    """Ids of `text`, or None (counted) when dropped as the official code."""
    ids = self._tok(text)
    if not ids:
      self.drop("empty_text")
      return None
    if self.builder_config.max_txt_len != -1 and (
        len(ids) > self.builder_config.max_txt_len):
      self.drop("over_max_txt_len")
      return None
    return ids

  def _key(self, image_id) -> str:
    return self.builder_config.img_key_format.format(image_id=image_id)


class UniterCocoCaptions(_AnnBuilder):
  """Caption text (COCO captions JSON format) for pretraining / retrieval."""

  BUILDER_CONFIGS = [AnnConfig(name="default", splits={
      "train": "captions_train2014.json"})]
  SOURCE = "coco_captions"
  TASK = "captions"

  def _split_iters(self, dl_manager):
    return {split: self._records(self._path(dl_manager, rel))
            for split, rel in self.builder_config.splits.items()}

  def _records(self, path: str):
    data = common.read_json(path, "captions file")
    if not isinstance(data, dict) or not isinstance(
        data.get("annotations"), list):
      raise common.BadInputError(
          "no 'annotations' list: not a COCO captions file", path,
          "pass --split NAME=captions_*.json (the COCO captions format)")
    for ann in data["annotations"]:
      rid = str(ann["id"])
      ids = self._tokenize(rid, ann["caption"])
      if ids is None:
        continue
      yield {"id": rid, "input_ids": ids,
             "img_keys": [self._key(ann["image_id"])]}


def vqa_targets(answers: list[str], ans2label: dict[str, int]
                ) -> tuple[list[int], list[float]]:
  """Soft targets: label -> min(1, #annotators giving it / 3)."""
  counts = collections.Counter(" ".join(a.lower().split()) for a in answers)
  labels, scores = [], []
  for ans, c in sorted(counts.items()):
    if ans in ans2label:
      labels.append(int(ans2label[ans]))
      scores.append(min(1.0, c / 3.0))
  return labels, scores


def _json_list(path: str, field: str, what: str) -> list:
  """`field` of a JSON file, which must be a list (errors name the file)."""
  data = common.read_json(path, what)
  if not isinstance(data, dict) or not isinstance(data.get(field), list):
    raise common.BadInputError(
        f"no {field!r} list: not a {what}", path,
        "check the order of --split NAME=QUESTIONS[,ANNOTATIONS]")
  return data[field]


class UniterVqa(_AnnBuilder):
  """VQA v2 questions (+ annotations) with soft answer targets."""

  BUILDER_CONFIGS = [AnnConfig(name="default", ans2label="ans2label.json",
                               splits={"train": (
                                   "v2_OpenEnded_mscoco_train2014_questions"
                                   ".json,v2_mscoco_train2014_annotations"
                                   ".json")})]
  SOURCE = "vqa"
  TASK = "vqa"

  def _text_meta(self, dl_manager):
    meta = super()._text_meta(dl_manager)
    cfg = self.builder_config
    if not cfg.ans2label:
      raise common.BadInputError(
          f"{common.full_name(self)}: no answer list named", "ans2label",
          "pass --ans2label an {answer: label} JSON")
    self._ans2label = common.read_json(
        self._path(dl_manager, cfg.ans2label), "ans2label file")
    if not isinstance(self._ans2label, dict) or not self._ans2label:
      raise common.BadInputError(
          "not a non-empty {answer: label} object",
          self._path(dl_manager, cfg.ans2label),
          "pass --ans2label an {answer: label} JSON")
    meta["num_answers"] = 1 + max(self._ans2label.values())
    return meta

  def _split_iters(self, dl_manager):
    return {split: self._records(split, [self._path(dl_manager, p)
                                         for p in rel.split(",")])
            for split, rel in self.builder_config.splits.items()}

  def _records(self, split: str, paths: list[str]):
    name = f"{common.full_name(self)}[{split}]"
    questions = _json_list(paths[0], "questions", "VQA questions file")
    answers = None
    if len(paths) > 1:
      answers = {a["question_id"]: a for a in _json_list(
          paths[1], "annotations", "VQA annotations file")}
    no_target = 0
    for q in questions:
      rid = str(q["question_id"])
      ids = self._tokenize(rid, q["question"])
      if ids is None:
        continue
      rec = {"id": rid, "input_ids": ids,
             "img_keys": [self._key(q["image_id"])]}
      if answers is not None:
        ann = answers.get(q["question_id"])
        if ann is None:
          raise schema.DataError(name, rid, "question has no entry in "
                                 "the annotations file")
        labels, scores = vqa_targets([a["answer"] for a in ann["answers"]],
                                     self._ans2label)
        no_target += not labels
        rec.update(target_labels=labels, target_scores=scores)
      yield rec
    md = self.info.metadata
    md.setdefault("no_target", {})[split] = no_target
