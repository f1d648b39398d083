"""Writers of small files in the official formats, for data_prep tests.

They follow the official writers' facts (see docs/data_prep.md): img_db
values are msgpack dicts (msgpack_numpy, use_bin_type) or savez_compressed
bytes of fp16-cast arrays, with `__keys__`; txt_db values are
lz4(msgpack(dict)) with meta.json / id2len.json / txt2img.json /
img2txts.json; BUTD TSV lines hold base64 float32 arrays.
"""
from __future__ import annotations

import base64
import collections
import io
import json
import os

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np

# A small cased BERT-like vocabulary: specials, "!" (v_range start), words.
VOCAB = (["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!",
          ".", ",", "?", "a", "the", "dog", "cat", "run", "##s",
          "on", "grass", "what", "color", "is", "Dog", "red", "blue", "sits",
          "man", "##ing", "play", "ball", "two", "yes", "no"])


def write_vocab(path: str, vocab=VOCAB) -> str:
  with open(path, "w") as f:
    f.write("\n".join(vocab) + "\n")
  return path


def bert_meta(vocab=VOCAB) -> dict:
  """meta.json as `prepro.py` writes it for `vocab`."""
  ix = {t: i for i, t in enumerate(vocab)}
  return {"UNK": ix["[UNK]"], "CLS": ix["[CLS]"], "SEP": ix["[SEP]"],
          "MASK": ix["[MASK]"], "v_range": [ix["!"], len(vocab)],
          "toker": "fixture-cased"}


def make_images(n: int, seed: int = 0, min_bb: int = 3, max_bb: int = 12,
                soft: bool = True, prefix: str = "img") -> dict[str, dict]:
  """{fname: arrays} like one BUTD npz per image (float32)."""
  rng = np.random.default_rng(seed)
  out = {}
  for i in range(n):
    k = int(rng.integers(min_bb, max_bb + 1))
    xy = rng.uniform(0, 0.5, (k, 2))
    wh = rng.uniform(0.1, 0.5, (k, 2))
    d = {"features": rng.uniform(0, 5, (k, 2048)).astype(np.float32),
         "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float32),
         "conf": rng.uniform(0, 1, (k,)).astype(np.float32)}
    if soft:
      s = rng.uniform(0, 1, (k, 1601)).astype(np.float32)
      d["soft_labels"] = s / s.sum(1, keepdims=True)
    out[f"{prefix}_{i:04d}.npz"] = d
  return out


def nbb_rule(conf, conf_th, min_bb, max_bb):
  """The official `_compute_nbb` (may exceed the stored count)."""
  return int(min(max_bb, max(min_bb, int((conf > conf_th).sum()))))


def write_img_db(root: str, images: dict[str, dict], variant: str = "dyn",
                 compressed: bool = False, conf_th=0.2, max_bb=100,
                 min_bb=10, num_bb=36, raw_override: dict | None = None
                 ) -> str:
  """Writes `root/<db name>` as convert_imgdir.py; returns the db folder.

  variant: "dyn" (feat_th.._max.._min.. + nbb json), "fixed" (feat_numbbN)
  or "all". raw_override: {fname: bytes} stored instead of the encoding.
  """
  if variant == "dyn":
    name = f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
  elif variant == "fixed":
    name = f"feat_numbb{num_bb}"
  else:
    name = "all"
  if compressed:
    name += "_compressed"
  db_dir = os.path.join(root, name)
  os.makedirs(db_dir, exist_ok=True)
  env = lmdb.open(db_dir, map_size=1 << 30)
  name2nbb = {}
  with env.begin(write=True) as txn:
    for fname, arrs in images.items():
      if variant == "dyn":
        nbb = nbb_rule(arrs["conf"], conf_th, min_bb, max_bb)
      elif variant == "fixed":
        nbb = num_bb
      else:
        nbb = None
      dump = {k: (v.astype(np.float16) if v.dtype == np.float32 else v)[:nbb]
              for k, v in arrs.items()}
      if compressed:
        with io.BytesIO() as w:
          np.savez_compressed(w, **dump)
          raw = w.getvalue()
      else:
        raw = msgpack.dumps(dump, use_bin_type=True,
                            default=msgpack_numpy.encode)
      if raw_override and fname in raw_override:
        raw = raw_override[fname]
      txn.put(fname.encode(), raw)
      name2nbb[fname] = nbb
    txn.put(b"__keys__", json.dumps(list(images)).encode())
  env.close()
  if variant == "dyn":
    with open(os.path.join(root, f"nbb_th{conf_th}_max{max_bb}_min{min_bb}"
                           ".json"), "w") as f:
      json.dump(name2nbb, f)
  return db_dir


def write_txt_db(db_dir: str, examples: dict[str, dict], meta=None,
                 raw_override: dict | None = None,
                 id2len_override: dict | None = None) -> str:
  """Writes an official txt_db folder (LMDB + side files)."""
  os.makedirs(db_dir, exist_ok=True)
  env = lmdb.open(db_dir, map_size=1 << 28)
  id2len, txt2img, img2txts = {}, {}, collections.defaultdict(list)
  with env.begin(write=True) as txn:
    for rid, ex in examples.items():
      raw = lz4.frame.compress(msgpack.dumps(
          ex, use_bin_type=True, default=msgpack_numpy.encode))
      if raw_override and rid in raw_override:
        raw = raw_override[rid]
      txn.put(rid.encode(), raw)
      id2len[rid] = len(ex["input_ids"])
      txt2img[rid] = ex["img_fname"]
      if isinstance(ex["img_fname"], str):
        img2txts[ex["img_fname"]].append(rid)
  env.close()
  id2len.update(id2len_override or {})
  for name, obj in [("meta.json", meta or bert_meta()),
                    ("id2len.json", id2len), ("txt2img.json", txt2img),
                    ("img2txts.json", img2txts)]:
    with open(os.path.join(db_dir, name), "w") as f:
      json.dump(obj, f)
  return db_dir


def _b64(a: np.ndarray) -> str:
  return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def write_butd_tsv(path: str, images: dict[str, dict], layout: int = 6
                   ) -> dict[str, dict]:
  """Writes a TSV (layout 6, 7 or 10 columns); returns the pixel boxes etc.

  `images` values need `features` and `conf` (and `soft_labels` for 7).
  """
  rng = np.random.default_rng(1)
  truth = {}
  with open(path, "w") as f:
    for key, arrs in images.items():
      n = arrs["features"].shape[0]
      w, h = int(rng.integers(300, 700)), int(rng.integers(300, 700))
      x1 = rng.uniform(0, w / 2, n)
      y1 = rng.uniform(0, h / 2, n)
      boxes = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, n),
                        y1 + rng.uniform(5, h / 2, n)], 1).astype(np.float32)
      feats = arrs["features"].astype(np.float32)
      if layout in (6, 7):
        cols = [key, str(w), str(h), str(n), _b64(boxes), _b64(feats)]
        if layout == 7:
          cols.append(_b64(arrs["soft_labels"].astype(np.float32)))
      else:
        ids = np.arange(n, dtype=np.int64)
        cols = [key, str(h), str(w), _b64(ids),
                _b64(arrs["conf"].astype(np.float32)), _b64(ids),
                _b64(arrs["conf"].astype(np.float32)), str(n),
                _b64(boxes), _b64(feats)]
      f.write("\t".join(cols) + "\n")
      truth[key] = {"w": w, "h": h, "boxes": boxes}
  return truth


def write_coco_captions(path: str, anns: list[tuple[int, int, str]]) -> None:
  """anns: (annotation id, image id, caption)."""
  data = {"images": [{"id": i} for i in sorted({a[1] for a in anns})],
          "annotations": [{"id": a, "image_id": i, "caption": c}
                          for a, i, c in anns]}
  with open(path, "w") as f:
    json.dump(data, f)


def write_vqa(q_path: str, a_path: str | None,
              qs: list[tuple[int, int, str, list[str]]]) -> None:
  """qs: (question id, image id, question, 10 answers)."""
  with open(q_path, "w") as f:
    json.dump({"questions": [{"question_id": q, "image_id": i,
                              "question": t} for q, i, t, _ in qs]}, f)
  if a_path:
    with open(a_path, "w") as f:
      json.dump({"annotations": [
          {"question_id": q, "image_id": i,
           "answers": [{"answer": a, "answer_id": j + 1}
                       for j, a in enumerate(ans)]}
          for q, i, _, ans in qs]}, f)
