"""Config files: official values, variants, and model surgery for init."""

import importlib
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from uniter_jax import model as um  # pylint: disable=wrong-import-position
from uniter_jax.model import surgery  # pylint: disable=wrong-import-position
from uniter_jax.train import input as input_lib  # pylint: disable=wrong-import-position
from uniter_jax.train import optim  # pylint: disable=wrong-import-position

SETUPS = ["pretrain_indomain_base", "pretrain_alldata_base",
          "pretrain_alldata_large", "pretrain_vcr_base", "demo"]


def _get(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", SETUPS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_configs_build_and_are_locked_friendly(name, arg):
  c = _get(name, arg)
  c.lock()
  with pytest.raises(AttributeError):
    c.train.learnin_rate = 1.0
  assert input_lib.task_keys(c)
  um.config.validate({**c.model.to_dict(),
                      "vocab_size": max(c.model.vocab_size, 1)})


def test_official_values():
  c = _get("pretrain_alldata_base")
  pool = input_lib.task_pool(c)
  assert len(pool) == 110
  share = {t: sum(k.startswith(t + "_") for k in pool) / 110
           for t in ("itm", "mlm", "mrfr", "mrckl")}
  assert share == pytest.approx({"itm": 30 / 110, "mlm": 40 / 110,
                                 "mrfr": 20 / 110, "mrckl": 20 / 110})
  assert (c.train.token_budget, c.train.gradient_accumulation_steps,
          c.train.learning_rate, c.train.num_train_steps,
          c.train.warmup_steps, c.train.grad_norm) == (
              10240, 6, 5e-5, 200000, 10000, 5.0)
  large = _get("pretrain_alldata_large")
  assert (large.model.hidden_size, large.model.num_hidden_layers,
          large.train.token_budget, large.train.num_train_steps) == (
              1024, 24, 6144, 500000)
  vcr = _get("pretrain_vcr_base", "large")
  assert vcr.model_task == "pretrain-vcr" and vcr.train.grad_norm < 0
  assert vcr.datasets.vcr.mix_ratio == (10, 1, 1)
  assert "itm" not in vcr.datasets.vcr.tasks
  for name in SETUPS[:-1]:   # the official setups weight every task 1.0
    for arg in (None, "large") if name == "pretrain_vcr_base" else (None,):
      assert set(_get(name, arg).train.loss_weights.values()) == {1.0}


def test_task_draws_follow_the_mix_and_are_reproducible():
  c = _get("pretrain_indomain_base")
  pool = input_lib.task_pool(c)
  draws = [input_lib.task_for_update(pool, 42, u) for u in range(6000)]
  assert draws == [input_lib.task_for_update(pool, 42, u)
                   for u in range(6000)]
  frac = np.mean([d.startswith("itm_") for d in draws])
  assert abs(frac - 4 / 12) < 0.03


def test_schedule_and_no_decay_set_follow_the_official_code():
  lr = optim.warmup_linear(1e-4, 10, 100)
  assert float(lr(0)) == pytest.approx(1e-5)      # step 1 of warmup 10
  assert float(lr(9)) == pytest.approx(1e-4 * 90 / 90)
  assert float(lr(54)) == pytest.approx(1e-4 * 45 / 90)
  assert float(lr(150)) == pytest.approx(1e-8)
  net = um.build_model("pretrain", um.config.tiny())
  shapes = jax.eval_shape(lambda: um.init_params(net, jax.random.key(0)))
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  mask = traverse_util.flatten_dict(optim.decay_mask(shapes))
  by_name = {optim.torch_name(p): m for p, m in mask.items()}
  assert by_name["uniter.encoder.layer.0.attention.self.query.weight"]
  assert not by_name["uniter.encoder.layer.0.attention.self.query.bias"]
  assert not by_name["uniter.embeddings.LayerNorm.weight"]
  # Name-based, as the official rule: these LayerNorm weights ARE decayed.
  assert by_name["uniter.img_embeddings.img_layer_norm.weight"]
  assert by_name["feat_regress.net.2.weight"]


def test_surgery_for_vcr_nlvr2_and_retrieval():
  cfg = um.config.tiny()
  pre = um.init_params(um.build_model("pretrain", cfg), jax.random.key(0))
  types = np.asarray(pre["uniter"]["embeddings"]["token_type_embeddings"]
                     ["embedding"])
  words = np.asarray(pre["uniter"]["embeddings"]["word_embeddings"]
                     ["embedding"])
  vcr_init = um.init_params(um.build_model("pretrain-vcr", cfg),
                            jax.random.key(1))
  vcr = surgery.adapt_params(pre, vcr_init, "pretrain-vcr", jax.random.key(2))
  t = np.asarray(vcr["uniter"]["embeddings"]["token_type_embeddings"]
                 ["embedding"])
  np.testing.assert_array_equal(t, np.stack([types[0], types[1], types[0],
                                             types[0]]))
  w = np.asarray(vcr["uniter"]["embeddings"]["word_embeddings"]["embedding"])
  assert w.shape == (cfg.vocab_size + 81, cfg.hidden_size)
  np.testing.assert_array_equal(w[:cfg.vocab_size], words)
  # The MLM head is re-created (fresh), the other heads are copied.
  np.testing.assert_array_equal(vcr["cls"]["predictions"]["bias"],
                                vcr_init["cls"]["predictions"]["bias"])
  np.testing.assert_array_equal(vcr["itm_output"]["kernel"],
                                pre["itm_output"]["kernel"])
  nlvr_init = um.init_params(um.build_model("nlvr2-paired", cfg),
                             jax.random.key(3))
  nl = surgery.adapt_params(pre, nlvr_init, "nlvr2-paired", jax.random.key(4))
  np.testing.assert_array_equal(
      nl["uniter"]["embeddings"]["token_type_embeddings"]["embedding"],
      np.stack([types[0], types[1], types[1]]))
  itm_init = um.init_params(um.build_model("itm", cfg), jax.random.key(5))
  itm = surgery.adapt_params(pre, itm_init, "itm", jax.random.key(6))
  np.testing.assert_array_equal(itm["rank_output"]["kernel"][:, 0],
                                pre["itm_output"]["kernel"][:, 1])
