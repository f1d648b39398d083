"""Checkpoint files, the conversion CLI, strict errors, BERT init."""

import json
import os

import jax
import numpy as np
import pytest
import torch

import parity_cases as P
import torch_ref as R
import uniter_jax
from uniter_jax import convert
from uniter_jax.convert import __main__ as cli


def _tiny_json(tmp_path, **overrides):
  cfg = R.tiny_config(**overrides).to_dict()
  path = tmp_path / "uniter-tiny.json"
  path.write_text(json.dumps(cfg))
  return str(path)


def _save_pt(model, path):
  torch.save(model.state_dict(), path)
  return str(path)


def _listing(d):
  return sorted(os.listdir(d))


def test_cli_round_trip_through_files_is_bitwise(tmp_path):
  cfg_json = _tiny_json(tmp_path)
  model = P.make_reference("vqa", R.tiny_config())
  src = _save_pt(model, tmp_path / "vqa.pt")
  assert cli.main(["to-flax", "--task", "vqa", "--model-config", cfg_json,
                   src, str(tmp_path / "vqa_flax")]) == 0
  meta = json.loads((tmp_path / "vqa_flax" / "uniter_config.json").read_text())
  assert meta["task"] == "vqa" and meta["head_kwargs"] == {"num_answer": 3129}
  assert cli.main(["to-torch", "--task", "vqa", str(tmp_path / "vqa_flax"),
                   str(tmp_path / "back.pt")]) == 0
  a = torch.load(src, weights_only=True)
  b = torch.load(tmp_path / "back.pt", weights_only=True)
  assert set(a) == set(b)
  for k in a:
    assert torch.equal(a[k], b[k]), k
  fresh = R.UniterForVisualQuestionAnswering(R.tiny_config())
  fresh.load_state_dict(b, strict=True)


def test_fp16_checkpoint_round_trips_in_its_dtype(tmp_path):
  cfg_json = _tiny_json(tmp_path)
  model = P.make_reference("itm", R.tiny_config()).half()
  src = _save_pt(model, tmp_path / "itm16.pt")
  assert cli.main(["to-flax", "--task", "itm", "--model-config", cfg_json,
                   "--scan-layers", src, str(tmp_path / "d")]) == 0
  assert cli.main(["to-torch", "--task", "itm", str(tmp_path / "d"),
                   str(tmp_path / "back.pt")]) == 0
  a = torch.load(src, weights_only=True)
  b = torch.load(tmp_path / "back.pt", weights_only=True)
  for k in a:
    assert b[k].dtype == torch.float16 and torch.equal(a[k], b[k]), k


def test_pretrain_export_keeps_tied_tensors_shared(tmp_path):
  model = P.make_reference("pretrain", R.tiny_config())
  sd = P.state_dict_numpy(model)
  fcfg = P.flax_config(R.tiny_config())
  params = convert.torch_to_flax(sd, "pretrain", fcfg)
  out = tmp_path / "p.pt"
  convert.write_state_dict(convert.flax_to_torch(params, "pretrain", fcfg),
                           out)
  back = torch.load(out, weights_only=True)
  assert (back["cls.predictions.decoder.weight"].data_ptr() ==
          back["uniter.embeddings.word_embeddings.weight"].data_ptr())
  fresh = R.UniterForPretraining(R.tiny_config())
  fresh.load_state_dict(back, strict=True)
  assert fresh.cls.predictions.decoder.weight is (
      fresh.uniter.embeddings.word_embeddings.weight)


def test_load_checkpoint_from_pt_and_dir_agree(tmp_path):
  cfg_json = _tiny_json(tmp_path)
  ref = P.make_reference("nlvr2-attn", R.tiny_config())
  src = _save_pt(ref, tmp_path / "n.pt")
  m1, p1 = uniter_jax.load_checkpoint(src, "nlvr2-attn",
                                      model_config=cfg_json)
  assert cli.main(["to-flax", "--task", "nlvr2-attn", "--model-config",
                   cfg_json, src, str(tmp_path / "n")]) == 0
  m2, p2 = uniter_jax.load_checkpoint(str(tmp_path / "n"), "nlvr2-attn",
                                      scan_layers=True)
  assert m2.cfg.scan_layers and not m1.cfg.scan_layers
  batch, _, _ = P.make_batch("nlvr2-attn", R.tiny_config())
  batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  a = m1.apply({"params": p1}, batch)["logits"]
  b = m2.apply({"params": p2}, batch)["logits"]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(convert.ConversionError, match="converted for task"):
    uniter_jax.load_checkpoint(str(tmp_path / "n"), "vqa")


def test_wrong_task_lists_every_offending_key(tmp_path):
  sd = P.state_dict_numpy(P.make_reference("vqa", R.tiny_config()))
  with pytest.raises(convert.ConversionError) as e:
    convert.torch_to_flax(sd, "nlvr2-paired", P.flax_config(R.tiny_config()),
                          source="vqa.pt")
  msg = str(e.value)
  assert msg.startswith("vqa.pt: does not match the 'nlvr2-paired' model")
  assert "look like a 'vqa or ve' checkpoint" in msg
  assert ("mis-shaped uniter.embeddings.token_type_embeddings.weight: "
          "expected [3, 64], found [2, 64]") in msg
  assert "missing    nlvr2_output.weight: expected [2, 128]" in msg
  for k in ("vqa_output.0.weight", "vqa_output.0.bias", "vqa_output.2.weight",
            "vqa_output.2.bias", "vqa_output.3.weight", "vqa_output.3.bias"):
    assert f"unexpected {k}: found" in msg


def test_wrong_hidden_size_reports_shapes(tmp_path):
  small = R.tiny_config(hidden_size=32, num_attention_heads=4,
                        intermediate_size=64)
  sd = P.state_dict_numpy(P.make_reference("itm", small))
  with pytest.raises(convert.ConversionError) as e:
    convert.torch_to_flax(sd, "itm", P.flax_config(R.tiny_config()))
  msg = str(e.value)
  assert "mis-shaped uniter.pooler.dense.weight: expected [64, 64], " \
         "found [32, 32]" in msg
  assert "mis-shaped itm_output.weight: expected [2, 64], found [2, 32]" in msg


def test_truncated_checkpoint_is_a_clear_error_and_leaves_nothing(tmp_path):
  cfg_json = _tiny_json(tmp_path)
  src = _save_pt(P.make_reference("ve", R.tiny_config()), tmp_path / "ve.pt")
  data = open(src, "rb").read()
  bad = tmp_path / "trunc.pt"
  bad.write_bytes(data[:len(data) // 2])
  out = tmp_path / "out"
  before = _listing(tmp_path)
  with pytest.raises(convert.ConversionError, match="trunc.pt: cannot read"):
    convert.read_state_dict(bad)
  assert cli.main(["to-flax", "--task", "ve", "--model-config", cfg_json,
                   str(bad), str(out)]) == 1
  assert _listing(tmp_path) == before  # no DST, no temporary left behind


def test_failed_conversion_mid_write_leaves_no_output(tmp_path, monkeypatch):
  sd = P.state_dict_numpy(P.make_reference("ve", R.tiny_config()))
  params = convert.torch_to_flax(sd, "ve", P.flax_config(R.tiny_config()))
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def boom(self, *a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
  before = _listing(tmp_path)
  with pytest.raises(OSError, match="disk full"):
    convert.save_flax(tmp_path / "dst", params, "ve",
                      P.flax_config(R.tiny_config()))
  assert _listing(tmp_path) == before


def test_tied_tensors_must_agree():
  sd = P.state_dict_numpy(P.make_reference("pretrain", R.tiny_config()))
  sd["feat_regress.weight"] = sd["feat_regress.weight"] + 1.0
  with pytest.raises(convert.ConversionError, match="tied tensors differ"):
    convert.torch_to_flax(sd, "pretrain", P.flax_config(R.tiny_config()))


def test_existing_destination_is_not_clobbered(tmp_path):
  cfg_json = _tiny_json(tmp_path)
  src = _save_pt(P.make_reference("ve", R.tiny_config()), tmp_path / "ve.pt")
  dst = tmp_path / "d"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  assert cli.main(["to-flax", "--task", "ve", "--model-config", cfg_json,
                   src, str(dst)]) == 1
  assert (dst / "keep.txt").read_text() == "mine"
  assert cli.main(["to-flax", "--task", "ve", "--model-config", cfg_json,
                   "--force", src, str(dst)]) == 0
  assert not (dst / "keep.txt").exists()


def _fake_hf_bert(cfg: R.UniterConfig, legacy_names: bool):
  """A HuggingFace BertForPreTraining-layout state_dict from a reference."""
  torch.manual_seed(3)
  ref = R.UniterForPretraining(cfg)
  sd = {}
  for k, v in ref.state_dict().items():
    if k.startswith("uniter.img_embeddings") or not (
        k.startswith(("uniter.embeddings", "uniter.encoder", "uniter.pooler",
                      "cls."))):
      continue
    k = "bert." + k[len("uniter."):] if k.startswith("uniter.") else k
    if legacy_names and "LayerNorm" in k:
      k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
          "LayerNorm.bias", "LayerNorm.beta")
    sd[k] = v.clone()
  h = cfg.hidden_size
  sd["cls.seq_relationship.weight"] = torch.randn(2, h)
  sd["cls.seq_relationship.bias"] = torch.zeros(2)
  sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()
  sd["bert.embeddings.position_ids"] = torch.arange(
      cfg.max_position_embeddings)[None]
  return sd


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_bert_to_uniter(tmp_path, fmt):
  cfg = R.tiny_config()
  cfg_json = _tiny_json(tmp_path)
  bert = _fake_hf_bert(cfg, legacy_names=(fmt == "bin"))
  if fmt == "bin":
    src = tmp_path / "pytorch_model.bin"
    torch.save(bert, src)
  else:
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in bert.items()}, str(src))
  dst = tmp_path / "uniter-init.pt"
  assert cli.main(["bert-to-uniter", "--model-config", cfg_json, str(src),
                   str(dst)]) == 0
  out = torch.load(dst, weights_only=True)
  model = R.UniterForPretraining(cfg)
  model.load_state_dict(out, strict=True)
  plain = {k.replace("gamma", "weight").replace("beta", "bias"): v
           for k, v in bert.items()}
  for k, v in plain.items():
    if k.startswith("bert."):
      if "position_ids" in k:
        continue
      assert torch.equal(out["uniter." + k[5:]], v), k
    elif k.startswith("cls.predictions.") and "decoder" not in k:
      assert torch.equal(out[k], v), k
  assert torch.equal(out["cls.predictions.decoder.weight"],
                     out["uniter.embeddings.word_embeddings.weight"])
  # Fresh parts follow init_weights: N(0, 0.02) weights, zero bias, unit LN.
  w = out["uniter.img_embeddings.img_linear.weight"]
  assert abs(float(w.std()) - 0.02) < 0.002
  assert torch.count_nonzero(out["itm_output.bias"]) == 0
  assert torch.equal(out["uniter.img_embeddings.LayerNorm.weight"],
                     torch.ones(cfg.hidden_size))
  # A directory destination gives a loadable Flax checkpoint.
  assert cli.main(["bert-to-uniter", "--model-config", cfg_json, str(src),
                   str(tmp_path / "flax_init")]) == 0
  m, p = uniter_jax.load_checkpoint(str(tmp_path / "flax_init"), "pretrain")
  assert m.cfg.hidden_size == cfg.hidden_size


def test_bert_with_wrong_size_is_rejected(tmp_path):
  bert = {k: v.numpy() for k, v in _fake_hf_bert(
      R.tiny_config(hidden_size=32, intermediate_size=64), False).items()}
  with pytest.raises(convert.ConversionError, match="mis-shaped"):
    convert.bert_to_uniter(bert, P.flax_config(R.tiny_config()))


def test_official_json_config_is_read(tmp_path):
  path = tmp_path / "uniter-base.json"
  path.write_text(json.dumps(R.base_config().to_dict()))
  from uniter_jax.model import config  # pylint: disable=g-import-not-at-top
  cfg = config.from_official_json(path)
  assert (cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size) == (
      768, 12, 28996)
  path.write_text(json.dumps({"hidden_size": 768}))
  with pytest.raises(ValueError, match="missing fields"):
    config.from_official_json(path)
