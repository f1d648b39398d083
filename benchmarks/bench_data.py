"""Input pipeline throughput vs the official LMDB reading path, and padding.

Prints, for images with 36 and with 100 regions:
  * examples per CPU-second of `uniter_jax.data` (TFDS ArrayRecord -> join ->
    bucketed, padded numpy batches), run in the main thread: "pipeline" with
    the default float32 `img_feat` (the batch contract), "pipeline_fp16" with
    `img_feat_dtype="float16"` (features cast on the device instead), and
    "pipeline_dicts": float32 through the per-example path that task ops use
    (an identity op; per-example fp32 dicts, then collate). Neither side
    runs masking ops;
  * examples per CPU-second of the official way of reading the same
    examples: an official-format txt_db (LMDB, lz4-compressed msgpack) and
    img_db (LMDB; plain msgpack, the official default, and npz-compressed,
    `--compressed_db`) written in a temp dir from the very same records
    (features, boxes, confidences and soft labels), decoded and collated as
    DetectFeatTxtTokDataset + mlm_collate do (torch tensors, pad to the batch
    max, gather_index), on the same batch compositions;
  * the padding fraction of the bucketed batches (synthetic corpus, and a
    realistic length distribution: COCO-like captions with 10..100 or 36
    regions, for several bucket counts);
  * ITM and MLM rows: `uniter_jax.data` with the real task ops
    (`masking.itm_op` / `masking.mlm_op`, the tasks' batch ops and batch
    contract) against the official ITM and MLM loaders on the same batch
    compositions: by default our re-implementation of them (below:
    `ItmDataset.new_epoch` drawing labels and negative images per epoch,
    `ItmDataset` + `itm_ot_collate`, `MlmDataset.random_word` +
    `mlm_collate`, over the plain msgpack img_db); with `--official_repo
    DIR`, the official classes themselves imported from a checkout of
    ChenRocks/UNITER and run on the same LMDB files (horovod, and toolz /
    cytoolz when not installed, are replaced by small stand-ins: see
    `import_official`). The official ITM row counts its batches; its
    per-epoch `new_epoch` (a text read per example) is timed on its own
    and printed as a second ratio.
  * the floor of those rows: per example, what any loader reading through
    the array_record library and protobuf must do at the least (read the
    image record; parse it; write its row of the batch, fp32 or fp16), timed
    in the same round-robin, and the most ours / official could reach with
    nothing else on our side (official per-example time / floor).

`--malloc_tuned` runs the whole benchmark (both sides, one process) with
glibc's `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**30` (no fresh mmap for
large blocks, freed memory kept), by executing itself again with them; the
first line printed says which allocator setting was used.

"Per core" = examples / CPU time of this process (`time.process_time`, all
threads), best of `--reps` rounds after a warm-up, the variants taking
turns within a round; both sides run in one thread (torch and OpenMP set to
1 thread) and drop each batch once made, as a training loop would. CPU time rather than wall time,
because the machine may be shared: other processes' load inflates wall time
far more than CPU time. Wall-time rates are printed too.

Usage: python benchmarks/bench_data.py [--images 150] [--captions 5]
         [--malloc_tuned] [--official_repo DIR] [--tasks itm,mlm]
Not a test: figures are ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import itertools
import json
import os
import random
import sys
import tempfile
import time
import types

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np



def build_synthetic(data_dir: str, n_regions: int, images: int,
                    captions: int) -> str:
  from data_prep import common, synthetic  # pylint: disable=g-import-not-at-top
  name = f"bench{n_regions}"
  cfg = dataclasses.replace(
      synthetic.DEFAULT_CONFIG, name=name, num_train_images=images,
      num_val_images=2, captions_per_image=captions, min_regions=n_regions,
      max_regions=n_regions)
  for b in (synthetic.UniterSyntheticImages, synthetic.UniterSyntheticText):
    common.build(b(config=cfg, data_dir=data_dir))
  return name


# -- the official reading path (own code, same formats and steps) ------------
def _official_img_db_name(rule) -> tuple[str, str | None]:
  """(LMDB folder name, nbb json name or None) that the official
  `DetectFeatLmdb` opens for our region rule (uncompressed)."""
  if rule.num_bb is not None:
    return f"feat_numbb{rule.num_bb}", None
  tag = f"th{rule.conf_th}_max{rule.max_bb}_min{rule.min_bb}"
  return f"feat_{tag}", f"nbb_{tag}.json"


def write_official(data, data_dir: str, out_dir: str, compress: bool
                   ) -> tuple[str, str]:
  """Writes txt_db / img_db LMDBs holding the same records as `data`.

  Laid out as the official loader reads them: the txt_db folder is the
  LMDB environment plus `id2len.json`, `txt2img.json`, `img2txts.json` and
  `meta.json`; the img_db folder holds the LMDB `feat_numbb<N>` (fixed N
  regions; else `feat_th.._max.._min..` and its `nbb_*.json`), with
  `_compressed` added for npz. Returns (txt_db folder, image LMDB folder);
  what exists already is kept.
  """
  os.makedirs(out_dir, exist_ok=True)
  # One txt_db per variant: LMDB opens an environment once per process.
  suffix = "npz" if compress else "mp"
  txt_dir = os.path.join(out_dir, "txt_db_" + suffix)
  img_root = os.path.join(out_dir, "img_db_" + suffix)
  db_name, nbb_name = _official_img_db_name(data.store.rule)
  img_dir = os.path.join(img_root,
                         db_name + ("_compressed" if compress else ""))
  if not os.path.exists(txt_dir):
    env = lmdb.open(txt_dir, map_size=1 << 34)
    id2len, txt2img, img2txts = {}, {}, {}
    with env.begin(write=True) as txn:
      for i in range(len(data.text)):
        rec = data.text._source[int(data.text.records[i])]  # pylint: disable=protected-access
        id_, fname = rec["id"].decode(), rec["img_keys"][0].decode()
        val = {"input_ids": [int(x) for x in rec["input_ids"]],
               "img_fname": fname}
        txn.put(rec["id"], lz4.frame.compress(
            msgpack.dumps(val, use_bin_type=True)))
        id2len[id_] = len(val["input_ids"])
        txt2img[id_] = fname
        img2txts.setdefault(fname, []).append(id_)
    env.close()
    sp = data.text.special
    meta = {"CLS": sp["CLS"], "SEP": sp["SEP"], "MASK": sp["MASK"],
            "v_range": list(data.text.v_range)}
    for fname, obj in (("id2len", id2len), ("txt2img", txt2img),
                       ("img2txts", img2txts), ("meta", meta)):
      with open(os.path.join(txt_dir, fname + ".json"), "w") as f:
        json.dump(obj, f)
  if os.path.exists(img_dir):
    return txt_dir, img_dir
  os.makedirs(img_root, exist_ok=True)
  if nbb_name is not None:
    with open(os.path.join(img_root, nbb_name), "w") as f:
      json.dump({k: int(n) for k, n in zip(data.store.keys,
                                           data.store.num_bbs())}, f)
  from uniter_jax.data import schema  # pylint: disable=g-import-not-at-top
  from uniter_jax.data import sources  # pylint: disable=g-import-not-at-top
  soft_split = sources.RecordReader(data_dir, data.store.name,
                                    schema.SOFT_LABEL_SPLIT,
                                    schema.IMAGE_ARRAYS)
  env = lmdb.open(img_dir, map_size=1 << 36)
  with env.begin(write=True) as txn:
    for i, key in enumerate(data.store.keys):
      rec = data.store._source[i]  # pylint: disable=protected-access
      soft = soft_split[i]
      assert soft["img_key"].decode() == key
      arrs = {"features": rec["features"], "norm_bb": rec["norm_bb"],
              "conf": rec["conf"], "soft_labels": soft["soft_labels"]}
      if compress:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrs)
        val = buf.getvalue()
      else:
        val = msgpack.dumps(arrs, use_bin_type=True)
      txn.put(key.encode(), val)
  env.close()
  return txt_dir, img_dir


class OfficialReader:
  """Reads and collates like the official TxtTokLmdb/DetectFeatLmdb/mlm."""

  def __init__(self, txt_dir, img_dir, compress, name2nbb, cls_id, sep_id):
    self._envs = [lmdb.open(d, readonly=True, create=False, lock=False)
                  for d in (txt_dir, img_dir)]
    self.txt, self.img = (e.begin(buffers=True) for e in self._envs)
    self.compress = compress
    self.name2nbb = name2nbb
    self.cls, self.sep = cls_id, sep_id

  def close(self):
    for txn in (self.txt, self.img):
      txn.abort()
    for env in self._envs:
      env.close()

  def example(self, id_: str):
    import torch  # pylint: disable=g-import-not-at-top
    txt = msgpack.loads(lz4.frame.decompress(self.txt.get(id_.encode())),
                        raw=False)
    fname = txt["img_fname"]
    nbb = self.name2nbb[fname]
    dump = self.img.get(fname.encode())
    if self.compress:
      with io.BytesIO(dump) as reader:
        z = np.load(reader, allow_pickle=True)
        d = {"features": z["features"], "norm_bb": z["norm_bb"]}
    else:
      d = msgpack.loads(dump, raw=False)
    feat = torch.tensor(d["features"][:nbb, :]).float()
    bb = torch.tensor(d["norm_bb"][:nbb, :]).float()
    bb = torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], dim=-1)
    input_ids = torch.tensor([self.cls] + txt["input_ids"] + [self.sep])
    attn = torch.ones(len(input_ids) + nbb, dtype=torch.long)
    return input_ids, feat, bb, attn

  def batch(self, ids):
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn.utils.rnn import pad_sequence  # pylint: disable=g-import-not-at-top
    exs = [self.example(i) for i in ids]
    input_ids = pad_sequence([e[0] for e in exs], batch_first=True)
    tl = [len(e[0]) for e in exs]
    nb = [e[1].size(0) for e in exs]
    mx = max(nb)
    feat = torch.zeros(len(exs), mx, exs[0][1].size(1))
    pos = torch.zeros(len(exs), mx, 7)
    for r, e in enumerate(exs):
      feat[r, :nb[r]] = e[1]
      pos[r, :nb[r]] = e[2]
    attn = pad_sequence([e[3] for e in exs], batch_first=True)
    out_size = attn.size(1)
    max_tl = max(tl)
    gather = torch.arange(out_size).unsqueeze(0).repeat(len(exs), 1)
    for r in range(len(exs)):
      gather[r, tl[r]:tl[r] + nb[r]] = torch.arange(max_tl, max_tl + nb[r])
    pos_ids = torch.arange(max_tl).unsqueeze(0)
    return input_ids, pos_ids, feat, pos, attn, gather


# -- the official ITM and MLM loaders (own code, the official steps) ---------
def _pad_rows(tensors, lens):
  """`pad_tensors`: a zero [B, max len, D] tensor, each row copied in."""
  import torch  # pylint: disable=g-import-not-at-top
  out = torch.zeros(len(tensors), max(lens), tensors[0].size(-1),
                    dtype=tensors[0].dtype)
  for r, (t, n) in enumerate(zip(tensors, lens)):
    out.data[r, :n, ...] = t.data
  return out


def _gather_index(txt_lens, num_bbs, max_tl, out_size):
  """`get_gather_index`: per row, the joint positions of its regions."""
  import torch  # pylint: disable=g-import-not-at-top
  gather = torch.arange(0, out_size, dtype=torch.long).unsqueeze(0).repeat(
      len(txt_lens), 1)
  for r, (tl, nb) in enumerate(zip(txt_lens, num_bbs)):
    gather.data[r, tl:tl + nb] = torch.arange(max_tl, max_tl + nb,
                                              dtype=torch.long).data
  return gather


def _pad_flags(lens, max_len):
  """1 past each length (the OT collate's text / image padding masks)."""
  import torch  # pylint: disable=g-import-not-at-top
  pad = torch.zeros(len(lens), max_len, dtype=torch.uint8)
  for r, n in enumerate(lens):
    pad.data[r, n:].fill_(1)
  return pad


class OfficialTasks(OfficialReader):
  """The official pretraining ITM and MLM loaders, re-implemented.

  ITM (`ItmDataset` with `itm_ot_collate`, the collate of the official
  pretraining configs, `itm_ot_lambda` 0.1): once per epoch `new_epoch`
  draws every example's label with numpy (0 with probability
  `neg_prob`), reads each text for its image name and, for a negative,
  draws another image with `random.sample` (redrawn while it is the true
  one); an example then reads its text and only the image it was given.
  MLM (`MlmDataset` with `mlm_collate`): per token `random.random()`, 15%
  selected, of those 80% [MASK], 10% `random.choice` of the vocabulary
  range as a list, 10% kept; the first token if none was selected.
  """

  def __init__(self, txt_dir, img_dir, name2nbb, special, v_range,
               neg_prob: float = 0.5):
    super().__init__(txt_dir, img_dir, False, name2nbb, special["CLS"],
                     special["SEP"])
    self.mask = special["MASK"]
    self.v_range = tuple(v_range)
    self.neg_prob = neg_prob
    self.ids = [bytes(k).decode() for k, _ in self.txt.cursor()]
    self.all_imgs = list({self.text(i)["img_fname"] for i in self.ids})
    self.itm_new_epoch()

  def text(self, id_: str):
    return msgpack.loads(lz4.frame.decompress(self.txt.get(id_.encode())),
                         raw=False)

  def image(self, fname: str):
    """`DetectFeatLmdb[...]` then `_get_img_feat` (7-d boxes)."""
    import torch  # pylint: disable=g-import-not-at-top
    d = msgpack.loads(self.img.get(fname.encode()), raw=False)
    nbb = self.name2nbb[fname]
    feat = torch.tensor(d["features"][:nbb, :]).float()
    bb = torch.tensor(d["norm_bb"][:nbb, :]).float()
    bb = torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], dim=-1)
    return feat, bb, feat.size(0)

  # ITM.
  def _negative(self, true_img: str) -> str:
    picked = [true_img]
    while true_img in set(picked):
      picked = random.sample(self.all_imgs, 1)
    return picked[0]

  def itm_new_epoch(self):
    labels = np.random.choice([0, 1], size=len(self.ids),
                              p=[self.neg_prob, 1 - self.neg_prob])
    self.itm_label, self.itm_img, lens = {}, {}, []
    for id_, label in zip(self.ids, labels):
      txt = self.text(id_)
      fname = txt["img_fname"]
      if label == 0:
        fname = self._negative(fname)
      self.itm_label[id_], self.itm_img[id_] = label, fname
      lens.append(len(txt["input_ids"]) + self.name2nbb[fname])
    self.itm_lens = lens

  def itm_example(self, id_: str):
    import torch  # pylint: disable=g-import-not-at-top
    txt = self.text(id_)
    feat, bb, nbb = self.image(self.itm_img[id_])
    input_ids = torch.tensor([self.cls] + txt["input_ids"] + [self.sep])
    attn = torch.ones(len(input_ids) + nbb, dtype=torch.long)
    target = torch.Tensor(1).long()
    target.data.fill_(int(self.itm_label[id_]))
    return input_ids, feat, bb, attn, target

  def itm_batch(self, ids):
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn.utils.rnn import pad_sequence  # pylint: disable=g-import-not-at-top
    input_ids, feats, bbs, attns, targets = map(
        list, zip(*[self.itm_example(i) for i in ids]))
    txt_lens = [t.size(0) for t in input_ids]
    input_ids = pad_sequence(input_ids, batch_first=True, padding_value=0)
    position_ids = torch.arange(0, input_ids.size(1), dtype=torch.long
                                ).unsqueeze(0)
    num_bbs = [f.size(0) for f in feats]
    img_feat, img_pos_feat = _pad_rows(feats, num_bbs), _pad_rows(bbs,
                                                                  num_bbs)
    attn = pad_sequence(attns, batch_first=True, padding_value=0)
    targets = torch.cat(targets, dim=0)
    bs, max_tl = input_ids.size()
    out_size = attn.size(1)
    gather = _gather_index(txt_lens, num_bbs, max_tl, out_size)
    # Word-region alignment inputs.
    max_tl, max_nbb = max(txt_lens), max(num_bbs)
    scatter = torch.arange(0, out_size, dtype=torch.long).unsqueeze(0).repeat(
        bs, 1)
    for r, tl in enumerate(txt_lens):
      scatter.data[r, tl:] = torch.arange(max_tl, max_tl + out_size - tl,
                                          dtype=torch.long).data
    ot = {"ot_scatter": scatter, "scatter_max": scatter.max().item(),
          "txt_pad": _pad_flags(txt_lens, max_tl),
          "img_pad": _pad_flags(num_bbs, max_nbb)}
    return {"input_ids": input_ids, "position_ids": position_ids,
            "img_feat": img_feat, "img_pos_feat": img_pos_feat,
            "attn_masks": attn, "gather_index": gather, "targets": targets,
            "ot_inputs": ot}

  # MLM.
  def _random_word(self, tokens):
    labels = []
    for k, tok in enumerate(tokens):
      p = random.random()
      if p < 0.15:
        p /= 0.15
        if p < 0.8:
          tokens[k] = self.mask
        elif p < 0.9:
          tokens[k] = random.choice(list(range(*self.v_range)))
        labels.append(tok)
      else:
        labels.append(-1)
    if all(t == -1 for t in labels):
      labels[0] = tokens[0]
      tokens[0] = self.mask
    return tokens, labels

  def mlm_example(self, id_: str):
    import torch  # pylint: disable=g-import-not-at-top
    txt = self.text(id_)
    tokens, labels = self._random_word(txt["input_ids"])
    input_ids = torch.tensor([self.cls] + tokens + [self.sep])
    txt_labels = torch.tensor([-1] + labels + [-1])
    feat, bb, nbb = self.image(txt["img_fname"])
    attn = torch.ones(len(input_ids) + nbb, dtype=torch.long)
    return input_ids, feat, bb, attn, txt_labels

  def mlm_batch(self, ids):
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn.utils.rnn import pad_sequence  # pylint: disable=g-import-not-at-top
    input_ids, feats, bbs, attns, txt_labels = map(
        list, zip(*[self.mlm_example(i) for i in ids]))
    txt_lens = [t.size(0) for t in input_ids]
    input_ids = pad_sequence(input_ids, batch_first=True, padding_value=0)
    txt_labels = pad_sequence(txt_labels, batch_first=True, padding_value=-1)
    position_ids = torch.arange(0, input_ids.size(1), dtype=torch.long
                                ).unsqueeze(0)
    num_bbs = [f.size(0) for f in feats]
    img_feat, img_pos_feat = _pad_rows(feats, num_bbs), _pad_rows(bbs,
                                                                  num_bbs)
    attn = pad_sequence(attns, batch_first=True, padding_value=0)
    bs, max_tl = input_ids.size()
    gather = _gather_index(txt_lens, num_bbs, max_tl, attn.size(1))
    return {"input_ids": input_ids, "position_ids": position_ids,
            "img_feat": img_feat, "img_pos_feat": img_pos_feat,
            "attn_masks": attn, "gather_index": gather,
            "txt_labels": txt_labels}


# Import-time needs of the official `data` package that this benchmark
# does not install. Stand-ins are made only for a module that cannot be
# imported; each does no more than the loader code paths timed here use.
def _stand_in_horovod():
  # Multi-GPU training (horovod): the loaders only ask for this process's
  # rank and the process count (one process: 0 and 1).
  hvd = types.ModuleType("horovod.torch")
  hvd.rank = hvd.local_rank = lambda: 0
  hvd.size = hvd.local_size = lambda: 1
  pkg = types.ModuleType("horovod")
  pkg.torch = hvd
  return {"horovod": pkg, "horovod.torch": hvd}


def _stand_in_toolz():
  # toolz / cytoolz (functional helpers): the collates use `unzip` and
  # `concat`, the sampler `partition_all`. Installed copies are preferred.
  def partition_all(n, seq):
    it = iter(seq)
    while True:
      part = tuple(itertools.islice(it, n))
      if not part:
        return
      yield part
  toolz = types.ModuleType("toolz")
  sandbox = types.ModuleType("toolz.sandbox")
  sandbox.unzip = lambda seq: zip(*seq)
  toolz.sandbox = sandbox
  cytoolz = types.ModuleType("cytoolz")
  cytoolz.concat = itertools.chain.from_iterable
  cytoolz.partition_all = partition_all
  return {"toolz": toolz, "toolz.sandbox": sandbox, "cytoolz": cytoolz}


def import_official(repo: str):
  """The official `data` package of a ChenRocks/UNITER checkout at `repo`,
  with stand-ins for horovod (and toolz / cytoolz when not installed).
  Returns (the package, the names of the modules stood in for)."""
  repo = os.path.abspath(repo)
  if not os.path.isfile(os.path.join(repo, "data", "mlm.py")):
    raise SystemExit(f"--official_repo {repo}: no data/mlm.py there (expected "
                     "a checkout of ChenRocks/UNITER)")
  stood_in = []
  for probe, make in (("horovod.torch", _stand_in_horovod),
                      ("toolz.sandbox", _stand_in_toolz),
                      ("cytoolz", _stand_in_toolz)):
    try:
      __import__(probe)
    except ImportError:
      mods = make()
      mods = {k: v for k, v in mods.items()
              if k.split(".")[0] == probe.split(".")[0]}
      sys.modules.update(mods)
      stood_in.extend(sorted(mods))
  sys.path.insert(0, repo)
  import data as official  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  if not os.path.abspath(official.__file__).startswith(repo + os.sep):
    raise SystemExit(f"--official_repo: 'data' was imported from "
                     f"{official.__file__}, not from {repo}")
  return official, stood_in


class OfficialRepoTasks:
  """The official classes (`--official_repo`) behind `OfficialTasks`'
  interface: `MlmDataset` + `mlm_collate`, `ItmDataset` +
  `itm_ot_collate`, over `TxtTokLmdb` / `DetectFeatLmdb` on our files."""

  def __init__(self, official, txt_dir, img_dir, rule, max_txt_len,
               neg_prob: float = 0.5):
    self.off = official
    db_name = os.path.basename(img_dir)
    if rule.num_bb is not None:
      kw = {"conf_th": -1, "num_bb": rule.num_bb}
    else:
      kw = {"conf_th": rule.conf_th, "max_bb": rule.max_bb,
            "min_bb": rule.min_bb}
    self.txt_db = official.TxtTokLmdb(txt_dir, max_txt_len)
    self.img_db = official.DetectFeatLmdb(
        os.path.dirname(img_dir), compress=db_name.endswith("_compressed"),
        **kw)
    self.mlm = official.MlmDataset(self.txt_db, self.img_db)
    self.itm = official.ItmDataset(self.txt_db, self.img_db, neg_prob)
    self.mlm_pos = {id_: k for k, id_ in enumerate(self.mlm.ids)}
    self.itm_pos = {id_: k for k, id_ in enumerate(self.itm.ids)}

  def itm_new_epoch(self):
    self.itm.new_epoch()

  def itm_batch(self, ids):
    return self.off.itm_ot_collate([self.itm[self.itm_pos[i]] for i in ids])

  def mlm_batch(self, ids):
    return self.off.mlm_collate([self.mlm[self.mlm_pos[i]] for i in ids])

  def close(self):
    # The LMDB environments close when the official objects are collected.
    del self.mlm, self.itm, self.txt_db, self.img_db
    gc.collect()


def _identity_op(example, rng, ctx):
  """A task op that changes nothing: forces the per-example path (fp32
  `img_feat` in every example dict, as ops see them, then collate)."""
  del rng, ctx
  return example


def _drain(batches) -> None:
  """Consumes batches one by one, dropping each (as a training loop does,
  so both sides may reuse the memory of the batch before)."""
  for _ in batches:
    pass


def timed(fns: dict, reps: int) -> dict[str, tuple[float, float]]:
  """Best (CPU seconds, wall seconds) of each callable over `reps` rounds.

  The callables run in turn within each round (after one warm-up run each),
  so a burst of load from other processes hits all of them alike.
  """
  for fn in fns.values():
    fn()
  best = {k: (float("inf"), float("inf")) for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      c0, w0 = time.process_time(), time.perf_counter()
      fn()
      c, w = time.process_time() - c0, time.perf_counter() - w0
      best[k] = (min(best[k][0], c), min(best[k][1], w))
  return best


def bench_regions(tmp: str, n_regions: int, args) -> dict:
  from uniter_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  name = build_synthetic(tmp, n_regions, args.images, args.captions)
  fns = {}
  datas = {}
  for label, dtype, ops in (("pipeline", "float32", None),
                            ("pipeline_fp16", "float16", None),
                            ("pipeline_dicts", "float32", [_identity_op])):
    data = pipeline.UniterData(
        tmp, f"uniter_synthetic_text/{name}:1.0.0", "train",
        token_budget=args.token_budget, batch_multiple=8, shard_index=0,
        shard_count=1, region_rule=sources.RegionRule(num_bb=n_regions),
        img_feat_dtype=dtype, ops=ops, seed=0)
    steps = range(data.batches_per_epoch)
    fns[label] = (lambda d=data, st=steps:
                  _drain(d.load_batch(s) for s in st))
    datas[label] = data
  data = datas["pipeline"]
  n_ex = sum(len(data.global_batch(s)[1]) for s in steps)
  sp = data.text.special
  ids = [data.text.record_id(i) for i in range(len(data.text))]
  name2nbb = {k: n_regions for k in data.store.keys}
  batches = [[ids[i] for i in data.global_batch(s)[1]] for s in steps]
  readers = []
  for compress in (False, True):
    label = "official_npz" if compress else "official_msgpack"
    txt_dir, img_dir = write_official(data, tmp, os.path.join(tmp, name),
                                      compress)
    reader = OfficialReader(txt_dir, img_dir, compress, name2nbb, sp["CLS"],
                            sp["SEP"])
    readers.append(reader)
    fns[label] = lambda r=reader: _drain(r.batch(b) for b in batches)
  times = timed(fns, args.reps)
  for reader in readers:
    reader.close()
  res = {"regions": n_regions, "examples": n_ex}
  for label, (cpu, wall) in times.items():
    res[f"{label}_ex_per_cpu_s"] = n_ex / cpu
    res[f"{label}_ex_per_wall_s"] = n_ex / wall
  res["padding_fraction"] = data.stats()["padding_fraction"]
  return res


TASK_ROWS = ("itm", "mlm")


def bench_tasks(tmp: str, n_regions: int, args, official=None) -> dict:
  """ITM and MLM: ours (the tasks' ops, batch ops and contract) vs the
  official loaders (re-implemented, or `official` = the imported package)
  on the same batch compositions; one `timed` round-robin."""
  from uniter_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from uniter_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  name = build_synthetic(tmp, n_regions, args.images, args.captions)
  text = f"uniter_synthetic_text/{name}:1.0.0"
  rule = sources.RegionRule(num_bb=n_regions)
  names = [t for t in args.tasks.split(",") if t]
  fns, datas = {}, {}
  for task_name in names:
    task = tasks_lib.make_task(task_name)
    # As the trainer builds a task's data (train/input.py `make_dataset`):
    # float32 features (an fp32 model, the official batches' dtype), and
    # float16 (the default for a bf16 model: `data.img_feat_dtype="auto"`).
    for suffix, dtype in (("", "float32"), ("_fp16", "float16")):
      data = pipeline.UniterData(
          tmp, text, "train", token_budget=args.token_budget,
          batch_multiple=8, shard_index=0, shard_count=1, region_rule=rule,
          with_soft_labels=task.with_soft_labels,
          ops=dict(task.data_ops()), op_params=task.op_params(),
          batch_ops=task.batch_ops(), fields=task.batch_fields(), seed=0,
          img_feat_dtype=dtype)
      steps = range(data.batches_per_epoch)
      fns[f"ours_{task_name}{suffix}"] = (lambda d=data, st=steps:
                                          _drain(d.load_batch(s) for s in st))
      if not suffix:
        datas[task_name] = data
  data = datas[names[0]]
  steps = range(data.batches_per_epoch)
  n_ex = sum(len(data.global_batch(s)[1]) for s in steps)
  ids = [data.text.record_id(i) for i in range(len(data.text))]
  batches = [[ids[i] for i in data.global_batch(s)[1]] for s in steps]
  txt_dir, img_dir = write_official(data, tmp, os.path.join(tmp, name),
                                    compress=False)
  neg_prob = float(data.op_params.get("itm_neg_prob", 0.5))
  if official is None:
    loader = OfficialTasks(txt_dir, img_dir,
                           {k: n_regions for k in data.store.keys},
                           data.text.special, data.text.v_range, neg_prob)
  else:
    loader = OfficialRepoTasks(official, txt_dir, img_dir, rule,
                               data.text.max_txt_len, neg_prob)
  if "itm" in names:
    fns["official_itm"] = lambda: _drain(loader.itm_batch(b) for b in batches)
    # Once per epoch, separately (its share is printed as a second ratio).
    fns["official_itm_new_epoch"] = loader.itm_new_epoch
  if "mlm" in names:
    fns["official_mlm"] = lambda: _drain(loader.mlm_batch(b) for b in batches)
  fns.update(floor_fns(data, tmp, steps))
  try:
    times = timed(fns, args.reps)
  finally:
    loader.close()
  res = {"regions": n_regions, "examples": n_ex,
         "official": "repo" if official is not None else "re-implemented"}
  for label, (cpu, wall) in times.items():
    res[f"{label}_ex_per_cpu_s"] = n_ex / cpu
    res[f"{label}_ex_per_wall_s"] = n_ex / wall
  return res


# What a loader reading through the array_record library and protobuf (the
# reading that issue 14's item 2 keeps) must do per example at the least.
FLOOR_ROWS = ("floor_read", "floor_parse", "floor_fp32", "floor_fp16")


def floor_fns(data, data_dir: str, steps) -> dict:
  """Timed callables over the same batch compositions as the task rows:
  per example, its image record read through the array_record library
  (`floor_read`, the TFDS data source's raw bytes); read and parsed with
  protobuf (`floor_parse`, the store's fields); read, parsed and written
  into its row of a reused batch buffer as `ImageStore.load` does for the
  pipeline (`floor_fp32`: the exact fp16 -> fp32 cast; `floor_fp16`: the
  stored values copied). Nothing else: no text, ops, collation."""
  from uniter_jax.data import schema, sources  # pylint: disable=g-import-not-at-top
  store = data.store
  reader = sources.RecordReader(data_dir, store.name, schema.IMAGE_SPLIT,
                                schema.IMAGE_ARRAYS)
  raw = reader.tfds_source.data_source
  batches, max_img = [], 0
  for s in steps:
    bucket, rows = data.global_batch(s)
    batches.append([int(data.text.img_index[int(i)]) for i in rows])
    max_img = max(max_img, bucket.max_img)
  rows_max = max(len(b) for b in batches)
  arenas = {dt: np.empty((rows_max, max_img, 2048), dt)
            for dt in (np.float32, np.float16)}
  for a in arenas.values():
    a.fill(0)   # pages mapped once, as the pipeline's pooled buffers

  def read():
    for b in batches:
      for img in b:
        raw[img]

  def parse():
    for b in batches:
      for img in b:
        reader.get(img, sources.IMAGE_HOT_FIELDS)

  def load(dtype):
    arena = arenas[dtype]
    for b in batches:
      for r, img in enumerate(b):
        store.load(img, img_feat_out=arena[r])

  return {"floor_read": read, "floor_parse": parse,
          "floor_fp32": lambda: load(np.float32),
          "floor_fp16": lambda: load(np.float16)}


def print_floor(r: dict) -> None:
  """The floor rows in microseconds per example, and what they leave."""
  n = r["regions"]
  us = {k: 1e6 / r[f"{k}_ex_per_cpu_s"] for k in FLOOR_ROWS
        if f"{k}_ex_per_cpu_s" in r}
  if len(us) < len(FLOOR_ROWS):
    return
  print(f"  regions={n} floor per example through array_record + protobuf "
        f"(CPU us): read {us['floor_read']:.0f}, read+parse "
        f"{us['floor_parse']:.0f}, + fp32 row {us['floor_fp32']:.0f}, "
        f"+ fp16 row {us['floor_fp16']:.0f}", flush=True)
  for t in TASK_ROWS:
    if f"official_{t}_ex_per_cpu_s" not in r:
      continue
    off = 1e6 / r[f"official_{t}_ex_per_cpu_s"]
    print(f"  regions={n} {t}: the official loader takes {off:.0f} us per "
          f"example; with nothing but the floor on our side, ours/official "
          f"could reach at most {off / us['floor_fp32']:.2f}x (fp32 batches)"
          f", {off / us['floor_fp16']:.2f}x (fp16)", flush=True)


def print_task_ratios(r: dict) -> None:
  """Ours / official per core and wall, ITM also with `new_epoch`."""
  n = r["regions"]
  for t in TASK_ROWS:
    if f"ours_{t}_ex_per_cpu_s" not in r:
      continue
    ratio = {k: r[f"ours_{t}_ex_per_{k}_s"] / r[f"official_{t}_ex_per_{k}_s"]
             for k in ("cpu", "wall")}
    line = (f"  regions={n} {t}: per core (CPU time) {ratio['cpu']:.2f}x "
            f"official {r['official']}, wall time {ratio['wall']:.2f}x")
    if t == "itm":
      # Examples per second of batches plus the epoch's new_epoch.
      def with_epoch(k):
        per_ex = (1 / r[f"official_itm_ex_per_{k}_s"]
                  + 1 / r[f"official_itm_new_epoch_ex_per_{k}_s"])
        return r[f"ours_itm_ex_per_{k}_s"] * per_ex
      line += (f" (counting its per-epoch new_epoch: {with_epoch('cpu'):.2f}x"
               f" / {with_epoch('wall'):.2f}x)")
    print(line, flush=True)
    if f"ours_{t}_fp16_ex_per_cpu_s" in r:
      fp16 = {k: r[f"ours_{t}_fp16_ex_per_{k}_s"]
              / r[f"official_{t}_ex_per_{k}_s"] for k in ("cpu", "wall")}
      print(f"  regions={n} {t}, float16 features (a bf16 model's batches; "
            f"the official loader makes fp32 for every model): per core "
            f"{fp16['cpu']:.2f}x, wall time {fp16['wall']:.2f}x", flush=True)


def realistic_padding(token_budget: int) -> list[dict]:
  from uniter_jax.data import buckets as bk  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n = 200_000
  t = 2 + np.clip(np.round(rng.lognormal(np.log(12), 0.3, n)), 3, 60)
  dyn = np.clip(np.round(rng.normal(45, 22, n)), 10, 100)
  out = []
  for label, nb in (("36 regions", np.full(n, 36)), ("10..100 regions", dyn)):
    # Fixed shape counts, then the pipeline's defaults (max_buckets=32,
    # target_padding=0.10: shapes are added until padding <= 10%).
    for k, target in ((4, 0.0), (8, 0.0), (16, 0.0), (24, 0.0), (32, 0.0),
                      (32, 0.10)):
      b = bk.choose_buckets(t, nb, token_budget, 8, max_buckets=k,
                            target_padding=target)
      plan = bk.plan_epoch(bk.assign_buckets(t, nb, b), b, 0, 0)
      s = bk.padding_stats(t, nb, plan, b)
      out.append({"lengths": label, "max_buckets": k,
                  "target_padding": target, "shapes": len(b),
                  "padding_fraction": round(s["padding_fraction"], 4)})
  return out


# --malloc_tuned: no mmap per large block (every fresh mmap page-faults
# its pages in) and freed memory is kept rather than given back.
MALLOC_TUNED = {"MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def allocator_setting() -> str:
  """The glibc malloc tunables this process was started with, in words."""
  names = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
           "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
  have = {k: os.environ[k] for k in names if k in os.environ}
  if not have:
    return "glibc defaults (no MALLOC_* tunables in the environment)"
  desc = " ".join(f"{k}={v}" for k, v in have.items())
  tuned = all(have.get(k) == v for k, v in MALLOC_TUNED.items())
  return f"{'tuned' if tuned else 'from the environment'}: {desc}"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=150)
  p.add_argument("--captions", type=int, default=5)
  p.add_argument("--token_budget", type=int, default=10240)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--regions", default="36,100",
                 help="comma-separated regions per image")
  p.add_argument("--no_padding_table", action="store_true")
  p.add_argument("--tasks", default=",".join(TASK_ROWS),
                 help="task rows to time: comma-separated of "
                 f"{','.join(TASK_ROWS)}; empty for none")
  p.add_argument("--official_repo", default=None, metavar="DIR",
                 help="a checkout of ChenRocks/UNITER: time its own ITM / "
                 "MLM loader classes instead of the re-implementation")
  p.add_argument("--workers", default="0,1,2",
                 help="worker-process counts of the worker table "
                 "(benchmarks/bench_workers.py: the in-domain mix, cores "
                 "per H100); empty for none")
  p.add_argument("--worker_batches", type=int, default=30)
  p.add_argument("--malloc_tuned", action="store_true",
                 help="run with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_="
                 f"{MALLOC_TUNED['MALLOC_TRIM_THRESHOLD_']} (both sides)")
  args = p.parse_args()
  # msgpack with numpy arrays, as the official LMDBs hold them (patched
  # here, not at import: importing the module changes nothing global).
  msgpack_numpy.patch()
  bad = set(t for t in args.tasks.split(",") if t) - set(TASK_ROWS)
  if bad:
    p.error(f"--tasks: unknown {sorted(bad)}; choose from {TASK_ROWS}")
  if args.malloc_tuned and any(os.environ.get(k) != v
                               for k, v in MALLOC_TUNED.items()):
    # glibc reads these when the process starts: run again with them.
    sys.stdout.flush()
    os.execve(sys.executable,
              [sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
              {**os.environ, **MALLOC_TUNED})
  print(f"allocator: {allocator_setting()}", flush=True)
  official = None
  if args.tasks and args.official_repo:
    official, stood_in = import_official(args.official_repo)
    print(f"official loaders: imported from {args.official_repo}"
          + (f" (stand-ins for {', '.join(stood_in)})" if stood_in else ""),
          flush=True)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  os.environ.setdefault("OMP_NUM_THREADS", "1")
  with tempfile.TemporaryDirectory() as tmp:
    for n_regions in [int(v) for v in args.regions.split(",")]:
      r = bench_regions(tmp, n_regions, args)
      print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                        for k, v in r.items()}))
      for ours in ("pipeline", "pipeline_fp16", "pipeline_dicts"):
        def ratio(off, kind, ours=ours):
          return (r[f"{ours}_ex_per_{kind}_s"]
                  / r[f"official_{off}_ex_per_{kind}_s"])
        print(f"  regions={n_regions} {ours}: per core (CPU time) "
              f"{ratio('msgpack', 'cpu'):.2f}x official msgpack, "
              f"{ratio('npz', 'cpu'):.2f}x official npz; wall time "
              f"{ratio('msgpack', 'wall'):.2f}x / {ratio('npz', 'wall'):.2f}x",
              flush=True)
      print(f"  regions={n_regions}: padding {r['padding_fraction']:.3f}",
            flush=True)
      if args.tasks:
        t = bench_tasks(tmp, n_regions, args, official)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                          for k, v in t.items()}))
        print_task_ratios(t)
        print_floor(t)
  for row in ([] if args.no_padding_table else
              realistic_padding(args.token_budget)):
    print(json.dumps(row))
  if args.workers:
    # Worker processes, in the same run.
    import bench_workers  # pylint: disable=g-import-not-at-top
    print("\nworker processes (benchmarks/bench_workers.py):", flush=True)
    bench_workers.report(argparse.Namespace(
        images=args.images, captions=args.captions,
        batches=args.worker_batches, workers=args.workers))


if __name__ == "__main__":
  main()
