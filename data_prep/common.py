"""Builder base classes shared by every source.

`ImageStoreBuilder` and `TextBuilder` hold what all sources share: the
schema's features, ArrayRecord output in generation order (no TFDS
shuffling, so `img_index.json` lists the image keys in record order), record
checks, a tqdm progress bar, and counts of written and dropped records in the
dataset metadata. A subclass only yields records.

Records are written to ArrayRecord **uncompressed** (`ARRAY_RECORD_OPTIONS`):
region features are fp16 noise-like values that compress poorly, and
decompressing a 100-region record costs more CPU than reading it (see
docs/data.md). Detector soft labels, the largest array, go to their own split
(`schema.SOFT_LABEL_SPLIT`, same record order as `images`), so readers that do
not train MRC never read them.

TFDS writes into a temporary directory and renames it when everything,
including `dataset_info.json` and `metadata.json`, is written; an exception
anywhere in a subclass's generator removes the temporary directory, so an
interrupted build leaves nothing that `tfds.data_source` can open.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import json
import os
from typing import Any, Iterator, Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters
import tqdm

from uniter_jax.data import schema

ARRAY_RECORD = "array_record"
# ArrayRecord writer options of every data_prep dataset. TFDS 4.9.10 writes
# 'group_size:1' (brotli by default); one record per group keeps random
# access cheap, and no compression makes a read a plain copy.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"


class _UncompressedArrayRecord(file_adapters.ArrayRecordFileAdapter):
  """TFDS's ArrayRecord adapter, writing with `ARRAY_RECORD_OPTIONS`."""

  @classmethod
  def write_examples(cls, path, iterator):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    writer = array_record_module.ArrayRecordWriter(os.fspath(path),
                                                   ARRAY_RECORD_OPTIONS)
    for _, serialized_example in iterator:
      writer.write(serialized_example)
    writer.close()
    return None


@contextlib.contextmanager
def _array_record_options():
  """Routes TFDS's ArrayRecord writes through `_UncompressedArrayRecord`.

  TFDS has no option for the ArrayRecord writer's options string; the
  adapter registry is swapped for the duration of one build only. Readers
  need nothing: an ArrayRecord file records its own options.
  """
  fmt = file_adapters.FileFormat.ARRAY_RECORD
  old = file_adapters.ADAPTER_FOR_FORMAT[fmt]
  file_adapters.ADAPTER_FOR_FORMAT[fmt] = _UncompressedArrayRecord
  try:
    yield
  finally:
    file_adapters.ADAPTER_FOR_FORMAT[fmt] = old


# ----------------------------------------------------------------------------
# Errors a person acts on.
# ----------------------------------------------------------------------------
class InputError(Exception):
  """A mistake of the person running a build: what, where, and the fix.

  The message reads `<what> (<where>): <fix>`, where `where` names the file,
  folder, option or key, so the CLI prints it as one line. Raise one of the
  two subclasses: callers that already catch `ValueError` or
  `FileNotFoundError` keep working.
  """

  def __init__(self, what: str, where: Any, fix: str):
    self.what, self.where, self.fix = what, str(where), fix
    super().__init__(f"{what} ({where}): {fix}")


class BadInputError(InputError, ValueError):
  """A file, folder or option is there but is not what the build needs."""


class MissingInputError(InputError, FileNotFoundError):
  """A file or folder that the build needs is not there."""


# What `python -m data_prep` prints in one line instead of a traceback (as
# run.py does with `uniter_jax.train.RUN_ERRORS`): a person's mistake, bad
# source data, or a path the system refuses. Anything else is a bug and
# keeps its traceback.
CLI_ERRORS = (InputError, schema.DataError, FileNotFoundError,
              IsADirectoryError, NotADirectoryError, PermissionError)


def describe_error(e: BaseException) -> str:
  """One line `<what> (<where>): <fix>` for an exception in `CLI_ERRORS`."""
  if isinstance(e, InputError):
    msg = str(e)
  elif isinstance(e, schema.DataError):
    where = e.dataset if e.record_id == "*" else (
        f"{e.dataset}, record {e.record_id!r}")
    msg = (f"{e.problem} ({where}): the source data is not what the "
           "official format holds; fix or re-download that file, or check "
           "the options that name it")
  elif isinstance(e, OSError) and e.filename is not None:
    msg = (f"{e.strerror or type(e).__name__} ({e.filename}): check the "
           "path (relative source paths are read from --manual_dir)")
  else:
    msg = str(e)
  # One line: a multi-line message would be read as several errors.
  return " ".join(msg.split("\n"))


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
  """Parsed JSON of `path`; a missing or malformed file names itself."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingInputError(f"{what} does not exist", path,
                            "check the path (relative source paths are "
                            "read from --manual_dir)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadInputError(f"{what} is not valid JSON ({e})", path,
                        "fix the file or download it again") from e


def folder_listing(path: str | os.PathLike[str], limit: int = 8) -> str:
  """'<folder> holds a, b, c' for the nearest existing folder of `path`:
  the fix of a path mistake shows what is there instead."""
  path = os.path.abspath(os.fspath(path))
  here = path
  while not os.path.isdir(here) and os.path.dirname(here) != here:
    here = os.path.dirname(here)
  try:
    names = sorted(os.listdir(here))
  except OSError:
    return f"{here} cannot be listed"
  shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
  return f"{here} holds {shown or 'nothing'}"


def full_name(builder: tfds.core.DatasetBuilder) -> str:
  """"builder/config:version", the name `tfds.data_source` accepts."""
  cfg = builder.builder_config
  name = f"{builder.name}/{cfg.name}" if cfg is not None else builder.name
  return f"{name}:{builder.version}"


class _Counting:
  """Mixin: counts written/dropped records into `info.metadata`."""

  # TFDS 4.9.10 resolves the path of a builder that lives in a package with
  # `importlib_resources`, a package it does not depend on (and which is not
  # installed); the builder's own file is what that lookup returns anyway.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", ARRAY_RECORD)
    super().__init__(**kwargs)
    self._reset_counts()

  def _download_and_prepare(self, dl_manager, download_config=None):
    # Both `common.build` and `tfds build` (data_prep.tfds_build) get here.
    with _array_record_options():
      return super()._download_and_prepare(dl_manager, download_config)

  def _reset_counts(self):
    self._written = collections.Counter()
    self._dropped = collections.Counter()

  def drop(self, reason: str, n: int = 1) -> None:
    """Counts `n` records dropped for `reason` (as the official code)."""
    self._dropped[reason] += n

  def _save_counts(self):
    md = self.info.metadata
    md["written"] = dict(self._written)
    md["dropped"] = dict(self._dropped)


class ImageStoreBuilder(_Counting, tfds.core.GeneratorBasedBuilder):
  """Base of the image-store builders: one record per image, split `images`."""

  VERSION = tfds.core.Version("1.0.0")
  SOURCE = "?"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=schema.image_features(),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  # Subclasses implement these two.
  def _image_meta(self) -> dict[str, Any]:
    """Source-specific metadata (`has_soft_labels`, `db_cut`, ...)."""
    raise NotImplementedError

  def _iter_images(self, dl_manager) -> Iterator[dict[str, Any]]:
    """Yields image records (schema fields; float arrays any float dtype)."""
    raise NotImplementedError

  def _total(self) -> int | None:
    """Number of images for the progress bar, when cheaply known."""
    return None

  def _split_generators(self, dl_manager):
    self._reset_counts()
    md = self.info.metadata
    md.clear()
    md.update({"kind": "images", "source": self.SOURCE,
               "img_store": full_name(self), "dropped": {}, "written": {},
               "array_record_options": ARRAY_RECORD_OPTIONS})
    md.update(self._image_meta())
    if "has_soft_labels" not in md:
      raise ValueError(f"{full_name(self)}: _image_meta() must set "
                       "has_soft_labels")
    md["soft_label_split"] = bool(md["has_soft_labels"])
    self._keys = []
    gens = {schema.IMAGE_SPLIT: self._generate(dl_manager)}
    if md["soft_label_split"]:
      gens[schema.SOFT_LABEL_SPLIT] = self._generate_soft_labels(dl_manager)
    return gens

  def _generate_examples(self, *args, **kwargs):
    raise NotImplementedError("records come from _split_generators")

  def _generate(self, dl_manager):
    name = full_name(self)
    keys = []
    seen = set()
    bar = tqdm.tqdm(self._iter_images(dl_manager), total=self._total(),
                    desc=f"{name} images", unit="img")
    has_soft = bool(self.info.metadata["has_soft_labels"])
    for rec in bar:
      rec = to_image_record(rec)
      key = rec["img_key"]
      if key in seen:
        raise schema.DataError(name, key, "duplicate image key")
      schema.check_image_record(rec, name)
      if has_soft and not rec.pop("_has_soft_labels"):
        raise schema.DataError(name, key, "no soft labels, but the "
                               "store has them (has_soft_labels=True)")
      rec.pop("_has_soft_labels", None)
      seen.add(key)
      rec["soft_labels"] = rec["soft_labels"][:0]   # in SOFT_LABEL_SPLIT
      yield len(keys), rec
      keys.append(key)
    self._keys = keys
    self._written[schema.IMAGE_SPLIT] = len(keys)
    self._save_counts()
    # self.data_dir is TFDS's temporary directory here; it is renamed with
    # the rest of the dataset only when the build succeeds.
    with open(os.path.join(self.data_dir, schema.IMG_INDEX_FILE), "w") as f:
      json.dump(keys, f)


  def _generate_soft_labels(self, dl_manager):
    """Second pass over the source: the `SOFT_LABEL_SPLIT` records.

    Same keys in the same order as the `images` split; only `img_key`,
    `num_bb` and `soft_labels` are filled (the other arrays are empty). TFDS
    generates the splits one after the other, so `self._keys` holds the
    image split's order here; a source that yields another order fails.
    """
    name = f"{full_name(self)}[{schema.SOFT_LABEL_SPLIT}]"
    n = 0
    bar = tqdm.tqdm(self._iter_images(dl_manager), total=self._total(),
                    desc=f"{name} soft labels", unit="img")
    for rec in bar:
      rec = to_image_record(rec)
      key = rec["img_key"]
      if n >= len(self._keys) or self._keys[n] != key:
        raise schema.DataError(name, key, f"record {n} differs from the "
                               "images split (source order not stable)")
      schema.check_image_record(rec, name)
      if not rec.pop("_has_soft_labels"):
        raise schema.DataError(name, key, "no soft labels, but the "
                               "store has them (has_soft_labels=True)")
      for field, width in (("features", schema.FEAT_DIM),
                           ("norm_bb", schema.BOX_DIM)):
        rec[field] = rec[field][:0].reshape(0, width)
      rec["conf"] = rec["conf"][:0]
      yield n, rec
      n += 1
    if n != len(self._keys):
      raise schema.DataError(name, "*", f"{n} records, but the images "
                             f"split has {len(self._keys)}")
    self._written[schema.SOFT_LABEL_SPLIT] = n
    self._save_counts()


def to_image_record(rec: Mapping[str, Any]) -> dict[str, Any]:
  """Casts a source record to the schema dtypes (features fp16 etc.)."""
  with np.errstate(over="ignore"):   # overflow -> inf, caught by the check
    feats = np.asarray(rec["features"]).astype(np.float16)
    n = feats.shape[0] if feats.ndim == 2 else 0
    soft = rec.get("soft_labels")
    soft_given = soft is not None
    soft = (np.zeros((n, schema.NUM_LABELS), np.float16) if soft is None
            else np.asarray(soft).astype(np.float16))
  return {
      "img_key": str(rec["img_key"]),
      "num_bb": np.int32(n),
      "features": feats,
      "norm_bb": np.asarray(rec["norm_bb"]).astype(np.float32),
      "conf": np.asarray(rec["conf"]).astype(np.float32),
      "soft_labels": soft,
      "image_w": np.int32(rec.get("image_w", 0) or 0),
      "image_h": np.int32(rec.get("image_h", 0) or 0),
      "_has_soft_labels": soft_given,
  }


class TextBuilder(_Counting, tfds.core.GeneratorBasedBuilder):
  """Base of the text builders: records refer to images by key."""

  VERSION = tfds.core.Version("1.0.0")
  SOURCE = "?"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=schema.text_features(),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  # Subclasses implement these.
  def _text_meta(self, dl_manager) -> dict[str, Any]:
    """Vocabulary ids, `img_store`, `task`, `max_txt_len`."""
    raise NotImplementedError

  def _split_iters(self, dl_manager) -> dict[str, Iterator[dict[str, Any]]]:
    """{split: iterator of text records}; may call `self.drop(reason)`."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    self._reset_counts()
    md = self.info.metadata
    md.clear()
    md.update({"kind": "text", "source": self.SOURCE, "dropped": {},
               "written": {}, "PAD": 0})
    md.update(self._text_meta(dl_manager))
    self._img_index = self._load_image_index(md["img_store"])
    iters = self._split_iters(dl_manager)
    return {split: self._generate(split, it) for split, it in iters.items()}

  def _load_image_index(self, img_store: str) -> set[str] | None:
    """Keys of the image store the text refers to (must be built first)."""
    bdir = schema.builder_dir(self.data_dir_root, img_store)
    try:
      return set(schema.read_image_index(bdir))
    except FileNotFoundError as e:
      raise MissingInputError(
          f"{full_name(self)}: image store {img_store!r} is not built",
          bdir, "build it first into the same --data_dir (python -m "
          "data_prep img_db / butd / synthetic), or fix --img_store "
          "(builder/config:version)") from e

  def _generate_examples(self, *args, **kwargs):
    raise NotImplementedError("records come from _split_generators")

  def _generate(self, split: str, records):
    name = f"{full_name(self)}[{split}]"
    vocab_size = int(self.info.metadata["vocab_size"])
    n = 0
    seen = set()
    for rec in tqdm.tqdm(records, desc=f"{name} text", unit="txt"):
      rec = to_text_record(rec)
      rid = rec["id"]
      if rid in seen:
        raise schema.DataError(name, rid, "duplicate text id")
      schema.check_text_record(rec, name, vocab_size)
      for k in rec["img_keys"]:
        if k not in self._img_index:
          raise schema.DataError(
              name, rid, f"image key {k!r} missing from image store "
              f"{self.info.metadata['img_store']}")
      seen.add(rid)
      yield n, rec
      n += 1
    self._written[split] = n
    self._save_counts()


def to_text_record(rec: Mapping[str, Any]) -> dict[str, Any]:
  """Casts a source record to the schema dtypes, filling optional fields."""
  labels = rec.get("target_labels")
  scores = rec.get("target_scores")
  target = rec.get("target")
  return {
      "id": str(rec["id"]),
      "input_ids": np.asarray(rec["input_ids"], dtype=np.int64).astype(
          np.int32),
      "img_keys": [str(k) for k in rec["img_keys"]],
      "target": np.int32(schema.NO_TARGET if target is None else target),
      "target_labels": np.asarray([] if labels is None else labels,
                                  dtype=np.int32),
      "target_scores": np.asarray([] if scores is None else scores,
                                  dtype=np.float32),
  }


@dataclasses.dataclass
class BuildSummary:
  """What a build wrote and dropped (printed by the CLI)."""
  name: str
  path: str
  written: dict[str, int]
  dropped: dict[str, int]

  def __str__(self) -> str:
    w = ", ".join(f"{k}={v}" for k, v in self.written.items()) or "none"
    d = ", ".join(f"{k}={v}" for k, v in self.dropped.items()) or "none"
    return f"{self.name}: wrote {w}; dropped {d}\n  at {self.path}"


def build(builder: tfds.core.DatasetBuilder,
          manual_dir: str | None = None, overwrite: bool = False
          ) -> BuildSummary:
  """Runs `download_and_prepare` and returns what was written and dropped."""
  cfg = tfds.download.DownloadConfig(
      manual_dir=manual_dir,
      download_mode=(tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
                     if overwrite else
                     tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  builder.download_and_prepare(download_config=cfg)
  meta = schema.read_meta(builder.data_dir)
  return BuildSummary(full_name(builder), os.fspath(builder.data_dir),
                      meta.get("written", {}), meta.get("dropped", {}))
