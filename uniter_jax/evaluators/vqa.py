"""`vqa_predictions` and `ve_predictions`: the official metric over every
held-out example, and the prediction files the benchmarks take.

Each runs the task's head over every kept example of the held-out split
once (`predict.exact_outputs`), and optionally of one more split
(`test_split`, e.g. SNLI-VE's test set or VQA's unlabelled test-dev/std
questions, read with `ctx.data`). Per split:

* **Metric** (labelled splits only): the soft score of the argmax answer
  summed over examples and divided by their count (official
  `compute_score_with_logits(...).sum() / n_ex`; SNLI-VE accuracy), and the
  validation loss as the official `validate` computes it (BCE with logits
  summed over the answers and examples, divided by the examples); and, as
  a reference point, `..._majority`: the score of giving every example the
  split's best single answer (not an official metric). A split whose
  records carry no labels at all (a test split) gets predictions only.
* **Prediction file** `<workdir>/results/<dataset>_<split>_results_<step>.json`:
  VQA a list of `{"question_id": int, "answer": str}`, the format of the
  official `inf_vqa.py` that the VQA evaluation server accepts (ids that are
  not digits stay strings); SNLI-VE a JSON object mapping each pair id to
  its label name ("contradiction", "entailment", "neutral"), the file the
  official `train_ve.py` writes (SNLI-VE has no server; the object keeps
  one entry per pair and is read back with one `json.load`).

Answer names come from the text dataset's metadata `label2ans` (answer
index -> string). When a dataset has fewer answers than the head (the
synthetic VQA set), the argmax is taken over its answers only; with the
official 3129 answers it is the plain argmax.
"""

from __future__ import annotations

import functools
import io
import json
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np

from uniter_jax.evaluators import predict
from uniter_jax.evaluators.base import Evaluator, register_evaluator
from uniter_jax.tasks import vqa as vqa_lib


def label_names(data, num_answers: int, *, fallback=None,
                ans2label: str = "") -> list[str]:
  """The answer strings (index = label) of text dataset `data`.

  From its metadata `label2ans`; else from the official `ans2label.json`
  at `ans2label` ({answer: label}); else `fallback` (SNLI-VE's fixed
  names). Raises ValueError naming the dataset when there is none, or when
  it lists more answers than the head's `num_answers`.
  """
  meta = data.text.meta
  names = meta.get("label2ans")
  where = f"{data.name} metadata label2ans"
  if names is None and ans2label:
    with open(ans2label, encoding="utf-8") as f:
      table = json.load(f)
    names = [None] * len(table)
    for ans, label in table.items():
      if not 0 <= int(label) < len(table):
        raise ValueError(f"{ans2label}: label {label} of {ans!r} is outside "
                         f"[0, {len(table)})")
      names[int(label)] = ans
    where = ans2label
  if names is None:
    names = fallback
    where = "the official label names"
  if names is None:
    raise ValueError(
        f"{data.name}: its metadata has no label2ans (answer names); build "
        "it with data_prep's VQA builders (they record it), or set the "
        "evaluator option ans2label to the official utils/ans2label.json")
  names = [str(n) if n is not None else None for n in names]
  if any(n is None for n in names):
    raise ValueError(f"{where}: some answer indices have no name")
  if not names or len(names) > num_answers:
    raise ValueError(f"{where}: {len(names)} answers, but the model head "
                     f"has {num_answers}")
  return names


def majority_score(data, n_names: int) -> float | None:
  """The score of answering every kept record of `data` with one answer,
  the best one for this split (a baseline: what a model that ignores the
  question and the image can reach at most); None when no record carries
  labels (an unlabelled test split)."""
  total = np.zeros(n_names, np.float64)
  labelled = False
  for i in range(len(data.text)):
    labels, scores = data.text.soft_target(i)
    if len(labels):
      labelled = True
      keep = labels < n_names
      np.add.at(total, labels[keep], scores[keep])
  return float(total.max() / len(data.text)) if labelled else None


def vqa_results(ids: list[str], answers: list[str]) -> list[dict[str, Any]]:
  """The VQA server's results list: question ids as ints when all digits."""
  return [{"question_id": int(q) if q.isdigit() else q, "answer": a}
          for q, a in zip(ids, answers)]


def ve_results(ids: list[str], answers: list[str]) -> dict[str, str]:
  """SNLI-VE predictions: pair id -> label name."""
  return dict(zip(ids, answers))


def _predict(model, task, n_names: int, with_logits: bool, params, batch):
  """Per row: argmax answer among the first `n_names`, its target score,
  the BCE summed over the answers (and the logits when asked)."""
  out = task.outputs(model, params, batch, deterministic=True)
  logits, targets = task.logits_and_targets(out, batch)
  answer = jnp.argmax(logits[:, :n_names], axis=-1)
  res = {"answer": answer.astype(jnp.int32),
         "score": jnp.take_along_axis(targets, answer[:, None], -1)[:, 0],
         "bce": jnp.sum(vqa_lib.bce_with_logits(logits, targets), -1)}
  if with_logits:
    res["logits"] = logits
  return res


class AnswerPredictions(Evaluator):
  """Shared run of `vqa_predictions` and `ve_predictions`.

  Options:
    dataset: the "{task}_{dataset}" data key (default: the first key of a
      task this evaluator serves that has held-out data, else the first).
    val: evaluate the key's held-out split (its `val_split`).
    test_split: one more split to predict (and score when labelled), e.g.
      "test"; "" for none.
    test_text: the tfds name of that split's text dataset (default: the
      dataset's `val_text`), e.g. "uniter_txt_db/vqa_test:1.0.0".
    save_logits: also write `<file stem>_logits.npz` with `ids` and float32
      `logits` [n, num_answers] (the official `--save_logits`, for
      ensembles; float32 instead of its float16).
    ans2label: path of the official `ans2label.json`, used when the
      dataset's metadata has no `label2ans`.
  """

  tasks: tuple[str, ...] = ()
  fallback_names: tuple[str, ...] | None = None

  def __init__(self, ctx, *, dataset: str = "", val: bool = True,
               test_split: str = "", test_text: str = "",
               save_logits: bool = False, ans2label: str = ""):
    super().__init__(ctx)
    self.dataset = dataset
    self.val = bool(val)
    self.test_split = test_split
    self.test_text = test_text
    self.save_logits = bool(save_logits)
    self.ans2label = ans2label
    self._majority: dict[tuple[str, str], float | None] = {}

  def _key(self) -> str:
    keys = sorted(k for k, t in self.ctx.key_task.items() if t in self.tasks)
    if self.dataset:
      if self.dataset not in keys:
        raise ValueError(f"{self.type}: data key {self.dataset!r} is not one "
                         f"of this run's {self.tasks} keys {keys}")
      return self.dataset
    if not keys:
      raise ValueError(f"{self.type}: the run trains none of the tasks "
                       f"{self.tasks} (data keys: {sorted(self.ctx.key_task)})")
    held_out = [k for k in keys if k in self.ctx.datasets]
    return (held_out or keys)[0]

  def splits(self, key: str) -> list[tuple[str, str, Any]]:
    """[(metric prefix, split name, UniterData)] to evaluate."""
    ctx = self.ctx
    name = key[len(ctx.key_task[key]) + 1:]
    out = []
    if self.val and key in ctx.datasets:
      out.append(("val", ctx.config.datasets[name].val_split,
                  ctx.data(key)))
    if self.test_split:
      out.append((self.test_split, self.test_split,
                  ctx.data(key, self.test_split, self.test_text or None)))
    return out

  def results(self, ids: list[str], answers: list[str]) -> Any:
    raise NotImplementedError

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    ctx = self.ctx
    key = self._key()
    task = ctx.task_of(key)
    name = key[len(task.name) + 1:]
    loss_name, score_name = task.metric_names
    for prefix, split, data in self.splits(key):
      names = label_names(data, task.num_answers,
                          fallback=self.fallback_names,
                          ans2label=self.ans2label)
      fn = functools.partial(_predict, ctx.model, task, len(names),
                             self.save_logits)
      idx, out = predict.exact_outputs(
          ctx, data, fn, params,
          jit_key=(self.type, task.name, len(names), self.save_logits))
      ids = predict.record_ids(data, idx)
      answers = [names[int(a)] for a in out.get("answer", [])]
      n = len(ids)
      if (prefix, split) not in self._majority:   # one scan per run
        self._majority[prefix, split] = majority_score(data, len(names))
      majority = self._majority[prefix, split]
      if majority is not None and n:
        yield (f"{prefix}/{score_name}",
               float(np.sum(out["score"], dtype=np.float64) / n))
        yield (f"{prefix}/{loss_name}",
               float(np.sum(out["bce"], dtype=np.float64) / n))
        yield f"{prefix}/{score_name}_majority", majority
      yield f"{prefix}/{task.name}_examples", float(n)
      stem = f"{name}_{split}_results_{step}"
      predict.write_result(ctx, f"{stem}.json",
                           json.dumps(self.results(ids, answers)))
      if self.save_logits:
        buf = io.BytesIO()
        np.savez(buf, ids=np.asarray(ids), logits=np.asarray(
            out.get("logits", np.zeros((0, task.num_answers))), np.float32))
        predict.write_result(ctx, f"{stem}_logits.npz", buf.getvalue())


@register_evaluator
class VqaPredictions(AnswerPredictions):
  """VQA score (`{split}/vqa_score`, `{split}/vqa_loss`) and `results.json`
  for the VQA server. Options: see `AnswerPredictions`."""

  type = "vqa_predictions"
  tasks = ("vqa",)

  def results(self, ids, answers):
    return vqa_results(ids, answers)


@register_evaluator
class VePredictions(AnswerPredictions):
  """SNLI-VE accuracy (`{split}/ve_acc`, `{split}/ve_loss`) and the
  predictions per pair id. Options: see `AnswerPredictions`."""

  type = "ve_predictions"
  tasks = ("ve",)
  fallback_names = vqa_lib.VE_LABELS

  def results(self, ids, answers):
    return ve_results(ids, answers)
