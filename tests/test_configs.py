"""Config files: official values, variants, and model surgery for init.

`configs` is imported as the installed package (`pip install -e .`), as
run.py's config files import it: nothing here edits sys.path.
"""

import glob
import importlib
import os

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from configs import common
from uniter_jax import model as um
from uniter_jax.model import surgery
from uniter_jax.train import input as input_lib
from uniter_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUPS = ["pretrain_indomain_base", "pretrain_alldata_base",
          "pretrain_alldata_large", "pretrain_vcr_base", "finetune_vqa",
          "finetune_ve", "finetune_nlvr2", "finetune_itr", "demo"]
# What each file accepts after ':' (docs/training.md, "Variants").
KNOWN_VARIANTS = {"pretrain_indomain_base": "runlocal",
                  "pretrain_alldata_base": "large, runlocal",
                  "pretrain_alldata_large": "runlocal",
                  "pretrain_vcr_base": "large, runlocal",
                  "finetune_vqa": "large, runlocal, synthetic",
                  "finetune_ve": "large, runlocal, synthetic",
                  "finetune_nlvr2": ("attn, large, paired, runlocal, "
                                     "synthetic, triplet"),
                  "finetune_itr": ("coco, flickr, large, runlocal, "
                                   "synthetic, zero_shot"),
                  "demo": "runlocal"}


def _get(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def _config_files():
  return sorted(os.path.basename(p)[:-3]
                for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                if os.path.basename(p) not in ("common.py", "__init__.py"))


def test_every_config_file_is_covered_and_leaves_sys_path_alone():
  # A new setup file must join SETUPS, so the build tests below reach it.
  assert _config_files() == sorted(SETUPS) == sorted(KNOWN_VARIANTS)
  for name in _config_files() + ["common", "__init__"]:
    with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
      src = f.read()
    assert "sys.path" not in src, name
    assert "import sys" not in src, name


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


def test_parse_arg_types_and_combines_variants():
  defaults = dict(large=False, runlocal=False, steps=10, lr=0.1, name="a")
  assert common.parse_arg(None, **defaults).to_dict() == defaults
  assert common.parse_arg("", **defaults).to_dict() == defaults
  v = common.parse_arg(" runlocal , large,steps=3,lr=1e-3,name=b", **defaults)
  assert v.to_dict() == dict(large=True, runlocal=True, steps=3, lr=1e-3,
                             name="b")
  assert isinstance(v.steps, int) and isinstance(v.lr, float)
  assert not common.parse_arg("runlocal=false", runlocal=True).runlocal
  assert common.parse_arg("runlocal=Yes", runlocal=False).runlocal
  with pytest.raises(AttributeError):   # locked: a misspelt read fails
    _ = common.parse_arg("", runlocal=False).runlcoal
  with pytest.raises(ValueError, match=r"'steps' needs a value"):
    common.parse_arg("steps", **defaults)
  with pytest.raises(ValueError, match=r"steps='x': expected a int"):
    common.parse_arg("steps=x", **defaults)
  with pytest.raises(ValueError, match=r"runlocal='maybe': expected a bool"):
    common.parse_arg("runlocal=maybe", **defaults)
  with pytest.raises(ValueError, match=r"'big=1' in 'large,big=1'; known "
                     r"variants: large, lr=<float>, name=<str>, runlocal, "
                     r"steps=<int>"):
    common.parse_arg("large,big=1", **defaults)
  with pytest.raises(ValueError, match="none"):
    common.parse_arg("runlocal")
  with pytest.raises(TypeError):
    common.parse_arg(None, mix=(1, 2))


def test_variants_give_the_expected_fields():
  demo = _get("demo", "runlocal")
  assert (demo.data.synthetic, demo.mesh.data, demo.train.num_train_steps,
          demo.datasets.synthetic.text) == (
              "tiny", 1, 6, "uniter_synthetic_text/tiny:1.0.0")
  assert _get("demo", "runlocal=false").to_dict() == _get("demo").to_dict()
  vcr = _get("pretrain_vcr_base", "large,runlocal")
  assert vcr.to_dict() == _get("pretrain_vcr_base", "runlocal , large"
                               ).to_dict()
  assert vcr.model_task == "pretrain-vcr"
  assert vcr.datasets.vcr.mix_ratio == (10, 1, 1)          # from large
  assert vcr.datasets.vcr.tasks == ("mlm", "mrfr", "mrckl")
  assert (vcr.model.hidden_size, vcr.init_checkpoint, vcr.data.synthetic,
          vcr.datasets.vcr.text) == (              # from runlocal
              um.config.tiny().hidden_size, "", "tiny",
              "uniter_synthetic_text/tiny:1.0.0")
  assert _get("pretrain_vcr_base", "runlocal").datasets.vcr.mix_ratio == (
      2, 1, 1)
  # The all-data base file's `large` is the official large setup.
  for arg, large_arg in (("large", None), ("large,runlocal", "runlocal")):
    assert _get("pretrain_alldata_base", arg).to_dict() == _get(
        "pretrain_alldata_large", large_arg).to_dict()


@pytest.mark.parametrize("name,arg", [
    ("demo", "runlcoal"), ("demo", "large"), ("demo", "runlocal,large"),
    ("pretrain_indomain_base", "large"), ("pretrain_alldata_large", "large"),
    ("pretrain_alldata_base", "huge"), ("pretrain_vcr_base", "large,tiny")])
def test_unknown_variant_names_the_known_ones(name, arg):
  with pytest.raises(ValueError, match="known variants: " +
                     KNOWN_VARIANTS[name] + "$"):
    _get(name, arg)


def test_config_flag_loads_files_by_path_and_refuses_unknown_variants():
  # As run.py does: ml_collections loads the file by path, and the file's
  # `from configs import common` resolves through the installed package.
  def parse(*argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                    lock_config=True)
    fv(["run.py", *argv])
    return fv.config

  path = os.path.join(ROOT, "configs", "demo.py")
  c = parse(f"--config={path}:runlocal")
  assert (c.data.synthetic, c.train.num_train_steps) == ("tiny", 6)
  with pytest.raises(flags.IllegalFlagValueError,
                     match="'runlcoal'; known variants: runlocal"):
    parse(f"--config={path}:runlcoal")


def test_ensure_synthetic_does_nothing_without_a_preset(tmp_path):
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  c = _get("pretrain_indomain_base")
  assert c.data.synthetic == ""
  c.data.data_dir = str(tmp_path / "never_created")
  prepare.ensure_synthetic(c)
  assert not (tmp_path / "never_created").exists()
  c.data.synthetic = "no_such_preset"
  with pytest.raises(ValueError, match="no_such_preset"):
    prepare.ensure_synthetic(c)


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


def test_mix_ratio_by_dataset_size():
  # VQA's official loader concatenates its three training dbs: -1 draws
  # each in proportion to its example count.
  c = _get("finetune_vqa")
  assert {tuple(d.mix_ratio) for d in c.datasets.values()} == {(-1,)}
  sizes = {"vqa_vqa_train": 300, "vqa_vqa_trainval": 200, "vqa_vqa_vg": 500}
  pool = input_lib.task_pool(c, sizes)
  assert len(pool) == 10 and pool.count("vqa_vqa_vg") == 5
  with pytest.raises(ValueError, match="sizes"):
    input_lib.task_pool(c)
  c.datasets.vqa_vg.mix_ratio = (2,)
  with pytest.raises(ValueError, match="all or none"):
    input_lib.task_pool(c, sizes)


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
