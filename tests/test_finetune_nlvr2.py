"""NLVR2 finetuning: rows, loss vs the PyTorch reference, metrics, files.

The three heads (paired, triplet, paired-attn) share one task, `nlvr2`;
its data op makes the rows the official `data/nlvr2.py` makes (image type
ids 1 and 2), its loss and gradient equal the reference heads' on the same
batch, its metrics follow the official `scripts/eval_nlvr2.py`, and a run
on the synthetic NLVR2 data writes a prediction file with every identifier
once. An official-format finetuned checkpoint (the reference head with
random weights, saved as .pt) evaluates to the reference's logits.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity_cases as P
import torch_ref as R
from configs import finetune_nlvr2
from data_prep import prepare
from uniter_jax import convert
from uniter_jax import model as um
from uniter_jax import tasks
from uniter_jax.data import buckets as bk
from uniter_jax.data import collate as collate_lib
from uniter_jax.data import contract
from uniter_jax.data import schema
from uniter_jax.evaluators import nlvr2 as nlvr2_eval
from uniter_jax.model import surgery
from uniter_jax.train import input as input_lib
from uniter_jax.train import metrics as metrics_lib
from uniter_jax.train import trainer

HEADS = ("nlvr2-paired", "nlvr2-triplet", "nlvr2-attn")
CLS, SEP, V = 2, 3, 100
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


# --------------------------------------------------------------- metrics
def test_consistency_groups_are_the_official_ones():
  # The image pair (third field) is blanked: one sentence of one set.
  assert nlvr2_eval.consistency_key("dev-850-2-0") == "dev-850--0"
  assert (nlvr2_eval.consistency_key("test1-7-0-3")
          == nlvr2_eval.consistency_key("test1-7-1-3"))
  assert (nlvr2_eval.consistency_key("dev-7-0-0")
          != nlvr2_eval.consistency_key("dev-7-0-1"))
  with pytest.raises(ValueError, match="'dev-1'.*three"):
    nlvr2_eval.consistency_key("dev-1")


def test_accuracy_and_consistency_by_hand():
  # Sentence groups (set, sentence): A = dev-1-*-0 all right; B = dev-1-*-1
  # one member wrong; C = dev-2-*-0 right, plus an unlabelled member
  # predicted "wrong" (no label: not scored); dev-3-0-0 unlabelled alone
  # (no group).
  labels = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-2-0": True,
            "dev-1-0-1": True, "dev-1-1-1": False,
            "dev-2-0-0": False, "dev-2-1-0": None, "dev-3-0-0": None}
  preds = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-2-0": True,
           "dev-1-0-1": True, "dev-1-1-1": True,      # the wrong one
           "dev-2-0-0": False, "dev-2-1-0": True, "dev-3-0-0": False}
  labelled = [(i, l) for i, l in labels.items() if l is not None]
  got = nlvr2_eval.accuracy_and_consistency(preds, labelled)
  assert got == {"acc": 5 / 6, "consistency": 2 / 3, "examples": 6.0,
                 "groups": 3.0}
  # Every member wrong in every group: nothing consistent.
  flipped = {i: not p for i, p in preds.items()}
  got = nlvr2_eval.accuracy_and_consistency(flipped, labelled)
  assert got["acc"] == 1 / 6 and got["consistency"] == 0.0
  with pytest.raises(ValueError, match="1 labelled examples have no "
                     "prediction.*dev-1-1-1"):
    nlvr2_eval.accuracy_and_consistency(
        {i: p for i, p in preds.items() if i != "dev-1-1-1"}, labelled)


def test_predictions_csv_is_the_official_format():
  text = nlvr2_eval.predictions_csv(["dev-1-0-0", "dev-1-1-0"],
                                    np.array([True, False]))
  assert text == "dev-1-0-0,True\ndev-1-1-0,False\n"


# -------------------------------------------------------------- the rows
def _examples(seed=0, txt_lens=(7, 4, 9), nbbs=((3, 5), (6, 2), (4, 4)),
              labels=(1, 0, 1)):
  """Joined 2-image examples as `TextSource.example` gives them."""
  rng = np.random.default_rng(seed)
  out = []
  for k, (tl, nb, label) in enumerate(zip(txt_lens, nbbs, labels)):
    ids = np.concatenate([[CLS], rng.integers(5, V, tl - 2), [SEP]])
    images = [{"img_feat": rng.normal(size=(n, 2048)).astype(np.float32),
               "img_pos_feat": rng.uniform(size=(n, 7)).astype(np.float32),
               "img_key": f"img{k}_{j}"} for j, n in enumerate(nb)]
    ex = {"input_ids": ids.astype(np.int32), "_id": f"dev-{k}-0-0",
          "_index": k, **images[0], "_images": images}
    if label >= 0:
      ex["targets"] = np.int32(label)
    out.append(ex)
  return out


def _batch(task, examples):
  """The task's rows of `examples`, collated to one static shape."""
  op = task.data_ops()["nlvr2"]
  rows = []
  for ex in examples:
    made = op(ex, np.random.default_rng(0), None)
    rows.extend(made if isinstance(made, list) else [made])
  lt = max(len(r["input_ids"]) for r in rows) + 1
  li = max(len(r["img_feat"]) for r in rows) + 2
  batch = collate_lib.collate(rows, bk.Bucket(lt, li, len(rows)),
                              fields=task.batch_fields(),
                              rows_per_example=task.rows_per_example)
  contract.check_batch(batch, task.batch_fields(), where="test",
                       rows_per_example=task.rows_per_example)
  return batch


def test_paired_rows_have_type_ids_1_and_2():
  task = tasks.make_task("nlvr2", head="nlvr2-paired")
  assert (task.rows_per_example, task.row_regions) == (2, "max")
  ex = _examples()[0]
  rows = task.data_ops()["nlvr2"](ex, np.random.default_rng(0), None)
  assert len(rows) == 2
  for i, row in enumerate(rows):
    image = ex["_images"][i]
    np.testing.assert_array_equal(row["input_ids"], ex["input_ids"])
    np.testing.assert_array_equal(row["img_feat"], image["img_feat"])
    np.testing.assert_array_equal(row["img_pos_feat"], image["img_pos_feat"])
    np.testing.assert_array_equal(row["img_type_ids"],
                                  np.full(len(image["img_feat"]), i + 1))
    assert row["targets"] == 1 and "_images" not in row
  batch = _batch(task, _examples())
  # Padding regions get type 1 (the contract's pad), real ones 1 / 2.
  np.testing.assert_array_equal(batch["img_type_ids"][:, :2],
                                [[1, 1], [2, 2]] * 3)
  np.testing.assert_array_equal(batch["num_bbs"], [3, 5, 6, 2, 4, 4])
  np.testing.assert_array_equal(batch["targets"], [1, 0, 1])


def test_triplet_row_concatenates_img0_then_img1():
  task = tasks.make_task("nlvr2", head="nlvr2-triplet")
  assert (task.rows_per_example, task.row_regions) == (1, "sum")
  ex = _examples()[1]
  row = task.data_ops()["nlvr2"](ex, np.random.default_rng(0), None)
  a, b = ex["_images"]
  np.testing.assert_array_equal(
      row["img_feat"], np.concatenate([a["img_feat"], b["img_feat"]]))
  np.testing.assert_array_equal(
      row["img_pos_feat"], np.concatenate([a["img_pos_feat"],
                                           b["img_pos_feat"]]))
  np.testing.assert_array_equal(row["img_type_ids"], [1] * 6 + [2] * 2)
  assert row["targets"] == 0
  batch = _batch(task, _examples())
  np.testing.assert_array_equal(batch["num_bbs"], [8, 8, 8])


def test_rows_refuse_a_record_without_two_images_and_keep_no_label():
  task = tasks.make_task("nlvr2", head="nlvr2-paired")
  ex = dict(_examples()[0])
  del ex["_images"]
  with pytest.raises(schema.DataError, match="'dev-0-0-0'.*names 1 image"):
    task.data_ops()["nlvr2"](ex, None, None)
  unlabelled = _examples(labels=(-1, 0, 1))[0]
  rows = task.data_ops()["nlvr2"](unlabelled, None, None)
  assert [int(r["targets"]) for r in rows] == [-1, -1]


def test_task_follows_the_head_and_refuses_another():
  assert {h: tasks.make_task("nlvr2", head=h).new_params for h in HEADS} == {
      "nlvr2-paired": ("nlvr2_output/*",),
      "nlvr2-triplet": ("nlvr2_output/*",),
      "nlvr2-attn": ("nlvr2_output/*", "attn1/*", "attn2/*", "fc/*",
                     "attn_pool/*")}
  task = tasks.make_task("nlvr2", head="nlvr2-triplet")
  with pytest.raises(ValueError, match="'nlvr2-triplet'.*'nlvr2-attn'"):
    task.check_head("nlvr2-attn")
  with pytest.raises(ValueError, match="trains the heads.*'vqa'"):
    task.check_head("vqa")
  with pytest.raises(ValueError, match="head 'itm'"):
    tasks.make_task("nlvr2", head="itm")


# ------------------------------------------------ loss vs the reference
@pytest.mark.parametrize("head", HEADS)
def test_loss_and_gradient_match_the_reference(head):
  cfg = R.tiny_config()
  ref = P.make_reference(head, cfg)
  with torch.no_grad():   # type 2 unlike type 1, so the ids matter
    ref.uniter.embeddings.token_type_embeddings.weight[2].add_(0.05)
  fcfg = P.flax_config(cfg)
  params = convert.torch_to_flax(P.state_dict_numpy(ref), head, fcfg)
  model = um.build_model(head, fcfg)
  task = tasks.make_task("nlvr2", head=head)
  batch = _batch(task, _examples(seed=3))

  @jax.jit
  def loss_and_grad(p, b):
    def fn(p):
      return task.loss(task.outputs(model, p, b, deterministic=True), b)
    return jax.value_and_grad(fn, has_aux=True)(p)

  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  (loss, metrics), grads = loss_and_grad(params, jb)
  packed = R.static_to_packed(batch)
  per_example = ref(packed, compute_loss=True)
  tloss = per_example.mean()      # official train_nlvr2.py: loss.mean()
  tloss.backward()
  assert P.rel_err(loss, tloss.item()) <= TOL
  with torch.no_grad():
    logits = ref(packed, compute_loss=False).numpy()
  acc = (logits.argmax(-1) == batch["targets"]).mean()
  assert float(metrics["nlvr2_acc"]) == pytest.approx(acc)
  assert float(metrics["nlvr2_n"]) == 3
  got = convert.flax_to_torch(grads, head, fcfg)
  # Unused by this batch (e.g. the region mask embedding): no torch grad.
  want = {n: np.zeros(tuple(p.shape), np.float32) if p.grad is None
          else p.grad.numpy() for n, p in ref.named_parameters()}
  assert sorted(got) == sorted(want)
  scale = max(float(np.abs(g).max()) for g in want.values())
  worst = 0.0
  for name, g in want.items():
    err = np.abs(got[name] - g).max() / max(np.abs(g).max(), 1e-3 * scale)
    assert err <= TOL, f"{head} {name}: gradient relative error {err:.2e}"
    worst = max(worst, err)
  print(f"{head}: loss rel err {P.rel_err(loss, tloss.item()):.1e}, worst "
        f"gradient rel err {worst:.1e}")

  # An unlabelled example (and exact-evaluation padding) counts for nothing.
  part = dict(jb, targets=jnp.asarray([1, -1, 1], jnp.int32))
  (loss_part, m), _ = loss_and_grad(params, part)
  assert P.rel_err(loss_part, per_example.detach().numpy()[[0, 2]].mean()
                   ) <= TOL
  assert float(m["nlvr2_n"]) == 2


# ----------------------------------------------------- init from pretrain
def _random_params(head, cfg, seed):
  net = um.build_model(head, cfg)
  abstract = jax.eval_shape(lambda: um.init_params(net, jax.random.key(0)))
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda s: rs.normal(size=s.shape).astype(s.dtype), abstract)


@pytest.fixture(scope="module")
def pretrain_pt(tmp_path_factory):
  cfg = um.config.tiny()
  params = _random_params("pretrain", cfg, 0)
  path = tmp_path_factory.mktemp("pre") / "pretrain.pt"
  convert.write_state_dict(convert.flax_to_torch(params, "pretrain", cfg),
                           path)
  return str(path), params


@pytest.mark.parametrize("head", HEADS)
def test_init_from_pretraining_grows_the_type_table(head, pretrain_pt):
  path, pre = pretrain_pt
  cfg = um.config.tiny()
  task = tasks.make_task("nlvr2", head=head)
  target = _random_params(head, cfg, 1)
  params, report = convert.load_init_params(
      path, head=head, model_cfg=cfg, target=target,
      allow_new=task.new_params)
  types = np.asarray(params["uniter"]["embeddings"]["token_type_embeddings"]
                     ["embedding"])
  old = pre["uniter"]["embeddings"]["token_type_embeddings"]["embedding"]
  np.testing.assert_array_equal(types, np.stack([old[0], old[1], old[1]]))
  fresh = {k.split("/")[0] for k in report.new}
  assert fresh == {p.split("/")[0] for p in task.new_params}
  # Without the task's declaration, the head's params are refused by name.
  with pytest.raises(surgery.MergeError, match="nlvr2_output"):
    convert.load_init_params(path, head=head, model_cfg=cfg, target=target)


# --------------------------------------------- the synthetic NLVR2 runs
DATA_DIR = "/tmp/uniter_jax_test_data"
TINY_TEXT = "uniter_synthetic_nlvr2/tiny:1.0.0"


def _config(arg):
  c = finetune_nlvr2.get_config(arg)
  c.data.data_dir = DATA_DIR
  c.data.max_buckets = 1   # one shape per split: fewest compiles
  c.evals.loss_curves.every_steps = -1
  c.checkpoint.every_steps = c.train.num_train_steps
  return c


@pytest.fixture(scope="module")
def synthetic():
  """The tiny synthetic NLVR2 val split (built on first use), read for the
  paired heads."""
  prepare.ensure_synthetic(_config("runlocal"))
  data = input_lib.make_dataset(
      _config("runlocal"), tasks.make_task("nlvr2", head="nlvr2-paired"),
      TINY_TEXT, "val", token_budget=512, batch_multiple=1, seed=0)
  return data


def _csv(path):
  with open(path) as f:
    text = f.read()
  lines = text.splitlines()
  assert text.endswith("\n") and all(lines)
  pairs = [line.split(",") for line in lines]
  assert all(len(p) == 2 and p[1] in ("True", "False") for p in pairs)
  return {i: p == "True" for i, p in pairs}, [i for i, _ in pairs]


def _split_records(split):
  data = input_lib.make_dataset(
      _config("runlocal"), tasks.make_task("nlvr2", head="nlvr2-triplet"),
      TINY_TEXT, split, token_budget=4096, batch_multiple=1, seed=0)
  return {data.text.record_id(i): data.text.target(i)
          for i in range(len(data.text))}


def test_rows_of_a_synthetic_record(synthetic):
  paired = synthetic
  triplet = input_lib.make_dataset(
      _config("runlocal"), tasks.make_task("nlvr2", head="nlvr2-triplet"),
      TINY_TEXT, "val", token_budget=512, batch_multiple=1, seed=0)
  i = 5
  left, right = (paired.store.load(int(j))
                 for j in paired.text.images_of(i))
  rows = paired.example_rows(i, 0)
  for t, (row, image) in enumerate(zip(rows, (left, right))):
    np.testing.assert_array_equal(row["img_feat"], image["img_feat"])
    np.testing.assert_array_equal(row["img_type_ids"],
                                  np.full(len(image["img_feat"]), t + 1))
    assert row["_id"] == paired.text.record_id(i)
    assert int(row["targets"]) == paired.text.target(i)
  (row,) = triplet.example_rows(i, 0)
  np.testing.assert_array_equal(
      row["img_pos_feat"], np.concatenate([left["img_pos_feat"],
                                           right["img_pos_feat"]]))
  np.testing.assert_array_equal(
      row["img_type_ids"], [1] * len(left["img_feat"])
      + [2] * len(right["img_feat"]))
  # The length index counts the larger image (paired) or both (triplet).
  assert paired.num_bbs[i] == max(len(left["img_feat"]),
                                  len(right["img_feat"]))
  assert triplet.num_bbs[i] == len(left["img_feat"]) + len(right["img_feat"])


def _tiny_model_cfg(vocab_size):
  cfg = um.config.tiny()
  cfg.vocab_size = vocab_size
  cfg.max_position_embeddings = 64
  return cfg


def test_runlocal_trains_from_pretraining_and_evaluates(synthetic, tmp_path):
  # Starts from a pretraining checkpoint: the trainer's strict init must
  # accept exactly the head's declared new params.
  cfg = _tiny_model_cfg(synthetic.text.meta["vocab_size"])
  pt = tmp_path / "pretrain.pt"
  convert.write_state_dict(convert.flax_to_torch(
      _random_params("pretrain", cfg, 0), "pretrain", cfg), pt)
  c = _config("triplet,runlocal")
  c.init_checkpoint = str(pt)
  # Two updates and one bucket shape: compiles dominate a CPU test.
  c.data.max_buckets = 1
  c.train.num_train_steps = 2
  c.log_every_steps = 1
  c.eval.every_steps = c.checkpoint.every_steps = 2
  wd = str(tmp_path / "run")
  out = trainer.train_and_evaluate(c, wd)
  rows = metrics_lib.read_metrics(wd)
  assert [r["step"] for r in rows if "train/nlvr2/nlvr2_loss" in r] == [
      1, 2]
  for split in ("val", "test"):
    want = _split_records(split)
    preds, order = _csv(os.path.join(wd, "results",
                                     f"nlvr2_{split}_step2.csv"))
    assert sorted(order) == sorted(want)     # every identifier once
    assert out[f"{split}/nlvr2_examples"] == len(want)
    labelled = [(i, bool(t)) for i, t in want.items() if t >= 0]
    scores = nlvr2_eval.accuracy_and_consistency(preds, labelled)
    assert out[f"{split}/nlvr2_acc"] == pytest.approx(scores["acc"])
    assert out[f"{split}/nlvr2_consistency"] == pytest.approx(
        scores["consistency"])
    assert np.isfinite(out[f"{split}/nlvr2_loss"])

  # mode=eval on the workdir's checkpoint gives the same numbers.
  c.mode = "eval"
  again = trainer.train_and_evaluate(c, wd)
  for k in ("val/nlvr2_acc", "val/nlvr2_consistency", "test/nlvr2_acc"):
    assert again[k] == out[k], k
  assert again["val/nlvr2_loss"] == pytest.approx(out["val/nlvr2_loss"],
                                                  rel=1e-5)


def test_official_finetuned_checkpoint_gives_the_reference_logits(
    synthetic, tmp_path):
  head = "nlvr2-attn"
  vocab = synthetic.text.meta["vocab_size"]
  ref = P.make_reference(head, R.tiny_config(vocab_size=vocab,
                                             max_position_embeddings=64),
                         seed=3)
  with torch.no_grad():
    ref.uniter.embeddings.token_type_embeddings.weight[2].add_(0.05)
  pt = tmp_path / "nlvr2_attn_finetuned.pt"
  convert.write_state_dict(P.state_dict_numpy(ref), pt)

  c = _config("attn,runlocal")
  c.mode = "eval"
  c.init_checkpoint, c.init_checkpoint_task = str(pt), head
  c.evals.nlvr2.splits = ()
  wd = str(tmp_path / "eval")
  out = trainer.train_and_evaluate(c, wd)
  preds, _ = _csv(os.path.join(wd, "results", "nlvr2_val_step0.csv"))

  # The same examples through the reference and through the task's
  # outputs with the loaded checkpoint.
  task = tasks.make_task("nlvr2", head=head)
  data = input_lib.make_dataset(c, task, TINY_TEXT, "val", token_budget=512,
                                batch_multiple=1, seed=c.seed + 1)
  cfg = _tiny_model_cfg(vocab)
  model = um.build_model(head, cfg)
  params, report = convert.load_init_params(
      str(pt), head=head, model_cfg=cfg, src_head=head,
      target=jax.eval_shape(lambda: um.init_params(model,
                                                   jax.random.key(0))))
  assert not report.new and not report.unused
  logits_fn = jax.jit(lambda p, b: task.outputs(model, p, b)["logits"])
  got, want, ids = [], [], []
  for batch in data.exact_batches():
    keep = batch["example_mask"][::2]
    got.append(np.asarray(logits_fn(params, batch))[keep])
    with torch.no_grad():
      want.append(ref(R.static_to_packed(batch),
                      compute_loss=False).numpy()[keep])
    ids += [data.text.record_id(i) for i in batch["example_index"][::2][keep]]
  got, want = np.concatenate(got), np.concatenate(want)
  assert P.rel_err(got, want) <= TOL
  ref_pred = want.argmax(-1) == 1
  assert sorted(preds) == sorted(ids)
  clear = np.abs(want[:, 1] - want[:, 0]) > 1e-4
  assert clear.mean() > 0.9
  # Predictions agree wherever the reference's margin is not a near-tie.
  assert all(preds[i] == p for i, p, sure in zip(ids, ref_pred, clear)
             if sure)
  records = _split_records("val")
  scores = nlvr2_eval.accuracy_and_consistency(
      dict(zip(ids, ref_pred)), [(i, bool(t)) for i, t in records.items()])
  assert out["val/nlvr2_acc"] == pytest.approx(scores["acc"])
