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


# ---------------------------------------------------------------------------
# Self-describing exports, the model size and the task from shapes.
# ---------------------------------------------------------------------------
def _official_shapes(hidden, layers, inter, vocab=28996, types=2, pos=512):
  """The official UniterForPretraining state_dict shapes, written out from
  the module definitions (not from this project's model)."""
  h = hidden
  sd = {"uniter.embeddings.word_embeddings.weight": (vocab, h),
        "uniter.embeddings.position_embeddings.weight": (pos, h),
        "uniter.embeddings.token_type_embeddings.weight": (types, h),
        "uniter.embeddings.LayerNorm.weight": (h,),
        "uniter.embeddings.LayerNorm.bias": (h,),
        "uniter.img_embeddings.img_linear.weight": (h, 2048),
        "uniter.img_embeddings.img_linear.bias": (h,),
        "uniter.img_embeddings.pos_linear.weight": (h, 7),
        "uniter.img_embeddings.pos_linear.bias": (h,),
        "uniter.img_embeddings.mask_embedding.weight": (2, 2048),
        "uniter.pooler.dense.weight": (h, h), "uniter.pooler.dense.bias": (h,)}
  for ln in ("img_layer_norm", "pos_layer_norm", "LayerNorm"):
    sd[f"uniter.img_embeddings.{ln}.weight"] = (h,)
    sd[f"uniter.img_embeddings.{ln}.bias"] = (h,)
  for i in range(layers):
    p = f"uniter.encoder.layer.{i}."
    for m in ("attention.self.query", "attention.self.key",
              "attention.self.value", "attention.output.dense"):
      sd[p + m + ".weight"], sd[p + m + ".bias"] = (h, h), (h,)
    sd[p + "intermediate.dense.weight"] = (inter, h)
    sd[p + "intermediate.dense.bias"] = (inter,)
    sd[p + "output.dense.weight"] = (h, inter)
    sd[p + "output.dense.bias"] = (h,)
    for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
      sd[p + ln + ".weight"], sd[p + ln + ".bias"] = (h,), (h,)
  sd.update({"cls.predictions.bias": (vocab,),
             "cls.predictions.transform.dense.weight": (h, h),
             "cls.predictions.transform.dense.bias": (h,),
             "cls.predictions.transform.LayerNorm.weight": (h,),
             "cls.predictions.transform.LayerNorm.bias": (h,),
             "cls.predictions.decoder.weight": (vocab, h),
             "feat_regress.weight": (h, 2048), "feat_regress.bias": (2048,),
             "feat_regress.net.0.weight": (h, h),
             "feat_regress.net.0.bias": (h,),
             "feat_regress.net.2.weight": (h,), "feat_regress.net.2.bias": (h,),
             "region_classifier.net.0.weight": (h, h),
             "region_classifier.net.0.bias": (h,),
             "region_classifier.net.2.weight": (h,),
             "region_classifier.net.2.bias": (h,),
             "region_classifier.net.3.weight": (1601, h),
             "region_classifier.net.3.bias": (1601,),
             "itm_output.weight": (2, h), "itm_output.bias": (2,)})
  return sd


@pytest.mark.parametrize("size", ["base", "large"])
def test_model_config_inferred_from_shapes_is_the_official_one(size):
  from uniter_jax.model import config  # pylint: disable=g-import-not-at-top
  official = {"base": config.base, "large": config.large}[size]()
  arch = {"base": (768, 12, 3072), "large": (1024, 24, 4096)}[size]
  shapes = _official_shapes(*arch)
  assert len([k for k in shapes if k.startswith("uniter.")]) == (
      210 if size == "base" else 402)
  for task, sd in [("pretrain", shapes), (None, shapes),
                   # Heads that grow the tables: VCR (+81 words, 4 types),
                   # NLVR2 (3 types); the official config stays 28996 / 2.
                   ("vcr", convert.expected_torch_shapes("vcr", official)),
                   ("nlvr2-attn",
                    convert.expected_torch_shapes("nlvr2-attn", official))]:
    cfg, summary = convert.core.infer_model_config(sd, task)
    assert config.to_official_dict(cfg) == config.to_official_dict(official)
    heads = official.num_attention_heads
    assert f"{heads} attention heads (hidden / 64" in summary
  assert convert.core.infer_task(shapes) == "pretrain"


def test_unrecognisable_checkpoint_lists_the_shapes_it_saw(tmp_path, capsys):
  shapes = _official_shapes(96, 2, 128)     # 96 is no multiple of 64
  with pytest.raises(convert.ConversionError) as e:
    convert.core.infer_model_config(shapes, "pretrain", source="odd.pt")
  msg = str(e.value)
  assert msg.startswith("odd.pt: cannot infer the model size")
  assert "hidden size 96 is not a multiple of 64" in msg
  assert "--model-config" in msg
  assert "uniter.embeddings.word_embeddings.weight: [28996, 96]" in msg
  assert "uniter.encoder.layer.0.intermediate.dense.weight: [128, 96]" in msg
  assert "encoder layers found: 2" in msg
  with pytest.raises(convert.ConversionError) as e:
    convert.core.infer_model_config({"foo.weight": (3, 4)}, "pretrain",
                                    source="x.pt")
  assert "no 'uniter.embeddings.word_embeddings.weight'" in str(e.value)
  assert "foo.weight: [3, 4]" in str(e.value)
  # The CLI: one error, non-zero exit, nothing written.
  small = R.tiny_config(hidden_size=32, num_attention_heads=4,
                        intermediate_size=64)
  src = _save_pt(P.make_reference("itm", small), tmp_path / "s.pt")
  assert cli.main(["to-flax", "--task", "itm", src,
                   str(tmp_path / "d")]) == 1
  err = capsys.readouterr().err
  assert "cannot infer the model size" in err and "[100, 32]" in err
  assert not (tmp_path / "d").exists()


def test_infer_task_from_keys_and_shapes():
  cfg = P.flax_config(R.tiny_config())
  for task in um_heads():
    for kw in ([{"mlp": 1}, {"mlp": 2}] if task == "re" else [{}]):
      shapes = convert.expected_torch_shapes(task, cfg, **kw)
      assert convert.core.infer_task(shapes) == task, (task, kw)
  with pytest.raises(convert.ConversionError, match="pass the task"):
    convert.core.infer_task({"uniter.pooler.dense.weight": (4, 4),
                             "foo.weight": (2, 4)})


def um_heads():
  from uniter_jax import model as um  # pylint: disable=g-import-not-at-top
  return sorted(um.HEADS)


def test_to_flax_without_model_config_infers_it(tmp_path, capsys):
  cfg = R.tiny_config(num_attention_heads=1)      # 64 / 64: one head
  ref = P.make_reference("vqa", cfg)
  src = _save_pt(ref, tmp_path / "v.pt")
  assert cli.main(["to-flax", "--task", "vqa", src,
                   str(tmp_path / "v")]) == 0
  out = capsys.readouterr().out
  assert ("hidden 64, 2 layers, intermediate 128, vocab 100, type vocab 2, "
          "1 attention heads") in out
  meta = json.loads((tmp_path / "v" / "uniter_config.json").read_text())
  assert {k: meta["model_config"][k] for k in cfg.to_dict()} == cfg.to_dict()
  # load_checkpoint on the .pt needs neither the task nor the config.
  m, p = uniter_jax.load_checkpoint(src)
  m2, p2 = uniter_jax.load_checkpoint(str(tmp_path / "v"))
  assert m == m2 and m.cfg.num_attention_heads == 1
  for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_array_equal(a, b)


def test_export_carries_vocab_and_text_config(tmp_path):
  from uniter_jax import processor as processor_lib  # pylint: disable=g-import-not-at-top
  fcfg = P.flax_config(R.tiny_config())
  sd = P.state_dict_numpy(P.make_reference("itm", R.tiny_config()))
  params = convert.torch_to_flax(sd, "itm", fcfg)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
      f"w{i}" for i in range(20)]
  tc = processor_lib.make_text_config(
      max_txt_len=40, region_rule={"conf_th": 0.3, "min_bb": 2,
                                   "max_bb": 50})
  d = tmp_path / "exp"
  convert.save_flax(d, params, "itm", fcfg, vocab=vocab, text_config=tc)
  assert (d / "vocab.txt").read_text().split("\n")[:3] == vocab[:3]
  meta = json.loads((d / "uniter_config.json").read_text())
  assert meta["text_config"]["special_ids"] == {
      "PAD": 0, "UNK": 1, "CLS": 2, "SEP": 3, "MASK": 4}
  assert meta["text_config"]["region_rule"] == {
      "conf_th": 0.3, "min_bb": 2, "max_bb": 50, "num_bb": None}
  model, _ = uniter_jax.load_checkpoint(str(d))           # no task
  assert type(model).__name__ == "UniterForImageTextRetrieval"
  uniter_jax.load_checkpoint(str(d), "itm")                # positional
  uniter_jax.load_checkpoint(str(d), task="itm")
  with pytest.raises(convert.ConversionError, match="converted for task"):
    uniter_jax.load_checkpoint(str(d), task="vqa")
  proc = uniter_jax.Processor.from_pretrained(str(d))
  assert proc.vocab == vocab and proc.max_txt_len == 40
  assert proc.region_rule == meta["text_config"]["region_rule"]
  assert proc.text_config == meta["text_config"]
  # A training workdir names its export_flax/.
  wd = tmp_path / "workdir"
  wd.mkdir()
  os.rename(d, wd / "export_flax")
  assert uniter_jax.Processor.from_pretrained(str(wd)).vocab == vocab
  uniter_jax.load_checkpoint(str(wd))
  # Refused before anything is written: special ids that disagree with the
  # vocabulary, a vocabulary larger than the model's word table.
  bad = dict(tc, special_ids={"PAD": 0, "UNK": 1, "CLS": 3, "SEP": 2,
                              "MASK": 4})
  with pytest.raises(convert.ConversionError, match="disagree"):
    convert.save_flax(tmp_path / "bad", params, "itm", fcfg, vocab=vocab,
                      text_config=bad)
  with pytest.raises(convert.ConversionError, match="200 tokens"):
    convert.save_flax(tmp_path / "bad", params, "itm", fcfg,
                      vocab=vocab + [f"x{i}" for i in range(175)])
  assert not (tmp_path / "bad").exists()
  # Without a vocabulary the processor says how to give one.
  convert.save_flax(tmp_path / "novocab", params, "itm", fcfg)
  with pytest.raises(FileNotFoundError, match="vocab="):
    uniter_jax.Processor.from_pretrained(str(tmp_path / "novocab"))
  assert uniter_jax.Processor.from_pretrained(
      str(tmp_path / "novocab"), vocab=vocab).max_txt_len == 60


def test_to_torch_reads_the_task_from_the_directory(tmp_path):
  cfg_json = _tiny_json(tmp_path)
  src = _save_pt(P.make_reference("ve", R.tiny_config()), tmp_path / "ve.pt")
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ndog\n")
  assert cli.main(["to-flax", "--task", "ve", "--model-config", cfg_json,
                   "--vocab", str(vocab), src, str(tmp_path / "d")]) == 0
  assert (tmp_path / "d" / "vocab.txt").read_text() == vocab.read_text()
  meta = json.loads((tmp_path / "d" / "uniter_config.json").read_text())
  assert meta["text_config"]["max_txt_len"] == 60
  assert cli.main(["to-torch", str(tmp_path / "d"),
                   str(tmp_path / "back.pt")]) == 0
  a = torch.load(src, weights_only=True)
  b = torch.load(tmp_path / "back.pt", weights_only=True)
  assert all(torch.equal(a[k], b[k]) for k in a)
  assert cli.main(["to-torch", "--task", "vqa", str(tmp_path / "d"),
                   str(tmp_path / "x.pt")]) == 1
  assert not (tmp_path / "x.pt").exists()
