"""The on-disk schema: what the data_prep tool writes and the pipeline reads.

This module is the single source of truth for what a built dataset holds.
It lives in the library, not in the data_prep tool, because both sides need
it and the library must not depend on the tool: the writer (`data_prep`)
imports it from here. It imports neither TensorFlow nor the builders, so the
input pipeline can use it cheaply. Two kinds of TFDS datasets exist:

* An **image store**: one dataset per feature source (e.g. one official
  `img_db`, one BUTD TSV set, the synthetic images). One record per image,
  all in the split `IMAGE_SPLIT`. Records are written in a fixed order
  (no TFDS shuffling), and the side file `IMG_INDEX_FILE` in the builder
  directory lists the image keys in record order, so the pipeline maps a key
  to a record index without decoding any record (`read_image_index`).
  The detector soft labels (the largest array, read only by MRC tasks) are
  in the split `SOFT_LABEL_SPLIT`, record i holding image i's; there
  `features`, `norm_bb` and `conf` are empty, and in `IMAGE_SPLIT`
  `soft_labels` is empty. Stores whose source has no soft labels
  (`has_soft_labels: false`) have no such split.
* A **text dataset**: one per task db. Records refer to images by key
  (`img_keys`, one or more per record), so an image shared by five captions
  is stored once.

Regions are stored as the source has them (or as the official db's cut left
them). Which of them a model sees is decided at read time by
`effective_num_bb` / `select_num_bb`, the official `num_bb` rule.

Metadata (`tfds` `info.metadata`, a JSON file in the builder directory) is
readable without TensorFlow through `read_meta`. Keys: see `TEXT_META_KEYS`
and `IMAGE_META_KEYS`.

Bad data, found by the writer or by the reader, raises `DataError`, which
names the dataset, the record and the problem.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------
# Constants.
# ----------------------------------------------------------------------------
FEAT_DIM = 2048          # detector region feature size
NUM_LABELS = 1601        # 1600 Visual Genome classes + background (index 0)
BOX_DIM = 6              # [x1, y1, x2, y2, w, h], normalised to [0, 1]
IMAGE_SPLIT = "images"   # every image of an image store, one record each
SOFT_LABEL_SPLIT = "soft_labels"   # their soft labels, same order (if any)
IMG_INDEX_FILE = "img_index.json"   # image keys in record order
META_FILE = "metadata.json"         # written by tfds MetadataDict
NO_TARGET = -1           # `target` value when a task has none

# Official defaults of the dynamic region rule (`DetectFeatLmdb`).
DEFAULT_CONF_TH = 0.2
DEFAULT_MIN_BB = 10
DEFAULT_MAX_BB = 100

# Metadata keys of a text dataset.
TEXT_META_KEYS = (
    "kind",          # "text"
    "source",        # "synthetic" | "uniter_txt_db" | "coco_captions" | "vqa"
    "task",          # e.g. "itm", "vqa", "nlvr2", "captions" ...
    "CLS", "SEP", "MASK", "UNK", "PAD",   # special token ids
    "v_range",       # [lo, hi): ids MLM may draw random replacements from
    "vocab_size",
    "img_store",     # tfds name "builder/config:version" of the image store
    "max_txt_len",   # records longer than this were dropped (-1: none)
    "dropped",       # {reason: count}
    "written",       # {split: count}
)
# Metadata keys of an image store.
IMAGE_META_KEYS = (
    "kind",            # "images"
    "source",          # "synthetic" | "uniter_img_db" | "butd_tsv"
    "img_store",       # its own tfds name "builder/config:version"
    "has_soft_labels", # False: `soft_labels` rows are all zero
    "db_cut",          # rule the source already applied (dict) or None
    "soft_label_split",  # True: soft labels are in SOFT_LABEL_SPLIT
    "array_record_options",  # ArrayRecord writer options ("uncompressed")
    "dropped",         # {reason: count}
    "written",         # {split: count}
)


class DataError(ValueError):
  """Bad input data: names the dataset (or file), the record and the problem.

  One type for the whole data path, so that a caller catches bad data the
  same way whether a builder found it while writing or the pipeline found
  it while reading. `record_id` is the record's id or key ("*" when the
  problem concerns the dataset as a whole).
  """

  def __init__(self, dataset: str, record_id: Any, problem: str):
    self.dataset = dataset
    self.record_id = record_id
    self.problem = problem
    super().__init__(f"{dataset}: record {record_id!r}: {problem}")


# ----------------------------------------------------------------------------
# TFDS feature specs (imported lazily: tensorflow_datasets is heavy).
# Arrays are stored as raw bytes (`Encoding.BYTES`): ~100x faster to write and
# ~7x faster to decode than proto float lists, and fp16 stays 2 bytes.
# `tfds.data_source` returns Text fields (`img_key`, `id`, `img_keys`) as
# `bytes`; decode with `.decode()`. Scalars come back as Python ints.
# ----------------------------------------------------------------------------
def image_features():
  """`tfds.features.FeaturesDict` of one image-store record."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  f = tfds.features
  t = functools.partial(f.Tensor, encoding=f.Encoding.BYTES)
  return f.FeaturesDict({
      "img_key": f.Text(),
      "num_bb": np.int32,
      "features": t(shape=(None, FEAT_DIM), dtype=np.float16),
      "norm_bb": t(shape=(None, BOX_DIM), dtype=np.float32),
      "conf": t(shape=(None,), dtype=np.float32),
      "soft_labels": t(shape=(None, NUM_LABELS), dtype=np.float16),
      "image_w": np.int32,
      "image_h": np.int32,
  })


def text_features():
  """`tfds.features.FeaturesDict` of one text record."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  f = tfds.features
  t = functools.partial(f.Tensor, encoding=f.Encoding.BYTES)
  return f.FeaturesDict({
      "id": f.Text(),
      "input_ids": t(shape=(None,), dtype=np.int32),  # no CLS/SEP
      "img_keys": f.Sequence(f.Text()),  # 1 key (2 for NLVR2)
      "target": np.int32,                # NO_TARGET when none
      "target_labels": t(shape=(None,), dtype=np.int32),
      "target_scores": t(shape=(None,), dtype=np.float32),
  })


# How the arrays above are serialised: one raw (little-endian) bytes value
# each, decodable with `np.frombuffer(value, dtype).reshape((-1,) + tail)`.
# Readers that bypass TFDS's per-feature decoding use these tables.
IMAGE_ARRAYS = {
    "features": (np.float16, (FEAT_DIM,)),
    "norm_bb": (np.float32, (BOX_DIM,)),
    "conf": (np.float32, ()),
    "soft_labels": (np.float16, (NUM_LABELS,)),
}
TEXT_ARRAYS = {
    "input_ids": (np.int32, ()),
    "target_labels": (np.int32, ()),
    "target_scores": (np.float32, ()),
}
TEXT_LISTS = ("img_keys",)   # Sequence(Text): a list of bytes values


# ----------------------------------------------------------------------------
# The official region-count rule.
# ----------------------------------------------------------------------------
def select_num_bb(conf: np.ndarray, conf_th: float = DEFAULT_CONF_TH,
                  min_bb: int = DEFAULT_MIN_BB, max_bb: int = DEFAULT_MAX_BB,
                  num_bb: int | None = None) -> int:
  """Number of leading regions to keep, by the official rule.

  Dynamic rule (`num_bb is None`): `clamp(#(conf > conf_th), min_bb, max_bb)`,
  as `compute_num_bb` / `convert_imgdir.py`. Fixed rule (`num_bb` given, the
  official `conf_th=-1` case): `num_bb`. The official code then slices
  `arr[:nbb]`, so the result is also capped at the number of stored regions;
  that capped value is returned here (the count of regions actually used).
  """
  n = int(np.shape(conf)[0])
  if num_bb is not None:
    k = int(num_bb)
  else:
    k = int(np.sum(np.asarray(conf) > conf_th))
    k = min(int(max_bb), max(int(min_bb), k))
  return min(k, n)


def effective_num_bb(conf: np.ndarray, stored_num_bb: int,
                     db_cut: Mapping[str, Any] | None,
                     conf_th: float = DEFAULT_CONF_TH,
                     min_bb: int = DEFAULT_MIN_BB,
                     max_bb: int = DEFAULT_MAX_BB,
                     num_bb: int | None = None) -> int:
  """Regions to use from a stored record, matching official reading.

  If the requested rule equals the cut the official db already applied
  (`db_cut` in the image store's metadata), the official loader uses the
  `nbb_*.json` count, i.e. every stored region; recomputing from the cut
  `conf` could differ when regions are not sorted by confidence. Otherwise
  the rule is applied to the stored `conf`.
  """
  rule = {"conf_th": conf_th, "min_bb": min_bb, "max_bb": max_bb,
          "num_bb": num_bb}
  if db_cut is not None and _same_rule(rule, db_cut):
    return int(stored_num_bb)
  return select_num_bb(conf, conf_th, min_bb, max_bb, num_bb)


def _same_rule(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  if a.get("num_bb") is not None or b.get("num_bb") is not None:
    return a.get("num_bb") == b.get("num_bb")
  return (float(a["conf_th"]) == float(b["conf_th"])
          and int(a["min_bb"]) == int(b["min_bb"])
          and int(a["max_bb"]) == int(b["max_bb"]))


# ----------------------------------------------------------------------------
# Record checks (used by every builder before writing).
# ----------------------------------------------------------------------------
def check_image_record(rec: Mapping[str, Any], dataset: str) -> None:
  """Raises `DataError` unless `rec` is a valid image-store record."""
  key = rec.get("img_key")
  feats = np.asarray(rec["features"])
  n = feats.shape[0] if feats.ndim == 2 else -1
  if feats.ndim != 2 or feats.shape[1] != FEAT_DIM:
    raise DataError(dataset, key, f"features shape {feats.shape}, "
                    f"expected (n, {FEAT_DIM})")
  if n == 0:
    raise DataError(dataset, key, "zero regions")
  expect = {"norm_bb": (n, BOX_DIM), "conf": (n,),
            "soft_labels": (n, NUM_LABELS)}
  for name, shape in expect.items():
    got = np.shape(rec[name])
    if tuple(got) != shape:
      raise DataError(dataset, key,
                      f"{name} shape {tuple(got)}, expected {shape}")
  if int(rec["num_bb"]) != n:
    raise DataError(dataset, key,
                    f"num_bb {rec['num_bb']} != stored regions {n}")
  for name in ("features", "norm_bb", "conf", "soft_labels"):
    arr = np.asarray(rec[name])
    if not np.all(np.isfinite(arr)):
      raise DataError(dataset, key, f"{name} holds NaN/inf "
                      f"(after the fp16 cast for features/soft_labels)")


def check_text_record(rec: Mapping[str, Any], dataset: str,
                      vocab_size: int) -> None:
  """Raises `DataError` unless `rec` is a valid text record."""
  rid = rec.get("id")
  ids = np.asarray(rec["input_ids"])
  if ids.ndim != 1 or ids.size == 0:
    raise DataError(dataset, rid, f"input_ids must be a non-empty 1-d "
                    f"array, got shape {ids.shape}")
  if ids.min() < 0 or ids.max() >= vocab_size:
    raise DataError(dataset, rid, f"token id out of range [0, "
                    f"{vocab_size}): min {ids.min()} max {ids.max()}")
  keys = list(rec["img_keys"])
  if not keys or not all(isinstance(k, str) and k for k in keys):
    raise DataError(dataset, rid, f"bad img_keys {keys!r}")
  if np.shape(rec["target_labels"]) != np.shape(rec["target_scores"]):
    raise DataError(dataset, rid, "target_labels and target_scores "
                    "differ in length")


# ----------------------------------------------------------------------------
# Reading metadata without TensorFlow.
# ----------------------------------------------------------------------------
def read_meta(builder_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """Metadata dict of a built dataset (`data_dir/name/config/version`)."""
  path = os.path.join(os.fspath(builder_dir), META_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no dataset metadata; is {builder_dir} "
                            "a fully built data_prep dataset directory?")
  with open(path) as f:
    return json.load(f)


def read_image_index(builder_dir: str | os.PathLike[str]) -> dict[str, int]:
  """Maps image key -> record index of an image store's `IMAGE_SPLIT`."""
  path = os.path.join(os.fspath(builder_dir), IMG_INDEX_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no image index; is {builder_dir} a "
                            "fully built image store?")
  with open(path) as f:
    keys = json.load(f)
  return {k: i for i, k in enumerate(keys)}


def builder_dir(data_dir: str | os.PathLike[str], tfds_name: str) -> str:
  """`data_dir/builder/config/version` for a name "builder/config:version"."""
  name, _, version = tfds_name.partition(":")
  if not version:
    raise ValueError(f"{tfds_name!r}: expected 'builder/config:version'")
  return os.path.join(os.fspath(data_dir), *name.split("/"), version)


def special_ids(meta: Mapping[str, Any]) -> dict[str, int]:
  """The special token ids of a text dataset's metadata."""
  return {k: int(meta[k]) for k in ("PAD", "CLS", "SEP", "MASK", "UNK")}


def validate_same_vocab(metas: Sequence[Mapping[str, Any]]) -> None:
  """Raises if text datasets to be mixed disagree on their vocabulary."""
  keys = ("CLS", "SEP", "MASK", "UNK", "PAD", "vocab_size")
  first = metas[0]
  for m in metas[1:]:
    diff = [k for k in keys if m.get(k) != first.get(k)]
    if diff or list(m.get("v_range", [])) != list(first.get("v_range", [])):
      raise ValueError(f"text datasets disagree on vocabulary fields "
                       f"{diff or ['v_range']}: {first.get('img_store')} vs "
                       f"{m.get('img_store')}")
