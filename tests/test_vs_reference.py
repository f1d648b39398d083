"""Every head in Flax against the PyTorch reference, float32, <=1e-5."""

import numpy as np
import pytest
import torch

import parity_cases as P
import torch_ref as R
from uniter_jax import convert

TOL = 1e-5


@pytest.mark.parametrize("case", list(P.CASES))
def test_head_matches_reference(case):
  cfg = R.tiny_config()
  pairs = P.run_case(case, cfg)
  assert "sequence_output" in pairs and "pooled_output" in pairs
  for name, (got, want) in pairs.items():
    assert got.shape == want.shape, name
    assert np.isfinite(got).all(), name
    err = P.rel_err(got, want)
    assert err <= TOL, f"{case}/{name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", ["pretrain", "nlvr2-attn"])
def test_scanned_layout_matches_reference(case):
  pairs = P.run_case(case, R.tiny_config(), scan_layers=True)
  for name, (got, want) in pairs.items():
    assert P.rel_err(got, want) <= TOL, name


def test_comparison_detects_a_wrong_parameter():
  """The parity check is sensitive: one perturbed tensor breaks it."""
  cfg = R.tiny_config()
  model = P.make_reference("vqa", cfg)
  sd = P.state_dict_numpy(model)
  key = "uniter.encoder.layer.1.attention.self.value.weight"
  sd[key] = sd[key] + 1e-3 * np.random.default_rng(0).normal(
      size=sd[key].shape).astype(np.float32)
  batch, tl, nb = P.make_batch("vqa", cfg)
  out = P.run_flax("vqa", sd, cfg, batch)
  pairs = P.compare("vqa", model, out, batch, tl, nb)
  assert P.rel_err(*pairs["sequence_output"]) > 10 * TOL


@pytest.mark.parametrize("case", list(P.CASES))
@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_is_bitwise_and_loads_strictly(case, scan):
  cfg = R.tiny_config()
  model = P.make_reference(case, cfg)
  sd = P.state_dict_numpy(model)
  task = P.flax_task(case)
  fcfg = P.flax_config(cfg)
  params = convert.torch_to_flax(sd, task, fcfg, scan_layers=scan)
  back = convert.flax_to_torch(params, task, fcfg)
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype, k
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  fresh = P.make_reference(case, cfg, seed=5)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()},
                        strict=True)
