"""Training inputs: one data iterator per (task, dataset), and the task mix.

The official MetaLoader repeats each `"{task}_{dataset}"` key `mix_ratio`
times in a pool and draws one key per optimizer update; here the draw for
update `u` is a pure function of `(seed, u)`, so a resumed run draws the
same sequence.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Any

import numpy as np

from uniter_jax import data as data_lib
from uniter_jax.tasks import losses
from uniter_jax.tasks import masking


def data_dir(config) -> str:
  return os.path.abspath(os.path.expanduser(config.data.data_dir))


def maybe_build_synthetic(config) -> None:
  """Builds the synthetic corpus into data_dir when the config asks for it."""
  preset = config.data.synthetic
  if not preset:
    return
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  cfg = synthetic.PRESETS.get(preset)
  if cfg is None:
    raise ValueError(f"config.data.synthetic={preset!r}; expected '' or one "
                     f"of {sorted(synthetic.PRESETS)}")
  d = data_dir(config)
  # Two runs started together on one data_dir (a sweep, two terminals) would
  # both build and the second would fail on TFDS's final rename; the lock
  # makes the second wait and then find the first one's build.
  os.makedirs(d, exist_ok=True)
  with _file_lock(os.path.join(d, ".synthetic_build.lock")):
    _build_or_check(cfg, d)


@contextlib.contextmanager
def _file_lock(path: str):
  with open(path, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build_or_check(cfg, d: str) -> None:
  """Builds preset `cfg` into `d`, or checks that the build there is it."""
  # pylint: disable=g-import-not-at-top
  from data_prep import common
  from data_prep import schema
  from data_prep import synthetic
  # pylint: enable=g-import-not-at-top
  preset = cfg.name
  want = synthetic.config_dict(cfg)
  for cls in (synthetic.UniterSyntheticImages, synthetic.UniterSyntheticText):
    builder = cls(config=cfg, data_dir=d)
    if not os.path.exists(os.path.join(builder.data_dir,
                                       "dataset_info.json")):
      logging.info("building %s into %s", cls.__name__, d)
      common.build(builder)
      continue
    # A corpus built by an older release under the same preset name would
    # silently train on other data; refuse it instead.
    have = schema.read_meta(builder.data_dir).get("config") or {}
    # Fields added after a build was written hold their default there.
    have = {**synthetic.config_dict(synthetic.SyntheticConfig(name=preset)),
            **have}
    if have != want:
      raise ValueError(
          f"{builder.data_dir} holds synthetic preset {preset!r} built with "
          f"{have}, but the preset is now {want}; delete that directory (it "
          f"is rebuilt on the next run) or set config.data.data_dir to "
          f"another place")


def task_keys(config) -> list[tuple[str, str, str]]:
  """[(key, task, dataset name)] with the key "{task}_{dataset}"."""
  out = []
  for name in sorted(config.datasets.keys()):
    ds = config.datasets[name]
    if len(ds.tasks) != len(ds.mix_ratio):
      raise ValueError(f"config.datasets.{name}: {len(ds.tasks)} tasks but "
                       f"{len(ds.mix_ratio)} mix ratios")
    for task in ds.tasks:
      if task not in masking.TASK_OPS:
        raise ValueError(f"config.datasets.{name}.tasks: unknown task "
                         f"{task!r}; expected one of {sorted(masking.TASK_OPS)}")
      out.append((f"{task}_{name}", task, name))
  if not out:
    raise ValueError("config.datasets is empty: no pretraining task")
  return out


def task_pool(config) -> list[str]:
  pool = []
  for name in sorted(config.datasets.keys()):
    ds = config.datasets[name]
    for task, ratio in zip(ds.tasks, ds.mix_ratio):
      pool += [f"{task}_{name}"] * int(ratio)
  return pool


def task_for_update(pool: list[str], seed: int, update: int) -> str:
  """The (task, dataset) key of optimizer update `update` (0-based)."""
  rng = np.random.default_rng([int(seed), 7919, int(update)])
  return pool[int(rng.integers(len(pool)))]


def _region_rule(config) -> data_lib.RegionRule:
  d = config.data
  return data_lib.RegionRule(conf_th=d.conf_th, min_bb=d.min_bb,
                             max_bb=d.max_bb,
                             num_bb=d.num_bb if d.num_bb > 0 else None)


def op_params(config) -> dict[str, float]:
  t = config.train
  return {"mlm_prob": t.mlm_prob, "mrm_prob": t.mrm_prob,
          "itm_neg_prob": t.itm_neg_prob}


def make_datasets(config, *, split_field: str, text_field: str,
                  token_budget: int, batch_multiple: int,
                  seed: int) -> dict[str, data_lib.UniterData]:
  """UniterData per "{task}_{dataset}" key; tasks of one dataset share
  their bucket shapes (fewer compiled programs)."""
  out: dict[str, data_lib.UniterData] = {}
  shapes: dict[str, Any] = {}
  for key, task, name in task_keys(config):
    ds = config.datasets[name]
    split = ds[split_field]
    if not split:
      continue
    kwargs = dict(
        token_budget=token_budget, batch_multiple=batch_multiple,
        max_buckets=config.data.max_buckets,
        target_padding=config.data.target_padding,
        max_txt_len=config.data.max_txt_len, region_rule=_region_rule(config),
        with_soft_labels=task in ("mrc", "mrckl"),
        ops={task: masking.TASK_OPS[task]}, op_params=op_params(config),
        seed=seed)
    if name in shapes:
      kwargs["buckets"] = shapes[name]
    out[key] = data_lib.UniterData(data_dir(config), ds[text_field], split,
                                   **kwargs)
    shapes.setdefault(name, [(b.max_txt, b.max_img)
                             for b in out[key].buckets])
  return out


def vocab_info(datasets: dict[str, data_lib.UniterData]) -> dict[str, Any]:
  """Special ids / vocab size of the text data (checked to agree)."""
  metas = {k: d.text.meta for k, d in datasets.items()}
  sizes = {int(m["vocab_size"]) for m in metas.values()}
  if len(sizes) != 1:
    raise ValueError(f"datasets disagree on vocab_size: "
                     f"{ {k: m['vocab_size'] for k, m in metas.items()} }")
  return next(iter(metas.values()))


def with_positions(batch: dict[str, np.ndarray], task: str,
                   mlm_prob: float, mrm_prob: float) -> dict[str, np.ndarray]:
  """Adds the fixed-size masked-position arrays the losses gather with."""
  if task == "mlm":
    lt = batch["input_ids"].shape[1]
    return losses.add_masked_positions(
        batch, task, losses.max_masked_count(max(lt - 2, 1), mlm_prob))
  if task in ("mrfr", "mrc", "mrckl"):
    li = batch["img_feat"].shape[1]
    return losses.add_masked_positions(
        batch, task, losses.max_masked_count(li, mrm_prob))
  return batch
