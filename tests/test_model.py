"""Flax model tests that need no PyTorch: shapes, layouts, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from uniter_jax import model as um
from uniter_jax.convert import core as convert_core


def _batch(cfg, rng, b=3, lt=7, li=5, rows=1):
  """A padded batch with mixed lengths in the static layout."""
  r = np.random.default_rng(rng)
  b = b * rows
  txt_lens = r.integers(3, lt + 1, size=b)
  nbbs = r.integers(1, li + 1, size=b)
  txt_lens[0], nbbs[0] = lt, li
  input_ids = r.integers(5, cfg.vocab_size, size=(b, lt)).astype(np.int32)
  attn = np.zeros((b, lt + li), np.int32)
  for i in range(b):
    input_ids[i, txt_lens[i]:] = 0
    attn[i, :txt_lens[i]] = 1
    attn[i, lt:lt + nbbs[i]] = 1
  img_feat = r.normal(size=(b, li, cfg.img_dim)).astype(np.float32)
  pos = r.uniform(size=(b, li, 7)).astype(np.float32)
  for i in range(b):
    img_feat[i, nbbs[i]:] = 0
    pos[i, nbbs[i]:] = 0
  return {
      "input_ids": jnp.asarray(input_ids),
      "position_ids": jnp.broadcast_to(jnp.arange(lt, dtype=jnp.int32),
                                       (b, lt)),
      "img_feat": jnp.asarray(img_feat),
      "img_pos_feat": jnp.asarray(pos),
      "attn_masks": jnp.asarray(attn),
      "img_masks": jnp.asarray(r.uniform(size=(b, li)) < 0.3),
  }, txt_lens, nbbs


def _valid(out, txt_lens, nbbs, lt):
  """Sequence outputs at the valid (non-padding) positions only."""
  rows = []
  for i, (t, n) in enumerate(zip(txt_lens, nbbs)):
    rows.append(np.concatenate([out[i, :t], out[i, lt:lt + n]]))
  return rows


def test_base_parameter_count_matches_official():
  net = um.build_model("pretrain", um.config.base())
  shapes = jax.eval_shape(lambda: um.init_params(net, jax.random.key(0)))
  flat = traverse_util.flatten_dict(shapes)
  uniter = {k: v for k, v in flat.items() if k[0] == "uniter"}
  assert len(uniter) == 210
  assert sum(int(np.prod(v.shape)) for v in uniter.values()) == 109_898_752
  head = sum(int(np.prod(v.shape)) for k, v in flat.items()
             if k[0] != "uniter")
  # The reference's count without the tied tensors.
  assert head == 3_040_135


@pytest.mark.parametrize("task,count", [
    ("vqa", 8_514_617), ("ve", 2_109_443), ("itm", 3_075),
    ("nlvr2-attn", 10_500_099), ("vcr", 2_107_394)])
def test_large_head_parameter_counts(task, count):
  net = um.build_model(task, um.config.large())
  shapes = jax.eval_shape(lambda: um.init_params(net, jax.random.key(0)))
  flat = traverse_util.flatten_dict(shapes)
  assert sum(int(np.prod(v.shape)) for k, v in flat.items()
             if k[0] != "uniter") == count


def test_re_mlp2_head_parameter_count_large():
  net = um.build_model("re", um.config.large(), mlp=2)
  shapes = jax.eval_shape(lambda: um.init_params(net, jax.random.key(0)))
  flat = traverse_util.flatten_dict(shapes)
  assert sum(int(np.prod(v.shape)) for k, v in flat.items()
             if k[0] != "uniter") == 1_052_673


@pytest.mark.parametrize("task", ["pretrain", "vqa", "nlvr2-attn", "re"])
def test_scan_and_loop_layers_give_same_outputs(task):
  cfg = um.config.tiny()
  net = um.build_model(task, cfg)
  params = um.init_params(net, jax.random.key(0))
  rows = um.head_spec(task).rows_per_example
  batch, _, _ = _batch(net.cfg, 0, rows=rows)
  ref = net.apply({"params": params}, batch)
  scfg = um.config.tiny()
  scfg.scan_layers = True
  snet = um.build_model(task, scfg)
  sparams = convert_core.scan_params(params)
  got = snet.apply({"params": sparams}, batch)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5,
                               err_msg=k)


@pytest.mark.parametrize("policy,scan", [("full", False), ("minimal", True),
                                         ("save_qkv_proj", True)])
def test_remat_keeps_outputs_and_gradients(policy, scan):
  cfg = um.config.tiny()
  cfg.scan_layers = scan
  net = um.build_model("itm", cfg)
  params = um.init_params(net, jax.random.key(0))
  rcfg = um.config.tiny()
  rcfg.scan_layers, rcfg.remat_policy = scan, policy
  rnet = um.build_model("itm", rcfg)
  batch, _, _ = _batch(net.cfg, 1)

  def loss(n):
    def f(p):
      out = n.apply({"params": p}, batch, deterministic=False,
                    rngs={"dropout": jax.random.key(3)})
      return jnp.sum(out["itm_logits"] ** 2)
    return f

  l0, g0 = jax.value_and_grad(loss(net))(params)
  l1, g1 = jax.value_and_grad(loss(rnet))(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_fused_attention_matches_explicit():
  cfg = um.config.tiny()
  net = um.build_model("vqa", cfg)
  params = um.init_params(net, jax.random.key(0))
  fcfg = um.config.tiny()
  fcfg.attention_impl = "fused"
  fnet = um.build_model("vqa", fcfg)
  batch, tl, nb = _batch(net.cfg, 2)
  a = net.apply({"params": params}, batch)
  b = fnet.apply({"params": params}, batch)
  lt = batch["input_ids"].shape[1]
  for x, y in zip(_valid(np.asarray(a["sequence_output"]), tl, nb, lt),
                  _valid(np.asarray(b["sequence_output"]), tl, nb, lt)):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b["logits"], a["logits"], rtol=1e-5, atol=1e-5)


def test_fused_attention_refuses_attention_dropout_in_training():
  fcfg = um.config.tiny()
  fcfg.attention_impl = "fused"
  net = um.build_model("vqa", fcfg)
  params = um.init_params(net, jax.random.key(0))
  batch, _, _ = _batch(net.cfg, 2)
  with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
    net.apply({"params": params}, batch, deterministic=False,
              rngs={"dropout": jax.random.key(0)})


def test_cudnn_attention_names_what_it_needs():
  # cuDNN's fused attention runs on NVIDIA GPUs in bf16/fp16 only; elsewhere
  # the model says so, naming the field, instead of JAX's bare error.
  fcfg = um.config.tiny()
  fcfg.attention_impl = "cudnn"
  um.config.validate(fcfg)
  net = um.build_model("vqa", fcfg)
  batch, _, _ = _batch(net.cfg, 2)
  # (tiny() computes in float32: on a GPU the dtype rule is what fails.)
  need = ("computes in bfloat16 or float16" if jax.default_backend() == "gpu"
          else f"needs an NVIDIA GPU.*'{jax.default_backend()}'")
  with pytest.raises(ValueError, match="attention_impl='cudnn' " + need):
    um.init_params(net, jax.random.key(0))


def test_padding_does_not_change_valid_outputs():
  cfg = um.config.tiny()
  net = um.build_model("pretrain", cfg)
  params = um.init_params(net, jax.random.key(0))
  batch, tl, nb = _batch(net.cfg, 4, lt=6, li=4)
  big = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if k in ("input_ids", "position_ids"):
      pad = np.zeros((v.shape[0], 5), v.dtype)
      big[k] = np.concatenate([v, pad], 1)
      if k == "position_ids":
        big[k] = np.broadcast_to(np.arange(11), big[k].shape).astype(v.dtype)
    elif k in ("img_feat", "img_pos_feat"):
      big[k] = np.concatenate([v, np.zeros((v.shape[0], 3) + v.shape[2:],
                                           v.dtype)], 1)
    elif k == "img_masks":
      big[k] = np.concatenate([v, np.zeros((v.shape[0], 3), bool)], 1)
    elif k == "attn_masks":
      big[k] = np.concatenate([v[:, :6], np.zeros((v.shape[0], 5), v.dtype),
                               v[:, 6:], np.zeros((v.shape[0], 3), v.dtype)],
                              1)
  a = net.apply({"params": params}, batch, "mrfr")
  b = net.apply({"params": params}, big, "mrfr")
  for x, y in zip(_valid(np.asarray(a["sequence_output"]), tl, nb, 6),
                  _valid(np.asarray(b["sequence_output"]), tl, nb, 11)):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_float32_params_and_stays_close():
  cfg = um.config.tiny()
  net = um.build_model("vqa", cfg)
  params = um.init_params(net, jax.random.key(0))
  bcfg = um.config.tiny()
  bcfg.dtype = "bfloat16"
  bnet = um.build_model("vqa", bcfg)
  bparams = um.init_params(bnet, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(bparams))
  batch, _, _ = _batch(net.cfg, 5)
  a = net.apply({"params": params}, batch)
  b = bnet.apply({"params": params}, batch)
  assert b["sequence_output"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(b["pooled_output"], np.float32),
                             a["pooled_output"], atol=0.1)


def test_dropout_is_active_in_training_and_keyed():
  cfg = um.config.tiny()
  net = um.build_model("itm", cfg)
  params = um.init_params(net, jax.random.key(0))
  batch, _, _ = _batch(net.cfg, 6)
  run = lambda k: net.apply({"params": params}, batch, deterministic=False,
                            rngs={"dropout": jax.random.key(k)})["logits"]
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))


def test_mask_embedding_row_zero_is_never_used():
  cfg = um.config.tiny()
  net = um.build_model("pretrain", cfg)
  params = um.init_params(net, jax.random.key(0))
  batch, _, _ = _batch(net.cfg, 7)
  a = net.apply({"params": params}, batch, "mrfr")["sequence_output"]
  p2 = jax.tree_util.tree_map(lambda x: x, params)
  p2["uniter"]["img_embeddings"]["mask_embedding"] = (
      params["uniter"]["img_embeddings"]["mask_embedding"].at[0].set(5.0))
  b = net.apply({"params": p2}, batch, "mrfr")["sequence_output"]
  np.testing.assert_array_equal(a, b)
  # Row 1 is used where img_masks is set.
  p2["uniter"]["img_embeddings"]["mask_embedding"] = (
      params["uniter"]["img_embeddings"]["mask_embedding"].at[1].add(1.0))
  c = net.apply({"params": p2}, batch, "mrfr")["sequence_output"]
  assert not np.allclose(a, c)


def test_positions_gather_matches_full_heads():
  cfg = um.config.tiny()
  net = um.build_model("pretrain", cfg)
  params = um.init_params(net, jax.random.key(0))
  batch, _, _ = _batch(net.cfg, 8)
  full = net.apply({"params": params}, batch)
  pos = jnp.array([[1, 2], [0, 3], [2, 2]], jnp.int32)
  got = net.apply({"params": params},
                  {**batch, "mlm_positions": pos, "mrm_positions": pos})
  want_mlm = jnp.take_along_axis(full["mlm_logits"], pos[..., None], 1)
  np.testing.assert_allclose(got["mlm_logits"], want_mlm, rtol=1e-6)
  want_mrc = jnp.take_along_axis(full["mrc_logits"], pos[..., None], 1)
  np.testing.assert_allclose(got["mrc_logits"], want_mrc, rtol=1e-6)


def test_bad_batch_shape_is_a_clear_error():
  cfg = um.config.tiny()
  net = um.build_model("vqa", cfg)
  params = um.init_params(net, jax.random.key(0))
  batch, _, _ = _batch(net.cfg, 9)
  batch["attn_masks"] = batch["attn_masks"][:, :-1]
  with pytest.raises(ValueError, match="attn_masks"):
    net.apply({"params": params}, batch)


def test_unknown_head_and_bad_config_errors():
  with pytest.raises(ValueError, match="unknown head .captioning.*expected one of"):
    um.build_model("captioning", um.config.tiny())
  cfg = um.config.tiny()
  cfg.num_attention_heads = 5
  with pytest.raises(ValueError, match="num_attention_heads"):
    um.build_model("vqa", cfg)
