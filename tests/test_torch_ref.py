"""Tests of the PyTorch reference (tests/torch_ref) against the official facts.

The Flax model is checked against this reference, so here the reference is
checked against the official facts written down in docs/model.md ("Official
facts the PyTorch reference is written from"): state_dict keys, shapes and
parameter counts of the model and every head (base on the meta device, large
head counts), the official computations (GELU, attention, mask embedding,
tied heads, pair handling), the packing helpers, and that padding never
changes outputs at valid positions.
"""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import torch_ref as R



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  """Tiny models: one thread is fastest and leaves the shared CPUs free."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)

TXT_LENS = [5, 3, 7, 4]
NUM_BBS = [4, 6, 2, 5]
LT, LI = 8, 7


def _meta(cls, cfg, *args, **kwargs):
  with torch.device("meta"):
    return cls(cfg, *args, **kwargs)


def _shapes(module):
  return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def _uniter_keys(h, n_layers, inter, vocab=28996, types=2, img_dim=2048):
  """The encoder's official keys in registration order (docs/model.md)."""
  keys = [
      ("embeddings.word_embeddings.weight", (vocab, h)),
      ("embeddings.position_embeddings.weight", (512, h)),
      ("embeddings.token_type_embeddings.weight", (types, h)),
      ("embeddings.LayerNorm.weight", (h,)),
      ("embeddings.LayerNorm.bias", (h,)),
      ("img_embeddings.img_linear.weight", (h, img_dim)),
      ("img_embeddings.img_linear.bias", (h,)),
      ("img_embeddings.img_layer_norm.weight", (h,)),
      ("img_embeddings.img_layer_norm.bias", (h,)),
      ("img_embeddings.pos_layer_norm.weight", (h,)),
      ("img_embeddings.pos_layer_norm.bias", (h,)),
      ("img_embeddings.pos_linear.weight", (h, 7)),
      ("img_embeddings.pos_linear.bias", (h,)),
      ("img_embeddings.mask_embedding.weight", (2, img_dim)),
      ("img_embeddings.LayerNorm.weight", (h,)),
      ("img_embeddings.LayerNorm.bias", (h,)),
  ]
  for i in range(n_layers):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      keys += [(p + f"attention.self.{name}.weight", (h, h)),
               (p + f"attention.self.{name}.bias", (h,))]
    keys += [
        (p + "attention.output.dense.weight", (h, h)),
        (p + "attention.output.dense.bias", (h,)),
        (p + "attention.output.LayerNorm.weight", (h,)),
        (p + "attention.output.LayerNorm.bias", (h,)),
        (p + "intermediate.dense.weight", (inter, h)),
        (p + "intermediate.dense.bias", (inter,)),
        (p + "output.dense.weight", (h, inter)),
        (p + "output.dense.bias", (h,)),
        (p + "output.LayerNorm.weight", (h,)),
        (p + "output.LayerNorm.bias", (h,)),
    ]
  keys += [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]
  return keys


# ---------------------------------------------------------------------------
# State-dict keys, shapes and counts.
# ---------------------------------------------------------------------------


def test_base_uniter_state_dict_is_official():
  model = _meta(R.UniterModel, R.base_config())
  assert _shapes(model) == _uniter_keys(768, 12, 3072)
  assert len(model.state_dict()) == 210
  assert sum(p.numel() for p in model.parameters()) == 109_898_752


def test_large_uniter_state_dict_is_official():
  model = _meta(R.UniterModel, R.large_config())
  assert _shapes(model) == _uniter_keys(1024, 24, 4096)
  assert len(model.state_dict()) == 402
  assert sum(p.numel() for p in model.parameters()) == 335_695_872


def _head_extra(model):
  return {k: tuple(v.shape) for k, v in model.state_dict().items()
          if not k.startswith("uniter.")}


def _attn_keys(name, h):
  return {f"{name}.in_proj_weight": (3 * h, h),
          f"{name}.in_proj_bias": (3 * h,),
          f"{name}.out_proj.weight": (h, h),
          f"{name}.out_proj.bias": (h,)}


# The heads' official keys, base shapes (docs/model.md, "Heads").
BASE_HEADS = {
    "pretrain": (R.UniterForPretraining, {}, {
        "cls.predictions.bias": (28996,),
        "cls.predictions.transform.dense.weight": (768, 768),
        "cls.predictions.transform.dense.bias": (768,),
        "cls.predictions.transform.LayerNorm.weight": (768,),
        "cls.predictions.transform.LayerNorm.bias": (768,),
        "cls.predictions.decoder.weight": (28996, 768),
        "feat_regress.weight": (768, 2048),
        "feat_regress.bias": (2048,),
        "feat_regress.net.0.weight": (768, 768),
        "feat_regress.net.0.bias": (768,),
        "feat_regress.net.2.weight": (768,),
        "feat_regress.net.2.bias": (768,),
        "region_classifier.net.0.weight": (768, 768),
        "region_classifier.net.0.bias": (768,),
        "region_classifier.net.2.weight": (768,),
        "region_classifier.net.2.bias": (768,),
        "region_classifier.net.3.weight": (1601, 768),
        "region_classifier.net.3.bias": (1601,),
        "itm_output.weight": (2, 768),
        "itm_output.bias": (2,),
    }),
    "vqa": (R.UniterForVisualQuestionAnswering, {}, {
        "vqa_output.0.weight": (1536, 768), "vqa_output.0.bias": (1536,),
        "vqa_output.2.weight": (1536,), "vqa_output.2.bias": (1536,),
        "vqa_output.3.weight": (3129, 1536), "vqa_output.3.bias": (3129,),
    }),
    "ve": (R.UniterForVisualEntailment, {}, {
        "vqa_output.0.weight": (1536, 768), "vqa_output.0.bias": (1536,),
        "vqa_output.2.weight": (1536,), "vqa_output.2.bias": (1536,),
        "vqa_output.3.weight": (3, 1536), "vqa_output.3.bias": (3,),
    }),
    "itm": (R.UniterForImageTextRetrieval, {}, {
        "itm_output.weight": (2, 768), "itm_output.bias": (2,),
        "rank_output.weight": (1, 768), "rank_output.bias": (1,),
    }),
    "nlvr2-paired": (R.UniterForNlvr2Paired, {}, {
        "nlvr2_output.weight": (2, 1536), "nlvr2_output.bias": (2,)}),
    "nlvr2-triplet": (R.UniterForNlvr2Triplet, {}, {
        "nlvr2_output.weight": (2, 768), "nlvr2_output.bias": (2,)}),
    "nlvr2-attn": (R.UniterForNlvr2PairedAttn, {}, {
        **_attn_keys("attn1", 768), **_attn_keys("attn2", 768),
        "fc.0.weight": (768, 1536), "fc.0.bias": (768,),
        "attn_pool.fc.0.weight": (1, 768), "attn_pool.fc.0.bias": (1,),
        "nlvr2_output.weight": (2, 1536), "nlvr2_output.bias": (2,),
    }),
    "re-mlp1": (R.UniterForReferringExpressionComprehension, {"mlp": 1}, {
        "re_output.weight": (1, 768), "re_output.bias": (1,)}),
    "re-mlp2": (R.UniterForReferringExpressionComprehension, {"mlp": 2}, {
        "re_output.0.weight": (768, 768), "re_output.0.bias": (768,),
        "re_output.2.weight": (768,), "re_output.2.bias": (768,),
        "re_output.3.weight": (1, 768), "re_output.3.bias": (1,),
    }),
    "vcr": (R.UniterForVisualCommonsenseReasoning, {}, {
        "vcr_output.0.weight": (1536, 768), "vcr_output.0.bias": (1536,),
        "vcr_output.2.weight": (1536,), "vcr_output.2.bias": (1536,),
        "vcr_output.3.weight": (2, 1536), "vcr_output.3.bias": (2,),
    }),
}


@pytest.mark.parametrize("name", sorted(BASE_HEADS))
def test_base_head_state_dict_is_official(name):
  cls, kwargs, extra = BASE_HEADS[name]
  model = _meta(cls, R.base_config(), **kwargs)
  assert _head_extra(model) == extra
  uniter = [(k[len("uniter."):], s) for k, s in _shapes(model)
            if k.startswith("uniter.")]
  assert uniter == _uniter_keys(768, 12, 3072)


def test_base_pretrain_head_param_counts():
  model = _meta(R.UniterForPretraining, R.base_config())
  sd = model.state_dict()
  with_tied = sum(v.numel() for k, v in sd.items()
                  if not k.startswith("uniter."))
  unique = sum(p.numel() for p in model.parameters())
  assert with_tied == 26_881_927
  assert unique - 109_898_752 == 3_040_135


@pytest.mark.parametrize("name,count", [
    ("vqa", 8_514_617), ("ve", 2_109_443), ("itm", 3_075),
    ("nlvr2-attn", 10_500_099), ("vcr", 2_107_394), ("re-mlp2", 1_052_673)])
def test_large_head_param_counts(name, count):
  cls, kwargs, _ = BASE_HEADS[name]
  model = _meta(cls, R.large_config(), **kwargs)
  assert sum(v.numel() for v in _head_extra_tensors(model)) == count


def _head_extra_tensors(model):
  return [v for k, v in model.state_dict().items()
          if not k.startswith("uniter.")]


def test_embedding_surgery_shapes_base():
  for cls in (R.UniterForNlvr2Paired, R.UniterForNlvr2Triplet,
              R.UniterForNlvr2PairedAttn):
    model = _meta(cls, R.base_config())
    model.init_type_embedding()
    assert model.state_dict()[
        "uniter.embeddings.token_type_embeddings.weight"].shape == (3, 768)
  vcr = _meta(R.UniterForVisualCommonsenseReasoning, R.base_config())
  vcr.init_type_embedding()
  vcr.init_word_embedding(81)
  sd = vcr.state_dict()
  assert sd["uniter.embeddings.token_type_embeddings.weight"].shape == (4, 768)
  assert sd["uniter.embeddings.word_embeddings.weight"].shape == (29077, 768)


def test_pretrain_vcr_surgery_retie():
  torch.manual_seed(0)
  model = R.UniterForPretrainingForVCR(R.tiny_config())
  old = model.uniter.embeddings.word_embeddings.weight.detach().clone()
  model.init_type_embedding()
  model.init_word_embedding(5)
  new = model.uniter.embeddings.word_embeddings.weight
  assert new.shape == (105, 64)
  torch.testing.assert_close(new[:100].detach(), old, rtol=0, atol=0)
  assert model.cls.predictions.decoder.weight is new
  assert model.state_dict()["cls.predictions.bias"].shape == (105,)


# ---------------------------------------------------------------------------
# Initialisation and surgery values.
# ---------------------------------------------------------------------------


def test_init_weights_official():
  torch.manual_seed(0)
  cfg = R.tiny_config(hidden_size=128, intermediate_size=256)
  model = R.UniterForNlvr2PairedAttn(cfg)
  for name, mod in model.named_modules():
    if isinstance(mod, torch.nn.LayerNorm):
      assert mod.eps == 1e-12, name
      assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
    elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
      w = mod.weight.detach()
      if w.numel() >= 1000:
        assert abs(w.std().item() - 0.02) < 0.003, name
        assert abs(w.mean().item()) < 0.003, name
      if isinstance(mod, torch.nn.Linear):
        assert torch.all(mod.bias == 0), name
  # MultiheadAttention's in_proj keeps its xavier-uniform init.
  w = model.attn1.in_proj_weight.detach()
  bound = (6.0 / (128 + 3 * 128)) ** 0.5
  assert w.abs().max() <= bound and w.std() > 0.05
  assert torch.all(model.attn1.in_proj_bias == 0)


def test_type_embedding_surgery_values():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  nlvr = R.UniterForNlvr2Paired(cfg)
  old = nlvr.uniter.embeddings.token_type_embeddings.weight.detach().clone()
  nlvr.init_type_embedding()
  new = nlvr.uniter.embeddings.token_type_embeddings.weight.detach()
  assert torch.equal(new[:2], old) and torch.equal(new[2], old[1])
  vcr = R.UniterForVisualCommonsenseReasoning(cfg)
  old = vcr.uniter.embeddings.token_type_embeddings.weight.detach().clone()
  vcr.init_type_embedding()
  new = vcr.uniter.embeddings.token_type_embeddings.weight.detach()
  assert torch.equal(new[:2], old)
  assert torch.equal(new[2], old[0]) and torch.equal(new[3], old[0])
  old_w = vcr.uniter.embeddings.word_embeddings.weight.detach().clone()
  vcr.init_word_embedding(81)
  new_w = vcr.uniter.embeddings.word_embeddings.weight.detach()
  assert new_w.shape == (181, 64) and torch.equal(new_w[:100], old_w)
  assert 0.01 < new_w[100:].std().item() < 0.03


def test_itm_init_output_copies_match_row():
  torch.manual_seed(0)
  model = R.UniterForImageTextRetrieval(R.tiny_config())
  model.itm_output.bias.data.normal_()
  model.init_output()
  assert torch.equal(model.rank_output.weight, model.itm_output.weight[1:])
  assert torch.equal(model.rank_output.bias, model.itm_output.bias[1:])
  assert model.state_dict()["rank_output.weight"].shape == (1, 64)


def test_config_from_dict_and_json(tmp_path):
  base = {"vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12,
          "num_attention_heads": 12, "intermediate_size": 3072,
          "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
          "attention_probs_dropout_prob": 0.1,
          "max_position_embeddings": 512, "type_vocab_size": 2,
          "initializer_range": 0.02}
  assert R.base_config().to_dict() == base
  path = tmp_path / "uniter-large.json"
  path.write_text(json.dumps({**base, "hidden_size": 1024,
                              "num_hidden_layers": 24,
                              "num_attention_heads": 16,
                              "intermediate_size": 4096}))
  assert (R.UniterConfig.from_json_file(str(path)).to_dict()
          == R.large_config().to_dict())
  assert R.UniterConfig.from_dict(base).to_dict() == base


# ---------------------------------------------------------------------------
# Official computations.
# ---------------------------------------------------------------------------


def test_gelu_is_exact_erf():
  x = torch.linspace(-6, 6, 1001)
  torch.testing.assert_close(R.gelu(x), F.gelu(x, approximate="none"),
                             rtol=1e-6, atol=1e-6)
  assert (R.gelu(x) - F.gelu(x, approximate="tanh")).abs().max() > 1e-4


def test_self_attention_math():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  att = R.uniter_ref.BertSelfAttention(cfg).eval()
  x = torch.randn(2, 9, 64)
  mask = torch.ones(2, 9)
  mask[0, 6:] = 0
  ext = (1.0 - mask[:, None, None, :]) * -10000.0
  heads = lambda t: t.view(2, 9, 4, 16).transpose(1, 2)
  q, k, v = (heads(lin(x)) for lin in (att.query, att.key, att.value))
  want = F.scaled_dot_product_attention(q, k, v, attn_mask=ext)
  want = want.transpose(1, 2).reshape(2, 9, 64)
  torch.testing.assert_close(att(x, ext), want, rtol=1e-5, atol=1e-6)


def test_attention_probability_dropout_is_active_in_train():
  torch.manual_seed(0)
  cfg = R.tiny_config(hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.5)
  model = R.UniterModel(cfg)
  packed = R.static_to_packed(_batch(cfg))
  model.eval()
  a = model.encode(packed)
  model.train()
  b = model.encode(packed)
  assert not torch.allclose(a, b)
  cfg0 = R.tiny_config(hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
  model0 = R.UniterModel(cfg0).train()
  model0.load_state_dict(model.state_dict())
  torch.testing.assert_close(model0.encode(packed), a, rtol=0, atol=0)


def _batch(cfg, seed=0, txt_lens=TXT_LENS, num_bbs=NUM_BBS, lt=LT, li=LI,
           **kw):
  return R.random_static_batch(seed, txt_lens, num_bbs, lt, li,
                               cfg.vocab_size, **kw)


def test_mask_embedding_official_semantics():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  model = R.UniterModel(cfg).eval()
  emb = model.img_embeddings.mask_embedding.weight
  assert emb[0].abs().sum() > 0  # init_weights overwrote the padding row.
  batch = _batch(cfg, pretrain=True)
  packed = R.static_to_packed(batch)
  out = model.encode(packed)
  assert torch.all(emb[0] == 0)  # Zeroed in place by the forward.
  # A masked region's input is (zeroed feature) + mask_embedding[1].
  manual = dict(packed)
  manual.pop("img_masks")
  manual["img_feat"] = torch.where(packed["img_masks"][..., None],
                                   emb[1].detach(), packed["img_feat"])
  torch.testing.assert_close(model.encode(manual), out, rtol=0, atol=0)


def test_embeddings_and_pooler_formulas():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  model = R.UniterModel(cfg).eval()
  for p in model.parameters():  # Non-trivial LayerNorm and bias values.
    p.data.normal_(0, 0.1)
  emb, img = model.embeddings, model.img_embeddings
  ln = lambda m, x: F.layer_norm(x, (64,), m.weight, m.bias, 1e-12)
  ids = torch.randint(0, 100, (2, 5))
  pos = torch.arange(5)[None]
  types = emb.token_type_embeddings.weight
  with torch.no_grad():
    want = ln(emb.LayerNorm, emb.word_embeddings.weight[ids]
              + emb.position_embeddings.weight[:5] + types[0])
    torch.testing.assert_close(model.embeddings(ids, pos), want)
    feat, box = torch.randn(2, 3, 2048), torch.rand(2, 3, 7)
    want = ln(img.LayerNorm,
              ln(img.img_layer_norm, F.linear(feat, img.img_linear.weight,
                                              img.img_linear.bias))
              + ln(img.pos_layer_norm, F.linear(box, img.pos_linear.weight,
                                                img.pos_linear.bias))
              + types[1])  # Regions: type 1 of the TEXT type table.
    torch.testing.assert_close(model._compute_img_embeddings(feat, box), want)
    h = torch.randn(2, 4, 64)
    torch.testing.assert_close(
        model.pooler(h), torch.tanh(F.linear(h[:, 0], model.pooler.dense.weight,
                                             model.pooler.dense.bias)))


def test_tied_weights_are_tied():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  model = R.UniterForPretraining(cfg).eval()
  words = model.uniter.embeddings.word_embeddings.weight
  img_linear = model.uniter.img_embeddings.img_linear.weight
  assert model.cls.predictions.decoder.weight is words
  assert model.feat_regress.weight is img_linear
  sd = model.state_dict()
  assert (sd["cls.predictions.decoder.weight"].data_ptr()
          == sd["uniter.embeddings.word_embeddings.weight"].data_ptr())
  assert (sd["feat_regress.weight"].data_ptr()
          == sd["uniter.img_embeddings.img_linear.weight"].data_ptr())
  # Loading a state_dict keeps the ties (values copied in place).
  other = R.UniterForPretraining(cfg)
  model.load_state_dict(other.state_dict(), strict=True)
  assert model.cls.predictions.decoder.weight is words
  assert torch.equal(words, other.uniter.embeddings.word_embeddings.weight)
  # The heads compute with the tied matrices.
  h = torch.randn(5, 64)
  with torch.no_grad():
    mlm = model.cls(h)
    t = model.cls.predictions.transform(h)
    torch.testing.assert_close(
        mlm, t @ words.T + model.cls.predictions.bias, rtol=1e-5, atol=1e-6)
    mrfr = model.feat_regress(h)
    torch.testing.assert_close(
        mrfr, model.feat_regress.net(h) @ img_linear + model.feat_regress.bias,
        rtol=1e-5, atol=1e-6)
    words.add_(1.0)
    assert torch.equal(model.cls.predictions.decoder.weight, words)


def test_paired_attn_matches_official_mha_math():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  model = R.UniterForNlvr2PairedAttn(cfg).eval()
  mha = model.attn1
  q_in, kv_in = torch.randn(6, 3, 64), torch.randn(8, 3, 64)
  pad = torch.zeros(3, 8, dtype=torch.bool)
  pad[1, 5:] = True
  got, _ = mha(q_in, kv_in, kv_in, key_padding_mask=pad)
  w, b = mha.in_proj_weight, mha.in_proj_bias
  q = F.linear(q_in, w[:64], b[:64]) * 16 ** -0.5
  k, v = F.linear(kv_in, w[64:], b[64:]).chunk(2, dim=-1)
  split = lambda t: t.reshape(t.shape[0], 3 * 4, 16).transpose(0, 1)
  s = split(q) @ split(k).transpose(1, 2)
  s = s.view(3, 4, 6, 8).masked_fill(pad[:, None, None], float("-inf"))
  o = torch.softmax(s.view(12, 6, 8), -1) @ split(v)
  o = o.transpose(0, 1).reshape(6, 3, 64)
  want = mha.out_proj(o)
  torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Packing helpers.
# ---------------------------------------------------------------------------


def test_packing_helpers_are_inverse():
  rng = torch.Generator().manual_seed(0)
  x = torch.randn(4, LT + LI, 3, generator=rng)
  valid = R.static_valid_mask(TXT_LENS, NUM_BBS, LT, LI)
  x = x * valid[..., None]
  packed = R.pack_static_sequence(x, TXT_LENS, NUM_BBS, LT)
  assert packed.shape == (4, max(t + n for t, n in zip(TXT_LENS, NUM_BBS)), 3)
  assert torch.equal(R.packed_to_static(packed, TXT_LENS, NUM_BBS, LT, LI), x)
  # Official gather_index on cat([text (max_tl) | regions (max_nbb)]).
  max_tl, max_nbb = max(TXT_LENS), max(NUM_BBS)
  both = torch.cat([x[:, :max_tl], x[:, LT:LT + max_nbb]], 1)
  index = R.gather_index(TXT_LENS, NUM_BBS, max_tl, packed.shape[1])
  gathered = torch.gather(both, 1, index[..., None].expand(-1, -1, 3))
  pmask = torch.arange(packed.shape[1])[None] < torch.tensor(
      [t + n for t, n in zip(TXT_LENS, NUM_BBS)])[:, None]
  assert torch.equal(gathered * pmask[..., None], packed)
  # And the other way round, at valid packed positions.
  p = torch.randn(packed.shape, generator=rng) * pmask[..., None]
  back = R.pack_static_sequence(
      R.packed_to_static(p, TXT_LENS, NUM_BBS, LT, LI), TXT_LENS, NUM_BBS, LT)
  assert torch.equal(back, p)


def test_static_to_packed_fields():
  cfg = R.tiny_config()
  batch = _batch(cfg, pretrain=True)
  packed = R.static_to_packed(batch)
  max_tl, max_nbb = max(TXT_LENS), max(NUM_BBS)
  width = max(t + n for t, n in zip(TXT_LENS, NUM_BBS))
  assert packed["input_ids"].shape == (4, max_tl)
  assert packed["input_ids"].dtype == torch.long
  assert torch.equal(packed["position_ids"], torch.arange(max_tl)[None])
  assert packed["img_feat"].shape == (4, max_nbb, 2048)
  assert packed["attn_masks"].shape == (4, width)
  assert packed["attn_masks"].sum(1).tolist() == [
      t + n for t, n in zip(TXT_LENS, NUM_BBS)]
  # img_mask_tgt marks the masked regions at their packed positions.
  tgt = R.packed_to_static(packed["img_mask_tgt"], TXT_LENS, NUM_BBS, LT, LI)
  assert torch.equal(tgt[:, LT:], torch.as_tensor(batch["img_masks"]))
  assert not tgt[:, :LT].any()
  n_masked = int(batch["img_masks"].sum())
  assert packed["feat_targets"].shape == (n_masked, 2048)
  assert packed["label_targets"].shape == (n_masked, 1601)
  first = batch["feat_targets"][0][batch["img_masks"][0]][0]
  assert torch.equal(packed["feat_targets"][0], torch.as_tensor(first))
  assert packed["obj_masks"].sum(1).tolist() == [max_nbb - n for n in NUM_BBS]
  # Lengths come from attn_masks when the batch has none.
  nolens = {k: v for k, v in batch.items()
            if k not in ("txt_lens", "num_bbs")}
  assert R.lengths_from_static(nolens) == (TXT_LENS, NUM_BBS)


def test_static_to_packed_rejects_inconsistent_masks():
  batch = _batch(R.tiny_config())
  batch["attn_masks"] = batch["attn_masks"].copy()
  batch["attn_masks"][2, LT + 1] = 0  # A hole inside row 2's regions.
  with pytest.raises(ValueError, match=r"rows \[2\]"):
    R.static_to_packed(batch)


# ---------------------------------------------------------------------------
# Padding never changes outputs at valid positions.
# ---------------------------------------------------------------------------


def _repad(batch, lt2, li2):
  """The same examples in a bigger static bucket (Lt2 >= Lt, Li2 >= Li)."""
  lt = batch["input_ids"].shape[1]
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if k in ("input_ids", "txt_labels", "position_ids", "txt_type_ids"):
      fill = -1 if k == "txt_labels" else 0
      out[k] = np.full((v.shape[0], lt2) + v.shape[2:], fill, v.dtype)
      out[k][:, :lt] = v
      if k == "position_ids":
        out[k] = np.tile(np.arange(lt2, dtype=v.dtype), (v.shape[0], 1))
    elif k in ("img_feat", "img_pos_feat", "img_masks", "feat_targets",
               "label_targets", "img_type_ids"):
      fill = 1 if k == "img_type_ids" else 0
      out[k] = np.full((v.shape[0], li2) + v.shape[2:], fill, v.dtype)
      out[k][:, :v.shape[1]] = v
    elif k == "attn_masks":
      out[k] = np.zeros((v.shape[0], lt2 + li2), v.dtype)
      out[k][:, :lt] = v[:, :lt]
      out[k][:, lt2:lt2 + v.shape[1] - lt] = v[:, lt:]
    else:
      out[k] = v
  return out


def _static_forward(model, batch):
  """Reference forward in the static layout (no gather_index)."""
  b = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
  return model(b["input_ids"].long(), b["position_ids"].long(),
               b["img_feat"].float(), b["img_pos_feat"].float(),
               b["attn_masks"].long(), None, output_all_encoded_layers=False)


def test_packed_and_static_layouts_agree():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  model = R.UniterModel(cfg).eval()
  batch = _batch(cfg)
  with torch.no_grad():
    packed = model.encode(R.static_to_packed(batch))
    static = _static_forward(model, batch)
    big = _static_forward(model, _repad(batch, LT + 3, LI + 5))
  valid = R.static_valid_mask(TXT_LENS, NUM_BBS, LT, LI)
  unpacked = R.packed_to_static(packed, TXT_LENS, NUM_BBS, LT, LI)
  torch.testing.assert_close(unpacked[valid], static[valid],
                             rtol=1e-5, atol=1e-5)
  big_valid = torch.cat([big[:, :LT], big[:, LT + 3:LT + 3 + LI]], 1)
  torch.testing.assert_close(big_valid[valid], static[valid],
                             rtol=1e-5, atol=1e-5)


def test_padding_values_are_ignored():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  model = R.UniterModel(cfg).eval()
  batch = _batch(cfg)
  noisy = dict(batch)
  rng = np.random.default_rng(1)
  tmask = batch["attn_masks"][:, :LT].astype(bool)
  imask = batch["attn_masks"][:, LT:].astype(bool)
  noisy["input_ids"] = np.where(tmask, batch["input_ids"],
                                rng.integers(1, 100, tmask.shape))
  noisy["img_feat"] = np.where(imask[..., None], batch["img_feat"],
                               rng.normal(size=batch["img_feat"].shape)
                               ).astype(np.float32)
  with torch.no_grad():
    a = _static_forward(model, batch)
    b = _static_forward(model, noisy)
  valid = R.static_valid_mask(TXT_LENS, NUM_BBS, LT, LI)
  torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-5)


def _paired_batch(cfg):
  """NLVR2 paired layout: rows 2i and 2i+1 share text; different images."""
  txt = [5, 5, 3, 3]
  return _batch(cfg, txt_lens=txt, num_bbs=NUM_BBS)


def _make_paired(batch):
  b = dict(batch)
  b["input_ids"] = np.repeat(batch["input_ids"][::2], 2, 0)
  b["img_type_ids"] = np.where(
      batch["attn_masks"][:, LT:] > 0, np.array([1, 2, 1, 2])[:, None], 1)
  b["targets"] = np.array([1, 0])
  return b


def _head_cases():
  cfg = R.tiny_config()
  return {
      "vqa": (lambda: R.UniterForVisualQuestionAnswering(cfg, num_answer=11),
              lambda: _batch(cfg)),
      "ve": (lambda: R.UniterForVisualEntailment(cfg), lambda: _batch(cfg)),
      "itm": (lambda: R.UniterForImageTextRetrieval(cfg), lambda: _batch(cfg)),
      "nlvr2-paired": (lambda: R.UniterForNlvr2Paired(cfg),
                       lambda: _make_paired(_paired_batch(cfg))),
      "nlvr2-triplet": (lambda: R.UniterForNlvr2Triplet(cfg),
                        lambda: _make_paired(_paired_batch(cfg))),
      "nlvr2-attn": (lambda: R.UniterForNlvr2PairedAttn(cfg),
                     lambda: _make_paired(_paired_batch(cfg))),
      "re-mlp1": (lambda: R.UniterForReferringExpressionComprehension(cfg),
                  lambda: _batch(cfg)),
      "re-mlp2": (lambda: R.UniterForReferringExpressionComprehension(
          cfg, mlp=2), lambda: _batch(cfg)),
      "vcr": (lambda: R.UniterForVisualCommonsenseReasoning(cfg),
              lambda: {**_batch(cfg), "txt_type_ids": np.where(
                  np.arange(LT)[None] < 3, 0, 2) * (
                      _batch(cfg)["attn_masks"][:, :LT])}),
  }


HEAD_SHAPES = {"vqa": (4, 11), "ve": (4, 3), "itm": (4, 1),
               "nlvr2-paired": (2, 2), "nlvr2-triplet": (4, 2),
               "nlvr2-attn": (2, 2), "re-mlp1": (4, 6), "re-mlp2": (4, 6),
               "vcr": (4, 1)}


@pytest.mark.parametrize("name", sorted(HEAD_SHAPES))
def test_head_outputs_do_not_depend_on_padding(name):
  torch.manual_seed(0)
  make_model, make_batch = _head_cases()[name]
  model = make_model().eval()
  if hasattr(model, "init_type_embedding"):
    model.init_type_embedding()
  batch = make_batch()
  with torch.no_grad():
    tight = model(R.static_to_packed(batch), compute_loss=False)
    loose = model(R.static_to_packed(_repad(batch, LT + 3, LI + 5),
                                     trim=False), compute_loss=False)
  assert tight.shape == HEAD_SHAPES[name]
  assert torch.isfinite(tight).all()
  torch.testing.assert_close(loose, tight, rtol=1e-5, atol=1e-5)


def test_head_semantics():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  # NLVR2 paired: poolers of rows 2i and 2i+1 concatenated.
  model = R.UniterForNlvr2Paired(cfg).eval()
  model.init_type_embedding()
  packed = R.static_to_packed(_make_paired(_paired_batch(cfg)))
  with torch.no_grad():
    pooled = model.uniter.pooler(model.encode(packed))
    want = model.nlvr2_output(torch.cat([pooled[0::2], pooled[1::2]], -1))
    torch.testing.assert_close(model(packed, compute_loss=False), want)
  # VCR returns the "right answer" column of its 2 logits.
  vcr = R.UniterForVisualCommonsenseReasoning(cfg).eval()
  packed = R.static_to_packed(_batch(cfg))
  with torch.no_grad():
    assert torch.equal(vcr(packed, compute_loss=False),
                       vcr.logits(packed)[:, 1:])
  # RE: padding regions get -1e4; real ones are re_output of their hidden.
  re = R.UniterForReferringExpressionComprehension(cfg).eval()
  with torch.no_grad():
    scores = re(packed, compute_loss=False)
    static = R.packed_to_static(re.encode(packed), TXT_LENS, NUM_BBS, LT, LI)
    want = re.re_output(static[:, LT:LT + max(NUM_BBS)]).squeeze(-1)
  real = ~packed["obj_masks"]
  torch.testing.assert_close(scores[real], want[real])
  assert torch.all(scores[~real] == -1e4)


def test_pretrain_outputs_at_masked_positions():
  torch.manual_seed(0)
  cfg = R.tiny_config()
  model = R.UniterForPretraining(cfg).eval()
  batch = _batch(cfg, pretrain=True)
  packed = R.static_to_packed(batch)
  labels = torch.as_tensor(batch["txt_labels"])
  img_masks = torch.as_tensor(batch["img_masks"])
  with torch.no_grad():
    mlm = model(packed, "mlm", compute_loss=False)
    mrfr = model(packed, "mrfr", compute_loss=False)
    mrc = model(packed, "mrckl", compute_loss=False)
    itm, ot = model(packed, "itm", compute_loss=False)
    masked = R.packed_to_static(model.encode(packed), TXT_LENS, NUM_BBS,
                                LT, LI)
    no_mask = dict(packed)
    no_mask.pop("img_masks")
    unmasked = R.packed_to_static(model.encode(no_mask), TXT_LENS, NUM_BBS,
                                  LT, LI)
    # MLM never adds the mask embedding; MRM does.
    torch.testing.assert_close(
        mlm, model.cls(unmasked[:, :LT][labels != -1]), rtol=1e-5, atol=1e-5)
    regions = masked[:, LT:][img_masks]
    torch.testing.assert_close(mrfr, model.feat_regress(regions),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mrc, model.region_classifier(regions),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(itm, model.itm_output(
        model.uniter.pooler(unmasked)), rtol=1e-5, atol=1e-5)
  assert ot is None
  assert mlm.shape == (int((labels != -1).sum()), cfg.vocab_size)
  assert mrfr.shape == (int(img_masks.sum()), 2048)
  assert not torch.allclose(masked, unmasked)  # encode() applies img_masks.
  # Losses: the official reductions ('none') per element / example.
  with torch.no_grad():
    assert model(packed, "mlm").shape == (mlm.shape[0],)
    assert model(packed, "mrfr").shape == mrfr.shape
    assert model(packed, "mrckl").shape == mrc.shape
    assert model(packed, "mrc").shape == (mrc.shape[0],)
    torch.testing.assert_close(
        model(packed, "mrfr"), (mrfr - packed["feat_targets"]) ** 2)
  with pytest.raises(NotImplementedError, match="ot_inputs"):
    model({**packed, "ot_inputs": {}}, "itm")
