"""Image-text retrieval: hard-negative task, full evaluation, configs.

Checks the recall metrics against hand-computed matrices, the hard-negative
selection and loss against the official scheme run on the PyTorch reference
head (loss and gradient), the negative sampling of the input pipeline, the
pair plan of the full evaluation, the rank head surgery, and, end to end,
`configs/finetune_itr.py:runlocal` training and then evaluating on 1 and 4
devices, and an official-format retrieval `.pt` evaluated to the
reference's scores.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

import parity_cases as P
import torch_ref as R
from configs import finetune_itr
from data_prep import prepare
from uniter_jax import convert
from uniter_jax import model as um
from uniter_jax.data import sources
from uniter_jax.data import UniterData
from uniter_jax.evaluators import retrieval
from uniter_jax.model import surgery
from uniter_jax.tasks import itr
from uniter_jax.train import metrics as metrics_lib
from uniter_jax.train import trainer

DATA_DIR = "/tmp/uniter_jax_test_data"
TEXT = "uniter_synthetic_text/tiny:1.0.0"


# ---------------------------------------------------------------------------
# Recall metrics.
# ---------------------------------------------------------------------------
# 4 texts x 3 images; texts 0, 1 show image 0, text 2 image 1, text 3 image 2.
SCORES = np.array([[0.9, 0.9, 0.1],    # tie with a wrong image: rank 1
                   [0.2, 0.5, 0.3],    # two wrong images above: rank 2
                   [0.1, 0.7, 0.0],    # rank 0
                   [0.4, 0.6, 0.6]],   # tie: rank 1
                  np.float32)
GT = np.array([0, 0, 1, 2])


def test_ranks_and_recall_by_hand():
  ir, tr = retrieval.retrieval_ranks(SCORES, GT)
  np.testing.assert_array_equal(ir, [1, 2, 0, 1])
  # Image 0: its best text (0.9) has no wrong text at or above it; image 1:
  # its text scores 0.7, text 0 (wrong) 0.9; image 2: 0.6, nothing above.
  np.testing.assert_array_equal(tr, [0, 1, 0])
  m = retrieval.recall_metrics(ir, tr)
  # Only 3 images (fewer than K = 5, 10): every rank is below 5 and 10.
  assert m["ir_r1"] == 25.0 and m["ir_r5"] == m["ir_r10"] == 100.0
  assert m["tr_r1"] == pytest.approx(200 / 3)
  assert m["tr_r5"] == m["tr_r10"] == 100.0
  assert m["ir_mean"] == pytest.approx(75.0)
  assert m["tr_mean"] == pytest.approx((200 / 3 + 200) / 3)
  assert m["r_mean"] == pytest.approx((m["ir_mean"] + m["tr_mean"]) / 2)


def test_ranks_do_not_depend_on_candidate_order_and_nan_is_worst():
  rng = np.random.default_rng(0)
  s = np.round(rng.uniform(size=(12, 5)), 1).astype(np.float32)  # many ties
  gt = rng.integers(0, 5, 12)
  gt[:5] = np.arange(5)
  ir, tr = retrieval.retrieval_ranks(s, gt)
  perm_i, perm_t = rng.permutation(5), rng.permutation(12)
  inv_i = np.argsort(perm_i)
  ir2, tr2 = retrieval.retrieval_ranks(s[perm_t][:, perm_i], inv_i[gt[perm_t]])
  np.testing.assert_array_equal(ir2, ir[perm_t])
  np.testing.assert_array_equal(tr2[inv_i], tr)
  # Brute force of the definition: wrong candidates at or above the truth.
  for t in range(12):
    assert ir[t] == sum(s[t, j] >= s[t, gt[t]] for j in range(5) if j != gt[t])
  for j in range(5):
    best = max(s[t, j] for t in range(12) if gt[t] == j)
    assert tr[j] == sum(s[t, j] >= best for t in range(12) if gt[t] != j)
  s[0, gt[0]] = np.nan
  ir, _ = retrieval.retrieval_ranks(s, gt)
  assert ir[0] == 4


def test_official_itm_eval_counts_text_rows_in_image_retrieval():
  """The deliberate difference: the official IR recall sums `rank < K` over
  both columns (text row, rank) of `nonzero()`."""
  rng = np.random.default_rng(1)
  n_txt, n_img = 20, 12
  s = rng.normal(size=(n_txt, n_img)).astype(np.float32)   # no ties
  gt = rng.integers(0, n_img, n_txt)
  ir, _ = retrieval.retrieval_ranks(s, gt)
  _, top = torch.from_numpy(s).topk(10, dim=1)
  hits = (top == torch.from_numpy(gt)[:, None]).nonzero()
  for k in (1, 5):
    official = (hits < k).sum().item() / n_txt
    intended = float(np.mean(ir < k))
    extra = sum(1 for t in range(k) if ir[t] < 10) / n_txt
    assert official == pytest.approx(intended + extra)
    m = retrieval.recall_metrics(ir, np.zeros(n_img))
    assert m[f"ir_r{k}"] == pytest.approx(100 * intended)


# ---------------------------------------------------------------------------
# The pair plan of the full evaluation.
# ---------------------------------------------------------------------------
def test_length_bins_are_optimal():
  rng = np.random.default_rng(2)
  lengths = rng.integers(5, 30, 40)
  for n in (1, 2, 3):
    edges = retrieval.length_bins(lengths, n)
    assert len(edges) <= n and edges[-1] == lengths.max()
    cost = lambda e: sum(e[np.searchsorted(e, x)] - x for x in lengths)
    vals = np.unique(lengths)
    best = min(cost(np.sort(np.append(np.asarray(c, int), vals[-1])))
               for c in __import__("itertools").combinations(vals[:-1], n - 1))
    assert cost(edges) == best


@pytest.mark.parametrize("multiple", [1, 4])
def test_pair_plan_visits_every_pair_once(multiple):
  rng = np.random.default_rng(3)
  txt_lens, nbbs = rng.integers(5, 40, 23), rng.integers(10, 100, 9)
  plan = retrieval.pair_plan(txt_lens, nbbs, batch_size=50,
                             batch_multiple=multiple, text_bins=3,
                             image_bins=2)
  seen = np.zeros((23, 9), int)
  for t, i in plan.pairs():
    np.add.at(seen, (t, i), 1)
  assert (seen == 1).all()
  for b in plan.batches:
    assert len(b.texts) % multiple == 0 and len(b.texts) <= 52
    members_t = plan.text_members[b.text_bin][b.texts]
    members_i = plan.image_members[b.image_bin][b.images]
    assert (txt_lens[members_t] <= plan.text_slots[b.text_bin]).all()
    assert (nbbs[members_i] <= plan.image_slots[b.image_bin]).all()
  assert len(plan.text_slots) == 3 and len(plan.image_slots) == 2


# ---------------------------------------------------------------------------
# Hard negatives: selection, loss and gradient against the reference.
# ---------------------------------------------------------------------------
def test_hard_negative_index_is_the_top_k():
  scores = jnp.asarray([[[9., 1., 5., 3., 7., 2.],     # top-2: 4 (7), 2 (5)
                         [0., 4., 4., 8., 1., 6.]]])   # 3 (8), 5 (6)
  idx = np.asarray(itr.hard_negative_index(scores, 2))
  np.testing.assert_array_equal(idx, [[[0, 4, 2], [0, 3, 5]]])
  # Among equal scores the lower index comes first.
  idx = np.asarray(itr.hard_negative_index(scores, 3))
  np.testing.assert_array_equal(idx[0, 1], [0, 3, 5, 1])
  with pytest.raises(ValueError, match="hard_neg_size"):
    itr.hard_negative_index(scores, 6)


N_NEG, HARD, N_EX = 5, 2, 2
ROWS = 2 * (1 + N_NEG)
LT, LI = 7, 6


@pytest.fixture(scope="module")
def reference():
  """A random-weight reference retrieval head, its Flax params and model,
  and a batch of two examples (each 2 x 6 rows, lengths varied)."""
  cfg = R.tiny_config()
  ref = P.make_reference("itm", cfg, seed=3)
  params = convert.torch_to_flax(P.state_dict_numpy(ref), "itm",
                                 P.flax_config(cfg))
  net = um.build_model("itm", P.flax_config(cfg))
  rng = np.random.default_rng(4)
  b = N_EX * ROWS
  batch = R.random_static_batch(5, rng.integers(2, LT + 1, b),
                                rng.integers(1, LI + 1, b), LT, LI,
                                cfg.vocab_size)
  return ref, params, net, batch


def _torch_hard_negative_loss(ref, batch, tbs):
  """The official `UniterForImageTextRetrievalHardNeg` step on each anchor
  group: scores of all candidates without gradients, the true pair plus
  the top-k, then the hinge, `mean() / train_batch_size`, summed."""
  total = 0.0
  for g in range(N_EX * 2):
    rows = np.arange(g * (1 + N_NEG), (g + 1) * (1 + N_NEG))
    group = {k: v[rows] for k, v in batch.items()}
    with torch.no_grad():
      scores = ref(R.static_to_packed(group), compute_loss=False)
    hard = scores.squeeze(-1)[1:].topk(HARD, sorted=False)[1] + 1
    keep = np.concatenate([[0], hard.numpy()])
    packed = R.static_to_packed({k: v[keep] for k, v in group.items()})
    packed["sample_size"] = HARD + 1
    total = total + ref(packed, compute_loss=True).mean() / tbs
  return total


def test_loss_and_gradient_match_the_official_hard_negative_step(reference):
  ref, params, net, batch = reference
  accum = 4   # this batch is one micro-step of 4; official tbs = 2 x 4
  task = itr.ImageTextRetrieval(negative_size=N_NEG, hard_neg_size=HARD,
                                loss_divisor=accum)
  fb = {k: jnp.asarray(v) for k, v in batch.items()}

  def loss_fn(p):
    out = task.outputs(net, p, fb, deterministic=True)
    return task.loss(out, fb)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params)
  ref.zero_grad()
  want = _torch_hard_negative_loss(ref, batch, tbs=N_EX * accum)
  want.backward()
  np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)
  assert float(metrics["itr_loss"]) == pytest.approx(
      want.item() * accum, rel=1e-5)
  fcfg = P.flax_config(R.tiny_config())
  got = convert.flax_to_torch(grads, "itm", fcfg)
  # itm_output is not in the ranking loss: no torch gradient.
  want = {n: np.zeros(tuple(p.shape), np.float32) if p.grad is None
          else p.grad.numpy() for n, p in ref.named_parameters()}
  assert sorted(got) == sorted(want)
  assert np.abs(want["rank_output.weight"]).max() > 0
  # Norm-wise over the whole gradient, and per tensor. rank_output.bias
  # sums the true and wrong pairs' terms (~1e-2 each, opposite signs) to
  # ~3e-5: float32 cancellation leaves ~1e-9 there, hence the per-tensor
  # floor of 1e-2 x the largest gradient entry.
  scale = max(float(np.abs(g).max()) for g in want.values())
  assert max(float(np.abs(got[n] - g).max()) for n, g in want.items()
             ) <= 1e-5 * scale
  errs = {n: float(np.abs(got[n] - g).max()
                   / max(np.abs(g).max(), 1e-2 * scale))
          for n, g in want.items()}
  assert max(errs.values()) <= 1e-5, errs


def test_outputs_train_on_the_top_k_of_the_no_gradient_scores(reference):
  _, params, net, batch = reference
  task = itr.ImageTextRetrieval(negative_size=N_NEG, hard_neg_size=HARD)
  fb = {k: jnp.asarray(v) for k, v in batch.items()}
  out, first = jax.jit(lambda p, b: (
      task.outputs(net, p, b, deterministic=True),
      net.apply({"params": p}, b)["logits"]))(params, fb)
  scores = np.asarray(first)[:, 0]
  scores = scores.reshape(N_EX, 2, 1 + N_NEG)
  np.testing.assert_allclose(out["all_scores"], scores, rtol=1e-6)
  idx = np.asarray(out["hard_index"])
  for e in range(N_EX):
    for g in range(2):
      top = np.argsort(-scores[e, g, 1:], kind="stable")[:HARD] + 1
      np.testing.assert_array_equal(idx[e, g], np.concatenate([[0], top]))
  # The second pass scored exactly those rows (deterministic: same values).
  picked = np.take_along_axis(scores, idx, axis=-1).reshape(-1)
  np.testing.assert_allclose(np.asarray(out["logits"])[:, 0], picked,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="no whole number of examples"):
    task.loss(out, {k: v[:-1] for k, v in fb.items()})


def test_rank_head_starts_as_the_itm_match_row():
  cfg = um.config.tiny()
  src = jax.jit(lambda: um.init_params(um.build_model("pretrain", cfg),
                                       jax.random.key(0)))()
  net = um.build_model("itm", cfg)
  target = jax.eval_shape(lambda: um.init_params(net, jax.random.key(2)))
  params, report = surgery.merge_params(
      jax.device_get(src), target, to_head="itm", from_head="pretrain",
      allow_new=itr.ImageTextRetrieval.new_params)
  assert not report.new
  np.testing.assert_array_equal(params["rank_output"]["kernel"],
                                np.asarray(src["itm_output"]["kernel"])[:, 1:])
  np.testing.assert_array_equal(params["rank_output"]["bias"],
                                np.asarray(src["itm_output"]["bias"])[1:])


# ---------------------------------------------------------------------------
# Negatives in the input pipeline.
# ---------------------------------------------------------------------------
def _tiny_config():
  c = finetune_itr.get_config("runlocal")
  c.data.data_dir = DATA_DIR
  prepare.ensure_synthetic(c)
  return c


def test_negatives_are_distinct_fit_and_exclude_the_true_image():
  _tiny_config()
  task = itr.ImageTextRetrieval(negative_size=7, hard_neg_size=3)
  data = UniterData(DATA_DIR, TEXT, "train", token_budget=4096,
                    max_buckets=2, ops=task.data_ops(),
                    op_params=task.op_params(),
                    rows_per_example=task.rows_per_example)
  small = data.buckets[0]
  ctx = data.context(small)
  ex = data.text.example(0)
  key = ex["img_key"]
  rng = np.random.default_rng(0)
  imgs = ctx.sample_images(rng, 10, exclude_key=key)
  keys = [im["img_key"] for im in imgs]
  assert len(set(keys)) == 10 and key not in keys
  assert all(len(im["img_feat"]) <= small.max_img for im in imgs)
  texts = ctx.sample_texts(rng, 12, exclude_img_key=key)
  ids = [t["_index"] for t in texts]
  assert len(set(ids)) == 12
  assert all(data.text.img_index[i] != data.text.img_index[0] for i in ids)
  assert all(len(t["input_ids"]) <= small.max_txt for t in texts)
  again = ctx.sample_texts(np.random.default_rng(5), 12, key)
  assert [t["_id"] for t in again] == [t["_id"] for t in ctx.sample_texts(
      np.random.default_rng(5), 12, key)]
  with pytest.raises(ValueError, match="distinct negative texts"):
    ctx.sample_texts(rng, len(data.text), exclude_img_key=key)
  # An example's rows: text-anchored group (one text, 8 images), then the
  # image-anchored group (one image, 8 texts), the true pair first in each.
  rows = data.example_rows(0, 0)
  assert len(rows) == 16
  assert all(np.array_equal(r["input_ids"], ex["input_ids"]) for r in rows[:9])
  assert all(r["img_feat"] is rows[8]["img_feat"] for r in rows[8:])
  assert np.array_equal(rows[8]["img_feat"], ex["img_feat"])
  assert len({r["img_feat"].tobytes() for r in rows[:8]}) == 8
  assert len({r["input_ids"].tobytes() for r in rows[8:]}) >= 2


# ---------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------
def _e2e_config(data: int = 1):
  c = _tiny_config()
  c.model.update(dict(hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64))
  c.train.num_train_steps = 2
  c.log_every_steps = 1
  c.eval.every_steps = 2
  c.checkpoint.every_steps = 2
  c.mesh.data = data
  del c.evals["val"]
  del c.evals["loss_curves"]
  c.evals.retrieval.save_scores = True
  return c


def _scores(workdir, step):
  path = os.path.join(workdir, "results", f"itr_synthetic_val_step{step}")
  with np.load(path + "_scores.npz") as z:
    scores = {k: z[k] for k in z.files}
  with open(path + ".json") as f:
    return scores, json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("itr") / "run")
  out = trainer.train_and_evaluate(_e2e_config(), wd)
  return wd, out


def test_runlocal_trains_and_evaluates_every_text_and_image(trained):
  wd, out = trained
  rows = metrics_lib.read_metrics(wd)
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2]
  assert all(np.isfinite(r["train/itr/itr_loss"]) for r in train)
  val = UniterData(DATA_DIR, TEXT, "val", token_budget=4096)
  n_txt, n_img = len(val.text), len(np.unique(val.text.img_index))
  assert out["val/itr_synthetic/texts"] == n_txt
  assert out["val/itr_synthetic/images"] == n_img
  scores, res = _scores(wd, 2)
  assert scores["scores"].shape == (n_txt, n_img)
  # The results file: every text and image once; its ranks give the metrics.
  assert sorted(t["id"] for t in res["texts"]) == sorted(
      val.text.record_id(i) for i in range(n_txt))
  assert len({im["image"] for im in res["images"]}) == n_img
  ranks = np.array([t["rank"] for t in res["texts"]])
  assert res["metrics"]["ir_r5"] == pytest.approx(100 * np.mean(ranks < 5))
  for k in ("ir_r1", "ir_r5", "tr_r1", "r_mean"):
    assert out[f"val/itr_synthetic/{k}"] == pytest.approx(res["metrics"][k])
  best = scores["scores"].max(axis=1)
  np.testing.assert_allclose([t["top_scores"][0] for t in res["texts"]],
                             best, rtol=1e-6)


def test_evaluation_on_four_devices_gives_the_same_metrics(trained):
  wd, out = trained
  one, _ = _scores(wd, 2)
  c = _e2e_config(data=4)
  c.mode = "eval"
  out4 = trainer.train_and_evaluate(c, wd)   # rewrites the step-2 results
  four, _ = _scores(wd, 2)
  np.testing.assert_allclose(four["scores"], one["scores"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(four["text_ids"], one["text_ids"])
  names = [k for k in out if k.startswith("val/itr_synthetic/")]
  assert len(names) == 11
  assert {k: out4[k] for k in names} == {k: out[k] for k in names}


def test_official_retrieval_checkpoint_gives_the_reference_scores(tmp_path):
  c = _e2e_config()
  val = UniterData(DATA_DIR, TEXT, "val", token_budget=4096,
                   region_rule=sources.RegionRule(
                       conf_th=c.data.conf_th, min_bb=c.data.min_bb,
                       max_bb=c.data.max_bb))
  vocab = val.text.meta["vocab_size"]
  cfg = R.UniterConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=64)
  ref = P.make_reference("itm", cfg, seed=7)
  pt = str(tmp_path / "itm_random.pt")
  torch.save(ref.state_dict(), pt)
  c.mode = "eval"
  c.init_checkpoint = pt
  c.init_checkpoint_task = "itm"
  c.evals.retrieval.text_bins = 2      # more than one shape
  wd = str(tmp_path / "eval")
  trainer.train_and_evaluate(c, wd)
  got, res = _scores(wd, 0)

  index = {val.text.record_id(i): i for i in range(len(val.text))}
  texts = [val.text.example(index[t])["input_ids"]
           for t in got["text_ids"]]
  store = val.store
  images = [store.load(store.key_to_index[str(k)])
            for k in got["image_keys"]]
  lt = max(len(t) for t in texts)
  li = max(len(im["img_feat"]) for im in images)
  rows = [(t, im) for t in texts for im in images]
  b = len(rows)
  batch = {"input_ids": np.zeros((b, lt), np.int32),
           "img_feat": np.zeros((b, li, 2048), np.float32),
           "img_pos_feat": np.zeros((b, li, 7), np.float32),
           "txt_lens": np.zeros(b, np.int32), "num_bbs": np.zeros(b, np.int32)}
  for r, (t, im) in enumerate(rows):
    n = len(im["img_feat"])
    batch["input_ids"][r, :len(t)] = t
    batch["img_feat"][r, :n] = im["img_feat"]
    batch["img_pos_feat"][r, :n] = im["img_pos_feat"]
    batch["txt_lens"][r], batch["num_bbs"][r] = len(t), n
  with torch.no_grad():
    want = ref(R.static_to_packed(batch), compute_loss=False).numpy()
  want = want.reshape(len(texts), len(images))
  np.testing.assert_allclose(got["scores"], want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  keys = list(got["image_keys"])
  gt = np.asarray([keys.index(t["image"]) for t in res["texts"]])
  ir, tr = retrieval.retrieval_ranks(want, gt)
  assert res["metrics"] == pytest.approx(retrieval.recall_metrics(ir, tr))


def test_configs_carry_the_official_values():
  base = finetune_itr.get_config("flickr")
  assert base.model_task == "itm"
  assert (base.train.negative_size, base.train.hard_neg_size,
          base.train.margin) == (399, 31, 0.2)
  assert base.train.learning_rate == 5e-5 and base.train.num_train_steps == 5000
  assert base.train.warmup_steps == 500 and base.train.grad_norm == 2.0
  assert base.train.gradient_accumulation_steps == 8
  assert base.datasets.flickr.text == "uniter_txt_db/itm_flickr30k_train:1.0.0"
  assert base.evals.retrieval_test.split == "test"
  coco_large = finetune_itr.get_config("coco,large")
  assert coco_large.train.learning_rate == 3e-5
  assert coco_large.model.hidden_size == 1024
  assert sorted(coco_large.datasets.keys()) == ["coco", "coco_restval"]
  assert coco_large.evals.retrieval.every_steps == 0   # official full_val off
  zs = finetune_itr.get_config("zero_shot")
  assert zs.mode == "eval" and zs.evals.retrieval.score == "itm"
  task = itr.ImageTextRetrieval.from_config(base)
  assert task.rows_per_example == 800 and task.loss_divisor == 8
  with pytest.raises(ValueError, match="one dataset"):
    finetune_itr.get_config("flickr,coco")
  with pytest.raises(ValueError, match="unknown config variant"):
    finetune_itr.get_config("flikr")
