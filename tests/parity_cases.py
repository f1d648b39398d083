"""Flax vs PyTorch-reference parity cases, shared by tests and a report.

Each case builds the reference head with random weights, converts its
state_dict to Flax with `uniter_jax.convert`, runs both on the same padded
batch of mixed lengths, and returns the outputs to compare at the valid
positions. `python tests/parity_cases.py [tiny|base]` prints the max relative
error of every head.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch_ref as R  # pylint: disable=g-import-not-at-top,wrong-import-position
from uniter_jax import convert  # pylint: disable=wrong-import-position
from uniter_jax import model as um  # pylint: disable=wrong-import-position

LT, LI = 9, 6
TXT_LENS = [9, 3, 6, 2]
NUM_BBS = [2, 6, 1, 4]

# task -> (reference class, kwargs, surgery calls)
CASES = {
    "pretrain": (R.UniterForPretraining, {}, ()),
    "pretrain-vcr": (R.UniterForPretrainingForVCR, {},
                     ("init_type_embedding", ("init_word_embedding", 81))),
    "vqa": (R.UniterForVisualQuestionAnswering, {"num_answer": 3129}, ()),
    "ve": (R.UniterForVisualEntailment, {}, ()),
    "itm": (R.UniterForImageTextRetrieval, {}, ("init_output",)),
    "nlvr2-paired": (R.UniterForNlvr2Paired, {}, ("init_type_embedding",)),
    "nlvr2-triplet": (R.UniterForNlvr2Triplet, {}, ("init_type_embedding",)),
    "nlvr2-attn": (R.UniterForNlvr2PairedAttn, {}, ("init_type_embedding",)),
    "re": (R.UniterForReferringExpressionComprehension, {"mlp": 1}, ()),
    "re-mlp2": (R.UniterForReferringExpressionComprehension, {"mlp": 2}, ()),
    "vcr": (R.UniterForVisualCommonsenseReasoning, {},
            ("init_type_embedding", ("init_word_embedding", 81))),
}


def flax_task(case: str) -> str:
  return "re" if case.startswith("re") else case


def make_reference(case: str, cfg: R.UniterConfig, seed: int = 0):
  """The reference head of `case`, random weights, eval mode."""
  cls, kwargs, surgery = CASES[case]
  torch.manual_seed(seed)
  model = cls(cfg, **kwargs)
  for call in surgery:
    name, *args = (call,) if isinstance(call, str) else call
    getattr(model, name)(*args)
  # Make every tensor non-trivial (biases and LayerNorms are 0/1 at init),
  # so a wrongly mapped parameter cannot hide.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
        p.add_(0.02 * torch.randn_like(p))
  return model.eval()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}


def make_batch(case: str, cfg: R.UniterConfig, seed: int = 1):
  """(static batch numpy, txt_lens, num_bbs) for the case."""
  txt_lens, num_bbs = TXT_LENS, NUM_BBS
  task = flax_task(case)
  b = R.random_static_batch(seed, txt_lens, num_bbs, LT, LI,
                            cfg.vocab_size, pretrain=task.startswith(
                                "pretrain"))
  rng = np.random.default_rng(seed + 7)
  if task in ("vcr", "pretrain-vcr"):
    types = rng.choice([0, 2, 3], size=b["input_ids"].shape)
    b["txt_type_ids"] = np.where(b["attn_masks"][:, :LT] > 0, types,
                                 0).astype(np.int32)
    b["input_ids"] = np.where(
        b["attn_masks"][:, :LT] > 0,
        rng.integers(1, cfg.vocab_size + 81, size=b["input_ids"].shape),
        0).astype(np.int32)
  if task.startswith("nlvr2"):
    b["img_type_ids"] = np.tile(np.array([[1], [2]] * (len(txt_lens) // 2)),
                                (1, LI)).astype(np.int32)
  return b, txt_lens, num_bbs


def flax_config(cfg: R.UniterConfig):
  return um.config.from_official_dict(cfg.to_dict())


def run_flax(case: str, sd: dict, cfg: R.UniterConfig, batch: dict,
             scan_layers: bool = False):
  task = flax_task(case)
  params = convert.torch_to_flax(sd, task, flax_config(cfg),
                                 scan_layers=scan_layers)
  fcfg = flax_config(cfg)
  fcfg.scan_layers = scan_layers
  kwargs = {"mlp": CASES[case][1]["mlp"]} if task == "re" else {}
  net = um.build_model(task, fcfg, **kwargs)
  fb = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  if task.startswith("pretrain"):
    tasks = ("mlm", "mrfr", "mrckl") + (("itm",) if task == "pretrain" else ())
    return {t: net.apply({"params": params}, fb, t) for t in tasks}
  return net.apply({"params": params}, fb)


def _valid_rows(static_seq, txt_lens, num_bbs):
  return np.concatenate([
      np.concatenate([static_seq[i, :t], static_seq[i, LT:LT + n]])
      for i, (t, n) in enumerate(zip(txt_lens, num_bbs))])


def compare(case: str, model, flax_out, batch, txt_lens, num_bbs
            ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """name -> (flax, reference) arrays to compare, valid positions only."""
  task = flax_task(case)
  packed = R.static_to_packed(batch)
  pairs = {}
  with torch.no_grad():
    if task.startswith("pretrain"):
      tl = np.asarray(batch["txt_labels"])
      im = np.asarray(batch["img_masks"])
      for t, out in flax_out.items():
        ref = model(packed, t, compute_loss=False)
        if t == "mlm":
          got = np.asarray(out["mlm_logits"])[tl != -1]
        elif t == "mrfr":
          got = np.asarray(out["mrfr_pred"])[im]
        elif t == "mrckl":
          got = np.asarray(out["mrc_logits"])[im]
        else:
          got, ref = np.asarray(out["itm_logits"]), ref[0]
        pairs[f"{t}_logits" if t != "mrfr" else "mrfr_pred"] = (
            got, ref.numpy())
      # encode() passes img_masks, as the MRM tasks do.
      seq_ref = model.encode(packed)
      out = flax_out["mrfr"]
    else:
      out = flax_out
      ref = (model.logits(packed) if task == "vcr"
             else model(packed, compute_loss=False))
      got = np.asarray(out["logits"])
      if task == "itm":
        pairs["itm_logits"] = (np.asarray(out["itm_logits"]),
                               model.itm_output(model.uniter.pooler(
                                   model.encode(packed))).numpy())
      if task == "re":
        real = ~packed["obj_masks"].numpy()
        width = real.shape[1]
        got, ref = got[:, :width][real], ref.numpy()[real]
      else:
        ref = ref.numpy()
      pairs["logits"] = (got, ref)
      seq_ref = model.encode(packed)
    static = R.packed_to_static(seq_ref, txt_lens, num_bbs, LT, LI).numpy()
    pairs["sequence_output"] = (
        _valid_rows(np.asarray(out["sequence_output"]), txt_lens, num_bbs),
        _valid_rows(static, txt_lens, num_bbs))
    pairs["pooled_output"] = (np.asarray(out["pooled_output"]),
                              model.uniter.pooler(seq_ref).numpy())
  return pairs


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
  """max |got - want| / max |want| (the norm-wise relative error)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def run_case(case: str, cfg: R.UniterConfig, scan_layers: bool = False):
  model = make_reference(case, cfg)
  sd = state_dict_numpy(model)
  batch, tl, nb = make_batch(case, cfg)
  out = run_flax(case, sd, cfg, batch, scan_layers=scan_layers)
  return compare(case, model, out, batch, tl, nb)


def main(argv):
  size = argv[1] if len(argv) > 1 else "tiny"
  cfg = {"tiny": R.tiny_config, "base": R.base_config}[size]()
  print(f"max relative error, Flax vs PyTorch reference, float32, {size} "
        f"config, batch of {len(TXT_LENS)} rows with text lengths {TXT_LENS} "
        f"(Lt={LT}) and region counts {NUM_BBS} (Li={LI})")
  print(f"{'head':15s} {'output':16s} {'max rel err':>12s}")
  for case in CASES:
    for name, (got, want) in run_case(case, cfg).items():
      print(f"{case:15s} {name:16s} {rel_err(got, want):12.2e}")


if __name__ == "__main__":
  main(sys.argv)
