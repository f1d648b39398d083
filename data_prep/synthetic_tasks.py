"""Synthetic finetuning tasks over the synthetic image store: VQA, VE, NLVR2.

Each task is a text dataset over the existing synthetic images
(`uniter_synthetic_images/<preset>:1.0.0`), written with the synthetic
vocabulary only (`synthetic.vocab()`), so a model pretrained on the synthetic
captions finetunes on it. Every answer, label or truth value follows from the
image's scene (`synthetic.scene`): its objects' classes, colours and boxes,
which the region features and boxes encode. Everything is a pure function of
(preset, seed, split, index), so a build is deterministic.

* `uniter_synthetic_vqa`: questions about one image, soft answer targets
  over `VQA_LABEL2ANS` (no, yes, the 8 colours, the 32 classes).
* `uniter_synthetic_ve`: hypotheses about one image; 0 contradiction,
  1 entailment, 2 neutral (`VE_LABEL2ANS`).
* `uniter_synthetic_nlvr2`: statements about an image pair, true (1) or
  false (0), with official-form identifiers
  `{split}-{set_id}-{pair_id}-{sentence_id}`.

docs/data_prep.md ("Synthetic finetuning tasks") states each rule.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from data_prep import common
from data_prep import synthetic
from data_prep.synthetic import CLASSES, COLOURS, LARGE_AREA, SIZES

# Bump when the generation rules change: `prepare.ensure_synthetic` refuses a
# build made with another version instead of training on stale data.
TASK_VERSION = 1
TASKS = ("vqa", "ve", "nlvr2")
SPLITS = ("train", "val", "test")

VQA_LABEL2ANS = ("no", "yes") + COLOURS + CLASSES
VE_LABEL2ANS = ("contradiction", "entailment", "neutral")
RELATIONS = ("left of", "right of", "above", "below", "next to")
# Colours an annotator could mistake for one another; a colour answer
# sometimes gives the other one partial credit (as VQA soft scores do).
_NEIGHBOUR_COLOUR = {"red": "orange", "orange": "red", "yellow": "white",
                     "white": "yellow", "black": "brown", "brown": "black",
                     "blue": "green", "green": "blue"}
PARTIAL_SCORE = 0.3
NEIGHBOUR_COLOUR_PROB = 0.25
# A size (area) or relation (centre offset) this close to its decision
# boundary gives the other answer partial credit.
SIZE_MARGIN = 0.03
RELATION_MARGIN = 0.05
VQA_KINDS = ("exist", "exist_colour", "colour", "size", "relation", "class")
VE_PER_IMAGE = 3
NLVR2_PAIRS_PER_SET = 4
_NLVR2_CANDIDATES = 30

# rng streams (synthetic.py uses 0, 1, 2 for scene, image and captions).
_STREAM = {"vqa": 101, "ve": 201, "nlvr2": 301}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def check_config(cfg: synthetic.SyntheticConfig) -> None:
  """Raises unless the tasks can be generated for `cfg`."""
  synthetic._check_config(cfg)  # pylint: disable=protected-access
  if cfg.num_classes <= cfg.max_objects:
    raise ValueError(f"synthetic tasks need num_classes ({cfg.num_classes}) "
                     f"> max_objects ({cfg.max_objects}): neutral VE "
                     "hypotheses and 'no' answers name an absent class")


def task_images(cfg: synthetic.SyntheticConfig, split: str) -> range:
  """Image indices a task split uses: `test` reuses the `val` images."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r}; expected one of {SPLITS}")
  return synthetic.split_images(cfg)["train" if split == "train" else "val"]


# ----------------------------------------------------------------------------
# Scene facts.
# ----------------------------------------------------------------------------
def objects(sc: dict[str, Any]) -> list[dict[str, Any]]:
  """The scene's objects: class and colour names, box, area, size word."""
  out = []
  for c, col, box in zip(sc["classes"], sc["colours"], sc["boxes"]):
    area = float((box[2] - box[0]) * (box[3] - box[1]))
    out.append({"cls": CLASSES[int(c)], "colour": COLOURS[int(col)],
                "box": box, "area": area,
                "size": SIZES[int(area > LARGE_AREA)]})
  return out


def relation(box_a: np.ndarray, box_b: np.ndarray) -> str:
  """How `a` lies relative to `b` ("a dog left of a cat": the dog's box
  centre is left of the cat's), by the rule the captions use."""
  return synthetic._relation(box_a, box_b)  # pylint: disable=protected-access


def _relation_ambiguous(box_a: np.ndarray, box_b: np.ndarray) -> bool:
  ca = (box_a[:2] + box_a[2:]) / 2
  cb = (box_b[:2] + box_b[2:]) / 2
  dx, dy = np.abs(cb - ca)
  return bool(abs(dx - dy) < RELATION_MARGIN
              or abs(max(dx, dy) - 0.1) < RELATION_MARGIN / 2)


def _absent_classes(cfg, objs) -> list[str]:
  present = {o["cls"] for o in objs}
  return [c for c in CLASSES[:cfg.num_classes] if c not in present]


def _rng(cfg, task: str, split: str, idx: int) -> np.random.Generator:
  return np.random.default_rng([cfg.seed, _STREAM[task], _SPLIT_CODE[split],
                                idx])


# ----------------------------------------------------------------------------
# VQA.
# ----------------------------------------------------------------------------
def _ans(a: str) -> int:
  return VQA_LABEL2ANS.index(a)


def _yes_no(truth: bool, partial: bool) -> dict[str, list]:
  right, other = ("yes", "no") if truth else ("no", "yes")
  labels, scores = [_ans(right)], [1.0]
  if partial:
    labels.append(_ans(other))
    scores.append(PARTIAL_SCORE)
  return {"labels": labels, "scores": scores}


def vqa_question(cfg, objs, kind: str, rng) -> tuple[str, dict[str, list]]:
  """(question text, {labels, scores}) of one question of `kind`.

  Kinds (answer in brackets): "exist" `is there a dog in the picture`
  (yes/no); "exist_colour" `is there a red dog in the image` (yes/no);
  "colour" `the dog is` (its colour; a confusable colour sometimes gets
  partial credit); "size" `is the dog large` / `is the dog small` (yes/no
  from the box area; partial credit near the threshold); "relation"
  `is the dog left of the cat` (yes/no; partial credit near a boundary);
  "class" `in the picture there is a red` (the class of the only red
  object; an "exist" question when no colour is unique).
  """
  n = len(objs)
  if kind == "class":
    counts = {}
    for o in objs:
      counts[o["colour"]] = counts.get(o["colour"], 0) + 1
    unique = [o for o in objs if counts[o["colour"]] == 1]
    if unique:
      o = unique[int(rng.integers(len(unique)))]
      return (f"in the picture there is a {o['colour']}",
              {"labels": [_ans(o["cls"])], "scores": [1.0]})
    kind = "exist"
  if kind == "exist":
    if rng.random() < 0.5:
      cls, truth = objs[int(rng.integers(n))]["cls"], True
    else:
      absent = _absent_classes(cfg, objs)
      cls, truth = absent[int(rng.integers(len(absent)))], False
    return f"is there a {cls} in the picture", _yes_no(truth, False)
  o = objs[int(rng.integers(n))]
  if kind == "exist_colour":
    truth = bool(rng.random() < 0.5)
    if truth:
      cls, col = o["cls"], o["colour"]
    elif rng.random() < 0.5:   # a present class with another colour
      cls = o["cls"]
      col = [c for c in COLOURS if c != o["colour"]][int(rng.integers(
          len(COLOURS) - 1))]
    else:                      # an absent class
      absent = _absent_classes(cfg, objs)
      cls = absent[int(rng.integers(len(absent)))]
      col = COLOURS[int(rng.integers(len(COLOURS)))]
    return f"is there a {col} {cls} in the image", _yes_no(truth, False)
  if kind == "colour":
    target = {"labels": [_ans(o["colour"])], "scores": [1.0]}
    if rng.random() < NEIGHBOUR_COLOUR_PROB:
      target["labels"].append(_ans(_NEIGHBOUR_COLOUR[o["colour"]]))
      target["scores"].append(PARTIAL_SCORE)
    return f"the {o['cls']} is", target
  if kind == "size":
    asked = SIZES[int(rng.integers(2))]
    truth = o["size"] == asked
    partial = abs(o["area"] - LARGE_AREA) < SIZE_MARGIN
    return f"is the {o['cls']} {asked}", _yes_no(truth, partial)
  if kind == "relation":
    a, b = rng.choice(n, 2, replace=False)
    oa, ob = objs[int(a)], objs[int(b)]
    true_rel = relation(oa["box"], ob["box"])
    if rng.random() < 0.5:
      rel = true_rel
    else:
      others = [r for r in RELATIONS if r != true_rel]
      rel = others[int(rng.integers(len(others)))]
    return (f"is the {oa['cls']} {rel} the {ob['cls']}",
            _yes_no(rel == true_rel,
                    _relation_ambiguous(oa["box"], ob["box"])))
  raise ValueError(f"unknown VQA question kind {kind!r}")


def vqa_records(cfg: synthetic.SyntheticConfig, split: str
                ) -> Iterator[dict[str, Any]]:
  """Questions of a split: one of each kind per image (`VQA_KINDS`).

  ids are digit strings `100 * image index + j` (`+ 50` for `test`, whose
  questions are drawn afresh on the val images and carry no target).
  """
  for idx in task_images(cfg, split):
    objs = objects(synthetic.scene(cfg, idx))
    rng = _rng(cfg, "vqa", split, idx)
    for j, kind in enumerate(VQA_KINDS):
      text, target = vqa_question(cfg, objs, kind, rng)
      rec = {"id": str(100 * idx + j + (50 if split == "test" else 0)),
             "input_ids": synthetic.tokenize(text),
             "img_keys": [synthetic.image_key(idx)]}
      if split != "test":
        rec.update(target_labels=target["labels"],
                   target_scores=target["scores"])
      yield rec


# ----------------------------------------------------------------------------
# VE.
# ----------------------------------------------------------------------------
def _pick(seq: Sequence, rng):
  return seq[int(rng.integers(len(seq)))]


def ve_hypothesis(cfg, objs, label: int, rng) -> str:
  """A hypothesis with VE label `label` (0 contradiction, 1 entailment,
  2 neutral) about an image with objects `objs`.

  Two templates, chosen at random: `there is a {colour} {class} in the
  picture .` and `a {colour} {class} {relation} a {class2} .`.
  Entailment: every object named is present, with its colour, and the
  relation is the boxes' relation. Contradiction: the objects are present
  but the colour of the first is wrong, or (second template, half the time)
  the relation is wrong. Neutral: the statement names a class that is not in
  the image (the first template's only class, the second template's
  `class2`), so the image can neither confirm nor refute it.
  """
  n = len(objs)
  o = objs[int(rng.integers(n))]
  wrong = [c for c in COLOURS if c != o["colour"]]
  if rng.random() < 0.5:   # object template
    if label == 2:
      return (f"there is a {_pick(COLOURS, rng)} "
              f"{_pick(_absent_classes(cfg, objs), rng)} in the picture .")
    col = o["colour"] if label == 1 else _pick(wrong, rng)
    return f"there is a {col} {o['cls']} in the picture ."
  # relation template
  if label == 2:
    return (f"a {o['colour']} {o['cls']} {_pick(RELATIONS, rng)} a "
            f"{_pick(_absent_classes(cfg, objs), rng)} .")
  b = [i for i in range(n) if objs[i] is not o][int(rng.integers(n - 1))]
  ob = objs[b]
  true_rel = relation(o["box"], ob["box"])
  col, rel = o["colour"], true_rel
  if label == 0:
    if rng.random() < 0.5:
      col = _pick(wrong, rng)
    else:
      rel = _pick([r for r in RELATIONS if r != true_rel], rng)
  return f"a {col} {o['cls']} {rel} a {ob['cls']} ."


def ve_records(cfg: synthetic.SyntheticConfig, split: str
               ) -> Iterator[dict[str, Any]]:
  """`VE_PER_IMAGE` hypotheses per image, label `(index + j) % 3` (so the
  three classes are balanced); ids `"{image key}#{j}"` (`#t{j}` on test)."""
  for idx in task_images(cfg, split):
    objs = objects(synthetic.scene(cfg, idx))
    rng = _rng(cfg, "ve", split, idx)
    for j in range(VE_PER_IMAGE):
      label = (idx + j) % 3
      text = ve_hypothesis(cfg, objs, label, rng)
      tag = "t" if split == "test" else ""
      yield {"id": f"{synthetic.image_key(idx)}#{tag}{j}",
             "input_ids": synthetic.tokenize(text),
             "img_keys": [synthetic.image_key(idx)],
             "target_labels": [label], "target_scores": [1.0]}


# ----------------------------------------------------------------------------
# NLVR2.
# ----------------------------------------------------------------------------
def _side_holds(atoms, side: str, objs) -> bool:
  """True when every atom of `side` holds for an image with objects `objs`."""
  return all(any(o["cls"] == cls and (col is None or o["colour"] == col)
                 for o in objs)
             for s, cls, col in atoms if s == side)


def _holds(atoms, left_objs, right_objs) -> bool:
  """True when every (side, class, colour or None) atom holds."""
  return (_side_holds(atoms, "left", left_objs)
          and _side_holds(atoms, "right", right_objs))


def _noun(o: dict[str, Any], with_colour: bool) -> tuple[str, str | None]:
  return (f"{o['colour']} {o['cls']}", o["colour"]) if with_colour else (
      o["cls"], None)


def nlvr2_statement(left_pool: Sequence[dict[str, Any]],
                    right_pool: Sequence[dict[str, Any]], rng
                    ) -> tuple[str, list[tuple[str, str, str | None]]]:
  """(text, atoms) of a statement about an image pair; it is true when
  every atom (side, class, colour or None) holds.

  A left-image atom names an object of `left_pool`, a right-image atom one
  of `right_pool` (so the statement is true of the images the pools come
  from). Templates: `there is a {noun} in the left|right image .`;
  `there is a {noun} in the left image and a {noun2} in the right image .`;
  `there is a {noun} in the left image and in the right image .` (a class
  of both pools; else the previous template), where a noun is
  `{colour} {class}` or `{class}` (half the time each).
  """
  kind = int(rng.integers(3))
  if kind == 0:
    side = _pick(("left", "right"), rng)
    o = _pick(left_pool if side == "left" else right_pool, rng)
    noun, col = _noun(o, rng.random() < 0.5)
    return (f"there is a {noun} in the {side} image .",
            [(side, o["cls"], col)])
  if kind == 2:
    right = {(o["cls"], o["colour"]) for o in right_pool}
    right_cls = {c for c, _ in right}
    both = [o for o in left_pool if o["cls"] in right_cls]
    if both:
      o = _pick(both, rng)
      noun, col = _noun(o, (o["cls"], o["colour"]) in right
                        and rng.random() < 0.5)
      return (f"there is a {noun} in the left image and in the right "
              "image .", [("left", o["cls"], col), ("right", o["cls"], col)])
  o, o2 = _pick(left_pool, rng), _pick(right_pool, rng)
  noun, col = _noun(o, rng.random() < 0.5)
  noun2, col2 = _noun(o2, rng.random() < 0.5)
  return (f"there is a {noun} in the left image and a {noun2} in the right "
          "image .", [("left", o["cls"], col), ("right", o2["cls"], col2)])


def _pair_for(atoms, want: bool, objs, rng) -> tuple[int, int]:
  """An image pair (two different images) on which `atoms` is `want`.

  True pairs come from the images satisfying each side's atoms; false
  ones by rejection. When no pair of the split can give `want`, a random
  pair is returned (its label is what it is).
  """
  n = len(objs)
  if want:
    left = [i for i in range(n) if _side_holds(atoms, "left", objs[i])]
    right = [i for i in range(n) if _side_holds(atoms, "right", objs[i])]
    for _ in range(20):
      if not left or not right:
        break
      a, b = _pick(left, rng), _pick(right, rng)
      if a != b:
        return a, b
  else:
    for _ in range(100):
      a, b = rng.choice(n, 2, replace=False)
      if not _holds(atoms, objs[a], objs[b]):
        return int(a), int(b)
  a, b = rng.choice(n, 2, replace=False)
  return int(a), int(b)


def nlvr2_records(cfg: synthetic.SyntheticConfig, split: str
                  ) -> Iterator[dict[str, Any]]:
  """Statements about image pairs, in sets as NLVR2's.

  A split has one set per image of its image range (train: train images;
  val and test: val images, drawn from different streams). A set has
  `NLVR2_PAIRS_PER_SET` image pairs and two statements; every statement
  is judged on every pair of its set, so the set holds 8 examples with
  identifier `{split}-{set}-{pair}-{sentence}`.
  As in NLVR2, the identifier without its last part names the image pair
  (its examples share `img_keys`), and the identifier with its third part
  (pair) blanked names a statement (the official consistency group: its
  examples share the text). Statement 0 is made from the objects of two
  random images and its pairs are chosen so that two are true and two
  false (when the split's images allow it); statement 1 is, of 30
  candidates about objects of the set's images, the one whose truth values
  over the pairs are the most balanced.
  """
  images = list(task_images(cfg, split))
  objs = [objects(synthetic.scene(cfg, i)) for i in images]
  for s in range(len(images)):
    rng = _rng(cfg, "nlvr2", split, s)
    a0, b0 = rng.choice(len(images), 2, replace=False)
    text0, atoms0 = nlvr2_statement(objs[a0], objs[b0], rng)
    pairs = [_pair_for(atoms0, (p + s) % 2 == 0, objs, rng)
             for p in range(NLVR2_PAIRS_PER_SET)]
    left_pool = [o for a, _ in pairs for o in objs[a]]
    right_pool = [o for _, b in pairs for o in objs[b]]
    best = None
    for _ in range(_NLVR2_CANDIDATES):
      text, atoms = nlvr2_statement(left_pool, right_pool, rng)
      if text == text0:
        continue
      n_true = sum(_holds(atoms, objs[a], objs[b]) for a, b in pairs)
      score = abs(2 * n_true - len(pairs))
      if best is None or score < best[0]:
        best = (score, text, atoms)
    sentences = [(text0, atoms0)] + ([best[1:]] if best else [])
    for p, (a, b) in enumerate(pairs):
      keys = [synthetic.image_key(images[a]), synthetic.image_key(images[b])]
      for k, (text, atoms) in enumerate(sentences):
        yield {"id": f"{split}-{s}-{p}-{k}",
               "input_ids": synthetic.tokenize(text), "img_keys": keys,
               "target": int(_holds(atoms, objs[a], objs[b]))}


# ----------------------------------------------------------------------------
# Builders.
# ----------------------------------------------------------------------------
_RECORDS = {"vqa": vqa_records, "ve": ve_records, "nlvr2": nlvr2_records}


def records(cfg: synthetic.SyntheticConfig, task: str, split: str
            ) -> Iterator[dict[str, Any]]:
  """Text records of one synthetic task split (what the builder writes)."""
  if task not in _RECORDS:
    raise ValueError(f"synthetic task {task!r}; expected one of {TASKS}")
  return _RECORDS[task](cfg, split)


def text_meta(cfg: synthetic.SyntheticConfig, task: str) -> dict[str, Any]:
  """Metadata of a synthetic task dataset (vocabulary, answers, settings)."""
  meta = synthetic._text_meta(cfg)  # pylint: disable=protected-access
  meta.update(task=task, config=synthetic.config_dict(cfg),
              task_version=TASK_VERSION)
  label2ans = {"vqa": VQA_LABEL2ANS, "ve": VE_LABEL2ANS}.get(task)
  if label2ans is not None:
    meta.update(label2ans=list(label2ans), num_answers=len(label2ans))
  return meta


class _SyntheticTask(common.TextBuilder):
  """Shared builder of the synthetic tasks: splits train, val and test."""

  BUILDER_CONFIGS = [synthetic.DEFAULT_CONFIG, synthetic.TINY_CONFIG,
                     synthetic.DEMO_CONFIG]
  SOURCE = "synthetic"
  TASK = "?"

  def _text_meta(self, dl_manager):
    check_config(self.builder_config)
    return text_meta(self.builder_config, self.TASK)

  def _split_iters(self, dl_manager):
    return {s: records(self.builder_config, self.TASK, s) for s in SPLITS}


class UniterSyntheticVqa(_SyntheticTask):
  """Synthetic VQA: questions with soft answer targets."""
  TASK = "vqa"


class UniterSyntheticVe(_SyntheticTask):
  """Synthetic visual entailment: 3-way labelled hypotheses."""
  TASK = "ve"


class UniterSyntheticNlvr2(_SyntheticTask):
  """Synthetic NLVR2: true/false statements about image pairs."""
  TASK = "nlvr2"


BUILDERS = {"vqa": UniterSyntheticVqa, "ve": UniterSyntheticVe,
            "nlvr2": UniterSyntheticNlvr2}
