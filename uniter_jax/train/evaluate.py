"""Validation: task metrics on held-out splits and zero-shot retrieval.

Evaluators yield `(name, value)` pairs; the loop writes them as metrics.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np

from uniter_jax.data import buckets as bk
from uniter_jax.data import collate as collate_lib
from uniter_jax.train import input as input_lib
from uniter_jax.train import sharding

# Metric -> the metric that weights it when averaging over batches.
_WEIGHTS = {"mlm_acc": "n_masked", "mlm_loss": "n_masked",
            "mrfr_loss": "n_masked", "mrckl_loss": "n_masked",
            "mrckl_acc": "n_masked", "mrc_loss": "n_masked",
            "mrc_acc": "n_masked"}


def task_metrics(eval_step: Callable, params, datasets: dict, mesh,
                 max_batches: int, mlm_prob: float, mrm_prob: float
                 ) -> Iterator[tuple[str, float]]:
  """Mean task metrics of every "{task}_{dataset}" validation set."""
  for key in sorted(datasets):
    data = datasets[key]
    task = key.split("_", 1)[0]
    n = data.batches_per_epoch
    if max_batches > 0:
      n = min(n, max_batches)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    outs = []
    for step in range(n):
      batch = input_lib.with_positions(data.load_batch(step), task, mlm_prob,
                                       mrm_prob)
      outs.append(eval_step(task)(params, sharding.to_global(batch, mesh)))
    for m in jax.device_get(outs):
      for name, v in m.items():
        w = float(m[_WEIGHTS[name]]) if name in _WEIGHTS else 1.0
        sums[name] = sums.get(name, 0.0) + float(v) * w
        weights[name] = weights.get(name, 0.0) + w
    for name in sorted(sums):
      if name == "n_masked" or name.endswith("_dropped"):
        continue
      yield f"val/{key}/{name}", sums[name] / max(weights[name], 1e-9)


def retrieval_pairs(data, num_images: int):
  """(text example indices, their image indices, chosen image indices)."""
  txt_img = np.asarray(data.text.img_index)
  images = []
  for i in txt_img:
    if i not in images:
      images.append(int(i))
    if len(images) == num_images:
      break
  chosen = set(images)
  texts = [t for t in range(len(txt_img)) if int(txt_img[t]) in chosen]
  return texts, txt_img[texts], np.asarray(images)


def zero_shot_retrieval(score_fn: Callable, params, data, mesh,
                        num_images: int, batch_multiple: int
                        ) -> Iterator[tuple[str, float]]:
  """Image and text retrieval R@1/5/10 from the ITM "match" logit.

  Every caption of `num_images` held-out images is scored against every one
  of those images (the official zero-shot protocol: the ITM head's match
  logit ranks the candidates).
  """
  texts, text_img, images = retrieval_pairs(data, num_images)
  img_ex = [data.store.load(int(i)) for i in images]
  txt_ex = [data.text.example(t) for t in texts]
  lt = max(len(e["input_ids"]) for e in txt_ex)
  li = max(len(e["img_feat"]) for e in img_ex)
  n_img = len(images)
  rows = -(-n_img // batch_multiple) * batch_multiple
  bucket = bk.Bucket(lt, li, rows)
  scores = []
  for t in txt_ex:
    exs = [{"input_ids": t["input_ids"], "img_feat": im["img_feat"],
            "img_pos_feat": im["img_pos_feat"]} for im in img_ex]
    exs += exs[:1] * (rows - n_img)  # fill rows; their scores are dropped
    batch = collate_lib.collate(exs, bucket)
    scores.append(score_fn(params, sharding.to_global(batch, mesh)))
  scores = np.asarray(jax.device_get(scores))[:, :n_img]  # [texts, images]
  column = {int(i): j for j, i in enumerate(images)}
  gt = np.asarray([column[int(i)] for i in text_img])
  # Image retrieval: rank of each caption's image among all images.
  order = np.argsort(-scores, axis=1, kind="stable")
  ir_rank = np.argmax(order == gt[:, None], axis=1)
  # Text retrieval: best rank of an image's captions among all captions.
  order_t = np.argsort(-scores.T, axis=1, kind="stable")
  tr_rank = np.array([
      np.min(np.where(gt[order_t[j]] == j)[0]) for j in range(n_img)])
  for k in (1, 5, 10):
    yield f"val/zs_ir_r{k}", float(np.mean(ir_rank < k) * 100)
  for k in (1, 5, 10):
    yield f"val/zs_tr_r{k}", float(np.mean(tr_rank < k) * 100)
  yield "val/zs_images", float(n_img)
  yield "val/zs_texts", float(len(texts))
