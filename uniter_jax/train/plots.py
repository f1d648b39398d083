"""PNG plots of a run: per-task loss curves and a WRA transport plan."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def loss_curves(rows: Sequence[dict[str, Any]], path: str) -> str:
  """One curve per `train/<task>/loss` (and validation accuracies)."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  keys = sorted({k for r in rows for k in r
                 if k.startswith("train/") and k.endswith("/loss")})
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if k in r]
    axes[0].plot(*zip(*pts), label=k.split("/")[1], marker=".")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("training loss")
  axes[0].set_yscale("log")
  axes[0].legend()
  axes[0].set_title("training loss per task")
  vkeys = sorted({k for r in rows for k in r if k.startswith("val/") and (
      k.endswith("_acc") or k.endswith("zs_ir_r1") or k.endswith("zs_tr_r1"))})
  for k in vkeys:
    pts = [(r["step"], r[k] * (100 if k.endswith("_acc") else 1))
           for r in rows if k in r]
    axes[1].plot(*zip(*pts), label=k[len("val/"):], marker="o")
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("%")
  axes[1].set_title("held-out accuracy / zero-shot R@1")
  if vkeys:
    axes[1].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def transport_plan(plan: np.ndarray, words: Sequence[str], path: str,
                   title: str, region_labels: Sequence[str] | None = None
                   ) -> str:
  """Heatmap of a word x region transport plan."""
  plt = _pyplot()
  n_w, n_r = plan.shape
  fig, ax = plt.subplots(figsize=(max(6, 0.28 * n_r + 2),
                                  max(3, 0.3 * n_w + 1.5)))
  im = ax.imshow(plan, aspect="auto", cmap="viridis")
  ax.set_yticks(range(n_w))
  ax.set_yticklabels(words)
  ax.set_xticks(range(n_r))
  ax.set_xticklabels(region_labels or [str(i) for i in range(n_r)],
                     rotation=90, fontsize=7)
  ax.set_xlabel("region")
  ax.set_ylabel("caption token")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="transport mass")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
