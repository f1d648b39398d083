"""One calling convention for every head: `model.apply({"params": p}, batch)`,
`uniter_jax.encode` and `uniter_jax.score_pairs`, on converted random
checkpoints (tiny PyTorch-reference models -> `to-flax` -> `load_checkpoint`
with no task) and batches made by `Processor.from_pretrained`.

Each head compiles once (`inference.apply` is cached per model and shape;
encode and score_pairs reuse it).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parity_cases as P
import torch
import torch_ref as R
import uniter_jax
from uniter_jax import inference
from uniter_jax import model as um
from uniter_jax.convert import __main__ as cli

HEADS = ["pretrain", "pretrain-vcr", "vqa", "ve", "itm", "nlvr2-paired",
         "nlvr2-triplet", "nlvr2-attn", "re", "vcr"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    f"w{i}" for i in range(95)]          # the tiny config's 100 words
CAPTIONS = ["w1 w2 w3 w4", "w5 w6"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """head -> converted directory (with vocab.txt) of a random reference."""
  d = tmp_path_factory.mktemp("ckpts")
  cfg_json = d / "uniter-tiny.json"
  cfg_json.write_text(json.dumps(R.tiny_config().to_dict()))
  vocab = d / "vocab.txt"
  vocab.write_text("\n".join(VOCAB) + "\n")
  out = {}
  for head in HEADS:
    src = d / f"{head}.pt"
    torch.save(P.make_reference(head, R.tiny_config()).state_dict(), src)
    dst = d / head
    assert cli.main(["to-flax", "--task", head, "--model-config",
                     str(cfg_json), "--vocab", str(vocab), str(src),
                     str(dst)]) == 0
    out[head] = str(dst)
  return out


def _images(proc, n):
  rng = np.random.default_rng(n)
  imgs = []
  for k in range(n):
    m = 3 + 2 * k
    xy = rng.uniform(0, 300, (m, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (m, 2))], 1)
    imgs.append(proc.regions(rng.normal(size=(m, 2048)), boxes,
                             image_size=(640, 480),
                             conf=rng.uniform(0, 1, m)))
  return imgs


def _batch(head, proc):
  imgs = _images(proc, 4)
  if head.startswith("nlvr2"):
    return proc(CAPTIONS, [(imgs[0], imgs[1]), (imgs[2], imgs[3])],
                task=head)
  if head == "vcr":
    # Token ids past the 100 words: the VCR heads' 81 extra tokens.
    return proc.vcr([[5, 6, 150], [7]], [[[8], [9, 170], [10], [11]]] * 2,
                    imgs[:2], answer=None)
  return proc(CAPTIONS, imgs[:2], task=head)


@pytest.mark.parametrize("head", HEADS)
def test_apply_encode_score_pairs(exported, head):
  model, params = uniter_jax.load_checkpoint(exported[head])   # no task
  assert inference.head_name(model) == head
  proc = uniter_jax.Processor.from_pretrained(exported[head])
  batch = _batch(head, proc)
  b, lt = batch["input_ids"].shape
  li = batch["img_feat"].shape[1]
  h = model.cfg.hidden_size

  out = inference.apply(model, params, batch)   # = model.apply, jitted
  assert out["sequence_output"].shape == (b, lt + li, h)
  assert out["pooled_output"].shape == (b, h)
  want_logits = {
      "vqa": (b, 3129), "ve": (b, 3), "itm": (b, 1), "nlvr2-paired": (b // 2,
                                                                      2),
      "nlvr2-attn": (b // 2, 2), "nlvr2-triplet": (b, 2), "re": (b, li),
      "vcr": (b, 2)}
  if head.startswith("pretrain"):
    assert out["itm_logits"].shape == (b, 2)
    assert out["txt_output"].shape == (b, lt, h)
  else:
    assert out["logits"].shape == want_logits[head]
  for v in jax.tree_util.tree_leaves(out):
    assert np.isfinite(np.asarray(v)).all()

  enc = uniter_jax.encode(model, params, batch)
  np.testing.assert_array_equal(enc["pooled_output"], out["pooled_output"])
  np.testing.assert_array_equal(enc["txt_output"],
                                out["sequence_output"][:, :lt])
  np.testing.assert_array_equal(enc["img_output"],
                                out["sequence_output"][:, lt:])
  np.testing.assert_array_equal(enc["txt_mask"].sum(1), batch["txt_lens"])
  np.testing.assert_array_equal(enc["img_mask"].sum(1), batch["num_bbs"])

  if head in ("pretrain", "pretrain-vcr", "itm"):
    probs = np.asarray(uniter_jax.score_pairs(model, params, batch))
    assert probs.shape == (b,) and ((probs >= 0) & (probs <= 1)).all()
    if head == "itm":
      assert inference.match_score_kind(model) == "rank"
      np.testing.assert_allclose(
          probs, jax.nn.sigmoid(out["logits"][:, 0]), rtol=1e-6)
      itm = uniter_jax.score_pairs(model, params, batch, score="itm")
      np.testing.assert_allclose(
          itm, jax.nn.softmax(out["itm_logits"], -1)[:, 1], rtol=1e-6)
    else:
      assert inference.match_score_kind(model) == "itm"
      np.testing.assert_allclose(
          probs, jax.nn.softmax(out["itm_logits"], -1)[:, 1], rtol=1e-6)
  else:
    with pytest.raises(ValueError, match="no image-text match score"):
      uniter_jax.score_pairs(model, params, batch)


def test_pretraining_model_default_call_is_the_itm_head(exported):
  """`apply(params, batch)` without `output` works for the pretraining
  model as for every head: on an inference batch, the encoder outputs and
  the ITM logits (the same values as the old `apply(params, batch, "itm")`);
  on a batch carrying masking, every head; and `init` still creates every
  pretraining head's parameters."""
  model, params = uniter_jax.load_checkpoint(exported["pretrain"])
  proc = uniter_jax.Processor.from_pretrained(exported["pretrain"])
  batch = {k: jnp.asarray(v) for k, v in _batch("pretrain", proc).items()}
  plain = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
  itm = inference.apply(model, params, batch, output="itm")   # cached
  assert set(plain) == set(itm) == {"sequence_output", "pooled_output",
                                    "txt_output", "img_output", "itm_logits"}
  for k in plain:
    np.testing.assert_allclose(plain[k], itm[k], rtol=1e-6, atol=1e-6,
                               err_msg=k)
  masked = dict(batch, img_masks=jnp.zeros(batch["img_feat"].shape[:2],
                                           bool))
  shapes = jax.eval_shape(lambda: model.apply({"params": params}, masked))
  assert {"mlm_logits", "mrfr_pred", "mrc_logits", "itm_logits"} <= set(
      shapes)
  shapes = jax.eval_shape(lambda: um.init_params(model, jax.random.key(0)))
  assert {"cls", "feat_regress", "region_classifier", "itm_output",
          "uniter"} <= set(shapes)
  with pytest.raises(ValueError, match="only the pretraining models"):
    vqa, vparams = uniter_jax.load_checkpoint(exported["vqa"])
    inference.apply(vqa, vparams, batch, output="itm")
