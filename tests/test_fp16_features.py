"""fp16 region features to the device: chosen by default for a model that
computes in bf16, the same values in the batch, and the same model outputs
bit for bit (the device widens them before any arithmetic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from uniter_jax.model import config as model_config
from uniter_jax.model import encoder
from uniter_jax.train import input as input_lib


@pytest.mark.parametrize("dtype,want", [("bfloat16", "float16"),
                                        ("float16", "float16"),
                                        ("float32", "float32")])
def test_auto_follows_the_compute_dtype(dtype, want):
  c = demo.get_config("runlocal")
  c.model.dtype = dtype
  assert input_lib.img_feat_dtype(c) == want
  c.data.img_feat_dtype = "float32"
  assert input_lib.img_feat_dtype(c) == "float32"
  c.data.img_feat_dtype = "fp16"
  with pytest.raises(ValueError, match="img_feat_dtype"):
    input_lib.img_feat_dtype(c)


def test_dataset_of_a_bf16_config_sends_the_stored_fp16_values():
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  from uniter_jax import tasks  # pylint: disable=g-import-not-at-top
  c = demo.get_config("runlocal")
  prepare.ensure_synthetic(c)
  ds = c.datasets[list(c.datasets.keys())[0]]
  task = tasks.make_task("mlm", c)
  batches = {}
  for dtype in ("float32", "bfloat16"):
    c.model.dtype = dtype
    d = input_lib.make_dataset(c, task, ds.text, "train", token_budget=2048,
                               batch_multiple=1, seed=0)
    batches[dtype] = d.load_batch(0)
  low, full = batches["bfloat16"]["img_feat"], batches["float32"]["img_feat"]
  assert low.dtype == np.float16 and full.dtype == np.float32
  assert low.nbytes * 2 == full.nbytes
  np.testing.assert_array_equal(low.astype(np.float32), full)
  for k in batches["float32"]:
    if k != "img_feat":
      np.testing.assert_array_equal(batches["bfloat16"][k],
                                    batches["float32"][k], err_msg=k)


def test_bf16_model_gives_the_same_outputs_from_fp16_features():
  cfg = model_config.tiny()
  cfg.dtype = "bfloat16"
  model = encoder.UniterModel(encoder.freeze_config(cfg))
  rng = np.random.default_rng(0)
  b, lt, li = 2, 6, 5
  feat16 = rng.normal(size=(b, li, cfg.img_dim)).astype(np.float16)
  batch = {
      "input_ids": rng.integers(1, 100, (b, lt)).astype(np.int32),
      "position_ids": np.broadcast_to(np.arange(lt, dtype=np.int32), (b, lt)),
      "img_pos_feat": rng.random((b, li, 7)).astype(np.float32),
      "attn_masks": np.ones((b, lt + li), np.int32),
      "img_masks": rng.random((b, li)) < 0.4,
  }
  params = model.init(jax.random.PRNGKey(0),
                      {**batch, "img_feat": feat16.astype(np.float32)})
  apply = jax.jit(lambda p, x: model.apply(p, x))
  out32 = apply(params, {**batch, "img_feat": feat16.astype(np.float32)})
  out16 = apply(params, {**batch, "img_feat": feat16})
  for k in out32:
    assert out16[k].dtype == out32[k].dtype
    np.testing.assert_array_equal(np.asarray(out16[k], np.float32),
                                  np.asarray(out32[k], np.float32),
                                  err_msg=k)
  assert jnp.isfinite(out16["pooled_output"].astype(jnp.float32)).all()
