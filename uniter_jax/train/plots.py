"""PNG plots of a run: loss curves and WRA transport plans.

Each plot has a `*_figure` function that returns the matplotlib figure (to
show in a notebook, or to inspect in a test) and a function that saves it
to a PNG.

Loss curves (`loss_curves_figure`), one panel each, stacked, every legend
outside its axes so none hides a curve:
  * every task's own loss (`train/<task>/<task>_loss`, e.g. MLM's
    cross-entropy, MRFR's regression loss, VQA's BCE), with held-out losses
    of the same name dashed in the task's colour;
  * for a task that also logs a cross-entropy (`<task>_xe`: ITM, whose loss
    adds the WRA term and can go negative), that cross-entropy alone;
  * the WRA distances of matched and mismatched pairs (`itm_ot_pos`,
    `itm_ot_neg`), when logged;
  * held-out accuracies, scores and R@1 in percent.
A loss axis is logarithmic when every value on it is positive, linear
otherwise (a log axis would silently drop values <= 0).

The WRA plot (`transport_plans_figure`) puts panels side by side (a matched
and a mismatched pair): words down, regions across, labelled by their
detected class where the data has one. Colour is the plan divided by the
uniform plan, per word: each word's row is normalised to sum to 1 and
multiplied by the number of regions, so 1 (white) means "spread evenly",
red cells are the regions a word is transported to, blue the ones it
avoids. A circle marks each word's strongest region.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str) -> str:
  """Writes `fig` to the PNG `path` (folders made) and closes it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # bbox_inches="tight" keeps the legends placed outside the axes.
  fig.savefig(path, dpi=110, bbox_inches="tight")
  _pyplot().close(fig)
  return path


def _series(rows, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` over the rows that have a finite number."""
  pts = [(int(r["step"]), float(r[key])) for r in rows
         if isinstance(r.get(key), (int, float)) and "step" in r
         and math.isfinite(float(r[key]))]
  pts.sort()
  return [s for s, _ in pts], [v for _, v in pts]


def _tasks(keys) -> list[str]:
  """Task names: those of the `train/<task>/<metric>` keys, and those of
  held-out `<task>_loss` keys (a task the mix has not drawn yet, or an
  evaluation-only run, still gets its curve)."""
  out = {k.split("/")[1] for k in keys
         if k.startswith("train/") and k.count("/") == 2}
  out |= {k.rsplit("/", 1)[-1][:-len("_loss")] for k in keys
          if k.startswith("val/") and k.endswith("_loss")}
  return sorted(t for t in out if t)


def _held_out(keys, metric: str) -> list[str]:
  """Held-out keys whose last part is `metric` (`val/<data>/<metric>` of
  the task-metrics evaluator, `val/<metric>` of VQA / NLVR2)."""
  return sorted(k for k in keys if k.startswith("val/")
                and k.rsplit("/", 1)[-1] == metric)


# Held-out metrics in [0, 1] (plotted x100) and those already in percent.
_FRACTION_SUFFIXES = ("_acc", "_score", "_consistency")
_PERCENT_NAMES = ("zs_ir_r1", "zs_tr_r1", "ir_r1", "tr_r1", "r_mean")


def _held_out_metrics(keys) -> list[tuple[str, float]]:
  out = []
  for k in sorted(keys):
    if not k.startswith("val/"):
      continue
    last = k.rsplit("/", 1)[-1]
    if last.endswith(_FRACTION_SUFFIXES):
      out.append((k, 100.0))
    elif last in _PERCENT_NAMES:
      out.append((k, 1.0))
  return out


def _finish_axis(ax, title: str, ylabel: str, values: list[float],
                 allow_log: bool = True) -> None:
  """Log scale when every value is positive, legend outside the axes."""
  log = allow_log and values and min(values) > 0
  ax.set_yscale("log" if log else "linear")
  if allow_log and values and not log:
    title += " (linear: some values <= 0)"
  ax.set_title(title, fontsize=10)
  ax.set_ylabel(ylabel)
  ax.grid(True, which="major", alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False, borderaxespad=0.0)


def loss_curves_figure(rows: Sequence[dict[str, Any]]):
  """The loss-curve figure of metrics rows (`metrics.read_metrics`).

  Axes titles name the panels: "loss per task ...", "<task>
  cross-entropy" (one per task that logs `<task>_xe`), "WRA distance
  (<task>)", "held-out metrics". Training curves are solid, held-out ones
  dashed, one colour per task.
  """
  plt = _pyplot()
  keys = {k for r in rows for k in r if k != "step"}
  tasks = _tasks(keys)
  colour = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tasks)}
  panels = []   # (title, ylabel, [(label, steps, values, style)], log?)

  lines = []
  has_xe = {t for t in tasks if any(k.endswith(f"/{t}_xe") for k in keys)}
  for t in tasks:
    if t in has_xe:
      continue   # its loss adds another term: its cross-entropy gets a panel
    own = f"train/{t}/{t}_loss"
    key = own if own in keys else f"train/{t}/loss"
    if key in keys:
      lines.append((t, *_series(rows, key),
                    dict(color=colour[t], marker=".")))
    for v in _held_out(keys, f"{t}_loss"):
      lines.append((f"{t} held out ({v[len('val/'):]})", *_series(rows, v),
                    dict(color=colour[t], marker="o", linestyle="--")))
  if lines:
    panels.append(("loss per task (solid: training, dashed: held out)",
                   "loss", lines, True))

  for t in sorted(has_xe):
    xe = f"train/{t}/{t}_xe"
    lines = [(f"{t} train", *_series(rows, xe),
              dict(color=colour[t], marker="."))] if xe in keys else []
    for v in _held_out(keys, f"{t}_xe"):
      lines.append((f"{t} held out ({v[len('val/'):]})", *_series(rows, v),
                    dict(color=colour[t], marker="o", linestyle="--")))
    wra = any(k.endswith(f"/{t}_ot") for k in keys)
    panels.append((f"{t} cross-entropy" + (" (without the WRA term)" if wra
                                          else " alone"),
                   "cross-entropy", lines, True))

  for t in tasks:
    pos, neg = f"train/{t}/{t}_ot_pos", f"train/{t}/{t}_ot_neg"
    if pos not in keys and neg not in keys:
      continue
    lines = [(f"{t} matched pairs", *_series(rows, pos),
              dict(color="tab:green", marker=".")),
             (f"{t} mismatched pairs", *_series(rows, neg),
              dict(color="tab:red", marker="."))]
    panels.append((f"WRA distance ({t}): matched pairs should fall below "
                   "mismatched", "OT distance", lines, False))

  lines = []
  cmap = plt.get_cmap("tab10")
  for i, (k, scale) in enumerate(_held_out_metrics(keys)):
    steps, vals = _series(rows, k)
    # Markers differ too: equal values (R@1 of both directions) stay visible.
    lines.append((k[len("val/"):], steps, [v * scale for v in vals],
                  dict(color=cmap(i % 10), marker="osD^v"[i % 5])))
  if lines:
    panels.append(("held-out metrics", "%", lines, False))

  n = max(1, len(panels))
  # One update axis for all panels: a held-out point lines up with the
  # training curves of its update.
  fig, axes = plt.subplots(n, 1, figsize=(9, 2.9 * n), squeeze=False,
                           sharex=True)
  if not panels:
    axes[0, 0].text(0.5, 0.5, "no metrics logged yet", ha="center",
                    va="center", transform=axes[0, 0].transAxes)
    axes[0, 0].set_title("loss per task", fontsize=10)
  for ax, (title, ylabel, lines, log) in zip(axes[:, 0], panels):
    values = []
    for label, steps, vals, style in lines:
      if steps:
        ax.plot(steps, vals, label=label, markersize=4, **style)
        values += vals
    _finish_axis(ax, title, ylabel, values, allow_log=log)
  axes[-1, 0].set_xlabel("update")
  fig.tight_layout()
  return fig


def loss_curves(rows: Sequence[dict[str, Any]], path: str) -> str:
  """Saves `loss_curves_figure(rows)` to `path`; returns `path`."""
  return save_figure(loss_curves_figure(rows), path)


@dataclasses.dataclass
class PlanPanel:
  """One word x region transport plan to draw.

  plan: [words, regions] transport masses. words, regions: tick labels.
  title: the panel's title (which pair, its ITM match probability).
  """
  plan: np.ndarray
  words: Sequence[str]
  regions: Sequence[str]
  title: str


def plan_vs_uniform(plan: np.ndarray) -> np.ndarray:
  """Each word's transport mass over the regions, relative to spreading it
  evenly: the row normalised to sum 1, times the number of regions (1 =
  uniform; a row with no mass stays 0)."""
  plan = np.asarray(plan, np.float64)
  sums = plan.sum(1, keepdims=True)
  share = np.divide(plan, sums, out=np.zeros_like(plan), where=sums > 0)
  return share * plan.shape[1]


def transport_plans_figure(panels: Sequence[PlanPanel], title: str = ""):
  """Heatmaps of transport plans side by side, one shared colour scale.

  Colour: `plan_vs_uniform` (white = the uniform plan, red = more of the
  word's mass than uniform, blue = less); a circle marks each word's
  strongest region. Returns the figure; its first `len(panels)` axes are
  the heatmaps (regions as x tick labels), the last one the colour bar.
  """
  plt = _pyplot()
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  ratios = [plan_vs_uniform(p.plan) for p in panels]
  vmax = max([2.0] + [float(r.max()) for r in ratios if r.size])
  norm = colors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
  n_w = max(len(p.words) for p in panels)
  widths = [max(3, p.plan.shape[1]) for p in panels]
  fig = plt.figure(figsize=(max(8, 0.24 * sum(widths) + 4),
                            max(3.5, 0.3 * n_w + 2.5)))
  grid = fig.add_gridspec(1, len(panels) + 1,
                          width_ratios=[*widths, 0.6], wspace=0.08)
  im = None
  for i, (p, ratio) in enumerate(zip(panels, ratios)):
    ax = fig.add_subplot(grid[0, i])
    n_words, n_reg = ratio.shape
    im = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", norm=norm,
                   interpolation="nearest")
    best = ratio.argmax(1)
    ax.scatter(best, np.arange(n_words), s=18, facecolors="none",
               edgecolors="black", linewidths=0.8)
    ax.set_yticks(range(n_words))
    ax.set_yticklabels(list(p.words) if i == 0 or list(p.words) != list(
        panels[0].words) else [""] * n_words, fontsize=8)
    ax.set_xticks(range(n_reg))
    ax.set_xticklabels(list(p.regions), rotation=90, fontsize=7)
    ax.set_xlabel("region (detected class)")
    if i == 0:
      ax.set_ylabel("caption token")
    ax.set_title(p.title, fontsize=9)
  cax = fig.add_subplot(grid[0, -1])
  fig.colorbar(im, cax=cax, label="transport mass / uniform plan's, per "
               "word (1 = spread evenly)")
  if title:
    # Above the panel titles (two lines each); the saved PNG's tight bounding
    # box takes it in.
    fig.suptitle(title, fontsize=10, y=1.0 + 0.5 / fig.get_figheight())
  return fig


def transport_plans(panels: Sequence[PlanPanel], path: str,
                    title: str = "") -> str:
  """Saves `transport_plans_figure(panels, title)` to `path`."""
  return save_figure(transport_plans_figure(panels, title), path)

