"""WRA optimal transport (uniter_jax/ot.py).

IPOT in JAX vs a PyTorch transcription of the official IPOT (values and
gradients, random padded batches); the OTT-JAX Sinkhorn default: no NaN with
padding, fully padded examples and bf16 inputs, padding has no influence,
marginals are met, identical embeddings are closer than random ones, and its
gradient points the same way as IPOT's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_objectives_ref as ref
from uniter_jax import ot

B, LT, LI, H = 4, 12, 9, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def _data(seed, txt_lens=(12, 5, 8, 3), num_bbs=(9, 4, 1, 7), h=H):
  r = np.random.default_rng(seed)
  txt = r.standard_normal((B, LT, h)).astype(np.float32)
  img = r.standard_normal((B, LI, h)).astype(np.float32)
  tv = np.arange(LT)[None] < np.array(txt_lens)[:, None]
  iv = np.arange(LI)[None] < np.array(num_bbs)[:, None]
  return txt, img, tv, iv


def _loss_fn(cfg, tv, iv, targets):
  def f(t, i):
    return ot.wra_loss(ot.wra_distance(t, i, tv, iv, cfg), targets)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ipot_matches_official_transcription(seed):
  txt, img, tv, iv = _data(seed)
  targets = np.array([1, 0, 1, 0], np.int32)
  cfg = ot.OTConfig(solver="ipot")
  dist = jax.jit(lambda t, i: ot.wra_distance(t, i, tv, iv, cfg))(txt, img)
  loss, (gt, gi) = _loss_fn(cfg, tv, iv, targets)(txt, img)

  tt = torch.tensor(txt, requires_grad=True)
  ti = torch.tensor(img, requires_grad=True)
  tdist = ref.ot_distance(tt, ti, torch.from_numpy(~tv), torch.from_numpy(~iv))
  tloss = ref.wra_loss(tdist, torch.from_numpy(targets))
  tloss.backward()
  np.testing.assert_allclose(np.asarray(dist), tdist.detach().numpy(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(loss), tloss.item(), rtol=1e-5)
  for g, tg in ((gt, tt.grad), (gi, ti.grad)):
    tg = tg.numpy()
    np.testing.assert_allclose(np.asarray(g), tg, rtol=1e-5,
                               atol=1e-5 * np.abs(tg).max())


def test_ipot_plan_matches_official_transcription():
  # Only k=1: the official inner loop reshapes sigma to a column once per
  # outer iteration, so k > 1 fails there with a shape error.
  txt, img, tv, iv = _data(3)
  cost = np.array(ot.cosine_cost(txt, img))
  plan = np.asarray(ot.ipot_plan(cost, tv, iv))
  tj = torch.from_numpy
  tplan = ref.ipot(
      tj(cost), tj(tv.sum(1).astype(np.float32)), tj(~tv),
      tj(iv.sum(1).astype(np.float32)), tj(~iv),
      tj(~tv[:, :, None] | ~iv[:, None, :]), 0.5, 50, 1).numpy()
  np.testing.assert_allclose(plan, tplan.transpose(0, 2, 1), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(plan.sum((1, 2)), 1.0, rtol=1e-3)


@pytest.mark.parametrize("solver", ["sinkhorn", "ipot"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_nan_with_padding_empty_examples_and_bf16(solver, dtype):
  # Example 2 has no text at all, example 3 no regions, and padded positions
  # hold zeros (zero-norm vectors) or huge values.
  txt, img, tv, iv = _data(4, txt_lens=(12, 5, 0, 3), num_bbs=(9, 4, 6, 0))
  txt[1, 5:] = 0.0
  img[0, :] = img[0, :]  # all valid
  img[1, 4:] = 1e6
  targets = np.array([1, 0, 1, 0], np.int32)
  cfg = ot.OTConfig(solver=solver)
  t, i = jnp.asarray(txt, dtype), jnp.asarray(img, dtype)
  dist = jax.jit(lambda a, b: ot.wra_distance(a, b, tv, iv, cfg))(t, i)
  loss, (gt, gi) = _loss_fn(cfg, tv, iv, targets)(t, i)
  assert dist.dtype == jnp.float32
  for x in (dist, loss, gt, gi):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  d = np.asarray(dist)
  assert d[2] == 0.0 and d[3] == 0.0 and d[0] > 0 and d[1] > 0
  # No gradient reaches padding.
  assert np.all(np.asarray(gt, np.float32)[~tv] == 0)
  assert np.all(np.asarray(gi, np.float32)[~iv] == 0)


@pytest.mark.parametrize("solver", ["sinkhorn", "ipot"])
def test_padding_values_do_not_matter(solver):
  txt, img, tv, iv = _data(5)
  cfg = ot.OTConfig(solver=solver)
  f = jax.jit(lambda a, b: ot.wra_distance(a, b, tv, iv, cfg))
  d1 = f(txt, img)
  r = np.random.default_rng(0)
  txt2, img2 = txt.copy(), img.copy()
  txt2[~tv] = r.standard_normal(txt2[~tv].shape) * 100
  img2[~iv] = -img2[~iv]
  np.testing.assert_allclose(np.asarray(f(txt2, img2)), np.asarray(d1),
                             rtol=1e-6)
  # Same example alone, unpadded, gives the same distance.
  b, nt, ni = 1, tv[1].sum(), iv[1].sum()
  alone = ot.wra_distance(txt[b:b + 1, :nt], img[b:b + 1, :ni],
                          np.ones((1, nt), bool), np.ones((1, ni), bool), cfg)
  np.testing.assert_allclose(float(alone[0]), float(d1[b]), rtol=1e-5)


def test_sinkhorn_marginals_over_full_cost_range():
  # Low-dim vectors: cosine costs span all of [0, 2], the hardest case for
  # kernel-mode iterations in float32.
  txt, img, tv, iv = _data(6, h=3)
  cfg = ot.OTConfig()
  plan = np.asarray(ot.sinkhorn_plan(ot.cosine_cost(txt, img), tv, iv, cfg))
  assert np.all(np.isfinite(plan)) and np.all(plan >= 0)
  nt, ni = tv.sum(1, keepdims=True), iv.sum(1, keepdims=True)
  np.testing.assert_allclose(plan.sum(2), tv / nt, atol=1e-5)
  np.testing.assert_allclose(plan.sum(1), iv / ni, atol=2e-2)
  assert np.all(plan[~tv] == 0) and np.all(plan.transpose(0, 2, 1)[~iv] == 0)


def test_identical_pair_closer_than_random_pair():
  txt, img, tv, iv = _data(7, txt_lens=(9,) * 4, num_bbs=(9,) * 4)
  same_img = txt[:, :LI][:, np.random.default_rng(0).permutation(LI)]
  for solver in ("sinkhorn", "ipot"):
    cfg = ot.OTConfig(solver=solver)
    d_same = np.asarray(ot.wra_distance(txt, same_img, tv, iv, cfg))
    d_rand = np.asarray(ot.wra_distance(txt, img, tv, iv, cfg))
    assert np.all(d_same < 0.2 * d_rand), (solver, d_same, d_rand)


def test_sinkhorn_gradient_agrees_with_ipot():
  """Default Sinkhorn gives the official method's alignment signal."""
  r = np.random.default_rng(8)
  # Structured data: shared concepts plus a common direction, so the cost
  # spread resembles contextual embeddings (cosine similarity well above 0).
  concepts = r.standard_normal((20, H)) + 2.0
  txt = concepts[r.integers(0, 20, (B, LT))] + 0.7 * r.standard_normal(
      (B, LT, H))
  img = concepts[r.integers(0, 20, (B, LI))] + 0.7 * r.standard_normal(
      (B, LI, H))
  _, _, tv, iv = _data(0)
  targets = np.array([1, 0, 1, 0], np.int32)
  _, g_sk = _loss_fn(ot.OTConfig(), tv, iv, targets)(txt, img)
  _, g_ip = _loss_fn(ot.OTConfig(solver="ipot"), tv, iv, targets)(txt, img)
  a = np.concatenate([np.ravel(x) for x in g_sk])
  b = np.concatenate([np.ravel(x) for x in g_ip])
  assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.9


def test_wra_loss_matches_official():
  dist = np.array([0.3, 0.5, 0.2, 0.9, 0.4], np.float32)
  targets = np.array([1, 0, 1, 0, 0], np.int32)
  got = ot.wra_loss(jnp.asarray(dist), jnp.asarray(targets))
  want = ref.wra_loss(torch.from_numpy(dist), torch.from_numpy(targets))
  np.testing.assert_allclose(float(got), want.item(), rtol=1e-6)


def test_bad_inputs_raise():
  txt, img, tv, iv = _data(0)
  with pytest.raises(ValueError, match="txt_valid"):
    ot.wra_distance(txt, img, tv[:, :3], iv)
  with pytest.raises(ValueError, match="solver"):
    ot.wra_distance(txt, img, tv, iv, ot.OTConfig(solver="emd"))
