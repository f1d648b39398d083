"""Plot evaluators: loss curves and held-out pairs' WRA transport plans.

Both draw with the host's copy of the parameters, on process 0 of a
single-process run, into `<workdir>/plots/`; configure them with `every_steps=0` to
draw once, after the last update.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import jax
import numpy as np

from uniter_jax import ot as ot_lib
from uniter_jax.data import sources
from uniter_jax.evaluators.base import Evaluator, register_evaluator
from uniter_jax.train import metrics as metrics_lib
from uniter_jax.train import plots


def _single_main() -> bool:
  if jax.process_count() > 1:
    logging.warning("plots are not drawn in a multi-process run")
    return False
  return True


@register_evaluator
class LossCurves(Evaluator):
  """`plots/loss_curves.png` from the run's metrics file."""

  type = "loss_curves"

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    del params, step
    if _single_main():
      plots.loss_curves(metrics_lib.read_metrics(self.ctx.workdir),
                        os.path.join(self.ctx.workdir, "plots",
                                     "loss_curves.png"))
    return iter(())


@register_evaluator
class WraPlan(Evaluator):
  """`plots/wra_plan.png`: the WRA transport plans of a matched and a
  mismatched pair side by side, with their ITM match probabilities.

  The matched pair is the first held-out caption with its own image; the
  mismatched one the same caption with the first other image of the split.
  Regions are labelled by their detected class where the image store has
  soft labels (the argmax of `img_soft_labels`, named when the store's
  metadata has `label_names` or the corpus is the synthetic one, whose
  class words end its vocabulary; otherwise the label index), else by
  their index. Colour: each word's mass relative to the uniform plan
  (`train.plots.plan_vs_uniform`). The OT solver settings are the `itm`
  task's when the run has one.
  """

  type = "wra_plan"

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    fig = self.figure(params, step)
    if fig is not None:
      plots.save_figure(fig, os.path.join(self.ctx.workdir, "plots",
                                          "wra_plan.png"))
    return iter(())

  def figure(self, params, step: int):
    """The matplotlib figure (None without data or in a multi-process
    run): two heatmap axes (matched, mismatched) and a colour bar."""
    ctx = self.ctx
    datasets = ctx.datasets or ctx.train_datasets
    if not datasets or not _single_main():
      return None
    params = jax.device_get(params)
    # The ITM data when the run has it (its examples are caption-image
    # pairs); else the first data key.
    keys = sorted(datasets)
    key = next((k for k in keys if ctx.key_task.get(k) == "itm"), keys[0])
    data = datasets[key]
    ex = data.text.example(0)
    own = int(data.text.img_index[0])
    others = np.flatnonzero(data.text.img_index != own)
    images = [ex]
    if len(others):
      images.append(data.store.load(int(data.text.img_index[others[0]])))
    ids = ex["input_ids"]
    lt = len(ids)
    n_reg = [len(im["img_feat"]) for im in images]
    li = max(n_reg)
    b = len(images)
    # One batch: regions padded at the end of the image part, masked.
    img_feat = np.zeros((b, li, ex["img_feat"].shape[1]), np.float32)
    img_pos = np.zeros((b, li, ex["img_pos_feat"].shape[1]), np.float32)
    attn = np.zeros((b, lt + li), np.int32)
    for i, (im, n) in enumerate(zip(images, n_reg)):
      img_feat[i, :n] = im["img_feat"]
      img_pos[i, :n] = im["img_pos_feat"]
      attn[i, :lt + n] = 1
    batch = {
        "input_ids": np.broadcast_to(ids, (b, lt)).astype(np.int32),
        "position_ids": np.broadcast_to(np.arange(lt, dtype=np.int32),
                                        (b, lt)),
        "img_feat": img_feat, "img_pos_feat": img_pos, "attn_masks": attn,
    }
    out = ctx.model.apply({"params": params}, batch, "itm")
    itm = ctx.tasks.get("itm")
    cfg = getattr(itm, "ot", None) or ot_lib.OTConfig()
    cost = ot_lib.cosine_cost(out["txt_output"], out["img_output"])
    tv, iv = np.ones((b, lt), bool), attn[:, lt:] > 0
    plan = np.asarray(ot_lib.sinkhorn_plan(cost, tv, iv, cfg)
                      if cfg.solver == "sinkhorn" else
                      ot_lib.ipot_plan(cost, tv, iv, cfg))
    match = np.asarray(jax.nn.softmax(out["itm_logits"])[:, 1])
    vocab = ctx.meta.get("vocab")
    words = [vocab[i] if vocab and i < len(vocab) else str(i)
             for i in ids.tolist()]
    labels = region_labels(ctx, data, [im["img_key"] for im in images],
                           n_reg)
    panels = []
    for i, im in enumerate(images):
      kind = "matched pair" if i == 0 else "mismatched pair"
      panels.append(plots.PlanPanel(
          plan[i, :, :n_reg[i]], words, labels[i],
          f"{kind}: image {im['img_key']}\nITM match probability "
          f"{float(match[i]):.2f}"))
    return plots.transport_plans_figure(
        panels, f"WRA transport plan at update {step}, caption "
        f"{ex.get('_id', '')} ({key})")


def label_names(store_meta, text_meta) -> list[str] | None:
  """Names of the detector's labels (index = soft-label column), or None.

  An image store's metadata may list them (`label_names`). The synthetic
  corpus names none, but its vocabulary ends with its class words in label
  order (label c + 1 is class c; 0 is background; `data_prep.synthetic`),
  after the size word "large".
  """
  names = store_meta.get("label_names")
  if names:
    return [str(n) for n in names]
  vocab = text_meta.get("vocab")
  if store_meta.get("source") == "synthetic" and vocab and "large" in vocab:
    return ["background"] + list(vocab[list(vocab).index("large") + 1:])
  return None


def region_labels(ctx, data, img_keys, n_regions) -> list[list[str]]:
  """Per image, one tick label per kept region (`n_regions` of them):
  "<index> <class>" with the region's detected class (argmax of its soft
  labels), or "<index>" when the store has no soft labels."""
  store = data.store
  if not store.meta.get("has_soft_labels"):
    return [[str(r) for r in range(n)] for n in n_regions]
  # The plotted data may have been read without soft labels (ITM does not
  # need them): open the store again with them, under the same region rule.
  soft_store = sources.ImageStore(
      os.path.abspath(os.path.expanduser(ctx.config.data.data_dir)),
      store.name, store.rule, with_soft_labels=True)
  names = label_names(store.meta, ctx.meta)
  out = []
  for key, n in zip(img_keys, n_regions):
    soft = soft_store.load(store.key_to_index[key])["img_soft_labels"][:n]
    out.append([f"{r} " + (names[c] if names and c < len(names) else f"#{c}")
                for r, c in enumerate(soft.argmax(1).tolist())])
  return out
