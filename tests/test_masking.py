"""Tests of the per-example pretraining ops (uniter_jax/tasks/masking.py).

Statistics are measured over many draws and compared with the official
semantics (docs/objectives.md, "Per-example ops"): MLM selects 15% of the
tokens, splits them 80/10/10, never touches [CLS]/[SEP] and masks at least
one; MRM masks 15% of the regions and at least one; ITM draws 50% negatives,
never the true image. Same generator state -> same output.
"""
import numpy as np
import pytest

from uniter_jax.tasks import masking

CLS, SEP, MASK = 101, 102, 103
V_RANGE = (106, 28996)
FEAT_DIM, N_LABELS = 16, 9


def _image(key: str, nb: int, seed: int):
  r = np.random.default_rng(seed)
  soft = r.random((nb, N_LABELS)).astype(np.float32)
  return {
      "img_feat": r.standard_normal((nb, FEAT_DIM)).astype(np.float32) + 5.0,
      "img_pos_feat": r.random((nb, 7)).astype(np.float32),
      "img_soft_labels": soft / soft.sum(-1, keepdims=True),
      "img_key": key,
  }


IMAGES = {f"img{i}": _image(f"img{i}", 4 + i, i) for i in range(5)}


def _sample_image(rng, exclude_key):
  keys = [k for k in IMAGES if k != exclude_key]
  return dict(IMAGES[keys[rng.integers(len(keys))]])


CTX = {"cls_id": CLS, "sep_id": SEP, "mask_id": MASK, "v_range": V_RANGE,
       "sample_image": _sample_image}


def _example(n_tokens: int, seed: int, img="img3"):
  r = np.random.default_rng(1000 + seed)
  ids = r.integers(V_RANGE[0], V_RANGE[1], size=n_tokens).astype(np.int32)
  ex = {"input_ids": np.concatenate([[CLS], ids, [SEP]]).astype(np.int32)}
  ex.update({k: v.copy() if isinstance(v, np.ndarray) else v
             for k, v in IMAGES[img].items()})
  return ex


# ------------------------------------------------------------------- MLM ----
def test_mlm_statistics():
  rng = np.random.default_rng(0)
  n_tok = n_sel = n_mask = n_rand = n_keep = 0
  for i in range(3000):
    ex = _example(40, i)
    out = masking.mlm_op(ex, rng, CTX)
    orig, new, lab = ex["input_ids"], out["input_ids"], out["txt_labels"]
    assert new.shape == orig.shape and lab.shape == orig.shape
    assert new.dtype == np.int32 and lab.dtype == np.int32
    # [CLS]/[SEP] never selected nor changed.
    assert new[0] == CLS and new[-1] == SEP
    assert lab[0] == -1 and lab[-1] == -1
    sel = lab != -1
    assert sel.any()
    # Labels hold the original ids; unselected tokens are untouched.
    np.testing.assert_array_equal(lab[sel], orig[sel])
    np.testing.assert_array_equal(new[~sel], orig[~sel])
    n_tok += 40
    n_sel += sel.sum()
    n_mask += (new[sel] == MASK).sum()
    n_keep += (new[sel] == orig[sel]).sum()
    changed = sel & (new != MASK) & (new != orig)
    assert np.all((new[changed] >= V_RANGE[0]) & (new[changed] < V_RANGE[1]))
    n_rand += changed.sum()
  assert abs(n_sel / n_tok - 0.15) < 0.01
  assert abs(n_mask / n_sel - 0.8) < 0.02
  assert abs(n_rand / n_sel - 0.1) < 0.02
  assert abs(n_keep / n_sel - 0.1) < 0.02


def test_mlm_at_least_one_and_forced_position():
  rng = np.random.default_rng(1)
  forced = 0
  for i in range(2000):
    ex = _example(2, i)
    out = masking.mlm_op(ex, rng, CTX)
    sel = out["txt_labels"] != -1
    assert sel.sum() >= 1
    if sel.sum() == 1 and sel[1] and out["input_ids"][1] == MASK:
      forced += 1
  # Pr[nothing selected] = 0.85^2 = 0.72: then token 1 is forced to [MASK].
  assert forced > 1200


def test_mlm_deterministic_and_pure():
  ex = _example(30, 7)
  before = {k: (v.copy() if isinstance(v, np.ndarray) else v)
            for k, v in ex.items()}
  a = masking.mlm_op(ex, np.random.default_rng(5), CTX)
  b = masking.mlm_op(ex, np.random.default_rng(5), CTX)
  c = masking.mlm_op(ex, np.random.default_rng(6), CTX)
  for k in ("input_ids", "txt_labels"):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["txt_labels"], c["txt_labels"])
  np.testing.assert_array_equal(ex["input_ids"], before["input_ids"])
  # The image is left whole (conditional masking).
  np.testing.assert_array_equal(a["img_feat"], before["img_feat"])
  assert "img_masks" not in a


def test_mlm_rejects_missing_specials():
  ex = {"input_ids": np.array([5, 6, 7], np.int32)}
  with pytest.raises(ValueError, match="CLS"):
    masking.mlm_op(ex, np.random.default_rng(0), CTX)
  with pytest.raises(ValueError, match="at least one token"):
    masking.mlm_op({"input_ids": np.array([CLS, SEP])},
                   np.random.default_rng(0), CTX)
  with pytest.raises(KeyError, match="mask_id"):
    masking.mlm_op(_example(3, 0), np.random.default_rng(0),
                   {"cls_id": CLS, "sep_id": SEP, "v_range": V_RANGE})


# ------------------------------------------------------------------- MRM ----
def test_mrm_statistics_and_targets():
  rng = np.random.default_rng(2)
  n_reg = n_masked = 0
  for i in range(1500):
    ex = _example(5, i, img=f"img{i % 5}")
    out = masking.mrm_op(ex, rng, CTX)
    m = out["img_masks"]
    assert m.dtype == bool and m.shape == (ex["img_feat"].shape[0],)
    assert m.any()
    np.testing.assert_array_equal(out["img_feat"][m], 0.0)
    np.testing.assert_array_equal(out["img_feat"][~m], ex["img_feat"][~m])
    np.testing.assert_array_equal(out["feat_targets"], ex["img_feat"])
    np.testing.assert_array_equal(out["label_targets"],
                                  ex["img_soft_labels"])
    # Text left whole, boxes unmasked.
    np.testing.assert_array_equal(out["input_ids"], ex["input_ids"])
    np.testing.assert_array_equal(out["img_pos_feat"], ex["img_pos_feat"])
    assert "txt_labels" not in out
    n_reg += m.size
    n_masked += m.sum()
  # 4..8 regions: the "at least one" rule adds Pr[none] (0.52..0.27) of a
  # region per example; compare with the exact expectation.
  sizes = np.array([4, 5, 6, 7, 8])
  expected = np.mean(0.15 * sizes + 0.85 ** sizes) / sizes.mean()
  assert abs(n_masked / n_reg - expected) < 0.01


def test_mrm_rate_on_many_regions():
  rng = np.random.default_rng(3)
  ex = {"input_ids": np.array([CLS, 5, SEP], np.int32),
        "img_feat": np.ones((100, 4), np.float32)}
  rate = np.mean([masking.mrm_op(ex, rng, CTX)["img_masks"].mean()
                  for _ in range(400)])
  assert abs(rate - 0.15) < 0.01


def test_mrm_deterministic_and_pure():
  ex = _example(5, 0)
  feat = ex["img_feat"].copy()
  a = masking.mrm_op(ex, np.random.default_rng(9), CTX)
  b = masking.mrm_op(ex, np.random.default_rng(9), CTX)
  for k in ("img_masks", "img_feat", "feat_targets", "label_targets"):
    np.testing.assert_array_equal(a[k], b[k])
  np.testing.assert_array_equal(ex["img_feat"], feat)


@pytest.mark.parametrize("slots", [12, 40])
def test_region_ops_draw_mrm_ops_masks_and_gather_its_targets(slots):
  """`mrfr_op` and `mrc_op` draw the same masks as `mrm_op` (the rng ends
  in the same state) and leave the features as read; `mrc_op`'s
  `mrm_label_targets` are `mrm_op`'s full soft labels, padded to the
  bucket's region slots, at the masked positions (zeros past the
  regions)."""
  from uniter_jax.tasks import losses  # pylint: disable=g-import-not-at-top
  ex = _example(30, 0)
  nb = ex["img_feat"].shape[0]
  ctx = {**CTX, "max_img": slots}
  rngs = [np.random.default_rng(3) for _ in range(3)]
  full = masking.mrm_op(ex, rngs[0], ctx)
  mrfr = masking.mrfr_op(ex, rngs[1], ctx)
  mrc = masking.mrc_op(ex, rngs[2], ctx)
  assert len({r.random() for r in rngs}) == 1
  for out in (mrfr, mrc):
    np.testing.assert_array_equal(out["img_masks"], full["img_masks"])
    assert out["img_feat"] is ex["img_feat"]
    assert "feat_targets" not in out and "label_targets" not in out
  assert "img_soft_labels" not in mrc and "img_soft_labels" in ex
  padded = np.zeros((slots,) + full["label_targets"].shape[1:], np.float32)
  padded[:nb] = full["label_targets"]
  row = np.zeros(slots, bool)
  row[:nb] = full["img_masks"]
  pos, _ = losses.masked_positions(row[None], losses.max_masked_count(slots))
  np.testing.assert_array_equal(mrc["mrm_label_targets"], padded[pos[0]])


# ------------------------------------------------------------------- ITM ----
def test_itm_statistics_and_negatives():
  rng = np.random.default_rng(4)
  labels = []
  for i in range(2000):
    ex = _example(5, i, img="img2")
    out = masking.itm_op(ex, rng, CTX)
    t = int(out["targets"])
    labels.append(t)
    np.testing.assert_array_equal(out["input_ids"], ex["input_ids"])
    if t == 1:
      assert out["img_key"] == "img2"
      np.testing.assert_array_equal(out["img_feat"], ex["img_feat"])
    else:
      assert out["img_key"] != "img2"
      src = IMAGES[out["img_key"]]
      np.testing.assert_array_equal(out["img_feat"], src["img_feat"])
      np.testing.assert_array_equal(out["img_pos_feat"], src["img_pos_feat"])
  assert abs(np.mean(labels) - 0.5) < 0.03


def test_itm_deterministic_and_rejects_true_image():
  ex = _example(5, 0)
  outs = [masking.itm_op(ex, np.random.default_rng(s), CTX) for s in (1, 1)]
  assert int(outs[0]["targets"]) == int(outs[1]["targets"])
  assert outs[0]["img_key"] == outs[1]["img_key"]
  bad = dict(CTX, itm_neg_prob=1.0,
             sample_image=lambda rng, key: dict(IMAGES[key]))
  with pytest.raises(ValueError, match="true image"):
    masking.itm_op(ex, np.random.default_rng(0), bad)


def test_pretraining_tasks_declare_their_ops():
  from uniter_jax import tasks  # pylint: disable=g-import-not-at-top
  ops = {name: tuple(tasks.make_task(name).data_ops().values())
         for name in ("mlm", "mrfr", "mrc", "mrckl", "itm")}
  assert ops == {"mlm": (masking.mlm_op,), "mrfr": (masking.mrfr_op,),
                 "mrc": (masking.mrc_op,), "mrckl": (masking.mrc_op,),
                 "itm": (masking.itm_op,)}
