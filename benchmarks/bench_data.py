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
    regions, for several bucket counts).

"Per core" = examples / CPU time of this process (`time.process_time`, all
threads), best of `--reps` rounds after a warm-up, the variants taking
turns within a round; both sides run in one thread (torch and OpenMP set to
1 thread) and drop each batch once made, as a training loop would. CPU time rather than wall time,
because the machine may be shared: other processes' load inflates wall time
far more than CPU time. Wall-time rates are printed too.

Usage: python benchmarks/bench_data.py [--images 150] [--captions 5]
Not a test: figures are ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import tempfile
import time

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np

msgpack_numpy.patch()


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
def write_official(data, data_dir: str, out_dir: str, compress: bool
                   ) -> tuple[str, str]:
  """Writes txt_db / img_db LMDBs holding the same records as `data`."""
  os.makedirs(out_dir, exist_ok=True)
  # One txt_db per variant: LMDB opens an environment once per process.
  suffix = "npz" if compress else "mp"
  txt_dir = os.path.join(out_dir, "txt_db_" + suffix)
  img_dir = os.path.join(out_dir, "img_db_" + suffix)
  if not os.path.exists(txt_dir):
    env = lmdb.open(txt_dir, map_size=1 << 34)
    with env.begin(write=True) as txn:
      for i in range(len(data.text)):
        rec = data.text._source[int(data.text.records[i])]  # pylint: disable=protected-access
        val = {"input_ids": [int(x) for x in rec["input_ids"]],
               "img_fname": rec["img_keys"][0].decode()}
        txn.put(rec["id"], lz4.frame.compress(
            msgpack.dumps(val, use_bin_type=True)))
    env.close()
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
  ids = [data.text._source[int(r)]["id"].decode()  # pylint: disable=protected-access
         for r in data.text.records]
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


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=150)
  p.add_argument("--captions", type=int, default=5)
  p.add_argument("--token_budget", type=int, default=10240)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--regions", default="36,100",
                 help="comma-separated regions per image")
  p.add_argument("--no_padding_table", action="store_true")
  args = p.parse_args()
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
  for row in ([] if args.no_padding_table else
              realistic_padding(args.token_budget)):
    print(json.dumps(row))


if __name__ == "__main__":
  main()
