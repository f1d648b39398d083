"""Plots a person reads without help: the loss-curve figure (ITM
cross-entropy on its own log axis, every task visible, legends outside the
data) and the WRA figure (matched and mismatched pair side by side, regions
labelled by their detected class, colour relative to the uniform plan).

The figures are inspected as matplotlib objects, not as pixels.
"""

import os

import jax
import numpy as np
import pytest

from configs import demo
from data_prep import prepare
from data_prep import synthetic
from uniter_jax import evaluators
from uniter_jax import model as um
from uniter_jax.data import sources
from uniter_jax.evaluators import plots as plot_evals
from uniter_jax.train import input as input_lib
from uniter_jax.train import plots
from uniter_jax.train import trainer

DATA_DIR = "/tmp/uniter_jax_test_data"


def _pretrain_rows():
  """Rows as a pretraining run logs them: the ITM total goes negative (its
  WRA term), the cross-entropy never does; MRFR first appears at update
  4, MLM only in the held-out rows."""
  rows = []
  for s in (2, 4, 6):
    row = {"step": s, "train/loss": 0.5,
           "train/itm/loss": 0.3 - 0.2 * s, "train/itm/itm_loss": 0.3 - 0.2 * s,
           "train/itm/itm_xe": 0.7 / s, "train/itm/itm_ot_pos": 1.0 / s,
           "train/itm/itm_ot_neg": 1.5, "train/mrckl/loss": 0.004,
           "train/mrckl/mrckl_loss": 0.004, "train/lr": 1e-3,
           "train/examples_per_sec": 100.0}
    if s > 2:
      row.update({"train/mrfr/loss": 0.8 / s, "train/mrfr/mrfr_loss": 0.8 / s})
    rows.append(row)
  rows.append({"step": 6, "val/itm_synthetic/itm_xe": 0.2,
               "val/itm_synthetic/itm_loss": -0.5,
               "val/itm_synthetic/itm_acc": 0.75,
               "val/mlm_synthetic/mlm_loss": 4.2,
               "val/mlm_synthetic/mlm_acc": 0.1,
               "val/zs_ir_r1": 25.0, "val/zs_tr_r1": 25.0})
  return rows


def _axes(fig, title_part):
  found = [ax for ax in fig.axes if title_part in ax.get_title()]
  assert len(found) == 1, [ax.get_title() for ax in fig.axes]
  return found[0]


def _curves(ax):
  return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
          for line in ax.get_lines()}


def test_itm_cross_entropy_has_its_own_log_axis():
  fig = plots.loss_curves_figure(_pretrain_rows())
  itm = _axes(fig, "itm cross-entropy")
  assert itm.get_yscale() == "log"
  curves = _curves(itm)
  assert curves["itm train"] == ([2, 4, 6], [0.7 / 2, 0.7 / 4, 0.7 / 6])
  assert curves["itm held out (itm_synthetic/itm_xe)"] == ([6], [0.2])
  assert all(v > 0 for _, ys in curves.values() for v in ys)
  # The ITM total (negative here) is drawn nowhere.
  totals = {0.3 - 0.2 * s for s in (2, 4, 6)} | {-0.5}
  for ax in fig.axes:
    for _, ys in _curves(ax).values():
      assert not totals & set(ys), ax.get_title()
  wra = _axes(fig, "WRA distance")
  assert set(_curves(wra)) == {"itm matched pairs", "itm mismatched pairs"}


def test_every_task_is_drawn_and_no_legend_covers_data():
  fig = plots.loss_curves_figure(_pretrain_rows())
  losses = _axes(fig, "loss per task")
  assert losses.get_yscale() == "log"
  curves = _curves(losses)
  assert curves["mrckl"][1] == [0.004] * 3
  assert curves["mrfr"][0] == [4, 6]       # from its first logged update
  assert curves["mlm held out (mlm_synthetic/mlm_loss)"] == ([6], [4.2])
  held = _curves(_axes(fig, "held-out metrics"))
  assert held["itm_synthetic/itm_acc"] == ([6], [75.0])   # in percent
  assert {"zs_ir_r1", "zs_tr_r1", "mlm_synthetic/mlm_acc"} <= set(held)
  # Equal values stay visible: the two R@1 curves differ in marker.
  markers = {line.get_label(): line.get_marker() for line in
             _axes(fig, "held-out metrics").get_lines()}
  assert markers["zs_ir_r1"] != markers["zs_tr_r1"]
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  for ax in fig.axes:
    legend = ax.get_legend()
    assert legend is not None, ax.get_title()
    # Every curve is in the legend, and the legend lies right of the axes.
    assert [t.get_text() for t in legend.get_texts()] == [
        line.get_label() for line in ax.get_lines()]
    assert (legend.get_window_extent(renderer).x0
            >= ax.get_window_extent(renderer).x1)


def test_finetuning_curves_and_a_loss_that_reaches_zero():
  rows = [{"step": s, "train/loss": 1.0 / s, "train/vqa/loss": 1.0 / s,
           "train/vqa/vqa_loss": 1.0 / s,
           "train/itr/itr_loss": 0.2 - 0.1 * s} for s in (1, 2, 3)]
  rows.append({"step": 3, "val/vqa_loss": 0.4, "val/vqa_score": 0.5,
               "val/vqa_score_majority": 0.2,
               "val/itr_synthetic/ir_r1": 30.0})
  fig = plots.loss_curves_figure(rows)
  losses = _axes(fig, "loss per task")
  curves = _curves(losses)
  assert curves["vqa"] == ([1, 2, 3], [1.0, 0.5, 1.0 / 3])
  assert curves["vqa held out (vqa_loss)"] == ([3], [0.4])
  assert curves["itr"][1][-1] < 0
  # A log axis would drop the values <= 0 without a word: linear, and said.
  assert losses.get_yscale() == "linear"
  assert "linear" in losses.get_title()
  held = _curves(_axes(fig, "held-out metrics"))
  assert held == {"vqa_score": ([3], [50.0]),
                  "itr_synthetic/ir_r1": ([3], [30.0])}
  assert not any("cross-entropy" in ax.get_title() for ax in fig.axes)


def test_plan_vs_uniform_is_one_for_an_even_plan():
  even = np.full((3, 4), 1.0 / 12)
  np.testing.assert_allclose(plots.plan_vs_uniform(even), np.ones((3, 4)))
  plan = np.array([[0.3, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(plots.plan_vs_uniform(plan),
                             [[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.fixture(scope="module")
def wra_context(tmp_path_factory):
  """A tiny pretraining model and the held-out ITM data of the tiny
  synthetic corpus, as the trainer hands them to the WRA evaluator."""
  c = demo.get_config("runlocal")
  c.data.data_dir = DATA_DIR
  c.model.update(dict(hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64))
  c.datasets.synthetic.tasks = ("itm",)
  c.datasets.synthetic.mix_ratio = (1,)
  prepare.ensure_synthetic(c)
  tasks = input_lib.make_run_tasks(c)
  data = input_lib.make_datasets(
      c, tasks, split_field="val_split", text_field="val_text",
      token_budget=256, batch_multiple=1, seed=1, held_out=True)
  meta = input_lib.vocab_info(data)
  model = trainer.build_model(c, int(meta["vocab_size"]))
  params = um.init_params(model, jax.random.key(0))
  ctx = evaluators.EvalContext(
      model=model, tasks=tasks, key_task={"itm_synthetic": "itm"},
      datasets=data, train_datasets={}, mesh=None, put=None,
      replicated=None, batch_multiple=1, meta=meta,
      workdir=str(tmp_path_factory.mktemp("wra")), config=c)
  return ctx, params, data["itm_synthetic"]


def test_wra_figure_shows_a_matched_and_a_mismatched_pair(wra_context):
  ctx, params, data = wra_context
  fig = plot_evals.WraPlan(ctx).figure(params, step=7)
  heat = [ax for ax in fig.axes if ax.images]
  assert len(heat) == 2
  assert "matched pair" in heat[0].get_title()
  assert "mismatched pair" in heat[1].get_title()
  assert "ITM match probability" in heat[0].get_title()
  text = data.text
  keys = [text.store.keys[int(text.img_index[0])]]
  keys.append(text.store.keys[int(next(
      i for i in text.img_index if i != text.img_index[0]))])
  # Regions are labelled by their detected class: the argmax of the soft
  # labels, named by the synthetic corpus' classes (label c+1 = class c).
  store = sources.ImageStore(DATA_DIR, text.store.name, text.store.rule,
                             with_soft_labels=True)
  names = ("background",) + synthetic.CLASSES
  for ax, key in zip(heat, keys):
    assert key in ax.get_title()
    top = store.load(store.key_to_index[key])["img_soft_labels"].argmax(1)
    want = [f"{r} " + (names[c] if c < len(names) else f"#{c}")
            for r, c in enumerate(top)]
    assert [t.get_text() for t in ax.get_xticklabels()] == want
    assert any(c in w for w in want for c in synthetic.CLASSES)
    # Colour: each word's row relative to the uniform plan (mean 1).
    ratio = ax.images[0].get_array()
    np.testing.assert_allclose(np.asarray(ratio).mean(1), 1.0, rtol=1e-5)
  words = [t.get_text() for t in heat[0].get_yticklabels()]
  vocab = ctx.meta["vocab"]
  assert words == [vocab[i] for i in text.input_ids(0)]
  assert words[0] == "[CLS]" and words[-1] == "[SEP]"
  # The colour bar says what the colour means.
  bar = [ax for ax in fig.axes if not ax.images][0]
  assert "uniform" in bar.get_ylabel()


def test_wra_evaluator_writes_the_png(wra_context):
  ctx, params, _ = wra_context
  list(plot_evals.WraPlan(ctx).run(params, step=7))
  path = os.path.join(ctx.workdir, "plots", "wra_plan.png")
  assert os.path.getsize(path) > 10_000
