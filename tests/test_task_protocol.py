"""The task protocol is real: a task written only here trains and evaluates.

The toy task puts a new head on the encoder (a regression of the number of
regions from the pooled output), brings its own batch field, data op, loss
and evaluator, and runs through the train loop `run.py` calls, with no edit
to `uniter_jax/train/`. Its evaluator visits every held-out example once
through the exact evaluation iterator, on 1 and on 4 devices.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import demo
from data_prep import prepare
from uniter_jax import evaluators
from uniter_jax import model as um
from uniter_jax import tasks
from uniter_jax.data import contract
from uniter_jax.model import encoder as enc
from uniter_jax.train import metrics as metrics_lib
from uniter_jax.train import trainer

DATA_DIR = "/tmp/uniter_jax_test_data"


class ToyCountHead(nn.Module):
  """The encoder and a 1-unit regression on the pooled output."""
  cfg: object

  def setup(self):
    self.uniter = enc.UniterModel(self.cfg)
    self.count_output = nn.Dense(1, name="count_output")

  def __call__(self, batch, *, deterministic: bool = True):
    out = dict(self.uniter(batch, deterministic=deterministic))
    out["count"] = self.count_output(out["pooled_output"])[:, 0]
    return out


def count_op(example, rng, ctx):
  del rng, ctx
  out = dict(example)
  out["toy_count"] = np.float32(len(example["img_feat"]) / 10.0)
  return out


class ToyCount(tasks.Task):
  name = "toy_count"
  heads = ("toy-count",)
  fields = (contract.Field("toy_count", np.float32, "row"),)
  new_params = ("count_output/*",)

  def data_ops(self):
    return {self.name: count_op}

  def loss(self, outputs, batch):
    err = outputs["count"] - batch["toy_count"]
    mse = jnp.mean(err * err)
    return mse, {"toy_mse": mse, "toy_abs_err": jnp.mean(jnp.abs(err))}


class ToyEvaluator(evaluators.Evaluator):
  """Mean absolute error over every held-out example, and a prediction
  file with one line per example."""
  type = "toy_exact"

  def run(self, params, step):
    ctx = self.ctx
    key = sorted(ctx.datasets)[0]
    data, task = ctx.datasets[key], ctx.task_of(key)
    fn = ctx.jit("toy_predict", lambda p, b: task.outputs(
        ctx.model, p, b)["count"])
    preds, errs, ids, padded = [], [], [], 0
    for batch in data.exact_batches():
      keep = np.asarray(batch["example_mask"])
      padded += int((~keep).sum())
      pred = np.asarray(jax.device_get(fn(params, ctx.put(batch))))
      ids += np.asarray(batch["example_index"])[keep].tolist()
      preds += pred[keep].tolist()
      errs += np.abs(pred - batch["toy_count"])[keep].tolist()
    path = os.path.join(ctx.workdir, f"toy_predictions_{step}.jsonl")
    with open(path, "w") as f:
      for i, p in zip(ids, preds):
        f.write(json.dumps({"id": int(i), "pred": p}) + "\n")
    yield "toy/abs_err", float(np.mean(errs))
    yield "toy/examples", float(len(ids))
    yield "toy/padded_rows", float(padded)


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
  monkeypatch.setitem(um.HEADS, "toy-count", um.HeadSpec(ToyCountHead))
  monkeypatch.setitem(tasks.TASKS, "toy_count", ToyCount)
  monkeypatch.setitem(evaluators.EVALUATORS, "toy_exact", ToyEvaluator)


def toy_config(steps=4, data=1):
  c = demo.get_config("runlocal")
  c.data.data_dir = DATA_DIR
  c.model.update(dict(hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64))
  c.model_task = "toy-count"
  c.datasets.synthetic.tasks = ("toy_count",)
  c.datasets.synthetic.mix_ratio = (1,)
  c.train.num_train_steps = steps
  c.train.token_budget = 256 // data   # per device: one global budget
  c.data.batch_multiple = 4     # the same batches on 1 and on 4 devices
  c.data.max_buckets = 2        # two shapes: each ends in a padded batch
  c.train.sum_grads = False
  c.mesh.data = data
  c.log_every_steps = 1
  c.checkpoint.every_steps = steps
  c.evals = ml_collections.ConfigDict(
      {"toy": {"type": "toy_exact", "every_steps": steps}})
  return c


def test_a_task_defined_in_a_test_trains_and_evaluates(tmp_path):
  c = toy_config()
  prepare.ensure_synthetic(c)
  wd = str(tmp_path / "run")
  out = trainer.train_and_evaluate(c, wd)
  rows = metrics_lib.read_metrics(wd)
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  assert all("train/toy_count/toy_mse" in r for r in train)
  # The evaluator ran at the last update, on every held-out example once.
  from uniter_jax.data import UniterData  # pylint: disable=g-import-not-at-top
  val = UniterData(DATA_DIR, c.datasets.synthetic.val_text, "val",
                   token_budget=256, batch_multiple=4)
  n = len(val.text)
  assert out["toy/examples"] == n
  assert out["toy/padded_rows"] > 0   # partial batches were padded, masked
  with open(os.path.join(wd, "toy_predictions_4.jsonl")) as f:
    ids = [json.loads(line)["id"] for line in f]
  assert sorted(ids) == list(range(n))
  # The export is labelled with the model's head.
  with open(os.path.join(wd, "export_flax", "uniter_config.json")) as f:
    assert json.load(f)["task"] == "toy-count"

  # Evaluating the checkpoint on 4 devices scores the same examples with
  # the same result.
  c4 = toy_config(data=4)
  c4.mode = "eval"
  out4 = trainer.train_and_evaluate(c4, wd)
  assert out4["toy/examples"] == n
  np.testing.assert_allclose(out4["toy/abs_err"], out["toy/abs_err"],
                             rtol=1e-5)
  with open(os.path.join(wd, "toy_predictions_4.jsonl")) as f:
    assert sorted(json.loads(line)["id"] for line in f) == list(range(n))


def test_a_task_refuses_another_head():
  c = toy_config()
  c.model_task = "pretrain"
  with pytest.raises(ValueError, match="toy_count.*toy-count.*'pretrain'"):
    trainer.train_and_evaluate(c, "/tmp/never-written")


def test_unknown_task_and_evaluator_types_are_errors(tmp_path):
  c = toy_config()
  c.datasets.synthetic.tasks = ("toy_cuont",)
  with pytest.raises(ValueError, match="toy_cuont.*registered tasks"):
    trainer.train_and_evaluate(c, str(tmp_path))
  c = toy_config()
  c.evals.toy.type = "toy_exaxt"
  prepare.ensure_synthetic(c)
  with pytest.raises(ValueError, match="toy_exaxt.*evaluator types"):
    trainer.train_and_evaluate(c, str(tmp_path))


def test_init_from_a_pretraining_workdir_is_strict(tmp_path, monkeypatch,
                                                   caplog):
  pre = toy_config(steps=2)
  pre.model_task = "pretrain"
  pre.datasets.synthetic.tasks = ("mlm",)
  pre.evals = ml_collections.ConfigDict()
  prepare.ensure_synthetic(pre)
  trainer.train_and_evaluate(pre, str(tmp_path / "pre"))

  c = toy_config(steps=0)   # nothing to train: the export is the init
  c.evals = ml_collections.ConfigDict()
  c.init_checkpoint = str(tmp_path / "pre")   # a training workdir
  with caplog.at_level("INFO"):
    trainer.train_and_evaluate(c, str(tmp_path / "toy"))
  assert "count_output" in caplog.text and "new" in caplog.text
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from uniter_jax import convert  # pylint: disable=g-import-not-at-top
  src, _ = convert.load_flax(str(tmp_path / "pre" / "export_flax"))
  got, meta = convert.load_flax(str(tmp_path / "toy" / "export_flax"))
  assert meta["task"] == "toy-count"
  src, got = traverse_util.flatten_dict(src), traverse_util.flatten_dict(got)
  enc_keys = [k for k in got if k[0] == "uniter"]
  assert enc_keys
  for k in enc_keys:
    np.testing.assert_array_equal(got[k], src[k], err_msg="/".join(k))

  # A head the task does not declare new is refused, by name.
  monkeypatch.setattr(ToyCount, "new_params", ())
  with pytest.raises(ValueError, match="count_output"):
    trainer.train_and_evaluate(c, str(tmp_path / "toy2"))
