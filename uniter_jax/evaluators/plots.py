"""Plot evaluators: loss curves and a held-out pair's WRA transport plan.

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
  """`plots/wra_plan.png`: the transport plan between the words and the
  regions of the first held-out pair, with the ITM match probability.

  The OT solver settings are the `itm` task's when the run has one.
  """

  type = "wra_plan"

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    del step
    self._draw(params)
    return iter(())

  def _draw(self, params) -> None:
    ctx = self.ctx
    datasets = ctx.datasets or ctx.train_datasets
    if not datasets or not _single_main():
      return
    params = jax.device_get(params)
    data = datasets[sorted(datasets)[0]]
    ex = data.text.example(0)
    lt, li = len(ex["input_ids"]), len(ex["img_feat"])
    batch = {
        "input_ids": ex["input_ids"][None],
        "position_ids": np.arange(lt, dtype=np.int32)[None],
        "img_feat": ex["img_feat"][None],
        "img_pos_feat": ex["img_pos_feat"][None],
        "attn_masks": np.ones((1, lt + li), np.int32),
    }
    out = ctx.model.apply({"params": params}, batch, "itm")
    itm = ctx.tasks.get("itm")
    cfg = getattr(itm, "ot", None) or ot_lib.OTConfig()
    cost = ot_lib.cosine_cost(out["txt_output"], out["img_output"])
    tv, iv = np.ones((1, lt), bool), np.ones((1, li), bool)
    plan = np.asarray(ot_lib.sinkhorn_plan(cost, tv, iv, cfg)
                      if cfg.solver == "sinkhorn" else
                      ot_lib.ipot_plan(cost, tv, iv, cfg))[0]
    vocab = ctx.meta.get("vocab")
    words = [vocab[i] if vocab and i < len(vocab) else str(i)
             for i in ex["input_ids"].tolist()]
    match = float(jax.nn.softmax(out["itm_logits"])[0, 1])
    plots.transport_plan(plan, words,
                         os.path.join(ctx.workdir, "plots", "wra_plan.png"),
                         f"WRA transport plan, held-out pair "
                         f"{ex.get('_id', '')} (ITM match prob {match:.2f})")
