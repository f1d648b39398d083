"""Pretraining losses vs the PyTorch transcription of the official code.

The reference (tests/torch_objectives_ref.py) works in the official packed
form (only masked rows, ``.mean()``); the JAX losses work on static shapes in
two layouts (full sequence with a mask, or gathered to a fixed maximum with a
validity mask). Both must agree to 1e-5 relative in float32, for the loss and
for its gradient w.r.t. the logits / predictions, and, through the Flax
heads of ``UniterForPretraining``, w.r.t. the encoder output.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_objectives_ref as ref
from uniter_jax import ot as ot_lib
from uniter_jax import tasks
from uniter_jax.tasks import losses

B, LT, LI, V, D, C = 3, 9, 7, 50, 2048, 1601
TXT_LENS = np.array([9, 5, 7])
NUM_BBS = np.array([7, 3, 6])
RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def _close(a, b, rtol=RTOL):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(b).max(), 1e-30)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def _loss(task, outputs, batch, **options):
  """The registered task's loss (options as its constructor takes them)."""
  return tasks.make_task(task, **options).loss(outputs, batch)


def _add_positions(batch, task, p):
  """The gathered-layout keys for `task` with P = `p` slots."""
  out = dict(batch)
  if task == "mlm":
    out["mlm_positions"], out["mlm_valid"] = losses.masked_positions(
        batch["txt_labels"] != -1, p)
  else:
    out["mrm_positions"], out["mrm_valid"] = losses.masked_positions(
        batch["img_masks"], p)
  return out


def _batch(seed=0):
  r = np.random.default_rng(seed)
  txt_valid = np.arange(LT)[None] < TXT_LENS[:, None]
  img_valid = np.arange(LI)[None] < NUM_BBS[:, None]
  labels = np.where(r.random((B, LT)) < 0.3, r.integers(0, V, (B, LT)), -1)
  labels[:, 0] = -1
  labels[np.arange(B), TXT_LENS - 1] = -1
  labels[~txt_valid] = -1
  labels[:, 1] = r.integers(0, V, B)  # at least one per row
  img_masks = (r.random((B, LI)) < 0.4) & img_valid
  img_masks[:, 0] = True
  soft = r.random((B, LI, C)).astype(np.float32) ** 4
  soft[..., r.random(C) < 0.3] = 0.0  # exact zeros, as detector outputs have
  soft /= soft.sum(-1, keepdims=True)
  return {
      "txt_labels": labels.astype(np.int32),
      "img_masks": img_masks,
      "feat_targets": r.standard_normal((B, LI, D)).astype(np.float32),
      "label_targets": soft * img_valid[..., None],
      "targets": np.array([1, 0, 1], np.int32),
      "attn_masks": np.concatenate([txt_valid, img_valid], 1).astype(np.int32),
  }


TASK_SPEC = {  # task: (output key, per-slot width, mask key, target key)
    "mlm": ("mlm_logits", V, "txt_labels", "txt_labels"),
    "mrfr": ("mrfr_pred", D, "img_masks", "feat_targets"),
    "mrc": ("mrc_logits", C, "img_masks", "label_targets"),
    "mrckl": ("mrc_logits", C, "img_masks", "label_targets"),
}


def _mask(batch, task):
  m = batch[TASK_SPEC[task][2]]
  return m != -1 if task == "mlm" else m


def _torch_loss(task, packed_pred, batch):
  m = torch.from_numpy(_mask(batch, task))
  tgt = torch.from_numpy(batch[TASK_SPEC[task][3]])[m]
  fn = {"mlm": ref.mlm_loss, "mrfr": ref.mrfr_loss, "mrc": ref.mrc_loss,
        "mrckl": ref.mrckl_loss}[task]
  return fn(packed_pred, tgt.long() if task == "mlm" else tgt)


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl"])
@pytest.mark.parametrize("layout", ["full", "gathered"])
def test_masked_losses_match_official(task, layout):
  batch = _batch(1)
  key, width, _, _ = TASK_SPEC[task]
  mask = _mask(batch, task)
  n_full = mask.shape[1]
  r = np.random.default_rng(2)
  full_pred = r.standard_normal((B, n_full, width)).astype(np.float32) * 2

  if layout == "gathered":
    p = int(mask.sum(1).max()) + 2  # room to spare: some invalid slots
    batch = _add_positions(batch, task, p)
    pos_key = "mlm_positions" if task == "mlm" else "mrm_positions"
    pos = np.asarray(batch[pos_key])
    pred = np.take_along_axis(full_pred, pos[..., None], axis=1)
  else:
    pred = full_pred

  def jloss(x):
    return _loss(task, {key: x}, batch)

  (loss, metrics), grad = jax.value_and_grad(jloss, has_aux=True)(
      jnp.asarray(pred))
  tpred = torch.from_numpy(full_pred)[torch.from_numpy(mask)]
  tpred.requires_grad_(True)
  tloss = _torch_loss(task, tpred, batch)
  tloss.backward()
  _close(loss, tloss.item())
  assert float(metrics["n_masked"]) == mask.sum()
  assert float(metrics[f"{task}_dropped"]) == 0
  # Scatter the JAX grad back to the full layout and compare the masked rows.
  g = np.asarray(grad)
  if layout == "gathered":
    gfull = np.zeros_like(full_pred)
    np.put_along_axis(gfull, pos[..., None], g, axis=1)
    # Invalid slots must get no gradient at all.
    valid = np.asarray(batch["mlm_valid" if task == "mlm" else "mrm_valid"])
    assert np.all(g[~valid] == 0)
  else:
    gfull = g
    assert np.all(g[~mask] == 0)
  _close(gfull[mask], tpred.grad.numpy())


def test_mlm_accuracy_metric():
  batch = _batch(3)
  mask = batch["txt_labels"] != -1
  logits = np.random.default_rng(0).standard_normal((B, LT, V)).astype(
      np.float32)
  # Make two masked positions correct.
  idx = np.argwhere(mask)[:2]
  for b, t in idx:
    logits[b, t, batch["txt_labels"][b, t]] = 100.0
  _, m = _loss("mlm", {"mlm_logits": logits}, batch)
  expect = (logits.argmax(-1) == batch["txt_labels"])[mask].mean()
  np.testing.assert_allclose(float(m["mlm_acc"]), expect, rtol=1e-6)
  assert expect >= 2 / mask.sum()


def test_itm_loss_and_wra_match_official():
  batch = _batch(4)
  r = np.random.default_rng(5)
  logits = r.standard_normal((B, 2)).astype(np.float32)
  txt = r.standard_normal((B, LT, 16)).astype(np.float32)
  img = r.standard_normal((B, LI, 16)).astype(np.float32)
  cfg = ot_lib.OTConfig(solver="ipot")

  def jloss(lg, t, i):
    out = {"itm_logits": lg, "txt_output": t, "img_output": i}
    return _loss("itm", out, batch, itm_ot_lambda=0.1, ot=cfg)

  (loss, m), grads = jax.value_and_grad(jloss, argnums=(0, 1, 2),
                                        has_aux=True)(logits, txt, img)
  tl, tt, ti = (torch.tensor(x, requires_grad=True)
                for x in (logits, txt, img))
  tgt = torch.from_numpy(batch["targets"]).long()
  attn = torch.from_numpy(batch["attn_masks"]) == 0
  dist = ref.ot_distance(tt, ti, attn[:, :LT], attn[:, LT:])
  xe = ref.itm_loss(tl, tgt)
  tot = xe + 0.1 * ref.wra_loss(dist, tgt)
  tot.backward()
  _close(loss, tot.item())
  _close(m["itm_xe"], xe.item())
  _close(m["itm_ot_pos"], dist[tgt == 1].mean().item())
  _close(m["itm_ot_neg"], dist[tgt == 0].mean().item())
  acc = (logits.argmax(-1) == batch["targets"]).mean()
  np.testing.assert_allclose(float(m["itm_acc"]), acc)
  for g, tg in zip(grads, (tl, tt, ti)):
    _close(g, tg.grad.numpy())


def test_itm_without_wra_is_plain_cross_entropy():
  batch = _batch(4)
  logits = np.random.default_rng(6).standard_normal((B, 2)).astype(np.float32)
  loss, m = _loss("itm", {"itm_logits": logits}, batch, itm_ot_lambda=0.0)
  expect = F.cross_entropy(torch.from_numpy(logits),
                           torch.from_numpy(batch["targets"]).long())
  _close(loss, expect.item())
  assert "itm_ot" not in m


def test_gathered_overflow_is_reported():
  batch = _batch(1)
  mask = batch["img_masks"]
  p = int(mask.sum(1).max()) - 1
  batch = _add_positions(batch, "mrfr", p)
  pred = np.zeros((B, p, D), np.float32)
  _, m = _loss("mrfr", {"mrfr_pred": pred}, batch)
  expect = np.maximum(mask.sum(1) - p, 0).sum()
  assert float(m["mrfr_dropped"]) == expect > 0


def test_masked_positions_and_max_count():
  mask = np.array([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  pos, valid = losses.masked_positions(mask, 3)
  np.testing.assert_array_equal(pos[0], [1, 2, 4])
  np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 0, 0], [1, 1, 1]])
  pos_j, valid_j = losses.masked_positions(jnp.asarray(mask), 7)
  assert pos_j.shape == (3, 7)
  np.testing.assert_array_equal(np.asarray(valid_j).sum(1), mask.sum(1))
  # Binomial tail bound: P(Bin(58, .15) > P) <= 1e-6 -> P in a sane range.
  p = losses.max_masked_count(58, 0.15, 1e-6)
  assert 20 <= p <= 30
  assert losses.max_masked_count(58, 0.15, 1e-3) < p


def test_errors_name_the_missing_key():
  with pytest.raises(KeyError, match="task 'mlm'.*mlm_logits"):
    _loss("mlm", {}, _batch())
  with pytest.raises(ValueError, match="unknown task 'mlmm'.*registered"):
    tasks.make_task("mlmm")
  with pytest.raises(ValueError, match="mrm_positions"):
    _loss("mrfr", {"mrfr_pred": np.zeros((B, 2, D))}, _batch())


# ---------------------------------------------------------------------------
# Through the Flax heads: gradient w.r.t. the encoder output.
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _tiny_model():
  from uniter_jax import model as um  # pylint: disable=g-import-not-at-top
  cfg = um.config.tiny()
  net = um.build_model("pretrain", cfg)
  params = um.init_params(net, jax.random.key(0))
  # Non-trivial biases/scales so that every parameter matters.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, keys)]
  return net, jax.tree_util.tree_unflatten(tree, leaves)


def _t(x):
  return torch.from_numpy(np.array(x, np.float32))


def _torch_dense(x, p):
  return x @ _t(p["kernel"]) + _t(p["bias"])


def _torch_ln(x, p):
  return F.layer_norm(x, (x.shape[-1],), _t(p["scale"]), _t(p["bias"]),
                      eps=1e-12)


def _torch_head(task, h, params):
  """The official head computations, from the Flax parameters."""
  gelu = functools.partial(F.gelu, approximate="none")
  if task == "mlm":
    p = params["cls"]["predictions"]
    x = _torch_ln(gelu(_torch_dense(h, p["transform"]["dense"])),
                  p["transform"]["LayerNorm"])
    emb = _t(params["uniter"]["embeddings"]["word_embeddings"]["embedding"])
    return x @ emb.T + _t(p["bias"])
  if task == "mrfr":
    p = params["feat_regress"]
    x = _torch_ln(gelu(_torch_dense(h, p["net"]["0"])), p["net"]["2"])
    w = _t(params["uniter"]["img_embeddings"]["img_linear"]["kernel"])
    return x @ w.T + _t(p["bias"])
  p = params["region_classifier"]["net"]
  x = _torch_ln(gelu(_torch_dense(h, p["0"])), p["2"])
  return _torch_dense(x, p["3"])


def _flax_head(module, seq, task):
  out = {}
  if task == "mlm":
    out["mlm_logits"] = module.cls(seq, module.uniter.word_logits)
  elif task == "mrfr":
    out["mrfr_pred"] = module.feat_regress(
        seq, module.uniter.img_linear_kernel())
  else:
    out["mrc_logits"] = module.region_classifier(seq)
  return out


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrckl", "mrc"])
def test_loss_grad_wrt_encoder_output_through_head(task):
  net, params = _tiny_model()
  h = net.cfg.hidden_size
  batch = _batch(7)
  if task == "mlm":  # tiny vocab
    batch["txt_labels"] = np.where(batch["txt_labels"] >= 0,
                                   batch["txt_labels"] % net.cfg.vocab_size,
                                   -1).astype(np.int32)
  r = np.random.default_rng(8)
  n = LT if task == "mlm" else LI
  seq = r.standard_normal((B, n, h)).astype(np.float32)
  p = int(_mask(batch, task).sum(1).max()) + 1
  batch = _add_positions(batch, task, p)
  pos = np.asarray(batch["mlm_positions" if task == "mlm"
                         else "mrm_positions"])

  def jloss(s):
    hs = jnp.take_along_axis(s, pos[..., None], axis=1)
    out = net.apply({"params": params}, hs, task,
                    method=_flax_head)
    return _loss(task, out, batch)[0]

  loss, grad = jax.value_and_grad(jloss)(jnp.asarray(seq))
  tseq = torch.tensor(seq, requires_grad=True)
  mask = torch.from_numpy(_mask(batch, task))
  tloss = _torch_loss(task, _torch_head(task, tseq[mask], params), batch)
  tloss.backward()
  _close(loss, tloss.item())
  _close(grad, tseq.grad.numpy())


def test_task_batch_ops_add_the_gathered_positions():
  """The MLM / MRM tasks' batch ops size P from the batch's slots and the
  masking rate, and their loss equals the full-layout loss."""
  batch = _batch(11)
  batch["input_ids"] = np.zeros((B, LT), np.int32)
  batch["img_feat"] = np.zeros((B, LI, 4), np.float32)
  mlm = tasks.make_task("mlm")
  out = mlm.batch_ops()[0](batch)
  p = losses.max_masked_count(LT - 2, mlm.mlm_prob)
  assert out["mlm_positions"].shape == (B, p)
  np.testing.assert_array_equal(out["mlm_valid"].sum(1),
                                (batch["txt_labels"] != -1).sum(1))
  mrfr = tasks.make_task("mrfr")
  out = mrfr.batch_ops()[0](batch)
  assert out["mrm_positions"].shape == (B, losses.max_masked_count(
      LI, mrfr.mrm_prob))
  r = np.random.default_rng(3)
  full = r.standard_normal((B, LI, D)).astype(np.float32)
  gathered = np.take_along_axis(full, out["mrm_positions"][..., None], 1)
  want, _ = mrfr.loss({"mrfr_pred": full}, batch)
  got, _ = mrfr.loss({"mrfr_pred": gathered}, out)
  _close(got, want)


def test_task_outputs_and_loss_through_the_model():
  """`task.outputs` runs the task's head; `eval_step` is its loss."""
  from uniter_jax import model as um  # pylint: disable=g-import-not-at-top
  from uniter_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  net, params = _tiny_model()
  b = um.dummy_batch(net.cfg, batch_size=B, txt_len=LT, num_regions=LI)
  b = dict(b, **_batch(9))
  b["txt_labels"] = np.where(b["txt_labels"] >= 0, 3, -1).astype(np.int32)
  for name in ("mlm", "itm"):
    task = tasks.make_task(name)
    out = net.apply({"params": params}, b, name)
    want, _ = task.loss(out, b)
    metrics = step_lib.eval_step(params, b, model=net, task=task)
    np.testing.assert_allclose(float(metrics[f"{name}_loss"]), float(want),
                               rtol=1e-6)
  with pytest.raises(TypeError):
    net.apply({"params": params}, b, "mlm", compute_loss=True)
