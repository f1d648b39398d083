"""Random-access readers of the data_prep TFDS datasets, and the text-image join.

`RecordReader` reads one split of a data_prep dataset: the files
`tfds.data_source` would read (no TensorFlow runtime), through the
array_record library, each record parsed once with protobuf and its arrays
taken as `np.frombuffer` views.
`ImageStore` reads one image store, maps image keys to record indices once
(from the store's `img_index.json`), applies the official region-count rule
and returns the model's image part: fp32 (or fp16) features, the 7-d box
feature and (optionally) the detector soft labels, from the store's
`soft_labels` split. `TextSource` reads one text split once, drops texts
longer than `max_txt_len` (counted, as the official `TxtTokLmdb` does),
resolves every record's image key up front, so a key missing from the store
is an error at start-up, not mid-epoch, and keeps the kept records' fields
in flat arrays. A text record may name several images (NLVR2: two); the
first one is the example's image, the others come along in `_images`.

Schema: `uniter_jax/data/schema.py` (shared with the data_prep writer).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import numpy as np

from uniter_jax.data import ops as ops_lib
from uniter_jax.data import schema

# Bad input, found while reading or while writing (one type for both).
DataError = schema.DataError


@dataclasses.dataclass(frozen=True)
class RegionRule:
  """The official num_bb rule (`DetectFeatLmdb`): dynamic unless `num_bb`."""
  conf_th: float = schema.DEFAULT_CONF_TH
  min_bb: int = schema.DEFAULT_MIN_BB
  max_bb: int = schema.DEFAULT_MAX_BB
  num_bb: int | None = None   # fixed count (the official conf_th=-1 case)

  def as_kwargs(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# fp16 bit pattern -> fp32 value; exact for every pattern (NaN payloads
# included). Used for inputs that hold inf/NaN; finite inputs take the
# faster bit-shift path of `fp16_to_fp32`.
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(
    np.float32)
_F16_EXP = 0x7C00                      # fp16 exponent bits (all ones: inf/NaN)
_TWO_POW_112 = np.float32(2.0 ** 112)  # fp32 bias 127 - fp16 bias 15 = 112
_KEEP_SIGN_EXP_MANT = np.uint32(0x8FFFFFFF).view(np.int32)


def fp16_all_finite(x: np.ndarray) -> bool:
  """True when no element of the float16 array `x` is inf or NaN."""
  x = np.ascontiguousarray(x, np.float16)
  if not x.size:
    return True
  # inf/NaN have all exponent bits set: +inf/NaN are 0x7C00..0x7FFF, the
  # largest int16 patterns; -inf/NaN 0xFC00..0xFFFF, the largest uint16 ones.
  return (int(x.view(np.int16).max()) < _F16_EXP
          and int(x.view(np.uint16).max()) < 0x8000 + _F16_EXP)


def fp16_to_fp32(x: np.ndarray, out: np.ndarray | None = None,
                 finite: bool | None = None) -> np.ndarray:
  """Exact float16 -> float32 cast, ~6x faster than numpy's `astype`.

  numpy converts float16 element by element in scalar code. For finite
  values the fp32 bit pattern is the fp16 magnitude bits shifted left by 13,
  with the sign bit at bit 31, read as fp32 and multiplied by 2**112 (exact:
  a power of two; it also renormalises fp16 subnormals): four vectorised
  passes, written into `out`. Arrays holding inf/NaN go through an exact
  lookup table instead (`finite=True`: the caller has checked).
  """
  x = np.ascontiguousarray(x, np.float16)
  bits = x.view(np.uint16)
  if out is None:
    out = np.empty(x.shape, np.float32)
  elif out.shape != x.shape or out.dtype != np.float32:
    raise ValueError(f"out must be float32 {x.shape}, got {out.dtype} "
                     f"{out.shape}")
  if not (finite if finite is not None else fp16_all_finite(x)):
    np.take(_F16_TO_F32, bits, out=out)
    return out
  i = out.view(np.int32)
  # Sign-extend to 32 bits; after the shift the fp16 sign is at bit 28 and
  # copies of it fill bits 29-31: keep bit 31, clear 28-30.
  np.copyto(i, bits.view(np.int16), casting="unsafe")
  np.left_shift(i, 13, out=i)
  np.bitwise_and(i, _KEEP_SIGN_EXP_MANT, out=i)
  np.multiply(out, _TWO_POW_112, out=out)
  return out


def box7(norm_bb: np.ndarray) -> np.ndarray:
  """[x1,y1,x2,y2,w,h] -> [x1,y1,x2,y2,w,h,w*h] in float32."""
  bb = np.asarray(norm_bb, np.float32)
  return np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)


def _tfds_source(name: str, split: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(name, split=split, data_dir=data_dir,
                          download=False)


def _example_proto():
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  return tf_example_pb2.Example


class RecordReader:
  """One split of a data_prep dataset, decoded straight from ArrayRecord.

  `tfds.data_source(...)[i]` runs TFDS's generic per-feature numpy decoder,
  which costs more than reading the record. This reads the same ArrayRecord
  files (the TFDS data source's underlying `ArrayRecordDataSource`), parses
  the `tf.Example` once with protobuf and turns each array field into
  `np.frombuffer(bytes, dtype)` (read-only, no further copy), using the
  schema's tables (`schema.IMAGE_ARRAYS`, `schema.TEXT_ARRAYS`). Text fields
  come back as `bytes`, `Sequence(Text)` fields as lists of `bytes`, scalars
  as ints: the same values as `tfds.data_source`.

  Args:
    data_dir, name, split: the TFDS dataset split.
    arrays: {field: (dtype, trailing shape)} of the array fields.
    lists: names of `Sequence(Text)` fields.
  """

  def __init__(self, data_dir: str, name: str, split: str,
               arrays: dict[str, tuple[Any, tuple[int, ...]]],
               lists: tuple[str, ...] = ()):
    self.name = f"{name}[{split}]"
    self.tfds_source = _tfds_source(name, split, data_dir)
    self._raw = getattr(self.tfds_source, "data_source", None)
    if self._raw is None or not hasattr(self._raw, "__getitems__"):
      raise DataError(self.name, "*", "not an ArrayRecord data source; "
                      "rebuild the dataset with data_prep")
    features = set(self.tfds_source.dataset_info.features.keys())
    missing = sorted(set(arrays) - features)
    if missing:
      raise DataError(self.name, "*", f"dataset has no fields {missing}; "
                      f"it has {sorted(features)}")
    self._arrays = dict(arrays)
    self._lists = frozenset(lists)
    self._example = _example_proto()

  def __len__(self) -> int:
    return len(self._raw)

  # Pickled for input worker processes: the protobuf class is looked up
  # again on the other side (protobuf descriptors do not pickle).
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_example"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._example = _example_proto()

  def decode(self, buf: bytes, index: Any,
             fields: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The fields (default: all) of one serialised record."""
    try:
      fmap = self._example.FromString(buf).features.feature
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(self.name, index, f"corrupted record ({type(e).__name__}"
                      f": {e})") from e
    out = {}
    for key in (fmap.keys() if fields is None else fields):
      if key not in fmap:
        raise DataError(self.name, index, f"record has no field {key!r}")
      feat = fmap[key]
      kind = feat.WhichOneof("kind")
      if kind == "bytes_list":
        vals = feat.bytes_list.value
        if key in self._arrays:
          dtype, tail = self._arrays[key]
          raw = vals[0] if len(vals) else b""
          try:
            out[key] = np.frombuffer(raw, dtype).reshape((-1,) + tail)
          except ValueError:
            raise DataError(self.name, index, f"{key}: {len(raw)} bytes are "
                            f"no whole number of {tail} {np.dtype(dtype)} "
                            "rows (corrupted record)") from None
        elif key in self._lists:
          out[key] = list(vals)
        else:
          out[key] = vals[0] if len(vals) else b""
      elif kind == "int64_list":
        out[key] = int(feat.int64_list.value[0])
      elif kind == "float_list":
        out[key] = float(feat.float_list.value[0])
      else:
        raise DataError(self.name, index, f"field {key!r} is empty")
    return out

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.decode(self._raw[int(index)], index)

  def get(self, index: int, fields: tuple[str, ...]) -> dict[str, Any]:
    """Only `fields` of record `index` (the others are not decoded)."""
    return self.decode(self._raw[int(index)], index, fields)

  def iter_fields(self, fields: tuple[str, ...], chunk: int = 512):
    """(index, fields) of every record, read in chunks (start-up scans)."""
    for lo in range(0, len(self), chunk):
      idx = list(range(lo, min(lo + chunk, len(self))))
      for i, buf in zip(idx, self._raw.__getitems__(idx)):
        yield i, self.decode(buf, i, fields)


# The fields of an image record that `ImageStore.load` reads every time.
IMAGE_HOT_FIELDS = ("features", "norm_bb", "conf", "num_bb")
_TEXT_FIELDS = ("id", "input_ids", "img_keys", "target", "target_labels",
                "target_scores")


class ImageStore:
  """An image-store dataset: key -> image part of an example.

  Args:
    data_dir, name: the image store ("builder/config:version").
    rule: the num_bb rule.
    with_soft_labels: also return `img_soft_labels` (read from the store's
      soft-label split, so stores read without them never touch them).
    img_feat_dtype: dtype of `img_feat`: float32 (the batch contract; exact
      cast of the stored fp16) or float16 (the stored values as they are,
      for models that cast on the device; half the host work and bytes).
  """

  def __init__(self, data_dir: str, name: str, rule: RegionRule = RegionRule(),
               with_soft_labels: bool = False,
               img_feat_dtype: Any = np.float32):
    self.name = name
    self.rule = rule
    self.with_soft_labels = with_soft_labels
    self.img_feat_dtype = np.dtype(img_feat_dtype)
    if self.img_feat_dtype not in (np.dtype(np.float32),
                                   np.dtype(np.float16)):
      raise ValueError(f"img_feat_dtype must be float32 or float16, got "
                       f"{self.img_feat_dtype}")
    bdir = schema.builder_dir(data_dir, name)
    self.meta = schema.read_meta(bdir)
    self.key_to_index = schema.read_image_index(bdir)
    self.keys = [None] * len(self.key_to_index)
    for k, i in self.key_to_index.items():
      self.keys[i] = k
    self._source = RecordReader(data_dir, name, schema.IMAGE_SPLIT,
                                schema.IMAGE_ARRAYS)
    if len(self._source) != len(self.keys):
      raise DataError(name, "*", f"img_index.json lists {len(self.keys)} keys "
                      f"but the split holds {len(self._source)} records")
    if with_soft_labels and not self.meta.get("has_soft_labels", True):
      raise DataError(name, "*", "soft labels requested (MRC) but the store "
                      "has none (has_soft_labels=False)")
    # Stores built before the soft-label split keep them in `images`.
    self._soft = None
    if with_soft_labels and self.meta.get("soft_label_split"):
      self._soft = RecordReader(data_dir, name, schema.SOFT_LABEL_SPLIT,
                                schema.IMAGE_ARRAYS)
      if len(self._soft) != len(self.keys):
        raise DataError(name, "*", f"split {schema.SOFT_LABEL_SPLIT} holds "
                        f"{len(self._soft)} records, {schema.IMAGE_SPLIT} "
                        f"{len(self.keys)}")
    self._num_bbs: np.ndarray | None = None
    # Per record, what its first load found: 0 not loaded yet, 1 features
    # and boxes free of inf/NaN, 2 that and no feature's sign bit set (the
    # usual case: detector features are ReLU outputs), which allows a
    # cheaper exact fp16 -> fp32 cast. The files do not change while read.
    self._checked = np.zeros(len(self.keys), np.uint8)
    self._hot_fields = IMAGE_HOT_FIELDS + (
        ("soft_labels",) if with_soft_labels and self._soft is None else ())

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
      rec = self._source.get(int(i), ("num_bb", "conf"))
      self._num_bbs[i] = self._nbb(rec, self.keys[i])
    return self._num_bbs if indices is None else self._num_bbs[indices]

  def _read_hot(self, index: int):
    """(stored features, stored norm_bb, regions to use, the decoded record)
    of image record `index`."""
    n = -1 if self._num_bbs is None else int(self._num_bbs[index])
    key = self.keys[index]
    rec = self._source.get(index, self._hot_fields)
    if n < 0 or int(rec["num_bb"]) != len(rec["conf"]) or n > int(
        rec["num_bb"]):
      n = self._nbb(rec, key)   # not counted at start-up (or inconsistent)
    return rec["features"], rec["norm_bb"], n, rec

  def _soft_labels(self, index: int, rec: dict[str, Any], key: str,
                   n: int) -> np.ndarray:
    if self._soft is None:
      soft = rec["soft_labels"]   # legacy layout: inside `images`
    else:
      srec = self._soft.get(index, ("img_key", "soft_labels"))
      if srec["img_key"].decode() != key:
        raise DataError(self.name, key, f"{schema.SOFT_LABEL_SPLIT} record "
                        f"{index} is {srec['img_key']!r}; the splits are out "
                        "of order")
      soft = srec["soft_labels"]
    if soft.shape[0] < n:
      raise DataError(self.name, key, f"{soft.shape[0]} soft-label rows for "
                      f"{n} regions")
    soft = soft[:n]
    if not soft.flags.aligned:
      soft = soft.copy()
    if not fp16_all_finite(soft):
      raise DataError(self.name, key, "img_soft_labels holds NaN/inf")
    return fp16_to_fp32(soft, finite=True)

  def load(self, index: int, img_feat_dtype: Any = None,
           img_feat_out: np.ndarray | None = None) -> dict[str, Any]:
    """The image part of an example: img_feat, img_pos_feat[, soft labels].

    `img_feat_dtype` overrides the store's dtype for this call (the pipeline
    asks for the stored float16 when no op will see the example, and casts
    while padding: `collate(..., img_feat_dtype=float32)`).
    `img_feat_out`: a float32 [>= num_bb, 2048] array whose first rows
    receive the fp32 features (the pipeline passes rows of one per-batch
    arena: one large allocation instead of one per example); or a float16
    one, which receives the stored values as they are (then `img_feat` is
    float16 whatever the dtype).
    """
    dtype = (self.img_feat_dtype if img_feat_dtype is None
             else np.dtype(img_feat_dtype))
    key = self.keys[index]
    feats, norm_bb, n, rec = self._read_hot(int(index))
    if feats.ndim != 2 or feats.shape[1] != schema.FEAT_DIM:
      raise DataError(self.name, key, f"features shape {feats.shape}, "
                      f"expected (n, {schema.FEAT_DIM})")
    feats = feats[:n]
    if not feats.flags.aligned:
      feats = feats.copy()   # numpy's integer passes are ~4x slower unaligned
    checked = int(self._checked[index])
    if not checked:
      # One reduction: below 0x7C00 as uint16 = finite with no sign bit.
      if feats.size and int(feats.view(np.uint16).max()) < _F16_EXP:
        found = 2
      elif fp16_all_finite(feats):
        found = 1
      else:
        raise DataError(self.name, key, "img_feat holds NaN/inf")
    if img_feat_out is not None and img_feat_out.dtype == np.float16:
      img_feat = img_feat_out[:n]
      np.copyto(img_feat, feats)
    elif dtype == np.float16:
      img_feat = feats
    else:
      img_feat = None if img_feat_out is None else img_feat_out[:n]
      if (checked or found) == 2:
        img_feat = self._cast_unsigned(feats, img_feat)
      else:
        img_feat = fp16_to_fp32(feats, out=img_feat, finite=True)
    out = {
        "img_feat": img_feat,
        "img_pos_feat": box7(norm_bb[:n]),
        "img_key": key,
    }
    if self.with_soft_labels:
      out["img_soft_labels"] = self._soft_labels(int(index), rec, key, n)
    if not checked:
      if not np.isfinite(out["img_pos_feat"]).all():
        raise DataError(self.name, key, "norm_bb holds NaN/inf")
      self._checked[index] = found
    return out

  @staticmethod
  def _cast_unsigned(feats: np.ndarray, out: np.ndarray | None
                     ) -> np.ndarray:
    """Exact fp16 -> fp32 of finite values without a sign bit set: the
    fp32 bit pattern is the fp16 one shifted left by 13, times 2**112 (as
    `fp16_to_fp32`, less the pass that moves the sign bit)."""
    if out is None:
      out = np.empty(feats.shape, np.float32)
    i = out.view(np.int32)
    np.copyto(i, feats.view(np.uint16), casting="unsafe")
    np.left_shift(i, 13, out=i)
    np.multiply(out, _TWO_POW_112, out=out)
    return out


class TextSource:
  """One split of a text dataset, joined to its image store by key.

  A record names one image or more (`img_keys`; NLVR2 pairs name two,
  retrieval or VCR variants more). Every key is resolved at start-up.

  Attributes:
    records: indices (into the TFDS split) of the kept records.
    txt_lens: per kept record, text length INCLUDING [CLS] and [SEP].
    img_index: per kept record, the image-store index of its FIRST image
      (the example's image; ITM negatives and evaluators use it).
    img_offsets, img_indices: every image of every kept record, ragged:
      record i's images are `img_indices[img_offsets[i]:img_offsets[i+1]]`
      (`images_of(i)`), in the record's key order.
    num_images: per kept record, how many images it names.
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
    self._source = RecordReader(data_dir, name, split, schema.TEXT_ARRAYS,
                                schema.TEXT_LISTS)
    self.max_txt_len = max_txt_len
    # Start-up reads every text record once (lengths, image keys); the kept
    # records' fields are kept in flat arrays, so an example costs no read.
    records, lens, imgs, ids, targets = [], [], [], [], []
    tokens, labels, scores, n_labels = [], [], [], []
    all_imgs, n_imgs = [], []
    too_long = 0
    for i, rec in self._source.iter_fields(_TEXT_FIELDS):
      n = len(rec["input_ids"])
      if max_txt_len >= 0 and n > max_txt_len:
        too_long += 1
        continue
      keys = rec["img_keys"]
      rid = rec["id"].decode()
      if not keys:
        raise DataError(self.name, rid, "no image key; a text record must "
                        "name at least one image")
      if len(rec["target_labels"]) != len(rec["target_scores"]):
        raise DataError(self.name, rid, "target_labels and target_scores "
                        "differ in length")
      records.append(i)
      lens.append(n + 2)
      first = store.index_of(keys[0].decode(), self.name, rid)
      imgs.append(first)
      all_imgs.append(first)
      all_imgs.extend(store.index_of(k.decode(), self.name, rid)
                      for k in keys[1:])
      n_imgs.append(len(keys))
      ids.append(rec["id"])
      targets.append(rec["target"])
      tokens.append(rec["input_ids"])
      labels.append(rec["target_labels"])
      scores.append(rec["target_scores"])
      n_labels.append(len(rec["target_labels"]))
    self.records = np.asarray(records, np.int64)
    self.txt_lens = np.asarray(lens, np.int32)
    self.img_index = np.asarray(imgs, np.int64)
    self.num_images = np.asarray(n_imgs, np.int64)
    self.img_offsets = np.concatenate([[0], np.cumsum(self.num_images)]
                                      ).astype(np.int64)
    self.img_indices = np.asarray(all_imgs, np.int64)
    self._ids = np.asarray(ids, dtype=np.bytes_)
    self._targets = np.asarray(targets, np.int64)
    self._tok_off = np.concatenate([[0], np.cumsum(self.txt_lens - 2)])
    self._tokens = (np.concatenate(tokens).astype(np.int32) if tokens
                    else np.zeros(0, np.int32))
    self._lab_off = np.concatenate([[0], np.cumsum(n_labels, dtype=np.int64)])
    self._labels = (np.concatenate(labels).astype(np.int32) if labels
                    else np.zeros(0, np.int32))
    self._scores = (np.concatenate(scores).astype(np.float32) if scores
                    else np.zeros(0, np.float32))
    self.dropped = {"longer_than_max_txt_len": too_long} if too_long else {}
    if too_long:
      logging.info("%s: dropped %d texts longer than max_txt_len=%d",
                   self.name, too_long, max_txt_len)
    if not len(records):
      raise DataError(self.name, "*", "no record left after filtering")

  def __len__(self) -> int:
    return len(self.records)

  @property
  def max_images(self) -> int:
    """The most images any kept record names (1 for caption datasets)."""
    return int(self.num_images.max())

  def input_ids(self, i: int) -> np.ndarray:
    """`[CLS] tokens [SEP]` of kept record `i` (int32), without reading its
    image (retrieval reads texts and images separately)."""
    i = int(i)
    a, b = self._tok_off[i], self._tok_off[i + 1]
    ids = np.empty(b - a + 2, np.int32)
    ids[0] = self.special["CLS"]
    ids[1:-1] = self._tokens[a:b]
    ids[-1] = self.special["SEP"]
    return ids

  def record_id(self, i: int) -> str:
    """The `id` of kept record `i` (e.g. a VQA question id)."""
    return self._ids[int(i)].decode()

  def target(self, i: int) -> int:
    """The `target` of kept record `i` (`schema.NO_TARGET` when none)."""
    return int(self._targets[int(i)])

  def soft_target(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """`(target_labels, target_scores)` of kept record `i` (empty when it
    has none, e.g. an unlabelled test question)."""
    a, b = self._lab_off[int(i)], self._lab_off[int(i) + 1]
    return self._labels[a:b], self._scores[a:b]

  def images_of(self, i: int) -> np.ndarray:
    """Image-store indices of every image of kept record `i`, in order."""
    return self.img_indices[self.img_offsets[i]:self.img_offsets[i + 1]]

  def num_bbs(self, row_regions: str | Callable[[np.ndarray], int] = "max"
              ) -> np.ndarray:
    """Regions per kept record (after the num_bb rule).

    For a record of several images the length index needs one count:
    `row_regions` says how its images' counts combine into the regions of
    one row: "max" when each row holds one of the images (NLVR2 paired),
    "sum" when one row holds all of them concatenated (NLVR2 triplet), or
    a callable mapping the images' counts to the row's.
    """
    if self.max_images == 1:
      return self.store.num_bbs(self.img_index)
    per_image = self.store.num_bbs(self.img_indices)
    starts = self.img_offsets[:-1]
    if row_regions == "max":
      out = np.maximum.reduceat(per_image, starts)
    elif row_regions == "sum":
      out = np.add.reduceat(per_image, starts)
    elif callable(row_regions):
      out = [row_regions(per_image[a:b]) for a, b in
             zip(starts, self.img_offsets[1:])]
    else:
      raise ValueError(f"{self.name}: row_regions must be 'max', 'sum' or a "
                       f"callable, got {row_regions!r}")
    return np.asarray(out, np.int32)

  def example(self, i: int, img_feat_dtype: Any = None,
              img_feat_out: np.ndarray | None = None,
              defer_image: bool = False) -> dict[str, Any]:
    """The joined per-example dict (batch contract) of kept record `i`.

    The first image's part (`img_feat`, `img_pos_feat`, `img_key`[,
    `img_soft_labels`]) is in the dict itself, so a one-image record gives
    exactly the contract's example. A record of k > 1 images also carries
    `_images`: the k image parts (dicts as `ImageStore.load` returns), in
    key order; `_images[0]` is the first image's (the same arrays). Task ops
    decide how they become rows (see docs/data.md).

    `img_feat_dtype`, `img_feat_out`: see `ImageStore.load` (first image).
    `defer_image`: a record of one image gets its image deferred instead
    (`img_key` and `ops.DEFERRED_IMAGE`, the store index; nothing is read):
    `ops.apply_ops` loads it when an op needs it or at the end.
    """
    i = int(i)
    out = {"input_ids": self.input_ids(i), "_id": self._ids[i].decode(),
           "_index": i}
    if self._targets[i] != schema.NO_TARGET:
      out["targets"] = np.int32(self._targets[i])
    a, b = self._lab_off[i], self._lab_off[i + 1]
    if b > a:
      out["_target_labels"] = self._labels[a:b].copy()
      out["_target_scores"] = self._scores[a:b].copy()
    a, b = self.img_offsets[i], self.img_offsets[i + 1]
    if defer_image and b - a == 1:
      j = int(self.img_index[i])
      out["img_key"] = self.store.keys[j]
      out[ops_lib.DEFERRED_IMAGE] = j
      return out
    first = self.store.load(int(self.img_index[i]), img_feat_dtype,
                            img_feat_out)
    out.update(first)
    if b - a > 1:
      out["_images"] = [first] + [self.store.load(int(j), img_feat_dtype)
                                  for j in self.img_indices[a + 1:b]]
    return out
