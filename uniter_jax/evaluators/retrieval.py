"""`zero_shot_retrieval`: image and text retrieval from the ITM match logit."""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from uniter_jax.data import buckets as bk
from uniter_jax.data import collate as collate_lib
from uniter_jax.evaluators.base import Evaluator, register_evaluator


def retrieval_pairs(data, num_images: int):
  """(text example indices, their image indices, chosen image indices):
  the first `num_images` distinct images of the split and all their texts."""
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


def retrieval_ranks(scores: np.ndarray, gt: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """Ranks of the true pairs in a [texts, images] score matrix.

  Returns `(ir_rank [texts], tr_rank [images])`: image retrieval ranks each
  text's image among all images; text retrieval takes, per image, the best
  rank of any of its texts among all texts. Ties keep index order.
  """
  n_img = scores.shape[1]
  order = np.argsort(-scores, axis=1, kind="stable")
  ir_rank = np.argmax(order == gt[:, None], axis=1)
  order_t = np.argsort(-scores.T, axis=1, kind="stable")
  tr_rank = np.array([
      np.min(np.where(gt[order_t[j]] == j)[0]) for j in range(n_img)])
  return ir_rank, tr_rank


def _match_logit(model, params, batch):
  out = model.apply({"params": params}, batch, "itm", deterministic=True)
  return out["itm_logits"][:, 1].astype(np.float32)


@register_evaluator
class ZeroShotRetrieval(Evaluator):
  """R@1/5/10 of image and text retrieval ranked by the ITM match logit.

  Every caption of the first `num_images` held-out images is scored against
  every one of those images (the official zero-shot protocol with a
  pretrained model's ITM head). `dataset`: the held-out data key (default:
  the first in name order). Yields `val/zs_{ir,tr}_r{1,5,10}` (percent),
  `val/zs_images`, `val/zs_texts`.
  """

  type = "zero_shot_retrieval"

  def __init__(self, ctx, *, num_images: int = 50, dataset: str = ""):
    super().__init__(ctx)
    self.num_images = int(num_images)
    self.dataset = dataset

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    del step
    ctx = self.ctx
    if self.num_images <= 0 or not ctx.datasets:
      return
    key = self.dataset or sorted(ctx.datasets)[0]
    if key not in ctx.datasets:
      raise ValueError(f"zero_shot_retrieval: no held-out data {key!r}; "
                       f"have {sorted(ctx.datasets)}")
    data = ctx.datasets[key]
    score_fn = ctx.jit("zero_shot_match_logit", lambda p, b: _match_logit(
        ctx.model, p, b))
    texts, text_img, images = retrieval_pairs(data, self.num_images)
    img_ex = [data.store.load(int(i)) for i in images]
    txt_ex = [data.text.example(t) for t in texts]
    lt = max(len(e["input_ids"]) for e in txt_ex)
    li = max(len(e["img_feat"]) for e in img_ex)
    n_img = len(images)
    rows = -(-n_img // ctx.batch_multiple) * ctx.batch_multiple
    bucket = bk.Bucket(lt, li, rows)
    scores = []
    for t in txt_ex:
      exs = [{"input_ids": t["input_ids"], "img_feat": im["img_feat"],
              "img_pos_feat": im["img_pos_feat"]} for im in img_ex]
      exs += exs[:1] * (rows - n_img)  # fill rows; their scores are dropped
      batch = collate_lib.collate(exs, bucket)
      scores.append(score_fn(params, ctx.put(batch)))
    scores = np.asarray(jax.device_get(scores))[:, :n_img]  # [texts, images]
    column = {int(i): j for j, i in enumerate(images)}
    gt = np.asarray([column[int(i)] for i in text_img])
    ir_rank, tr_rank = retrieval_ranks(scores, gt)
    for k in (1, 5, 10):
      yield f"val/zs_ir_r{k}", float(np.mean(ir_rank < k) * 100)
    for k in (1, 5, 10):
      yield f"val/zs_tr_r{k}", float(np.mean(tr_rank < k) * 100)
    yield "val/zs_images", float(n_img)
    yield "val/zs_texts", float(len(texts))
