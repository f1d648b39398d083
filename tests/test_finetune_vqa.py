"""VQA and SNLI-VE finetuning: targets, loss, metric, optimizer, evaluation.

The loss and its gradient (w.r.t. every parameter) match the PyTorch
reference heads with `compute_loss` (the official `train_vqa.py` /
`train_ve.py` reduction) on one batch to 1e-5 in float32; the score matches
hand-computed cases; the head's learning rate is 10x; and a run of
`configs/finetune_vqa.py:runlocal` trains, scores every held-out question
once, writes the server's `results.json`, and evaluates an official-format
finetuned `.pt` to the reference's logits.
"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity_cases as P
import torch_ref as R
from configs import finetune_ve
from configs import finetune_vqa
from data_prep import prepare
from uniter_jax import convert
from uniter_jax import model as um
from uniter_jax import tasks
from uniter_jax.data import UniterData
from uniter_jax.evaluators import vqa as vqa_eval
from uniter_jax.tasks import vqa as vqa_lib
from uniter_jax.train import input as input_lib
from uniter_jax.train import metrics as metrics_lib
from uniter_jax.train import optim
from uniter_jax.train import trainer

TOL = 1e-5
DATA_DIR = "/tmp/uniter_jax_test_data"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# ---------------------------------------------------------------------------
# Targets and the score, by hand.
# ---------------------------------------------------------------------------
def test_dense_targets_scatter_and_refuse_bad_labels():
  row = vqa_lib.dense_targets(np.array([4, 1]), np.array([0.3, 1.0]), 6, "q1")
  np.testing.assert_array_equal(row, np.float32([0, 1.0, 0, 0, 0.3, 0]))
  assert row.dtype == np.float32
  # No labels (an unlabelled question, or no answer in the vocabulary):
  # zeros, as the official loader gives (and trains on).
  np.testing.assert_array_equal(vqa_lib.dense_targets(None, None, 3, "q"),
                                np.zeros(3))
  np.testing.assert_array_equal(
      vqa_lib.dense_targets(np.zeros(0, np.int32), np.zeros(0), 3, "q"),
      np.zeros(3))
  with pytest.raises(ValueError, match=r"'q7'.*label 6 .*6 answers"):
    vqa_lib.dense_targets(np.array([6]), np.array([1.0]), 6, "q7")
  with pytest.raises(ValueError, match=r"'q8'.*not all finite"):
    vqa_lib.dense_targets(np.array([0]), np.array([np.nan]), 6, "q8")


def test_targets_op_replaces_int_targets_and_checks_the_dataset():
  class Ctx:
    num_answers = 5
    meta = {"num_answers": 5}
  ex = {"_id": "7", "targets": np.int32(1),
        "_target_labels": np.array([2], np.int32),
        "_target_scores": np.array([0.6], np.float32)}
  out = vqa_lib.targets_op(ex, None, Ctx())
  np.testing.assert_array_equal(out["targets"], np.float32([0, 0, 0.6, 0, 0]))
  assert "targets" in ex and ex["targets"] == 1   # the input is not changed
  Ctx.meta = {"num_answers": 9}
  with pytest.raises(ValueError, match=r"9 answers.*head has 5"):
    vqa_lib.targets_op(ex, None, Ctx())


def test_vqa_score_gives_partial_credit_of_the_argmax_answer():
  # Official compute_score_with_logits: the target score of the argmax.
  logits = np.array([[0.1, 0.2, 3.0, -1.0],    # argmax 2: score 0.3
                     [2.0, 1.0, 0.0, 0.0],     # argmax 0: score 1.0
                     [0.0, 5.0, 0.0, 0.0],     # argmax 1: not an answer, 0
                     [4.0, 4.0, 1.0, 0.0],     # tie: first maximum (0): 0.6
                     [0.0, 0.0, 0.0, 9.0]],    # no labels at all: 0
                    np.float32)
  targets = np.array([[0.0, 0.9, 0.3, 0.0],
                      [1.0, 0.0, 0.0, 0.0],
                      [0.6, 0.0, 1.0, 0.0],
                      [0.6, 1.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0]], np.float32)
  want = [0.3, 1.0, 0.0, 0.6, 0.0]
  np.testing.assert_allclose(vqa_lib.argmax_score(logits, targets), want,
                             rtol=1e-7)
  task = tasks.make_task("vqa", num_answers=4)
  _, m = task.loss({"logits": jnp.asarray(logits)},
                   {"targets": jnp.asarray(targets)})
  np.testing.assert_allclose(m["vqa_score"], np.mean(want), rtol=1e-6)
  assert float(m["n_examples"]) == 5
  # Padding rows of exact batches are left out of the loss and the score.
  mask = np.array([True, True, False, False, True])
  loss_m, m_m = task.loss({"logits": jnp.asarray(logits)},
                          {"targets": jnp.asarray(targets),
                           "example_mask": mask})
  np.testing.assert_allclose(m_m["vqa_score"], (0.3 + 1.0 + 0.0) / 3,
                             rtol=1e-6)
  loss_k, _ = task.loss({"logits": jnp.asarray(logits[mask])},
                        {"targets": jnp.asarray(targets[mask])})
  np.testing.assert_allclose(loss_m, loss_k, rtol=1e-6)
  # SNLI-VE: one-hot targets make the score an accuracy.
  # Argmax of logits[:, :3]: 2, 0, 1, 0 (tie), 0; labels 2, 0, 1, 1, 0.
  ve = tasks.make_task("ve")
  labels = np.eye(3, dtype=np.float32)[np.array([2, 0, 1, 1, 0])]
  _, mv = ve.loss({"logits": jnp.asarray(logits[:, :3])},
                  {"targets": jnp.asarray(labels)})
  np.testing.assert_allclose(mv["ve_acc"], 4 / 5, rtol=1e-6)


def test_loss_is_the_official_instance_level_bce():
  r = np.random.default_rng(0)
  logits = r.normal(size=(6, 11)).astype(np.float32) * 4
  targets = np.where(r.random((6, 11)) < 0.3, r.random((6, 11)), 0).astype(
      np.float32)
  want = torch.nn.functional.binary_cross_entropy_with_logits(
      torch.from_numpy(logits), torch.from_numpy(targets),
      reduction="none").mean() * 11
  task = tasks.make_task("vqa", num_answers=11)
  loss, m = task.loss({"logits": jnp.asarray(logits)},
                      {"targets": jnp.asarray(targets)})
  assert _rel(loss, want.numpy()) <= TOL
  assert m["vqa_loss"] == loss
  with pytest.raises(ValueError, match=r"gives 11 answer logits.*"
                     r"num_answers=3129"):
    tasks.make_task("vqa").loss({"logits": jnp.asarray(logits)},
                                {"targets": jnp.asarray(targets)})


def test_tasks_declare_head_fields_and_new_params():
  vqa, ve = tasks.make_task("vqa"), tasks.make_task("ve")
  assert vqa.num_answers == 3129 and ve.num_answers == 3
  assert vqa.heads == ("vqa",) and ve.heads == ("ve",)
  assert vqa.new_params == ve.new_params == ("vqa_output/*",)
  (field,) = vqa.fields
  assert (field.name, field.kind, field.tail) == ("targets", "row", (3129,))
  assert field.dtype == np.float32
  assert vqa.op_params() == {"num_answers": 3129}
  # The trained head has exactly that many answers.
  assert um.build_model("vqa", um.config.tiny()).num_answer == 3129
  assert um.build_model("ve", um.config.tiny()).num_answer == 3


def test_result_formats():
  assert vqa_eval.vqa_results(["12", "q3"], ["yes", "2"]) == [
      {"question_id": 12, "answer": "yes"},
      {"question_id": "q3", "answer": "2"}]
  assert vqa_eval.ve_results(["a.jpg#0", "a.jpg#1"],
                             ["neutral", "entailment"]) == {
                                 "a.jpg#0": "neutral",
                                 "a.jpg#1": "entailment"}


def test_answer_names_come_from_metadata_or_the_official_file(tmp_path):

  def data(meta):
    return types.SimpleNamespace(name="d[val]",
                                 text=types.SimpleNamespace(meta=meta))
  assert vqa_eval.label_names(data({"label2ans": ["no", "yes"]}), 5) == [
      "no", "yes"]
  path = tmp_path / "ans2label.json"
  path.write_text(json.dumps({"yes": 1, "no": 0, "2": 2}))
  assert vqa_eval.label_names(data({}), 3129, ans2label=str(path)) == [
      "no", "yes", "2"]
  assert vqa_eval.label_names(data({}), 3, fallback=vqa_lib.VE_LABELS) == [
      "contradiction", "entailment", "neutral"]
  with pytest.raises(ValueError, match=r"d\[val\]: its metadata has no "
                     r"label2ans.*ans2label"):
    vqa_eval.label_names(data({}), 3129)
  with pytest.raises(ValueError, match=r"3 answers, but the model head has "
                     r"2"):
    vqa_eval.label_names(data({"label2ans": ["a", "b", "c"]}), 2)


# ---------------------------------------------------------------------------
# Loss and gradient against the PyTorch reference heads.
# ---------------------------------------------------------------------------
def _soft_targets(rng, rows, n, ve):
  if ve:
    t = np.zeros((rows, n), np.float32)
    t[np.arange(rows), rng.integers(0, n, rows)] = 1.0
    return t
  t = np.zeros((rows, n), np.float32)
  for i in range(rows - 1):   # the last row has no answer in the vocabulary
    idx = rng.choice(n, size=3, replace=False)
    t[i, idx] = [1.0, 0.6, 0.3]
  return t


@pytest.mark.parametrize("head", ["vqa", "ve"])
def test_loss_and_gradient_match_the_reference_head(head):
  cfg = R.tiny_config()
  model = P.make_reference(head, cfg)
  sd = P.state_dict_numpy(model)
  batch, _, _ = P.make_batch(head, cfg)
  n = 3129 if head == "vqa" else 3
  batch["targets"] = _soft_targets(np.random.default_rng(3),
                                   len(P.TXT_LENS), n, head == "ve")

  # Reference: official forward with compute_loss, then the official
  # `loss.mean() * targets.size(1)`.
  packed = R.static_to_packed(batch)
  model.zero_grad()
  loss_ref = model(packed, compute_loss=True)
  loss_ref = loss_ref.mean() * packed["targets"].shape[1]
  loss_ref.backward()
  grads_ref = {k: p.grad.detach().numpy() if p.grad is not None
               else np.zeros_like(sd[k]) for k, p in model.named_parameters()}

  fcfg = P.flax_config(cfg)
  params = convert.torch_to_flax(sd, head, fcfg)
  net = um.build_model(head, fcfg)
  task = tasks.make_task(head)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

  def loss_fn(p):
    out = task.outputs(net, p, jbatch, deterministic=True)
    return task.loss(out, jbatch)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert _rel(loss, loss_ref.detach().numpy()) <= TOL
  want = convert.torch_to_flax(grads_ref, head, fcfg)
  flat_got = jax.tree_util.tree_leaves_with_path(grads)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  assert len(flat_got) == len(flat_want)
  gmax = max(np.abs(w).max() for w in flat_want.values())
  worst, zero = (0.0, ""), []
  for k, g in flat_got:
    w, name = flat_want[k], jax.tree_util.keystr(k)
    if np.abs(w).max() <= 1e-6 * gmax:
      # Zero in exact arithmetic (an attention key bias shifts every score
      # of a row alike; the MRM mask embedding is unused): both sides must
      # be rounding noise.
      assert np.abs(np.asarray(g)).max() <= 1e-6 * gmax, name
      zero.append(name)
    else:
      worst = max(worst, (_rel(g, w), name))
  assert worst[0] <= TOL, worst
  assert all(("key" in n and "bias" in n) or "mask_embedding" in n
             for n in zero), zero
  # The head's own gradient is not trivially zero.
  assert np.abs(np.asarray(grads["vqa_output"]["3"]["kernel"])).max() > 0


# ---------------------------------------------------------------------------
# The head learning-rate multiplier of the official VQA optimizer.
# ---------------------------------------------------------------------------
def test_vqa_output_moves_ten_times_as_far():
  c = finetune_vqa.get_config("runlocal")
  assert c.train.lr_mul == 10.0
  assert tuple(c.train.lr_mul_params) == ("vqa_output/*",)
  net = um.build_model("vqa", um.config.tiny())
  shapes = jax.eval_shape(lambda: um.init_params(net, jax.random.key(0)))
  r = np.random.default_rng(0)
  params, grads = (jax.tree_util.tree_map(
      lambda s: jnp.asarray(r.normal(size=s.shape), jnp.float32), shapes)
                   for _ in range(2))

  def update(cfg):
    tx = optim.make_optimizer(cfg, params)
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)

  with_mul = update(c.train)
  base = c.train.copy_and_resolve_references()
  base.lr_mul = 1.0
  plain = update(base)
  for path, u in jax.tree_util.tree_leaves_with_path(with_mul):
    name = jax.tree_util.keystr(path)
    ref = dict(jax.tree_util.tree_leaves_with_path(plain))[path]
    assert np.abs(np.asarray(ref)).max() > 0, name
    factor = 10.0 if name.startswith("['vqa_output']") else 1.0
    np.testing.assert_allclose(u, factor * np.asarray(ref), rtol=1e-6,
                               err_msg=name)
  # SNLI-VE uses the plain optimizer.
  assert finetune_ve.get_config().train.lr_mul == 1.0


# ---------------------------------------------------------------------------
# End to end: configs/finetune_vqa.py:runlocal through the train loop.
# ---------------------------------------------------------------------------
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=64)


def _run_config():
  """`finetune_vqa.py:runlocal` with a smaller model, one bucket shape and
  two updates (compiles dominate a CPU test)."""
  c = finetune_vqa.get_config("runlocal")
  c.data.data_dir = DATA_DIR
  c.model.update(SMALL)
  c.data.max_buckets = 1
  c.train.num_train_steps = 2
  c.train.warmup_steps = 1
  c.log_every_steps = 1
  c.eval.every_steps = 2
  c.checkpoint.every_steps = 2
  del c.evals["loss_curves"]
  return c


def _val_data(c):
  return input_lib.make_dataset(
      c, tasks.make_task("vqa"), c.datasets.vqa.val_text, "val",
      token_budget=c.train.token_budget, batch_multiple=1, seed=0)


def _read(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  c = _run_config()
  prepare.ensure_synthetic(c)
  wd = str(tmp_path_factory.mktemp("vqa") / "run")
  out = trainer.train_and_evaluate(c, wd)
  return c, wd, out


def test_runlocal_trains_scores_and_writes_the_server_file(trained):
  c, wd, out = trained
  rows = metrics_lib.read_metrics(wd)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
  assert all(np.isfinite(r["train/vqa/vqa_loss"]) for r in rows
             if "train/loss" in r)
  val = _val_data(c)
  text = val.text
  names = text.meta["label2ans"]
  results = _read(os.path.join(wd, "results", "vqa_val_results_2.json"))
  # Every held-out question exactly once, ids as ints, answers by name.
  ids = [r["question_id"] for r in results]
  assert all(isinstance(q, int) for q in ids)
  assert sorted(ids) == sorted(int(text.record_id(i))
                               for i in range(len(text)))
  assert all(r["answer"] in names for r in results)
  # The reported score is the official one, recomputed from the file: the
  # soft score of each predicted answer, summed over questions / count.
  score = {}
  for i in range(len(text)):
    labels, scores = text.soft_target(i)
    score[int(text.record_id(i))] = dict(zip(
        (names[int(l)] for l in labels), (float(s) for s in scores)))
  want = sum(score[r["question_id"]].get(r["answer"], 0.0)
             for r in results) / len(results)
  assert out["val/vqa_score"] == pytest.approx(want, rel=1e-6)
  # The baseline: the best single answer for every question.
  best = max(sum(sc.get(a, 0.0) for sc in score.values()) for a in names)
  assert out["val/vqa_score_majority"] == pytest.approx(best / len(text),
                                                        rel=1e-6)
  assert out["val/vqa_examples"] == len(text)
  assert out["val/vqa_loss"] > 0
  # The unlabelled test split: predictions for every question, no score.
  test = _read(os.path.join(wd, "results", "vqa_test_results_2.json"))
  assert len(test) == len({r["question_id"] for r in test}) > 0
  assert out["test/vqa_examples"] == len(test)
  assert "test/vqa_score" not in out
  assert "test/vqa_score_majority" not in out


def test_eval_mode_reproduces_the_run_metrics(trained):
  c, wd, out = trained
  c = c.copy_and_resolve_references()
  c.mode = "eval"
  again = trainer.train_and_evaluate(c, wd)
  for k in ("val/vqa_score", "val/vqa_loss", "val/vqa_examples",
            "test/vqa_examples"):
    assert again[k] == pytest.approx(out[k], rel=1e-6), k


def test_an_official_finetuned_checkpoint_evaluates_to_its_logits(
    trained, tmp_path):
  """A reference VQA head with random weights, saved as an official `.pt`,
  through `mode=eval` + `init_checkpoint`: the logits written by the eval
  path are the reference's on the same questions."""
  c, _, _ = trained
  val = _val_data(c)
  vocab = int(val.text.meta["vocab_size"])
  cfg = R.UniterConfig(vocab_size=vocab, max_position_embeddings=64,
                       type_vocab_size=2, **SMALL)
  torch.manual_seed(0)
  ref = R.UniterForVisualQuestionAnswering(cfg, num_answer=3129)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name:
        p.add_(0.02 * torch.randn_like(p))
  ref.eval()
  pt = str(tmp_path / "uniter-vqa-finetuned.pt")
  torch.save(ref.state_dict(), pt)

  c = c.copy_and_resolve_references()
  c.mode = "eval"
  c.init_checkpoint = pt
  c.init_checkpoint_task = "vqa"
  c.evals.vqa.save_logits = True
  c.evals.vqa_test.every_steps = -1
  wd = str(tmp_path / "eval")
  out = trainer.train_and_evaluate(c, wd)
  got = np.load(os.path.join(wd, "results", "vqa_val_results_0_logits.npz"))
  got = dict(zip(got["ids"].tolist(), got["logits"]))
  assert len(got) == len(val.text) == out["val/vqa_examples"]

  want = {}
  with torch.no_grad():
    for batch in val.exact_batches():
      keep = batch["example_mask"]
      logits = ref(R.static_to_packed(batch), compute_loss=False).numpy()
      for i, row in zip(batch["example_index"][keep], logits[keep]):
        want[val.text.record_id(int(i))] = row
  assert sorted(want) == sorted(got)
  err = max(_rel(got[k], want[k]) for k in want)
  assert err <= TOL, err
  # The answers in the file are the argmax over the dataset's answers.
  names = val.text.meta["label2ans"]
  res = _read(os.path.join(wd, "results", "vqa_val_results_0.json"))
  for r in res:
    assert r["answer"] == names[int(np.argmax(want[str(r["question_id"])]
                                              [:len(names)]))]


def test_ve_evaluates_dev_and_test_and_writes_pair_predictions(tmp_path):
  """`finetune_ve.py:runlocal` in eval mode from an official-format VE
  `.pt`: accuracy on dev and test, each recomputed from its file."""
  c = finetune_ve.get_config("runlocal")
  c.data.data_dir = DATA_DIR
  c.model.update(SMALL)
  c.data.max_buckets = 1
  del c.evals["loss_curves"]
  prepare.ensure_synthetic(c)
  texts = {s: UniterData(DATA_DIR, c.datasets.ve.val_text, s,
                         token_budget=512).text for s in ("val", "test")}
  vocab = int(texts["val"].meta["vocab_size"])
  torch.manual_seed(1)
  ref = R.UniterForVisualEntailment(R.UniterConfig(
      vocab_size=vocab, max_position_embeddings=64, type_vocab_size=2,
      **SMALL))
  pt = str(tmp_path / "uniter-ve.pt")
  torch.save(ref.state_dict(), pt)
  c.mode = "eval"
  c.init_checkpoint = pt
  c.init_checkpoint_task = "ve"
  wd = str(tmp_path / "eval")
  out = trainer.train_and_evaluate(c, wd)
  for split, prefix in (("val", "val"), ("test", "test")):
    text = texts[split]
    pred = _read(os.path.join(wd, "results", f"ve_{split}_results_0.json"))
    assert isinstance(pred, dict)
    assert sorted(pred) == sorted(text.record_id(i)
                                  for i in range(len(text)))
    assert set(pred.values()) <= set(vqa_lib.VE_LABELS)
    gold = {text.record_id(i): vqa_lib.VE_LABELS[int(text.soft_target(i)[0]
                                                     [0])]
            for i in range(len(text))}
    acc = np.mean([pred[k] == gold[k] for k in gold])
    assert out[f"{prefix}/ve_acc"] == pytest.approx(acc, rel=1e-6)
    majority = max(np.mean([g == name for g in gold.values()])
                   for name in vqa_lib.VE_LABELS)
    assert out[f"{prefix}/ve_acc_majority"] == pytest.approx(majority,
                                                             rel=1e-6)
    assert out[f"{prefix}/ve_examples"] == len(text)


def test_the_export_converts_to_the_official_head_class(trained, tmp_path):
  """The finished run's `export_flax/` -> `to-torch` (head read from the
  directory) -> strict `load_state_dict` into the official VQA class, whose
  logits equal the exported Flax model's on a held-out batch."""
  from uniter_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  c, wd, _ = trained
  pt = str(tmp_path / "vqa.pt")
  assert convert_cli.main(["to-torch", os.path.join(wd, "export_flax"),
                           pt]) == 0
  model, params = convert.load_checkpoint(os.path.join(wd, "export_flax"))
  cfg = model.cfg
  ref = R.UniterForVisualQuestionAnswering(
      R.UniterConfig(vocab_size=cfg.vocab_size,
                     max_position_embeddings=cfg.max_position_embeddings,
                     type_vocab_size=cfg.type_vocab_size, **SMALL),
      num_answer=3129)
  ref.load_state_dict(torch.load(pt), strict=True)
  ref.eval()
  batch = next(_val_data(c).exact_batches())
  got = np.asarray(model.apply({"params": params}, {
      k: batch[k] for k in ("input_ids", "position_ids", "img_feat",
                            "img_pos_feat", "attn_masks")})["logits"])
  with torch.no_grad():
    want = ref(R.static_to_packed(batch), compute_loss=False).numpy()
  assert _rel(got, want) <= TOL
