"""Image-text retrieval: every text against every image, and R@K.

`retrieval` is the official full evaluation (`utils/itm_eval.py` on the
score matrix of `ItmEvalDataset`): every text of a split is scored against
every image of that split, by the finetuned ranking score (`score="rank"`:
`rank_output`, whose sigmoid the loss uses; ranks are the same) or by the
pretrained ITM "match" logit (`score="itm"`, zero-shot), and image retrieval
(IR: a text's image among all images) and text retrieval (TR: an image's
captions among all texts) are reported as R@1/5/10, their means and
`r_mean`. `zero_shot_retrieval` is the same computation on the captions of
the first few held-out images, for a pretraining run's periodic check.

How the scores are computed (`score_matrix`): texts are grouped by length
and images by region count into a few bins (`length_bins`: the grouping
with the least padding); each bin's token ids or region features are put
once on every device, and a pair batch is just two index vectors (text,
image) sharded over the devices, gathered into rows on the device, so the
host never builds the text x image rows. Each (text bin, image bin) block
has one static shape; its pairs are cut into batches of `batch_size` rows
(a multiple of `ctx.batch_multiple`; the last one padded with copies of a
pair whose score is dropped). `pair_plan` is that plan: every pair exactly
once, on any device count.

Ranks and ties (`retrieval_ranks`): a candidate's rank is the number of
wrong candidates whose score is at least the true one's (for TR: at least
the best score among the image's captions). A tie thus counts against the
true pair, whatever the order of the candidates, so the metrics do not
depend on the sharding, the bins or the order of the split. NaN scores
count as -inf. With fewer than K candidates every rank is below K.

Difference from the official `itm_eval` (deliberate): its IR counts
`(rank < K).sum()` over the two-column output of `nonzero()` (text row,
rank), so it also counts the row index of the first K texts; here only the
rank counts (the intended definition). The official matrix is float16 and
`topk` breaks ties in an unspecified order; here float32 and the rule
above.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uniter_jax import model as um
from uniter_jax.evaluators import predict
from uniter_jax.evaluators.base import Evaluator, register_evaluator

SCORES = ("rank", "itm")
KS = (1, 5, 10)


# ----------------------------------------------------------------------------
# Ranks and recall.
# ----------------------------------------------------------------------------
def retrieval_ranks(scores: np.ndarray, gt: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Ranks of the true pairs in a [texts, images] score matrix.

  Args:
    scores: [T, I] scores, higher is better.
    gt: [T] the column of each text's image.

  Returns:
    `(ir_rank [T], tr_rank [I])`: image retrieval ranks each text's image
    among all images; text retrieval ranks, per image, the best of its
    texts among all texts. A rank is the number of wrong candidates that
    score at least as high (ties count against the true pair); an image
    with no text gets rank T.
  """
  s = np.asarray(scores, np.float32)
  gt = np.asarray(gt, np.int64)
  n_txt, n_img = s.shape
  if gt.shape != (n_txt,) or (n_txt and (gt.min() < 0 or gt.max() >= n_img)):
    raise ValueError(f"retrieval_ranks: gt must be {n_txt} column indices "
                     f"in [0, {n_img}), got shape {gt.shape}")
  s = np.where(np.isnan(s), -np.inf, s)
  true = s[np.arange(n_txt), gt]
  ir_rank = np.sum(s >= true[:, None], axis=1) - 1
  best = np.full(n_img, -np.inf, np.float32)
  np.maximum.at(best, gt, true)
  at_least = np.sum(s >= best[None, :], axis=0)
  true_at_least = np.zeros(n_img, np.int64)
  np.add.at(true_at_least, gt, true >= best[gt])
  tr_rank = at_least - true_at_least
  has_text = np.zeros(n_img, bool)
  has_text[gt] = True
  tr_rank[~has_text] = n_txt
  return ir_rank.astype(np.int64), tr_rank.astype(np.int64)


def recall_metrics(ir_rank: np.ndarray, tr_rank: np.ndarray,
                   ks: Sequence[int] = KS) -> dict[str, float]:
  """`ir_r{k}`, `tr_r{k}` (percent of texts / images ranked below k),
  `ir_mean`, `tr_mean` (their means over `ks`) and `r_mean` (the mean of
  those two), as the official `itm_eval` defines them (there as fractions:
  `img_r*` is IR, `txt_r*` TR)."""
  out = {}
  for kind, rank in (("ir", ir_rank), ("tr", tr_rank)):
    rank = np.asarray(rank)
    vals = [100.0 * float(np.mean(rank < k)) if rank.size else 0.0
            for k in ks]
    for k, v in zip(ks, vals):
      out[f"{kind}_r{k}"] = v
    out[f"{kind}_mean"] = float(np.mean(vals))
  out["r_mean"] = (out["ir_mean"] + out["tr_mean"]) / 2
  return out


def top_candidates(scores: np.ndarray, k: int, axis: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Indices and scores of the k best candidates per row (`axis=1`: images
  per text) or per column (`axis=0`: texts per image), best first; equal
  scores keep candidate order."""
  s = np.asarray(scores, np.float32)
  s = s if axis == 1 else s.T
  s = np.where(np.isnan(s), -np.inf, s)
  k = min(int(k), s.shape[1])
  idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return idx, np.take_along_axis(s, idx, axis=1)


# ----------------------------------------------------------------------------
# The pair plan.
# ----------------------------------------------------------------------------
def length_bins(lengths: Sequence[int] | np.ndarray, num_bins: int
                ) -> np.ndarray:
  """Upper edges (ascending) of at most `num_bins` bins of `lengths` that
  minimise the padded total, each item padded to the smallest edge >= its
  length (exact: dynamic programming over the distinct lengths)."""
  vals, counts = np.unique(np.asarray(lengths, np.int64), return_counts=True)
  if not len(vals):
    raise ValueError("length_bins: no lengths")
  m, nb = len(vals), max(1, min(int(num_bins), len(vals)))
  csum = np.concatenate([[0], np.cumsum(counts)])
  wsum = np.concatenate([[0], np.cumsum(counts * vals)])

  def cost(a: int, b: int) -> int:   # items vals[a:b] padded to vals[b-1]
    return int(vals[b - 1] * (csum[b] - csum[a]) - (wsum[b] - wsum[a]))

  inf = float("inf")
  best = [[inf] * (m + 1) for _ in range(nb + 1)]
  back = [[0] * (m + 1) for _ in range(nb + 1)]
  best[0][0] = 0
  for j in range(1, nb + 1):
    for b in range(1, m + 1):
      for a in range(j - 1, b):
        c = best[j - 1][a] + cost(a, b)
        if c < best[j][b]:
          best[j][b], back[j][b] = c, a
  j = min(range(1, nb + 1), key=lambda x: (best[x][m], x))
  edges, b = [], m
  while j > 0:
    edges.append(int(vals[b - 1]))
    b, j = back[j][b], j - 1
  return np.asarray(edges[::-1], np.int64)


@dataclasses.dataclass(frozen=True)
class PairBatch:
  """One batch of (text, image) pairs within a (text bin, image bin) block.

  `texts` / `images` [R] index into the bins' members; rows from `real` on
  are padding (copies of the first pair)."""
  text_bin: int
  image_bin: int
  texts: np.ndarray
  images: np.ndarray
  real: int


@dataclasses.dataclass(frozen=True)
class PairPlan:
  """Every text x image pair once, in static-shape batches.

  Attributes:
    text_members, image_members: per bin, the text / image indices (into
      the caller's lists) it holds, ascending.
    text_slots, image_slots: per bin, its Lt (text tokens) / Li (regions).
    batches: the batches, block by block (text bin major), pairs of a block
      text major.
  """
  text_members: tuple[np.ndarray, ...]
  image_members: tuple[np.ndarray, ...]
  text_slots: tuple[int, ...]
  image_slots: tuple[int, ...]
  batches: tuple[PairBatch, ...]

  def pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(text indices, image indices) of each batch's real rows."""
    for b in self.batches:
      yield (self.text_members[b.text_bin][b.texts[:b.real]],
             self.image_members[b.image_bin][b.images[:b.real]])


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m


def pair_plan(txt_lens: Sequence[int], num_bbs: Sequence[int], *,
              batch_size: int = 400, batch_multiple: int = 1,
              text_bins: int = 3, image_bins: int = 3) -> PairPlan:
  """Batches scoring every text against every image exactly once.

  Args:
    txt_lens: per text, its tokens with [CLS]/[SEP].
    num_bbs: per image, its regions.
    batch_size: rows per batch (rounded up to `batch_multiple`; a block with
      fewer pairs gets one batch of its pair count rounded up).
    batch_multiple: every batch's rows are a multiple of this (devices).
    text_bins, image_bins: at most this many text lengths / region counts
      (`length_bins`); blocks = text bins x image bins static shapes.
  """
  t_len = np.asarray(txt_lens, np.int64)
  i_nbb = np.asarray(num_bbs, np.int64)
  if not len(t_len) or not len(i_nbb):
    raise ValueError(f"pair_plan: {len(t_len)} texts x {len(i_nbb)} images; "
                     "need at least one of each")
  rows = _round_up(max(1, int(batch_size)), batch_multiple)

  def bins(lengths, n):
    edges = length_bins(lengths, n)
    which = np.searchsorted(edges, lengths, side="left")
    members = tuple(np.flatnonzero(which == k) for k in range(len(edges)))
    return members, tuple(int(e) for e in edges)

  t_members, t_slots = bins(t_len, text_bins)
  i_members, i_slots = bins(i_nbb, image_bins)
  batches = []
  for a, tm in enumerate(t_members):
    for b, im in enumerate(i_members):
      n_pairs = len(tm) * len(im)
      r = min(rows, _round_up(n_pairs, batch_multiple))
      for lo in range(0, n_pairs, r):
        p = np.arange(lo, min(lo + r, n_pairs))
        real = len(p)
        p = np.concatenate([p, np.full(r - real, p[0])])
        batches.append(PairBatch(a, b, (p // len(im)).astype(np.int32),
                                 (p % len(im)).astype(np.int32), real))
  return PairPlan(t_members, i_members, t_slots, i_slots, tuple(batches))


# ----------------------------------------------------------------------------
# Scoring on the devices.
# ----------------------------------------------------------------------------
def _model_args(model) -> tuple:
  """The pretraining model computes one head per call: ask for ITM."""
  return ("itm",) if isinstance(model, um.UniterForPretraining) else ()


def pair_scores(model, params, tables: Mapping[str, jax.Array],
                texts: jax.Array, images: jax.Array, score: str
                ) -> jax.Array:
  """Scores [R] of the pairs (`texts[r]`, `images[r]`) of bin tables.

  `tables`: `input_ids` [n_t, Lt] (0-padded), `txt_lens` [n_t], `img_feat`
  [n_i, Li, D], `img_pos_feat` [n_i, Li, 7] (0-padded), `num_bbs` [n_i].
  The rows are built here in the batch layout `[text (Lt) | regions (Li)]`
  with their attention mask. `score`: "rank" (`logits`, the ranking head)
  or "itm" (`itm_logits[:, 1]`, the ITM match logit).
  """
  ids = tables["input_ids"][texts]
  tl = tables["txt_lens"][texts]
  nbb = tables["num_bbs"][images]
  lt, li = ids.shape[1], tables["img_feat"].shape[1]
  attn = jnp.concatenate([jnp.arange(lt)[None, :] < tl[:, None],
                          jnp.arange(li)[None, :] < nbb[:, None]], axis=1)
  batch = {"input_ids": ids,
           "position_ids": jnp.broadcast_to(
               jnp.arange(lt, dtype=jnp.int32), ids.shape),
           "img_feat": tables["img_feat"][images],
           "img_pos_feat": tables["img_pos_feat"][images],
           "attn_masks": attn.astype(jnp.int32)}
  out = model.apply({"params": params}, batch, *_model_args(model),
                    deterministic=True)
  if score == "rank":
    return out["logits"][:, 0].astype(jnp.float32)
  if score == "itm":
    return out["itm_logits"][:, 1].astype(jnp.float32)
  raise ValueError(f"retrieval score {score!r}; expected one of {SCORES}")


def _replicate(ctx, value: np.ndarray) -> jax.Array:
  value = np.ascontiguousarray(value)
  return jax.make_array_from_callback(value.shape, ctx.replicated,
                                      lambda idx: value[idx])


def _text_table(texts: Sequence[np.ndarray], members: np.ndarray,
                slots: int) -> dict[str, np.ndarray]:
  ids = np.zeros((len(members), slots), np.int32)
  lens = np.zeros(len(members), np.int32)
  for r, t in enumerate(members):
    x = np.asarray(texts[t])
    ids[r, :len(x)] = x
    lens[r] = len(x)
  return {"input_ids": ids, "txt_lens": lens}


def _image_table(images: Sequence[Mapping[str, np.ndarray]],
                 members: np.ndarray, slots: int) -> dict[str, np.ndarray]:
  first = np.asarray(images[members[0]]["img_feat"])
  feat = np.zeros((len(members), slots, first.shape[1]), first.dtype)
  pos = np.zeros((len(members), slots, 7), np.float32)
  nbb = np.zeros(len(members), np.int32)
  for r, i in enumerate(members):
    f = np.asarray(images[i]["img_feat"])
    if f.dtype != feat.dtype:
      raise ValueError(f"retrieval: image {i} has img_feat {f.dtype}, the "
                       f"others {feat.dtype}")
    n = len(f)
    feat[r, :n] = f
    pos[r, :n] = images[i]["img_pos_feat"]
    nbb[r] = n
  return {"img_feat": feat, "img_pos_feat": pos, "num_bbs": nbb}


def score_matrix(ctx, params, texts: Sequence[np.ndarray],
                 images: Sequence[Mapping[str, np.ndarray]], *,
                 score: str = "rank", batch_size: int = 400,
                 text_bins: int = 3, image_bins: int = 3) -> np.ndarray:
  """Scores [T, I] (float32) of every text against every image.

  Args:
    ctx: an `EvalContext` (model, placement, `batch_multiple`, jit cache).
    params: the model parameters.
    texts: token ids of each text, with [CLS] and [SEP].
    images: per image `img_feat` [n, D] (float16 or float32; the model
      casts) and `img_pos_feat` [n, 7].
    score: "rank" or "itm" (`pair_scores`).
    batch_size, text_bins, image_bins: see `pair_plan`.
  """
  if score not in SCORES:
    raise ValueError(f"retrieval score {score!r}; expected one of {SCORES}")
  plan = pair_plan([len(t) for t in texts],
                   [len(im["img_feat"]) for im in images],
                   batch_size=batch_size, batch_multiple=ctx.batch_multiple,
                   text_bins=text_bins, image_bins=image_bins)
  fn = ctx.jit(("retrieval_pair_scores", score), lambda p, tab, t, i: (
      pair_scores(ctx.model, p, tab, t, i, score)))
  t_tabs = [{k: _replicate(ctx, v) for k, v in
             _text_table(texts, m, s).items()}
            for m, s in zip(plan.text_members, plan.text_slots)]
  i_tabs = [{k: _replicate(ctx, v) for k, v in
             _image_table(images, m, s).items()}
            for m, s in zip(plan.image_members, plan.image_slots)]
  n_txt, n_img = len(texts), len(images)
  out = np.zeros((n_txt, n_img), np.float32)
  written = np.zeros((n_txt, n_img), bool)
  hosts, host = jax.process_count(), jax.process_index()
  by_block: dict[tuple[int, int], list[PairBatch]] = {}
  for b in plan.batches:
    by_block.setdefault((b.text_bin, b.image_bin), []).append(b)
  real = 0
  for (a, c), batches in by_block.items():
    tables = {**t_tabs[a], **i_tabs[c]}
    pending = []
    for b in batches:
      per = len(b.texts) // hosts
      rows = slice(host * per, (host + 1) * per)
      idx = ctx.put({"texts": b.texts[rows], "images": b.images[rows]})
      pending.append(fn(params, tables, idx["texts"], idx["images"]))
    for b, s in zip(batches, jax.device_get(pending)):
      t = plan.text_members[a][b.texts[:b.real]]
      i = plan.image_members[c][b.images[:b.real]]
      out[t, i] = np.asarray(s)[:b.real]
      written[t, i] = True
      real += b.real
  if real != n_txt * n_img or not written.all():
    raise AssertionError(f"retrieval: scored {real} pairs, covering "
                         f"{int(written.sum())} of {n_txt} x {n_img}")
  return out


# ----------------------------------------------------------------------------
# The evaluators.
# ----------------------------------------------------------------------------
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


def _default_key(ctx) -> str:
  itr = sorted(k for k, t in ctx.key_task.items()
               if t == "itr" and k in ctx.datasets)
  if itr:
    return itr[0]
  if not ctx.datasets:
    raise ValueError("retrieval: the run has no held-out data")
  return sorted(ctx.datasets)[0]


@register_evaluator
class Retrieval(Evaluator):
  """Full retrieval evaluation of one split: every text x every image.

  Options:
    dataset: the data key ("{task}_{dataset}", default: the first `itr`
      key with held-out data).
    split: "" for the key's held-out data (`val_split` of `val_text`), or
      another split, read with `ctx.data(key, split, text)`.
    text: tfds name of that split's text dataset ("": the dataset's
      `val_text`), e.g. the official test txt_db.
    score: "rank" (finetuned ranking head) or "itm" (ITM match logit,
      zero-shot from a pretraining checkpoint).
    batch_size: rows per scoring batch (official `inf_minibatch_size`).
    text_bins, image_bins: length bins (static shapes) of texts / images.
    top_k: candidates per text / image in the results file.
    write_results: write `results/{key}_{split}_step{N}.json`.
    save_scores: also write the score matrix, `..._scores.npz` (`scores`
      [T, I] float32, `text_ids`, `image_keys`).

  Yields `{split}/{key}/{ir_r1..tr_mean, r_mean}` (percent; split "val"
  for the held-out data), `.../texts`, `.../images`.
  """

  type = "retrieval"

  def __init__(self, ctx, *, dataset: str = "", split: str = "",
               text: str = "", score: str = "rank", batch_size: int = 400,
               text_bins: int = 3, image_bins: int = 3, top_k: int = 10,
               write_results: bool = True, save_scores: bool = False):
    super().__init__(ctx)
    if score not in SCORES:
      raise ValueError(f"retrieval: score={score!r}; expected one of "
                       f"{SCORES}")
    self.dataset, self.split, self.text = dataset, split, text
    self.score = score
    self.batch_size = int(batch_size)
    self.text_bins, self.image_bins = int(text_bins), int(image_bins)
    self.top_k = int(top_k)
    self.write_results = bool(write_results)
    self.save_scores = bool(save_scores)

  def evaluate(self, params) -> tuple[dict[str, Any], dict[str, float]]:
    """(details, metrics) of the split: details holds `scores`, `gt`,
    `text_ids`, `image_keys` and the ranks."""
    ctx = self.ctx
    key = self.dataset or _default_key(ctx)
    if key not in ctx.key_task:
      raise ValueError(f"retrieval: unknown data key {key!r}; have "
                       f"{sorted(ctx.key_task)}")
    data = ctx.data(key, self.split, self.text or None)
    src = data.text   # held-out data keep every text (data.eval_max_txt_len)
    limit = int(ctx.model.cfg.max_position_embeddings)
    if int(src.txt_lens.max()) > limit:
      raise ValueError(f"retrieval: {src.name} has a text of "
                       f"{int(src.txt_lens.max())} tokens; the model has "
                       f"{limit} positions (set data.eval_max_txt_len)")
    images = np.unique(src.img_index)
    gt = np.searchsorted(images, src.img_index)
    texts = [src.input_ids(t) for t in range(len(src))]
    img_parts = [data.store.load(int(i), np.float16) for i in images]
    scores = score_matrix(ctx, params, texts, img_parts, score=self.score,
                          batch_size=self.batch_size,
                          text_bins=self.text_bins,
                          image_bins=self.image_bins)
    ir_rank, tr_rank = retrieval_ranks(scores, gt)
    metrics = recall_metrics(ir_rank, tr_rank)
    details = {"key": key, "scores": scores, "gt": gt,
               "text_ids": [src.record_id(t) for t in range(len(src))],
               "image_keys": [data.store.keys[int(i)] for i in images],
               "ir_rank": ir_rank, "tr_rank": tr_rank}
    return details, metrics

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    details, metrics = self.evaluate(params)
    key, split = details["key"], self.split or "val"
    stem = f"{key}_{split}_step{step}"
    if self.write_results:
      predict.write_result(self.ctx, f"{stem}.json", json.dumps(
          results_json(details, metrics, split=split, step=step,
                       score=self.score, top_k=self.top_k)))
    if self.save_scores:
      buf = io.BytesIO()
      np.savez(buf, scores=details["scores"],
               text_ids=np.asarray(details["text_ids"]),
               image_keys=np.asarray(details["image_keys"]))
      predict.write_result(self.ctx, f"{stem}_scores.npz", buf.getvalue())
    for name, value in metrics.items():
      yield f"{split}/{key}/{name}", value
    yield f"{split}/{key}/texts", float(len(details["text_ids"]))
    yield f"{split}/{key}/images", float(len(details["image_keys"]))


def results_json(details: Mapping[str, Any], metrics: Mapping[str, float],
                 *, split: str, step: int, score: str, top_k: int = 10
                 ) -> dict[str, Any]:
  """The results file: metrics, then per text its image, the rank of that
  image and the top-k images (with scores), and per image its texts, the
  best rank among them and the top-k texts."""
  scores, gt = details["scores"], details["gt"]
  tids, ikeys = details["text_ids"], details["image_keys"]
  ti, ts = top_candidates(scores, top_k, axis=1)
  it, its = top_candidates(scores, top_k, axis=0)
  by_image: list[list[str]] = [[] for _ in ikeys]
  for t, j in enumerate(gt):
    by_image[int(j)].append(tids[t])
  return {
      "split": split, "step": int(step), "score": score, "metrics": metrics,
      "ties": "a tie counts against the true pair",
      "texts": [{"id": tids[t], "image": ikeys[int(gt[t])],
                 "rank": int(details["ir_rank"][t]),
                 "top_images": [ikeys[int(j)] for j in ti[t]],
                 "top_scores": [float(v) for v in ts[t]]}
                for t in range(len(tids))],
      "images": [{"image": ikeys[j], "texts": by_image[j],
                  "rank": int(details["tr_rank"][j]),
                  "top_texts": [tids[int(t)] for t in it[j]],
                  "top_scores": [float(v) for v in its[j]]}
                 for j in range(len(ikeys))]}


@register_evaluator
class ZeroShotRetrieval(Evaluator):
  """R@1/5/10 of image and text retrieval ranked by the ITM match logit.

  Every caption of the first `num_images` held-out images is scored against
  every one of those images (the official zero-shot protocol with a
  pretrained model's ITM head, on a subset; `retrieval` with
  `score="itm"` does the whole split). `dataset`: the held-out data key
  (default: the first in name order). Yields `val/zs_{ir,tr}_r{1,5,10}`
  (percent), `val/zs_images`, `val/zs_texts`.
  """

  type = "zero_shot_retrieval"

  def __init__(self, ctx, *, num_images: int = 50, dataset: str = "",
               batch_size: int = 400):
    super().__init__(ctx)
    self.num_images = int(num_images)
    self.dataset = dataset
    self.batch_size = int(batch_size)

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
    texts, text_img, images = retrieval_pairs(data, self.num_images)
    # One static shape: a pretraining run's periodic check compiles once.
    scores = score_matrix(
        ctx, params, [data.text.input_ids(t) for t in texts],
        [data.store.load(int(i), np.float16) for i in images], score="itm",
        batch_size=self.batch_size, text_bins=1, image_bins=1)
    column = {int(i): j for j, i in enumerate(images)}
    gt = np.asarray([column[int(i)] for i in text_img])
    ir_rank, tr_rank = retrieval_ranks(scores, gt)
    for k in KS:
      yield f"val/zs_ir_r{k}", float(np.mean(ir_rank < k) * 100)
    for k in KS:
      yield f"val/zs_tr_r{k}", float(np.mean(tr_rank < k) * 100)
    yield "val/zs_images", float(len(images))
    yield "val/zs_texts", float(len(texts))
