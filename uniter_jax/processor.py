"""`Processor`: captions and image regions -> a batch in the model's layout.

    proc = uniter_jax.Processor.from_pretrained("export_dir")   # or
    proc = uniter_jax.Processor("bert-base-cased/vocab.txt")
    image = proc.regions(features, boxes, image_size=(w, h), conf=conf)
    batch = proc(["a dog on a bench .", "a red bus ."], [image, image])
    out = model.apply({"params": params}, batch)

What it does, as the official code does it (ChenRocks/UNITER):

* **Text.** WordPiece with the official vocabulary (bert-base-cased: no
  lower-casing, no accent stripping), run on the whitespace-split text as
  `prepro.py: bert_tokenize` does, then `[CLS] ids [SEP]`. The official
  code never truncates: training *drops* texts longer than `max_txt_len`
  word pieces (60; `TxtTokLmdb`), and inference keeps every text whole
  (`TxtTokLmdb(db, -1)` in `inf_*.py` and the validation sets). The
  processor therefore keeps the whole text by default; `truncation=True`
  keeps the first `max_txt_len` word pieces instead (not an official
  behaviour, a convenience). A text longer than the position table
  (`max_position_embeddings` - 2 = 510 word pieces) is an error either way
  unless truncated.
* **Regions.** Features `[n, 2048]` (rounded to float16 and back by
  default, as the official img_db and this project's image stores keep
  them) and boxes as corners `[x1, y1, x2, y2]`, in pixels with
  `image_size=(width, height)` or normalised to [0, 1]; or the official
  6-column `norm_bb` `[x1, y1, x2, y2, w, h]`. Pixel boxes are normalised as
  the official feature extraction does (`generate_npz.py` of
  BUTD-UNITER-NLVR2): `x1/W, y1/H, x1/W + (x2-x1)/W, y1/H + (y2-y1)/H,
  (x2-x1)/W, (y2-y1)/H`, in float32. The model's 7-d box feature is
  `[x1, y1, x2, y2, w, h, w*h]` with the area computed from the stored w
  and h, as `DetectFeatTxtTokDataset._get_img_feat` does. With detector
  confidences the official region rule picks how many leading regions are
  used: `clamp(#(conf > conf_th), min_bb, max_bb)`, at most the regions
  given (`DetectFeatLmdb`; or a fixed `num_bb`); without, the first
  `min(n, max_bb)` (or `num_bb`).
* **Layout.** Each row is `[CLS text SEP pad.. (Lt) | regions pad.. (Li)]`
  with `input_ids`, `position_ids`, `img_feat`, `img_pos_feat`,
  `attn_masks`, `txt_lens`, `num_bbs` (see `uniter_jax.data.contract`),
  built by the pipeline's own collate function, so a batch equals the
  pipeline's for the same examples.
* **Heads with other inputs.** NLVR2 paired / paired-attn: two rows per
  example, (text, img0) with `img_type_ids` 1 and (text, img1) with 2;
  NLVR2 triplet: one row, text | img0 regions (type 1) | img1 regions
  (type 2) (`data/nlvr2.py`). VCR: one row per answer choice, `[CLS] q
  [SEP] a [SEP]` (or `[CLS] q [SEP] a_gt [SEP] r [SEP]`) with `txt_type_ids`
  0 / 2 / 3 for question / answer / rationale (`data/vcr.py`).

Nothing here imports data_prep: the library stays independent of the
dataset builders.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "uniter_config.json"   # = uniter_jax.convert.core.FLAX_META
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_KEYS = ("PAD", "UNK", "CLS", "SEP", "MASK")

# Official values (`train_*.py` / `pretrain*.py` argparse and configs).
OFFICIAL_MAX_TXT_LEN = 60
OFFICIAL_VCR_MAX_TXT_LEN = 220
DEFAULT_CONF_TH = 0.2      # = uniter_jax.data.schema.DEFAULT_*
DEFAULT_MIN_BB = 10
DEFAULT_MAX_BB = 100
FEAT_DIM = 2048
MAX_POSITION_EMBEDDINGS = 512

# Heads whose rows pair one text with one image, two images, or choices.
PAIRED_TASKS = ("nlvr2-paired", "nlvr2-attn")
TRIPLET_TASKS = ("nlvr2-triplet",)
SINGLE_TASKS = ("pretrain", "pretrain-vcr", "vqa", "ve", "itm", "re", "vcr")

# The 6-column norm_bb of the official img_db.
_BOX_TOL = 0.01   # normalised boxes may overshoot [0, 1] by rounding


# ---------------------------------------------------------------------------
# Vocabulary and the text settings stored with an export.
# ---------------------------------------------------------------------------
def read_vocab(path: str | os.PathLike[str]) -> list[str]:
  """Tokens of a `vocab.txt` (line number = id)."""
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f]


def write_vocab(vocab: Sequence[str], path: str | os.PathLike[str]) -> None:
  """Writes `vocab.txt`: one token a line, line number = id."""
  bad = [t for t in vocab if not isinstance(t, str) or "\n" in t]
  if bad:
    raise ValueError(f"vocabulary tokens must be strings without newlines; "
                     f"got {bad[:3]!r}")
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(t + "\n" for t in vocab))


def special_ids(vocab: Sequence[str], source: str = "vocab"
                ) -> dict[str, int]:
  """{PAD, UNK, CLS, SEP, MASK} ids of a vocabulary."""
  index = {t: i for i, t in enumerate(vocab)}
  missing = [t for t in SPECIAL_TOKENS if t not in index]
  if missing:
    raise ValueError(f"{source}: the vocabulary lacks the special tokens "
                     f"{missing}")
  return {k: index[t] for k, t in zip(_SPECIAL_KEYS, SPECIAL_TOKENS)}


def _rule_kwargs(region_rule) -> dict[str, Any]:
  if region_rule is None:
    return {}
  if hasattr(region_rule, "as_kwargs"):
    region_rule = region_rule.as_kwargs()
  elif dataclasses.is_dataclass(region_rule):
    region_rule = dataclasses.asdict(region_rule)
  return dict(region_rule)


def official_text_config(task: str | None = None) -> dict[str, Any]:
  """The official text and region settings of a head's checkpoints.

  `max_txt_len` 60 (220 for the VCR heads), the dynamic region rule
  `conf_th 0.2, min_bb 10, max_bb 100`; the RE head's official configs read
  a fixed 100 regions (`conf_th -1, num_bb 100`: ground-truth boxes).
  """
  rule = {"conf_th": DEFAULT_CONF_TH, "min_bb": DEFAULT_MIN_BB,
          "max_bb": DEFAULT_MAX_BB, "num_bb": None}
  if task == "re":
    rule["num_bb"] = 100
  return {"max_txt_len": (OFFICIAL_VCR_MAX_TXT_LEN
                          if task in ("vcr", "pretrain-vcr")
                          else OFFICIAL_MAX_TXT_LEN),
          "region_rule": rule, "lowercase": False}


def make_text_config(*, max_txt_len: int = OFFICIAL_MAX_TXT_LEN,
                     region_rule=None, special_ids: Mapping[str, int]
                     | None = None, lowercase: bool = False
                     ) -> dict[str, Any]:
  """The `text_config` that `save_flax` stores and `Processor` reads.

  Args:
    max_txt_len: the word-piece limit of the data (the official training
      filter, 60); `Processor(truncation=True)` cuts to it.
    region_rule: a `uniter_jax.data.RegionRule` or a dict of `conf_th`,
      `min_bb`, `max_bb`, `num_bb` (official defaults when None).
    special_ids: {PAD, UNK, CLS, SEP, MASK} ids (from the vocabulary when
      None and a vocabulary is stored).
    lowercase: lower-case before WordPiece (False for bert-base-cased).
  """
  rule = {"conf_th": DEFAULT_CONF_TH, "min_bb": DEFAULT_MIN_BB,
          "max_bb": DEFAULT_MAX_BB, "num_bb": None}
  rule.update(_rule_kwargs(region_rule))
  out = {"max_txt_len": int(max_txt_len), "region_rule": rule,
         "lowercase": bool(lowercase)}
  if special_ids is not None:
    out["special_ids"] = {k: int(special_ids[k]) for k in _SPECIAL_KEYS}
  return check_text_config(out)


def text_config_from_meta(meta: Mapping[str, Any], *, max_txt_len: int,
                          region_rule=None) -> dict[str, Any]:
  """`make_text_config` from a text dataset's metadata (special ids,
  lower-casing) and the run's data settings."""
  return make_text_config(
      max_txt_len=max_txt_len, region_rule=region_rule,
      special_ids={k: int(meta[k]) for k in _SPECIAL_KEYS if k in meta}
      if all(k in meta for k in _SPECIAL_KEYS) else None,
      lowercase=bool(meta.get("lowercase", False)))


def check_text_config(tc: Mapping[str, Any], vocab: Sequence[str] | None
                      = None, source: str = "text_config"
                      ) -> dict[str, Any]:
  """Validates a text_config (and its agreement with `vocab`); returns it
  normalised (plain JSON types, official defaults filled in)."""
  if not isinstance(tc, Mapping):
    raise ValueError(f"{source}: expected a dict, got {type(tc).__name__}")
  known = {"max_txt_len", "region_rule", "special_ids", "lowercase"}
  unknown = sorted(set(tc) - known)
  if unknown:
    raise ValueError(f"{source}: unknown fields {unknown}; known: "
                     f"{sorted(known)}")
  out = {"max_txt_len": int(tc.get("max_txt_len", OFFICIAL_MAX_TXT_LEN)),
         "lowercase": bool(tc.get("lowercase", False))}
  if out["max_txt_len"] < 1 and out["max_txt_len"] != -1:
    raise ValueError(f"{source}: max_txt_len {out['max_txt_len']} must be "
                     ">= 1 (or -1: no limit)")
  rule = {"conf_th": DEFAULT_CONF_TH, "min_bb": DEFAULT_MIN_BB,
          "max_bb": DEFAULT_MAX_BB, "num_bb": None}
  given = _rule_kwargs(tc.get("region_rule"))
  bad = sorted(set(given) - set(rule))
  if bad:
    raise ValueError(f"{source}: region_rule has unknown fields {bad}; "
                     f"known: {sorted(rule)}")
  rule.update(given)
  rule = {"conf_th": float(rule["conf_th"]), "min_bb": int(rule["min_bb"]),
          "max_bb": int(rule["max_bb"]),
          "num_bb": None if rule["num_bb"] in (None, -1) or int(
              rule["num_bb"]) <= 0 else int(rule["num_bb"])}
  if rule["num_bb"] is None and not 0 <= rule["min_bb"] <= rule["max_bb"]:
    raise ValueError(f"{source}: region_rule needs 0 <= min_bb <= max_bb, "
                     f"got min_bb {rule['min_bb']} max_bb {rule['max_bb']}")
  out["region_rule"] = rule
  if tc.get("special_ids") is not None:
    sp = dict(tc["special_ids"])
    missing = [k for k in _SPECIAL_KEYS if k not in sp]
    if missing:
      raise ValueError(f"{source}: special_ids lacks {missing}")
    out["special_ids"] = {k: int(sp[k]) for k in _SPECIAL_KEYS}
  if vocab is not None:
    try:
      have = special_ids(vocab, source)
    except ValueError:
      have = None
    if "special_ids" in out and have is not None and have != out[
        "special_ids"]:
      raise ValueError(f"{source}: special_ids {out['special_ids']} disagree "
                       f"with the vocabulary's {have}")
    if "special_ids" not in out and have is not None:
      out["special_ids"] = have
  return out


# ---------------------------------------------------------------------------
# Regions.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Regions:
  """One image's regions, ready for a row: what the pipeline loads.

  Attributes:
    img_feat: [n, D] float32 region features (after the region rule).
    img_pos_feat: [n, 7] float32 boxes `[x1, y1, x2, y2, w, h, w*h]`,
      normalised.
    num_given: how many regions were given before the region rule.
  """
  img_feat: np.ndarray
  img_pos_feat: np.ndarray
  num_given: int

  @property
  def num_bb(self) -> int:
    return int(self.img_feat.shape[0])


def norm_boxes(boxes, image_size: tuple[float, float] | None = None
               ) -> np.ndarray:
  """Boxes -> the official 6-column `norm_bb` `[x1, y1, x2, y2, w, h]`.

  `boxes` [n, 4] corners `x1, y1, x2, y2`: in pixels when `image_size =
  (width, height)` is given (normalised as the official feature extraction
  does), else already normalised to [0, 1]. [n, 6]: the official `norm_bb`
  itself (normalised; returned as float32).
  """
  b = np.asarray(boxes, dtype=np.float32)
  if b.ndim != 2 or b.shape[1] not in (4, 6):
    raise ValueError(f"boxes have shape {b.shape}; expected [n, 4] corners "
                     "(x1, y1, x2, y2) or the official [n, 6] norm_bb")
  if not np.all(np.isfinite(b)):
    raise ValueError("boxes hold NaN/inf")
  if b.shape[1] == 6:
    if image_size is not None:
      raise ValueError("6-column boxes are the official normalised norm_bb; "
                       "image_size applies to [n, 4] pixel boxes only")
    return np.ascontiguousarray(b)
  x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
  if np.any(x2 < x1) or np.any(y2 < y1):
    raise ValueError("boxes must be corners [x1, y1, x2, y2] with x2 >= x1 "
                     "and y2 >= y1 (not [x, y, w, h])")
  if image_size is None:
    if b.size and (b.min() < -_BOX_TOL or b.max() > 1 + _BOX_TOL):
      raise ValueError(
          f"boxes range over [{b.min():g}, {b.max():g}], not [0, 1]: pixel "
          "boxes need the image size, image_size=(width, height)")
    w, h = x2 - x1, y2 - y1
    return np.stack([x1, y1, x2, y2, w, h], axis=1).astype(np.float32)
  try:
    iw, ih = (float(v) for v in image_size)
  except (TypeError, ValueError) as e:
    raise ValueError(f"image_size must be (width, height), got "
                     f"{image_size!r}") from e
  if iw <= 0 or ih <= 0:
    raise ValueError(f"image_size must be positive (width, height), got "
                     f"{image_size!r}")
  iw, ih = np.float32(iw), np.float32(ih)
  # generate_npz.py: scaled_x + scaled_width, not x2 / W (the float32
  # rounding differs in the last bit).
  sw, sh = (x2 - x1) / iw, (y2 - y1) / ih
  sx, sy = x1 / iw, y1 / ih
  return np.stack([sx, sy, sx + sw, sy + sh, sw, sh], axis=1).astype(
      np.float32)


def box7(norm_bb: np.ndarray) -> np.ndarray:
  """[x1,y1,x2,y2,w,h] -> [x1,y1,x2,y2,w,h,w*h] in float32 (the official
  `torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], -1)`)."""
  bb = np.asarray(norm_bb, np.float32)
  return np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1)


def select_num_bb(conf, n: int, conf_th: float, min_bb: int, max_bb: int,
                  num_bb: int | None) -> int:
  """How many leading regions the official rule keeps (at most `n`).

  The same rule as `uniter_jax.data.schema.select_num_bb`; without
  confidences every region counts as confident, i.e. `min(n, max_bb)`.
  """
  if num_bb is not None:
    return min(int(num_bb), n)
  above = n if conf is None else int(np.sum(np.asarray(conf) > conf_th))
  return min(min(int(max_bb), max(int(min_bb), above)), n)


# ---------------------------------------------------------------------------
# The processor.
# ---------------------------------------------------------------------------
def _is_ids(x) -> bool:
  """A pre-tokenised text: a 1-d sequence of ints."""
  if isinstance(x, np.ndarray):
    return x.ndim == 1 and np.issubdtype(x.dtype, np.integer)
  return (isinstance(x, (list, tuple)) and len(x) > 0
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                  for v in x))


def _is_text(x) -> bool:
  return isinstance(x, str) or _is_ids(x)


def _is_image(x) -> bool:
  return isinstance(x, Regions) or (isinstance(x, Mapping)
                                    and "features" in x)


class Processor:
  """Captions and image regions -> a batch for any UNITER head.

  Args:
    vocab: the WordPiece vocabulary: a `vocab.txt` path or a list of tokens
      (line number / index = id), e.g. bert-base-cased's, or a word-level
      list such as the synthetic corpus's.
    max_txt_len: word pieces kept by `truncation=True` (official 60).
    truncation: False (default): keep the whole text, as the official
      inference does; True: keep the first `max_txt_len` word pieces.
    region_rule: `uniter_jax.data.RegionRule` or a dict of `conf_th`,
      `min_bb`, `max_bb`, `num_bb` (official defaults 0.2 / 10 / 100 /
      None).
    lowercase: lower-case (and strip accents) before WordPiece, for an
      uncased vocabulary; the official vocabulary is cased (False).
    max_position_embeddings: the model's position table (512); texts with
      more than this minus 2 word pieces cannot be embedded.
    img_dim: region feature size (2048).
    round_features_fp16: round features to float16 and back, as the official
      img_db and this project's image stores keep them (default True).
    round_boxes_fp16: round the 6 normalised box values to float16 first,
      as the official `.npz` files store `norm_bb` (default False: this
      project's image stores keep float32 boxes).
    pad_to_multiple_of: round Lt and Li up to a multiple of this (fewer
      distinct shapes, fewer compilations); None: the batch's longest.
  """

  def __init__(self, vocab: str | os.PathLike[str] | Sequence[str], *,
               max_txt_len: int = OFFICIAL_MAX_TXT_LEN,
               truncation: bool = False,
               region_rule=None,
               lowercase: bool = False,
               max_position_embeddings: int = MAX_POSITION_EMBEDDINGS,
               img_dim: int = FEAT_DIM,
               round_features_fp16: bool = True,
               round_boxes_fp16: bool = False,
               pad_to_multiple_of: int | None = None):
    if isinstance(vocab, (str, os.PathLike)):
      source = os.fspath(vocab)
      if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such vocabulary file (a "
                                "vocab.txt, one token a line)")
      vocab = read_vocab(source)
    else:
      source = "vocab"
      vocab = list(vocab)
    if not vocab or not all(isinstance(t, str) for t in vocab):
      raise ValueError(f"{source}: the vocabulary must be a non-empty list "
                       "of token strings")
    self.vocab = vocab
    self.special_ids = special_ids(vocab, source)
    tc = check_text_config({"max_txt_len": max_txt_len,
                            "region_rule": _rule_kwargs(region_rule),
                            "lowercase": lowercase})
    self.max_txt_len = tc["max_txt_len"]
    self.region_rule = tc["region_rule"]
    self.lowercase = tc["lowercase"]
    self.truncation = bool(truncation)
    self.max_position_embeddings = int(max_position_embeddings)
    self.img_dim = int(img_dim)
    self.round_features_fp16 = bool(round_features_fp16)
    self.round_boxes_fp16 = bool(round_boxes_fp16)
    if pad_to_multiple_of is not None and int(pad_to_multiple_of) < 1:
      raise ValueError(f"pad_to_multiple_of must be >= 1, got "
                       f"{pad_to_multiple_of}")
    self.pad_to_multiple_of = (None if pad_to_multiple_of is None
                               else int(pad_to_multiple_of))
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top
    # A dict vocabulary: the last of duplicate tokens wins, as BERT's
    # `load_vocab`. strip_accents=None follows `lowercase`, as BERT's
    # BasicTokenizer.
    self._tok = BertWordPieceTokenizer(
        {t: i for i, t in enumerate(vocab)}, lowercase=self.lowercase,
        clean_text=True, handle_chinese_chars=True, strip_accents=None)

  # -- construction --------------------------------------------------------
  @classmethod
  def from_pretrained(cls, path: str | os.PathLike[str], **overrides
                      ) -> "Processor":
    """The processor of an exported or converted directory.

    Reads `vocab.txt` and the stored `text_config` (max_txt_len, region
    rule, lower-casing) and the model's position-table size and feature
    size from `uniter_config.json`. A training workdir works too (its
    `export_flax/`). Keyword arguments override what is stored; pass
    `vocab=` for a directory exported without a vocabulary.
    """
    d = os.fspath(path)
    if not os.path.isfile(os.path.join(d, CONFIG_FILE)) and os.path.isfile(
        os.path.join(d, "export_flax", CONFIG_FILE)):
      d = os.path.join(d, "export_flax")
    meta_path = os.path.join(d, CONFIG_FILE)
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(
          f"{d}: not an exported uniter-jax model (no {CONFIG_FILE}); give "
          "the directory written by `python -m uniter_jax.convert to-flax` "
          "or a training run's export_flax/")
    with open(meta_path, encoding="utf-8") as f:
      try:
        meta = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from e
    vocab = overrides.pop("vocab", None)
    if vocab is None:
      vpath = os.path.join(d, VOCAB_FILE)
      if not os.path.isfile(vpath):
        raise FileNotFoundError(
            f"{d}: no {VOCAB_FILE} (exported without a vocabulary); pass "
            f"it: Processor.from_pretrained({d!r}, vocab='bert-base-cased/"
            "vocab.txt'), or convert with --vocab")
      vocab = read_vocab(vpath)
    tc = meta.get("text_config")
    tc = (official_text_config(meta.get("task")) if tc is None
          else check_text_config(tc, None, f"{meta_path}: text_config"))
    kwargs = {"max_txt_len": tc["max_txt_len"],
              "region_rule": tc["region_rule"],
              "lowercase": tc["lowercase"]}
    mc = meta.get("model_config") or {}
    if "max_position_embeddings" in mc:
      kwargs["max_position_embeddings"] = int(mc["max_position_embeddings"])
    if "img_dim" in mc:
      kwargs["img_dim"] = int(mc["img_dim"])
    kwargs.update(overrides)
    proc = cls(vocab, **kwargs)
    if tc.get("special_ids") and tc["special_ids"] != proc.special_ids:
      raise ValueError(f"{meta_path}: text_config special_ids "
                       f"{tc['special_ids']} disagree with the vocabulary's "
                       f"{proc.special_ids}")
    return proc

  @property
  def text_config(self) -> dict[str, Any]:
    """The settings `save_flax(text_config=...)` stores for this processor."""
    return make_text_config(max_txt_len=self.max_txt_len,
                            region_rule=self.region_rule,
                            special_ids=self.special_ids,
                            lowercase=self.lowercase)

  # -- text ----------------------------------------------------------------
  def tokenize(self, text: str) -> list[int]:
    """WordPiece ids of `text`, without [CLS]/[SEP] (the official txt_db's
    `input_ids`)."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a string, got {type(text).__name__}")
    # `bert_tokenize`: whitespace split, each word tokenised, empty results
    # dropped; the library's pre-tokenizer splits on whitespace first too.
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def _ids(self, text) -> list[int]:
    if isinstance(text, str):
      return self.tokenize(text)
    if not _is_ids(text):
      raise TypeError(f"a text is a string or a sequence of token ids, got "
                      f"{type(text).__name__}")
    ids = [int(v) for v in text]
    bad = [v for v in ids if not 0 <= v]
    if bad:
      raise ValueError(f"token ids must be >= 0, got {bad[:3]}")
    return ids

  def _limit(self) -> int:
    """Word pieces (CLS/SEP excluded) a row may hold."""
    hard = self.max_position_embeddings - 2
    if self.truncation and self.max_txt_len > 0:
      return min(self.max_txt_len, hard)
    return hard

  def text_row(self, segments: Sequence[tuple[Any, int]]
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """`[CLS] s1 [SEP] s2 [SEP] ..` ids and type ids of text segments.

    `segments`: (text or ids, type id) pairs. The type ids follow
    `data/vcr.py`: [CLS] takes the first segment's type, a [SEP] the type
    of the segment it ends. Type ids are None when all are 0 (the batch then
    has no `txt_type_ids`, as the official caption datasets).
    """
    sp = self.special_ids
    parts = [(self._ids(t), int(ty)) for t, ty in segments]
    body: list[int] = []
    types: list[int] = []
    for k, (ids, ty) in enumerate(parts):
      if k:
        body.append(sp["SEP"])
        types.append(ty)
      body.extend(ids)
      types.extend([ty] * len(ids))
    limit = self._limit()
    if len(body) > limit:
      if not self.truncation:
        raise ValueError(
            f"text of {len(body)} word pieces is longer than the model's "
            f"{self.max_position_embeddings} positions allow "
            f"({self.max_position_embeddings - 2} plus [CLS] and [SEP]); "
            "shorten it or pass truncation=True")
      body, types = body[:limit], types[:limit]
    first = parts[0][1] if parts else 0
    last = types[-1] if types else first
    ids = np.asarray([sp["CLS"]] + body + [sp["SEP"]], np.int32)
    tys = np.asarray([first] + types + [last], np.int32)
    return ids, (tys if tys.any() else None)

  # -- regions -------------------------------------------------------------
  def regions(self, features, boxes, *, image_size=None, conf=None
              ) -> Regions:
    """One image's regions after the official region rule.

    Args:
      features: [n, 2048] detector region features.
      boxes: [n, 4] corners (x1, y1, x2, y2), in pixels with `image_size`,
        else normalised; or the official [n, 6] `norm_bb`.
      image_size: (width, height) in pixels, as PIL's `Image.size`.
      conf: [n] detector confidences (the region rule's input); None: all
        regions count as confident.
    """
    feats = np.asarray(features)
    if feats.ndim != 2 or feats.shape[1] != self.img_dim:
      raise ValueError(f"features have shape {feats.shape}; expected "
                       f"[n, {self.img_dim}]")
    n = feats.shape[0]
    if n == 0:
      raise ValueError("an image needs at least one region")
    bb = norm_boxes(boxes, image_size)
    if bb.shape[0] != n:
      raise ValueError(f"{n} features but {bb.shape[0]} boxes")
    if conf is not None:
      conf = np.asarray(conf, np.float32).reshape(-1)
      if conf.shape[0] != n:
        raise ValueError(f"{n} features but {conf.shape[0]} confidences")
    r = self.region_rule
    k = select_num_bb(conf, n, r["conf_th"], r["min_bb"], r["max_bb"],
                      r["num_bb"])
    feats = np.asarray(feats[:k], np.float32)
    if self.round_features_fp16:
      with np.errstate(over="ignore"):
        f16 = feats.astype(np.float16)
      if not np.all(np.isfinite(f16)):
        raise ValueError("features exceed the float16 range (or hold NaN/"
                         "inf); pass round_features_fp16=False")
      feats = f16.astype(np.float32)
    elif not np.all(np.isfinite(feats)):
      raise ValueError("features hold NaN/inf")
    bb = bb[:k]
    if self.round_boxes_fp16:
      bb = bb.astype(np.float16).astype(np.float32)
    return Regions(np.ascontiguousarray(feats), box7(bb), n)

  def _image(self, img) -> Regions:
    if isinstance(img, Regions):
      return img
    if isinstance(img, Mapping) and "features" in img:
      extra = sorted(set(img) - {"features", "boxes", "image_size", "conf"})
      if extra or "boxes" not in img:
        raise ValueError(f"an image dict holds 'features', 'boxes' and "
                         f"optional 'image_size', 'conf'; got {sorted(img)}")
      return self.regions(img["features"], img["boxes"],
                          image_size=img.get("image_size"),
                          conf=img.get("conf"))
    raise TypeError(f"an image is a Processor.regions(...) result or a dict "
                    f"with 'features' and 'boxes', got {type(img).__name__}")

  # -- batches -------------------------------------------------------------
  def __call__(self, text, images, *, task: str | None = None,
               pad_to: tuple[int, int] | None = None
               ) -> dict[str, np.ndarray]:
    """A batch of text-image examples for the head `task`.

    Args:
      text: a caption (string or token ids) or a list of them.
      images: an image (`regions(...)` result or a dict of its arguments) or
        a list of them; for NLVR2 heads each example's image is a pair
        (img0, img1). One text with several images, or several texts with
        one image, pairs the single one with each of the others (e.g. one
        caption scored against many images).
      task: the head (`pretrain`, `vqa`, `ve`, `itm`, `re`, `vcr`,
        `pretrain-vcr`: one row per example; `nlvr2-paired`, `nlvr2-attn`:
        two rows per example; `nlvr2-triplet`: one row holding both
        images). None: one row per example.
      pad_to: (Lt, Li) slots to pad to (static shapes); default: the
        batch's longest (rounded up to `pad_to_multiple_of`).

    Returns:
      numpy arrays: `input_ids` [B, Lt], `position_ids` [B, Lt], `img_feat`
      [B, Li, 2048], `img_pos_feat` [B, Li, 7], `attn_masks` [B, Lt+Li],
      `txt_lens` [B], `num_bbs` [B] and, for NLVR2, `img_type_ids` [B, Li].
    """
    task = task or "pretrain"
    if task not in SINGLE_TASKS + PAIRED_TASKS + TRIPLET_TASKS:
      raise ValueError(f"unknown task {task!r}; expected one of "
                       f"{sorted(SINGLE_TASKS + PAIRED_TASKS + TRIPLET_TASKS)}"
                       )
    two = task in PAIRED_TASKS + TRIPLET_TASKS
    is_one = ((lambda x: isinstance(x, (list, tuple)) and len(x) == 2
               and all(_is_image(i) for i in x)) if two else _is_image)
    texts = [text] if _is_text(text) else list(text)
    imgs = [images] if is_one(images) else list(images)
    if not texts or not imgs:
      raise ValueError("need at least one text and one image")
    if len(texts) == 1 and len(imgs) > 1:
      texts = texts * len(imgs)
    elif len(imgs) == 1 and len(texts) > 1:
      imgs = imgs * len(texts)
    if len(texts) != len(imgs):
      raise ValueError(f"{len(texts)} texts for {len(imgs)} images: give one "
                       "image per text, or one of either")
    for i, im in enumerate(imgs):
      if not is_one(im):
        want = ("a pair (img0, img1) of images" if two else "an image")
        raise TypeError(f"example {i}: expected {want}, got "
                        f"{type(im).__name__}")
    rows = []
    cache: dict[int, Regions] = {}

    def image(x):
      if id(x) not in cache:
        cache[id(x)] = self._image(x)
      return cache[id(x)]

    for t, im in zip(texts, imgs):
      ids, _ = self.text_row([(t, 0)])
      if task in PAIRED_TASKS:
        for k, one in enumerate(im):
          r = image(one)
          rows.append(self._row(ids, None, r.img_feat, r.img_pos_feat,
                                np.full(r.num_bb, k + 1, np.int32)))
      elif task in TRIPLET_TASKS:
        a, b = image(im[0]), image(im[1])
        rows.append(self._row(
            ids, None, np.concatenate([a.img_feat, b.img_feat]),
            np.concatenate([a.img_pos_feat, b.img_pos_feat]),
            np.concatenate([np.full(a.num_bb, 1, np.int32),
                            np.full(b.num_bb, 2, np.int32)])))
      else:
        r = image(im)
        rows.append(self._row(ids, None, r.img_feat, r.img_pos_feat))
    return self.collate(rows, rows_per_example=2 if task in PAIRED_TASKS
                        else 1, pad_to=pad_to)

  def vcr(self, question, choices, image, *, answer=None,
          pad_to: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """A VCR batch: one row per choice, as `data/vcr.py` builds them.

    Q->A (`answer` None): rows `[CLS] q [SEP] a_i [SEP]`, `txt_type_ids` 0
    on [CLS] and the question, 2 on the rest. QA->R (`answer` = the chosen
    answer's text): `[CLS] q [SEP] answer [SEP] r_i [SEP]`, types 0 / 2 / 3.
    Texts may be strings or token ids (the official VCR txt_db holds ids,
    with the 81 extra person-tag tokens of the VCR vocabulary).

    Args:
      question: one question, or a list (one per example).
      choices: the example's choices (4), or a list of such lists; every
        example needs the same number (rows per example).
      image: the example's image (or a list); VCR's ground-truth and
        detected regions are one image here: concatenate them first
        (`Regions` from `regions(np.concatenate(...), ...)`).
      answer: for QA->R, the answer (or a list, one per example).
    """
    single = _is_text(question)
    qs = [question] if single else list(question)
    chs = [choices] if single else list(choices)
    ims = [image] if single else list(image)
    ans = ([answer] if single else list(answer)) if answer is not None \
        else [None] * len(qs)
    if not len(qs) == len(chs) == len(ims) == len(ans):
      raise ValueError(f"{len(qs)} questions, {len(chs)} choice lists, "
                       f"{len(ims)} images, {len(ans)} answers: give one of "
                       "each per example")
    n_choices = {len(c) for c in chs}
    if len(n_choices) != 1 or 0 in n_choices:
      raise ValueError(f"every example needs the same number of choices, "
                       f"got {sorted(n_choices)}")
    rows = []
    for q, cs, im, a in zip(qs, chs, ims, ans):
      r = self._image(im)
      for c in cs:
        segs = [(q, 0), (c, 2)] if a is None else [(q, 0), (a, 2), (c, 3)]
        ids, tys = self.text_row(segs)
        if tys is None:
          tys = np.zeros_like(ids)
        rows.append(self._row(ids, tys, r.img_feat, r.img_pos_feat))
    return self.collate(rows, rows_per_example=n_choices.pop(),
                        pad_to=pad_to)

  @staticmethod
  def _row(ids, txt_type_ids, img_feat, img_pos_feat, img_type_ids=None
           ) -> dict[str, np.ndarray]:
    row = {"input_ids": ids, "img_feat": img_feat,
           "img_pos_feat": img_pos_feat}
    if txt_type_ids is not None:
      row["txt_type_ids"] = txt_type_ids
    if img_type_ids is not None:
      row["img_type_ids"] = img_type_ids
    return row

  def collate(self, rows: Sequence[Mapping[str, np.ndarray]], *,
              rows_per_example: int = 1,
              pad_to: tuple[int, int] | None = None
              ) -> dict[str, np.ndarray]:
    """Pads row dicts (`input_ids` with [CLS]/[SEP], `img_feat`,
    `img_pos_feat`, optional `txt_type_ids` / `img_type_ids`) into a batch
    with the pipeline's collate function."""
    # Lazy: the data package pulls in the input pipeline (grain).
    from uniter_jax.data import buckets  # pylint: disable=g-import-not-at-top
    from uniter_jax.data import collate as collate_lib  # pylint: disable=g-import-not-at-top
    from uniter_jax.data import contract  # pylint: disable=g-import-not-at-top
    if not rows:
      raise ValueError("no rows to collate")
    lt = max(len(r["input_ids"]) for r in rows)
    li = max(len(r["img_feat"]) for r in rows)
    if pad_to is not None:
      plt, pli = (int(v) for v in pad_to)
      if plt < lt or pli < li:
        raise ValueError(f"pad_to={tuple(pad_to)} is smaller than the batch "
                         f"needs: Lt >= {lt}, Li >= {li}")
      lt, li = plt, pli
    elif self.pad_to_multiple_of:
      m = self.pad_to_multiple_of
      lt, li = -(-lt // m) * m, -(-li // m) * m
    return collate_lib.collate(
        [dict(r) for r in rows], buckets.Bucket(lt, li, len(rows)),
        fields=contract.BASE_FIELDS, rows_per_example=rows_per_example)

  def __repr__(self) -> str:
    r = self.region_rule
    rule = (f"num_bb={r['num_bb']}" if r["num_bb"] is not None else
            f"conf_th={r['conf_th']}, min_bb={r['min_bb']}, "
            f"max_bb={r['max_bb']}")
    return (f"Processor(vocab={len(self.vocab)} tokens, max_txt_len="
            f"{self.max_txt_len}, truncation={self.truncation}, {rule}, "
            f"lowercase={self.lowercase})")


__all__ = ["Processor", "Regions", "box7", "check_text_config",
           "make_text_config", "norm_boxes", "official_text_config",
           "read_vocab", "select_num_bb", "special_ids",
           "text_config_from_meta", "write_vocab"]
