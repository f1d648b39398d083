"""Initialising a head's model from another checkpoint: strict merge, report,
every kind of source (state_dict, converted dir, training workdir) and
leaf-wise placement on a mesh. Tiny models whose params are random numpy
of the heads' shapes (jax.eval_shape only), so nothing is compiled.
"""

import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uniter_jax import convert
from uniter_jax import model as um
from uniter_jax.model import surgery

CFG = um.config.tiny()
TYPES = "uniter/embeddings/token_type_embeddings/embedding"
ENC = "uniter/encoder/layer/1/intermediate/dense/kernel"


def _flat(tree):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _abstract(head, scan=False, **kw):
  cfg = CFG.to_dict()
  cfg["scan_layers"] = scan
  net = um.build_model(head, cfg, **kw)
  return jax.eval_shape(lambda: um.init_params(net, jax.random.key(0)))


def _fresh(head, seed=1, **kw):
  """Random numpy params of the head's shapes (no slow eager init)."""
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda s: rs.normal(size=s.shape).astype(s.dtype),
      _abstract(head, **kw))


@pytest.fixture(scope="module")
def pretrain():
  return _fresh("pretrain", seed=0)


@pytest.fixture(scope="module")
def vqa_init():
  return _fresh("vqa", num_answer=5)


@pytest.fixture(scope="module")
def pt(pretrain, tmp_path_factory):
  path = tmp_path_factory.mktemp("pt") / "pretrain.pt"
  convert.write_state_dict(convert.flax_to_torch(pretrain, "pretrain", CFG),
                           path)
  return str(path)


def test_pretrain_pt_into_vqa_reports_new_and_unused(pt, pretrain, vqa_init):
  params, report = convert.load_init_params(
      pt, head="vqa", model_cfg=CFG, target=vqa_init,
      allow_new=("vqa_output/*",))
  got, src, fresh = _flat(params), _flat(pretrain), _flat(vqa_init)
  assert sorted(report.new) == sorted(k for k in fresh
                                      if k.startswith("vqa_output/"))
  for k in ("cls/predictions/bias", "itm_output/kernel"):
    assert k in report.unused
  assert {k.split("/")[0] for k in report.unused} == {
      "cls", "feat_regress", "region_classifier", "itm_output"}
  assert not report.surgered and report.from_head == "pretrain"
  assert len(report.loaded) == len([k for k in fresh if k.startswith("uniter")])
  for k in report.loaded:
    np.testing.assert_array_equal(got[k], src[k], err_msg=k)
  for k in report.new:
    np.testing.assert_array_equal(got[k], fresh[k], err_msg=k)
  assert all(isinstance(v, jax.Array) for v in got.values())
  lines = report.lines()
  assert len(lines) <= 3, lines
  assert "head 'pretrain' -> 'vqa'" in lines[0]
  assert "6 new (vqa_output/...)" in lines[0]
  assert "18 unused (cls/predictions/..., feat_regress/..., itm_output/..." in (
      lines[0])


def test_missing_and_mis_shaped_params_fail_together(pt, vqa_init, tmp_path):
  with pytest.raises(surgery.MergeError) as e:
    convert.load_init_params(pt, head="vqa", model_cfg=CFG, target=vqa_init)
  msg = str(e.value)
  assert "missing    vqa_output/3/kernel (128, 5)" in msg, msg
  assert "allow_new=('vqa_output/*',)" in msg

  sd = convert.read_state_dict(pt)[0]
  sd["uniter.encoder.layer.1.intermediate.dense.weight"] = np.zeros(
      (100, CFG.hidden_size), np.float32)
  bad = tmp_path / "bad.pt"
  convert.write_state_dict(sd, bad)
  with pytest.raises(surgery.MergeError) as e:
    convert.load_init_params(bad, head="vqa", model_cfg=CFG, target=vqa_init)
  msg = str(e.value)
  assert f"mis-shaped {ENC}: source (64, 100), target (64, 128)" in msg, msg
  assert "vqa_output/0/kernel" in msg    # every problem, in one error
  assert str(bad) in msg


def test_nlvr2_grows_the_type_table_as_surgery(pt, pretrain):
  target = _fresh("nlvr2-paired")
  params, report = convert.load_init_params(
      pt, head="nlvr2-paired", model_cfg=CFG, target=target,
      allow_new=("nlvr2_output/*",))
  types = _flat(pretrain)[TYPES]
  got = np.asarray(_flat(params)[TYPES])
  np.testing.assert_array_equal(got, np.stack([types[0], types[1],
                                               types[1]]))
  assert report.surgered == {TYPES: "type table 2 -> 3 rows (row 2 = row 1)"}
  assert TYPES not in report.loaded
  assert "surgery: type table 2 -> 3 rows" in "\n".join(report.lines())


def test_converted_dir_into_itm_needs_no_fresh_params(pretrain, tmp_path):
  d = tmp_path / "conv"
  convert.save_flax(d, convert.scan_params(pretrain), "pretrain", CFG)

  def no_init():
    raise AssertionError("nothing is new: no fresh params needed")

  params, report = convert.load_init_params(
      d, head="itm", model_cfg=CFG, target=_abstract("itm"), init_fn=no_init)
  got = _flat(params)
  np.testing.assert_array_equal(got["rank_output/kernel"],
                                pretrain["itm_output"]["kernel"][:, 1:2])
  np.testing.assert_array_equal(got[ENC], _flat(pretrain)[ENC])
  assert not report.new and "rank_output/kernel" in report.surgered
  assert "(converted)" in report.source

  with pytest.raises(convert.ConversionError, match="not src_head 'vqa'"):
    convert.load_init_params(d, head="itm", model_cfg=CFG, src_head="vqa",
                             target=_abstract("itm"))
  other = dict(CFG.to_dict(), num_attention_heads=2)
  with pytest.raises(convert.ConversionError,
                     match="num_attention_heads=4, the target model "
                           "num_attention_heads=2"):
    convert.load_init_params(d, head="itm", model_cfg=other,
                             target=_abstract("itm"))
  with pytest.raises(convert.ConversionError, match="params folder"):
    convert.load_init_params(d / "params", head="itm", model_cfg=CFG,
                             target=_abstract("itm"))


@flax.struct.dataclass
class _State:
  """The fields of the trainer's TrainState, as it is saved."""
  step: Any
  params: Any
  opt_state: Any
  rng: Any
  bad_step: Any


def _workdir(path, steps):
  """A training workdir laid out as uniter_jax/train/checkpoint.py saves."""
  run_config = {"model_task": "pretrain",
                "model": dict(CFG.to_dict(), vocab_size=-1,
                              scan_layers=True)}
  path.mkdir()
  (path / "config.json").write_text(json.dumps(run_config))
  mgr = ocp.CheckpointManager(
      path / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True,
                                           enable_async_checkpointing=False),
      item_names=("state", "data", "config"))
  tx = optax.adamw(1e-3)
  for step, params in steps.items():
    params = jax.tree_util.tree_map(jnp.asarray, convert.scan_params(params))
    state = _State(step=jnp.asarray(step), params=params,
                   opt_state=tx.init(params),
                   rng=jax.random.key_data(jax.random.key(0)),
                   bad_step=jnp.asarray(-1))
    mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"iterators": {}}),
        config=ocp.args.JsonSave(run_config)), force=True)
  mgr.wait_until_finished()
  mgr.close()


def test_training_workdir_loads_its_newest_step(pretrain, vqa_init, tmp_path):
  later = jax.tree_util.tree_map(lambda x: x + 1, pretrain)
  wd = tmp_path / "run"
  _workdir(wd, {10: pretrain, 20: later})
  params, report = convert.load_init_params(
      wd, head="vqa", model_cfg=CFG, target=vqa_init,
      allow_new=("vqa_output/*",))
  np.testing.assert_array_equal(_flat(params)[ENC], _flat(later)[ENC])
  assert report.source == f"{wd} (step 20)" and report.from_head == "pretrain"
  assert "cls/predictions/bias" in report.unused

  params, report = convert.load_init_params(
      wd / "checkpoints" / "10", head="vqa", model_cfg=CFG, target=vqa_init,
      allow_new=("vqa_output/*",))
  np.testing.assert_array_equal(_flat(params)[ENC], _flat(pretrain)[ENC])

  with pytest.raises(convert.ConversionError,
                     match=f"checkpoints folder .* pass the workdir itself "
                           f"\\({wd}\\)"):
    convert.load_init_params(wd / "checkpoints", head="vqa", model_cfg=CFG,
                             target=vqa_init)
  (tmp_path / "empty").mkdir()
  with pytest.raises(convert.ConversionError, match="empty.*not a checkpoint"):
    convert.load_init_params(tmp_path / "empty", head="vqa", model_cfg=CFG,
                             target=vqa_init)
  with pytest.raises(convert.ConversionError, match="no such file"):
    convert.load_init_params(tmp_path / "nope.pt", head="vqa", model_cfg=CFG,
                             target=vqa_init)


def _shardings(tree, mesh):
  def spec(x):
    if x.ndim == 2 and x.shape[1] % mesh.shape["model"] == 0:
      return NamedSharding(mesh, P(None, "model"))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map(spec, tree)


def test_leaves_land_on_the_requested_shardings(pt, pretrain, vqa_init):
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  target = _abstract("vqa", scan=True, num_answer=5)
  shardings = _shardings(target, mesh)
  params, report = convert.load_init_params(
      pt, head="vqa", model_cfg=CFG, target=target, shardings=shardings,
      allow_new=("vqa_output/*",),
      init_fn=lambda: convert.scan_params(vqa_init))
  assert report.new
  for (path, leaf), want in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree_util.tree_leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
  enc = "uniter/encoder/layer/intermediate/dense/kernel"     # scanned
  np.testing.assert_array_equal(_flat(params)[enc],
                                _flat(convert.scan_params(pretrain))[enc])

  _, loaded = convert.load_checkpoint(
      pt, "pretrain", model_config=CFG,
      shardings=_shardings(pretrain, mesh))
  kernel = loaded["uniter"]["encoder"]["layer"]["1"]["intermediate"]["dense"][
      "kernel"]
  assert kernel.sharding.is_equivalent_to(
      NamedSharding(mesh, P(None, "model")), 2)
  assert len(kernel.addressable_shards) == 4


def test_vcr_pretraining_surgery_and_a_deeper_scanned_target(pretrain):
  target = _fresh("pretrain-vcr", seed=2)
  params, report = surgery.merge_params(pretrain, target,
                                        to_head="pretrain-vcr")
  words = "uniter/embeddings/word_embeddings/embedding"
  assert report.surgered[words].startswith("word embeddings 100 -> 181 rows")
  assert report.surgered[TYPES] == ("type table 2 -> 4 rows (row 2, 3 = "
                                    "row 0)")
  # The MLM head is re-created, so it is new without being declared.
  assert report.new == sorted(k for k in _flat(target) if k.startswith("cls"))
  assert "cls/predictions/bias" in report.unused
  assert any("re-created" in line for line in report.lines())
  with pytest.raises(surgery.MergeError, match="'nope/\\*' matches no"):
    surgery.merge_params(pretrain, target, to_head="pretrain-vcr",
                         reinit=("nope/*",))

  # A 3-layer scanned target from the 2-layer source: layer 2 is new.
  deep = dict(CFG.to_dict(), num_hidden_layers=3, scan_layers=True)
  net = um.build_model("itm", deep)
  abstract = jax.eval_shape(lambda: um.init_params(net, jax.random.key(0)))
  with pytest.raises(surgery.MergeError, match="layer/2/"):
    surgery.merge_params(pretrain, abstract, to_head="itm")
  fresh = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7, s.dtype),
                                 abstract)
  params, report = surgery.merge_params(
      pretrain, abstract, to_head="itm",
      allow_new=("uniter/encoder/layer/2/*",), init_fn=lambda: fresh)
  stacked = _flat(params)["uniter/encoder/layer/intermediate/dense/kernel"]
  np.testing.assert_array_equal(stacked[1], _flat(pretrain)[ENC])
  assert (stacked[2] == 7).all()
  assert all(k.startswith("uniter/encoder/layer/2/") for k in report.new)
