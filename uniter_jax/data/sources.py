"""Random-access readers of the data_prep TFDS datasets, and the text-image join.

`ImageStore` reads one image-store dataset (`tfds.data_source`, no TensorFlow
runtime), maps image keys to record indices once (from the store's
`img_index.json`), applies the official region-count rule and returns the
model's image part: fp32 features, the 7-d box feature and (optionally) the
detector soft labels. `TextSource` reads one text split, drops texts longer
than `max_txt_len` (counted, as the official `TxtTokLmdb` does) and resolves
every record's image key up front, so a key missing from the store is an
error at start-up, not mid-epoch.

Schema: `data_prep/schema.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from data_prep import schema
import numpy as np


class DataError(ValueError):
  """Bad input found while reading: names the dataset, record and problem."""

  def __init__(self, dataset: str, record_id: Any, problem: str):
    self.dataset = dataset
    self.record_id = record_id
    self.problem = problem
    super().__init__(f"{dataset}: record {record_id!r}: {problem}")


@dataclasses.dataclass(frozen=True)
class RegionRule:
  """The official num_bb rule (`DetectFeatLmdb`): dynamic unless `num_bb`."""
  conf_th: float = schema.DEFAULT_CONF_TH
  min_bb: int = schema.DEFAULT_MIN_BB
  max_bb: int = schema.DEFAULT_MAX_BB
  num_bb: int | None = None   # fixed count (the official conf_th=-1 case)

  def as_kwargs(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# fp16 bit pattern -> fp32 value; `np.take` on this table is exact (NaN
# payloads included) and ~4x faster than numpy's fp16 `astype` on CPUs.
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(
    np.float32)


def fp16_to_fp32(x: np.ndarray) -> np.ndarray:
  """Exact float16 -> float32 cast (fast table lookup)."""
  x = np.ascontiguousarray(x, np.float16)
  return np.take(_F16_TO_F32, x.view(np.uint16))


def _all_finite(x: np.ndarray) -> bool:
  # For values cast from fp16 (|x| <= 65504) the sum cannot overflow, so it
  # is finite exactly when every element is; one SIMD pass.
  if x.size and x.size < 1e30 / 65504:
    return bool(np.isfinite(x.sum(dtype=np.float32)))
  return bool(np.isfinite(x).all())


def box7(norm_bb: np.ndarray) -> np.ndarray:
  """[x1,y1,x2,y2,w,h] -> [x1,y1,x2,y2,w,h,w*h] in float32."""
  bb = np.asarray(norm_bb, np.float32)
  return np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)


def _tfds_source(name: str, split: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(name, split=split, data_dir=data_dir,
                          download=False)


class ImageStore:
  """An image-store dataset: key -> image part of an example."""

  def __init__(self, data_dir: str, name: str, rule: RegionRule = RegionRule(),
               with_soft_labels: bool = False):
    self.name = name
    self.rule = rule
    self.with_soft_labels = with_soft_labels
    bdir = schema.builder_dir(data_dir, name)
    self.meta = schema.read_meta(bdir)
    self.key_to_index = schema.read_image_index(bdir)
    self.keys = [None] * len(self.key_to_index)
    for k, i in self.key_to_index.items():
      self.keys[i] = k
    self._source = _tfds_source(name, schema.IMAGE_SPLIT, data_dir)
    if len(self._source) != len(self.keys):
      raise DataError(name, "*", f"img_index.json lists {len(self.keys)} keys "
                      f"but the split holds {len(self._source)} records")
    if with_soft_labels and not self.meta.get("has_soft_labels", True):
      raise DataError(name, "*", "soft labels requested (MRC) but the store "
                      "has none (has_soft_labels=False)")
    self._num_bbs: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.keys)

  def index_of(self, key: str, dataset: str, record_id: Any) -> int:
    try:
      return self.key_to_index[key]
    except KeyError:
      raise DataError(dataset, record_id, f"image key {key!r} is missing from "
                      f"image store {self.name}") from None

  def _nbb(self, rec: dict[str, Any], key: str) -> int:
    if int(rec["num_bb"]) <= 0 or np.shape(rec["conf"])[0] == 0:
      raise DataError(self.name, key, "zero regions")
    n = schema.effective_num_bb(rec["conf"], int(rec["num_bb"]),
                                self.meta.get("db_cut"), **self.rule.as_kwargs())
    if n <= 0:
      raise DataError(self.name, key, f"num_bb rule {self.rule} keeps no "
                      "region")
    return n

  def num_bbs(self, indices: np.ndarray | None = None) -> np.ndarray:
    """Regions kept per image record (reads each record's `conf` once)."""
    if self._num_bbs is None:
      out = np.full(len(self), -1, np.int32)
      self._num_bbs = out
    todo = np.arange(len(self)) if indices is None else np.unique(indices)
    todo = todo[self._num_bbs[todo] < 0]
    if len(todo) > 1000:
      logging.info("%s: reading region counts of %d images", self.name,
                   len(todo))
    for i in todo:
      rec = self._source[int(i)]
      self._num_bbs[i] = self._nbb(rec, self.keys[i])
    return self._num_bbs if indices is None else self._num_bbs[indices]

  def load(self, index: int) -> dict[str, Any]:
    """The image part of an example: img_feat, img_pos_feat[, soft labels]."""
    key = self.keys[index]
    rec = self._source[int(index)]
    n = self._nbb(rec, key)
    feats = rec["features"]
    if feats.ndim != 2 or feats.shape[1] != schema.FEAT_DIM:
      raise DataError(self.name, key, f"features shape {feats.shape}, "
                      f"expected (n, {schema.FEAT_DIM})")
    out = {
        "img_feat": fp16_to_fp32(feats[:n]),
        "img_pos_feat": box7(rec["norm_bb"][:n]),
        "img_key": key,
    }
    if self.with_soft_labels:
      out["img_soft_labels"] = fp16_to_fp32(rec["soft_labels"][:n])
    for field in ("img_feat", "img_soft_labels"):
      if field in out and not _all_finite(out[field]):
        raise DataError(self.name, key, f"{field} holds NaN/inf")
    if not np.isfinite(out["img_pos_feat"]).all():
      raise DataError(self.name, key, "norm_bb holds NaN/inf")
    return out


class TextSource:
  """One split of a text dataset, joined to its image store by key.

  Attributes:
    records: indices (into the TFDS split) of the kept records.
    txt_lens: per kept record, text length INCLUDING [CLS] and [SEP].
    img_index: per kept record, the image-store index of its image.
    dropped: {reason: count} of records left out.
  """

  def __init__(self, data_dir: str, name: str, split: str, store: ImageStore,
               max_txt_len: int = 60):
    self.name = f"{name}[{split}]"
    self.store = store
    bdir = schema.builder_dir(data_dir, name)
    self.meta = schema.read_meta(bdir)
    want = self.meta.get("img_store")
    if want is not None and want != store.name:
      raise DataError(self.name, "*", f"text refers to image store {want!r} "
                      f"but {store.name!r} was given")
    self.special = schema.special_ids(self.meta)
    self.v_range = tuple(int(v) for v in self.meta["v_range"])
    self._source = _tfds_source(name, split, data_dir)
    self.max_txt_len = max_txt_len
    records, lens, imgs = [], [], []
    too_long = 0
    for i in range(len(self._source)):
      rec = self._source[i]
      n = len(rec["input_ids"])
      if max_txt_len >= 0 and n > max_txt_len:
        too_long += 1
        continue
      keys = rec["img_keys"]
      rid = rec["id"].decode()
      if len(keys) != 1:
        raise DataError(self.name, rid, f"{len(keys)} image keys; this "
                        "pipeline joins exactly one image per text")
      records.append(i)
      lens.append(n + 2)
      imgs.append(store.index_of(keys[0].decode(), self.name, rid))
    self.records = np.asarray(records, np.int64)
    self.txt_lens = np.asarray(lens, np.int32)
    self.img_index = np.asarray(imgs, np.int64)
    self.dropped = {"longer_than_max_txt_len": too_long} if too_long else {}
    if too_long:
      logging.info("%s: dropped %d texts longer than max_txt_len=%d",
                   self.name, too_long, max_txt_len)
    if not len(records):
      raise DataError(self.name, "*", "no record left after filtering")

  def __len__(self) -> int:
    return len(self.records)

  def num_bbs(self) -> np.ndarray:
    """Regions per kept record (after the num_bb rule)."""
    return self.store.num_bbs(self.img_index)

  def example(self, i: int) -> dict[str, Any]:
    """The joined per-example dict (batch contract) of kept record `i`."""
    rec = self._source[int(self.records[i])]
    ids = np.asarray(rec["input_ids"], np.int32)
    out = {
        "input_ids": np.concatenate([[self.special["CLS"]], ids,
                                     [self.special["SEP"]]]).astype(np.int32),
        "_id": rec["id"].decode(),
        "_index": int(i),
    }
    if int(rec["target"]) != schema.NO_TARGET:
      out["targets"] = np.int32(rec["target"])
    if len(rec["target_labels"]):
      out["_target_labels"] = np.asarray(rec["target_labels"], np.int32)
      out["_target_scores"] = np.asarray(rec["target_scores"], np.float32)
    out.update(self.store.load(int(self.img_index[i])))
    return out
