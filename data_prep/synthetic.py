"""The synthetic image-text corpus: the project's embedded default data.

Each image holds a few objects of `num_classes` classes. An object region's
feature is its class prototype plus a colour prototype plus noise (ReLU'd, so
it looks like a detector's pooled feature); the other regions are background
clutter. Boxes are random, confidences are high for objects and low for
clutter, and the detector soft labels put most mass on the right class index
(class c -> label c + 1; 0 is background) most of the time. Captions name the
image's objects, their colours (each with probability `colour_prob`), sizes
(from the box area) and a spatial relation computed from the boxes, e.g.
"a small red dog left of a blue car .".
So image-text matching, masked language modelling of the object / colour /
relation words and region classification are all learnable from the data.

Everything is a pure function of (config, seed, image index): the image and
text builders regenerate the same scenes independently, and a build is
deterministic for a seed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_prep import common
from uniter_jax.data import schema

CLASSES = ("dog", "cat", "car", "bus", "tree", "house", "bird", "horse",
           "boat", "chair", "table", "cup", "bottle", "man", "woman", "child",
           "bike", "train", "kite", "ball", "sign", "lamp", "clock", "phone",
           "sheep", "cow", "plane", "truck", "bench", "bag", "shoe", "hat")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown",
           "orange")
SIZES = ("small", "large")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FUNCTION_WORDS = (".", ",", "a", "there", "is", "and", "in", "the", "picture",
                  "of", "left", "right", "above", "below", "next", "to",
                  "with", "an", "image", "photo")
LARGE_AREA = 0.12    # box area (normalised) above which an object is "large"
P_LABEL_RIGHT = 0.85  # how often the detector's top soft label is right


def vocab() -> list[str]:
  """The synthetic WordPiece vocabulary; index = token id ([PAD] = 0)."""
  return list(SPECIALS + FUNCTION_WORDS + COLOURS + SIZES + CLASSES)


def v_range() -> tuple[int, int]:
  """[lo, hi): ids MLM may replace a token with (all non-special tokens)."""
  return len(SPECIALS), len(vocab())


def write_vocab_file(path: str) -> None:
  """Writes `vocab.txt` (one token a line, line number = id)."""
  with open(path, "w") as f:
    f.write("\n".join(vocab()) + "\n")


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Size and seed of the synthetic corpus (shared by images and text)."""
  seed: int = 0
  num_train_images: int = 512
  num_val_images: int = 128
  captions_per_image: int = 5
  num_classes: int = 24
  min_regions: int = 10
  max_regions: int = 36
  min_objects: int = 2
  max_objects: int = 5
  noise: float = 0.5   # feature noise scale (prototype entries are ~0.8)
  # Probability that a caption names an object's colour. Below 1, colour
  # alone cannot decide a match, so a model must learn the object classes.
  colour_prob: float = 1.0


DEFAULT_CONFIG = SyntheticConfig(name="default",
                                 description="512 train / 128 val images.")
# The demo's corpus: fewer objects and fewer, cleaner regions, so that a
# small model learns image-text matching from scratch in minutes on a CPU.
# Captions name an object's colour only a quarter of the time. When every
# phrase names its colour, a small model learns the 8 colours long before
# the classes and stalls near 85% ITM accuracy (a random image often holds
# the colours); at one half, some seeds still stall near 83-85% on a model
# that matches colours and only part of the classes.
DEMO_CONFIG = SyntheticConfig(name="demo", num_classes=12, max_objects=3,
                              min_regions=6, max_regions=12, noise=0.3,
                              colour_prob=0.25,
                              description="512 train / 128 val images, 12 "
                              "classes, 6-12 regions, colours named a "
                              "quarter of the time (the CPU demo).")
PRESETS = {}  # filled below
TINY_CONFIG = SyntheticConfig(name="tiny", num_train_images=24,
                              num_val_images=8, captions_per_image=3,
                              description="For tests and smoke runs.")
PRESETS.update(default=DEFAULT_CONFIG, tiny=TINY_CONFIG, demo=DEMO_CONFIG)


def _check_config(cfg: SyntheticConfig) -> None:
  if not 1 <= cfg.num_classes <= len(CLASSES):
    raise ValueError(f"num_classes {cfg.num_classes} not in [1, "
                     f"{len(CLASSES)}]")
  if not 2 <= cfg.min_objects <= cfg.max_objects <= cfg.num_classes:
    raise ValueError("need 2 <= min_objects <= max_objects <= num_classes")
  if not 2 * cfg.max_objects <= cfg.min_regions <= cfg.max_regions:
    raise ValueError("need 2 * max_objects <= min_regions <= max_regions")


def image_key(idx: int) -> str:
  return f"synthetic_{idx:07d}"


def split_images(cfg: SyntheticConfig) -> dict[str, range]:
  """Image indices of each split (train and val hold different images)."""
  n = cfg.num_train_images
  return {"train": range(0, n), "val": range(n, n + cfg.num_val_images)}


def prototypes(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray,
                                               np.ndarray]:
  """(class [K, D], colour [C, D], background [D]) feature prototypes."""
  rng = np.random.default_rng([cfg.seed, 7919])
  d = schema.FEAT_DIM
  cls = np.maximum(rng.normal(0.0, 1.0, (cfg.num_classes, d)), 0.0)
  col = np.maximum(rng.normal(0.0, 0.6, (len(COLOURS), d)), 0.0)
  bg = np.maximum(rng.normal(0.0, 0.5, (d,)), 0.0)
  return cls.astype(np.float32), col.astype(np.float32), bg.astype(np.float32)


def scene(cfg: SyntheticConfig, idx: int) -> dict[str, Any]:
  """The layout of image `idx`: objects (class, colour, box) and clutter."""
  rng = np.random.default_rng([cfg.seed, idx, 0])
  n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
  classes = rng.choice(cfg.num_classes, n_obj, replace=False)
  colours = rng.integers(0, len(COLOURS), n_obj)
  wh = rng.uniform(0.1, 0.6, (n_obj, 2))
  xy = rng.uniform(0.0, 1.0, (n_obj, 2)) * (1.0 - wh)
  boxes = np.concatenate([xy, xy + wh], axis=1)          # x1 y1 x2 y2
  n_reg = int(rng.integers(cfg.min_regions, cfg.max_regions + 1))
  # Each object is detected once or twice (a jittered duplicate box).
  dup = rng.random(n_obj) < 0.4
  width, height = [(640, 480), (480, 640), (500, 375), (640, 427)][
      int(rng.integers(0, 4))]
  return {"classes": classes, "colours": colours, "boxes": boxes,
          "dup": dup, "n_regions": n_reg, "image_w": width,
          "image_h": height}


def _norm_bb(boxes: np.ndarray) -> np.ndarray:
  boxes = np.clip(boxes, 0.0, 1.0)
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  return np.concatenate([boxes, w[:, None], h[:, None]], 1).astype(np.float32)


def image_record(cfg: SyntheticConfig, idx: int, protos=None
                 ) -> dict[str, Any]:
  """The image-store record of image `idx` (schema fields)."""
  protos = prototypes(cfg) if protos is None else protos
  p_cls, p_col, p_bg = protos
  sc = scene(cfg, idx)
  rng = np.random.default_rng([cfg.seed, idx, 1])
  d, n_lab = schema.FEAT_DIM, schema.NUM_LABELS
  # Object regions (with duplicates), then clutter.
  obj_of_region = []
  boxes = []
  for o, box in enumerate(sc["boxes"]):
    obj_of_region.append(o)
    boxes.append(box)
    if sc["dup"][o]:
      obj_of_region.append(o)
      boxes.append(box + rng.normal(0.0, 0.02, 4))
  n_obj_reg = len(obj_of_region)
  n_clutter = sc["n_regions"] - n_obj_reg
  wh = rng.uniform(0.05, 0.5, (n_clutter, 2))
  xy = rng.uniform(0.0, 1.0, (n_clutter, 2)) * (1.0 - wh)
  boxes = np.concatenate([np.asarray(boxes).reshape(-1, 4),
                          np.concatenate([xy, xy + wh], 1)], 0)
  boxes = np.sort(boxes.reshape(-1, 2, 2), axis=1).reshape(-1, 4)
  n = sc["n_regions"]
  feats = np.empty((n, d), np.float32)
  soft = np.zeros((n, n_lab), np.float32)
  conf = np.empty((n,), np.float32)
  for r in range(n):
    noise = rng.normal(0.0, cfg.noise, d)
    if r < n_obj_reg:
      o = obj_of_region[r]
      c = int(sc["classes"][o])
      feats[r] = p_cls[c] + p_col[sc["colours"][o]] + noise
      conf[r] = rng.uniform(0.5, 1.0)
      top = c + 1 if rng.random() < P_LABEL_RIGHT else int(
          rng.integers(1, cfg.num_classes + 1))
    else:
      mix = rng.choice(cfg.num_classes, 2)
      feats[r] = p_bg + 0.25 * p_cls[mix].sum(0) + noise
      conf[r] = rng.uniform(0.01, 0.35)
      top = 0 if rng.random() < 0.7 else int(rng.integers(1, n_lab))
    main = rng.uniform(0.5, 0.9)
    others = rng.choice(n_lab, 3, replace=False)
    soft[r, others] += (1.0 - main) * rng.dirichlet(np.ones(3))
    soft[r, top] += main
  feats = np.maximum(feats, 0.0)
  order = np.argsort(-conf, kind="stable")   # detector output: by confidence
  return {
      "img_key": image_key(idx),
      "num_bb": n,
      "features": feats[order],
      "norm_bb": _norm_bb(boxes[order]),
      "conf": conf[order],
      "soft_labels": soft[order],
      "image_w": sc["image_w"],
      "image_h": sc["image_h"],
  }


def _relation(box_a: np.ndarray, box_b: np.ndarray) -> str:
  ca = (box_a[:2] + box_a[2:]) / 2
  cb = (box_b[:2] + box_b[2:]) / 2
  dx, dy = cb - ca
  if max(abs(dx), abs(dy)) < 0.1:
    return "next to"
  if abs(dx) >= abs(dy):
    return "left of" if dx > 0 else "right of"
  return "above" if dy > 0 else "below"   # y grows downwards


def _phrase(sc, o: int, rng, with_size: bool, colour_prob: float) -> str:
  c = CLASSES[int(sc["classes"][o])]
  col = COLOURS[int(sc["colours"][o])]
  x1, y1, x2, y2 = sc["boxes"][o]
  size = SIZES[int((x2 - x1) * (y2 - y1) > LARGE_AREA)]
  words = ["a"] + ([size] if with_size and rng.random() < 0.5 else [])
  # No draw at colour_prob 1: the presets built before the field existed
  # keep their exact captions.
  if colour_prob >= 1.0 or rng.random() < colour_prob:
    words.append(col)
  return " ".join(words + [c])


def captions(cfg: SyntheticConfig, idx: int) -> list[str]:
  """`captions_per_image` captions of image `idx`, each naming its objects."""
  sc = scene(cfg, idx)
  rng = np.random.default_rng([cfg.seed, idx, 2])
  n_obj = len(sc["classes"])

  def ph(o, with_size):
    return _phrase(sc, o, rng, with_size, cfg.colour_prob)

  out = []
  for _ in range(cfg.captions_per_image):
    kind = int(rng.integers(0, 4))
    a, b = rng.choice(n_obj, 2, replace=False)
    if kind == 0:
      rel = _relation(sc["boxes"][a], sc["boxes"][b])
      text = (f"{ph(a, True)} {rel} "
              f"{ph(b, True)} .")
    elif kind == 1:
      text = (f"there is {ph(a, True)} and "
              f"{ph(b, True)} in the picture .")
    elif kind == 2:
      c = int(rng.choice(n_obj))
      text = f"{ph(c, True)} in the image ."
    else:
      rel = _relation(sc["boxes"][a], sc["boxes"][b])
      others = [o for o in range(n_obj) if o not in (a, b)]
      tail = (f" , with {ph(others[0], False)}"
              if others else "")
      text = (f"a photo of {ph(a, False)} {rel} "
              f"{ph(b, False)}{tail} .")
    out.append(text)
  return out


def tokenize(text: str) -> list[int]:
  """Word-level ids of a synthetic caption (every word is in the vocab)."""
  ids = {w: i for i, w in enumerate(vocab())}
  return [ids[w] for w in text.split()]


def text_records(cfg: SyntheticConfig, split: str) -> Iterator[dict]:
  """Caption records of a split: several per image, no target."""
  for idx in split_images(cfg)[split]:
    for j, text in enumerate(captions(cfg, idx)):
      yield {"id": f"{split}_{idx}_{j}", "input_ids": tokenize(text),
             "img_keys": [image_key(idx)], "target": None}


def _text_meta(cfg: SyntheticConfig) -> dict[str, Any]:
  voc = vocab()
  return {"task": "captions", "CLS": voc.index("[CLS]"),
          "SEP": voc.index("[SEP]"), "MASK": voc.index("[MASK]"),
          "UNK": voc.index("[UNK]"), "PAD": voc.index("[PAD]"),
          "v_range": list(v_range()), "vocab_size": len(voc),
          "vocab": voc, "max_txt_len": -1,
          "img_store": f"uniter_synthetic_images/{cfg.name}:1.0.0"}


class UniterSyntheticImages(common.ImageStoreBuilder):
  """Image store of the synthetic corpus (train and val images together)."""

  BUILDER_CONFIGS = [DEFAULT_CONFIG, TINY_CONFIG, DEMO_CONFIG]
  SOURCE = "synthetic"

  def _image_meta(self):
    cfg = self.builder_config
    _check_config(cfg)
    return {"has_soft_labels": True, "db_cut": None,
            "config": config_dict(cfg)}

  def _total(self):
    cfg = self.builder_config
    return cfg.num_train_images + cfg.num_val_images

  def _iter_images(self, dl_manager):
    cfg = self.builder_config
    protos = prototypes(cfg)
    for split_range in split_images(cfg).values():
      for idx in split_range:
        yield image_record(cfg, idx, protos)


class UniterSyntheticText(common.TextBuilder):
  """Captions of the synthetic corpus: splits `train` and `val`."""

  BUILDER_CONFIGS = [DEFAULT_CONFIG, TINY_CONFIG, DEMO_CONFIG]
  SOURCE = "synthetic"

  def _text_meta(self, dl_manager):
    cfg = self.builder_config
    _check_config(cfg)
    meta = _text_meta(cfg)
    meta["config"] = config_dict(cfg)
    return meta

  def _split_iters(self, dl_manager):
    cfg = self.builder_config
    return {s: text_records(cfg, s) for s in ("train", "val")}


def config_dict(cfg: SyntheticConfig) -> dict[str, Any]:
  """The fields that decide a build's content (stored in its metadata)."""
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(
      SyntheticConfig) if f.name not in ("description", "release_notes",
                                          "supported_versions", "tags",
                                          "version")}
