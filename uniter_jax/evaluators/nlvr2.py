"""`nlvr2`: NLVR2 accuracy and consistency, and the prediction file.

Every example of the held-out split (and of any other split named in
`splits`) is scored once (`predict.exact_outputs`); the prediction is the
argmax of the head's two logits (1 = True), as the official `train_nlvr2.py`
and `inf_nlvr2.py` take it. Metrics follow the official
`scripts/eval_nlvr2.py` (the NLVR2 authors' script) exactly:

* accuracy: correct predictions over the labelled examples;
* consistency: the labelled examples are grouped by their identifier with
  its third '-'-separated field blanked (`"dev-850-2-0"` -> `"dev-850--0"`:
  one sentence of one set, over its image pairs); a group is consistent
  when every member is predicted correctly; consistency is the fraction of
  consistent groups.

Examples without a label (a hidden test split) are predicted but take no
part in either metric; a split with no label at all yields predictions
only. The prediction file `results/nlvr2_<split>_step<N>.csv` holds one line
`identifier,True|False` per example and no header, as `inf_nlvr2.py`
writes `results.csv`; it is what `eval_nlvr2.py` and the NLVR2 leaderboard
read.
"""

from __future__ import annotations

import logging
from typing import Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from uniter_jax.data import schema
from uniter_jax.evaluators import predict
from uniter_jax.evaluators.base import Evaluator, register_evaluator


def consistency_key(identifier: str) -> str:
  """The official consistency group of an NLVR2 identifier: the identifier
  with its third '-'-separated field (the image pair) blanked."""
  parts = identifier.split("-")
  if len(parts) < 3:
    raise ValueError(f"NLVR2 identifier {identifier!r}: expected "
                     "'<split>-<set>-<pair>-<sentence>' (at least three "
                     "'-'-separated fields) to group it for consistency")
  parts[2] = ""
  return "-".join(parts)


def accuracy_and_consistency(predictions: Mapping[str, bool],
                             labelled: Sequence[tuple[str, bool]]
                             ) -> dict[str, float]:
  """NLVR2 accuracy and consistency as `scripts/eval_nlvr2.py` computes them.

  Args:
    predictions: identifier -> predicted truth value.
    labelled: `(identifier, label)` of every labelled example, in any order
      (the annotation file's examples).

  Returns:
    {"acc", "consistency", "examples" (labelled), "groups"}.

  Raises:
    ValueError: a labelled example has no prediction (the official script
      stops there too), or there is no labelled example.
  """
  missing = [i for i, _ in labelled if i not in predictions]
  if missing:
    raise ValueError(f"NLVR2: {len(missing)} labelled examples have no "
                     f"prediction, e.g. {missing[:5]}")
  if not labelled:
    raise ValueError("NLVR2: no labelled example to score")
  correct = 0
  consistent: dict[str, bool] = {}
  for identifier, label in labelled:
    group = consistency_key(identifier)
    consistent.setdefault(group, True)
    if bool(predictions[identifier]) == bool(label):
      correct += 1
    else:
      consistent[group] = False
  return {"acc": correct / len(labelled),
          "consistency": sum(consistent.values()) / len(consistent),
          "examples": float(len(labelled)), "groups": float(len(consistent))}


def predictions_csv(identifiers: Sequence[str],
                    predictions: Sequence[bool]) -> str:
  """`identifier,True|False` lines, no header (official `results.csv`)."""
  if len(identifiers) != len(predictions):
    raise ValueError(f"{len(identifiers)} identifiers for "
                     f"{len(predictions)} predictions")
  return "".join(f"{i},{'True' if p else 'False'}\n"
                 for i, p in zip(identifiers, predictions))


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
  return lse - logits[np.arange(len(labels)), labels]


@register_evaluator
class Nlvr2Evaluator(Evaluator):
  """Accuracy, consistency and predictions of an NLVR2 head.

  Options (`config.evals.<name>`):
    dataset: the held-out data key ("{task}_{dataset}"); default the first
      key whose task is `nlvr2`.
    splits: other splits of that dataset to predict and score (e.g.
      ("test",)); read with the held-out data's settings.
    texts: the tfds text dataset of each of `splits` (same length), or
      empty: the dataset's `val_text` for all.
    write_predictions: write `results/nlvr2_<split>_step<N>.csv`.

  Yields, per split (prefix `val` for the held-out split, else the split's
  name): `<prefix>/nlvr2_acc`, `<prefix>/nlvr2_consistency`,
  `<prefix>/nlvr2_loss` (mean cross-entropy, as the official validation
  logs it) over the labelled examples, `<prefix>/nlvr2_examples` (all
  predicted), and `<prefix>/nlvr2_dropped` when the split's data left
  examples out (too long a text for `data.max_txt_len`, or no bucket
  fits): the prediction file then lacks them.
  """

  type = "nlvr2"

  def __init__(self, ctx, *, dataset: str = "",
               splits: Sequence[str] = (), texts: Sequence[str] = (),
               write_predictions: bool = True):
    super().__init__(ctx)
    self.splits = tuple(splits or ())
    self.texts = tuple(texts or ())
    if self.texts and len(self.texts) != len(self.splits):
      raise ValueError(f"evaluator 'nlvr2': texts {self.texts} must name one "
                       f"text dataset per split of {self.splits}, or none")
    self.dataset = dataset
    self.write_predictions = bool(write_predictions)

  def _key(self) -> str:
    ctx = self.ctx
    if self.dataset:
      if self.dataset not in ctx.datasets:
        raise ValueError(f"evaluator 'nlvr2': no held-out data "
                         f"{self.dataset!r}; have {sorted(ctx.datasets)}")
      return self.dataset
    keys = [k for k in sorted(ctx.datasets) if ctx.key_task[k] == "nlvr2"]
    if not keys:
      raise ValueError("evaluator 'nlvr2': no held-out data of task 'nlvr2'; "
                       f"have {sorted(ctx.datasets)}")
    return keys[0]

  def _val_split(self, key: str) -> str:
    name = key[len(self.ctx.key_task[key]) + 1:]
    return str(self.ctx.config.datasets[name].val_split)

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    ctx = self.ctx
    key = self._key()
    task = ctx.task_of(key)

    def logits_fn(p, batch):
      out = task.outputs(ctx.model, p, batch, deterministic=True)
      return {"logits": out["logits"].astype(jnp.float32)}

    todo = [("val", self._val_split(key), ctx.data(key))]
    for i, split in enumerate(self.splits):
      text = self.texts[i] if self.texts else None
      todo.append((split, split, ctx.data(key, split, text)))
    for prefix, split, data in todo:
      idx, out = predict.exact_outputs(ctx, data, logits_fn, params,
                                       jit_key=("nlvr2_logits", task.head))
      logits = out["logits"] if len(idx) else np.zeros((0, 2), np.float32)
      pred = np.argmax(logits, axis=-1) == 1
      ids = predict.record_ids(data, idx)
      labels = np.array([data.text.target(i) for i in idx], np.int64)
      if self.write_predictions:
        path = predict.write_result(
            ctx, f"nlvr2_{split}_step{step}.csv", predictions_csv(ids, pred))
        if path:
          logging.info("nlvr2: %d predictions of %s written to %s",
                       len(ids), data.name, path)
      yield f"{prefix}/nlvr2_examples", float(len(ids))
      dropped = int(sum(data.dropped.values()))
      if dropped:
        logging.warning("nlvr2: %s left out %d examples (%s); they have no "
                        "prediction", data.name, dropped, dict(data.dropped))
        yield f"{prefix}/nlvr2_dropped", float(dropped)
      has = labels != schema.NO_TARGET
      bad = np.flatnonzero(has & (labels != 0) & (labels != 1))
      if len(bad):
        raise schema.DataError(data.name, ids[bad[0]], f"NLVR2 target "
                               f"{labels[bad[0]]}; expected 1 (True), 0 "
                               "(False) or -1 (no label)")
      if not has.any():
        continue
      labelled = [(ids[j], bool(labels[j])) for j in np.flatnonzero(has)]
      scores = accuracy_and_consistency(dict(zip(ids, pred.tolist())),
                                        labelled)
      yield f"{prefix}/nlvr2_acc", scores["acc"]
      yield f"{prefix}/nlvr2_consistency", scores["consistency"]
      yield f"{prefix}/nlvr2_loss", float(np.mean(_cross_entropy(
          logits[has], labels[has])))
