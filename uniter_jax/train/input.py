"""Training inputs: one data iterator per (task, dataset), and the task mix.

What each (task, dataset) pair loads is the task's business: its data ops,
batch ops, batch fields, rows per example and whether it needs soft labels
(`uniter_jax.tasks.Task`); this module only wires them to the pipeline.

The official MetaLoader repeats each `"{task}_{dataset}"` key `mix_ratio`
times in a pool and draws one key per optimizer update; here the draw for
update `u` is a pure function of `(seed, u)`, so a resumed run draws the
same sequence.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from uniter_jax import data as data_lib
from uniter_jax import tasks as tasks_lib


def data_dir(config) -> str:
  return os.path.abspath(os.path.expanduser(config.data.data_dir))


def task_keys(config) -> list[tuple[str, str, str]]:
  """[(key, task, dataset name)] with the key "{task}_{dataset}"."""
  out = []
  for name in sorted(config.datasets.keys()):
    ds = config.datasets[name]
    if len(ds.tasks) != len(ds.mix_ratio):
      raise ValueError(f"config.datasets.{name}: {len(ds.tasks)} tasks but "
                       f"{len(ds.mix_ratio)} mix ratios")
    for task in ds.tasks:
      if task not in tasks_lib.TASKS:
        raise ValueError(f"config.datasets.{name}.tasks: unknown task "
                         f"{task!r}; registered tasks: "
                         f"{sorted(tasks_lib.TASKS)}")
      key = f"{task}_{name}"
      if any(k == key for k, _, _ in out):
        raise ValueError(f"config.datasets: the data key {key!r} is made "
                         "twice (task and dataset names that end and start "
                         "with '_'); rename one")
      out.append((key, task, name))
  if not out:
    raise ValueError("config.datasets is empty: no task to train")
  return out


def make_run_tasks(config) -> dict[str, tasks_lib.Task]:
  """The tasks named in `config.datasets`, with options from the config,
  each checked to train the config's model head."""
  names = sorted({task for _, task, _ in task_keys(config)})
  out = tasks_lib.make_tasks(names, config)
  for t in out.values():
    t.check_head(config.model_task)
  return out


def task_pool(config, sizes: Mapping[str, int] | None = None) -> list[str]:
  """Each "{task}_{dataset}" key repeated by its mix ratio.

  A ratio of -1 means "in proportion to the dataset's size" (the official
  finetuning scripts concatenate their training dbs, e.g. VQA's train,
  trainval and VG, so each contributes by its example count): every key's
  weight is then its training example count from `sizes`, reduced by their
  greatest common divisor. A config uses -1 for all its keys or for none.
  """
  entries = []
  for name in sorted(config.datasets.keys()):
    ds = config.datasets[name]
    for task, ratio in zip(ds.tasks, ds.mix_ratio):
      entries.append((f"{task}_{name}", int(ratio)))
  by_size = [k for k, r in entries if r == -1]
  if by_size and len(by_size) != len(entries):
    raise ValueError(f"config.datasets: mix_ratio -1 (by size) for "
                     f"{by_size} but not for the others; use -1 for all or "
                     "none")
  bad = [k for k, r in entries if r < 1 and r != -1]
  if bad:
    raise ValueError(f"config.datasets: mix ratios of {bad} must be >= 1 "
                     "(or -1: by dataset size)")
  if by_size:
    if sizes is None or any(k not in sizes for k in by_size):
      raise ValueError("mix_ratio -1 needs the training datasets' sizes")
    g = int(np.gcd.reduce([int(sizes[k]) for k in by_size]))
    entries = [(k, int(sizes[k]) // max(g, 1)) for k, _ in entries]
  pool = []
  for key, ratio in entries:
    pool += [key] * ratio
  return pool


def task_for_update(pool: list[str], seed: int, update: int) -> str:
  """The (task, dataset) key of optimizer update `update` (0-based)."""
  rng = np.random.default_rng([int(seed), 7919, int(update)])
  return pool[int(rng.integers(len(pool)))]


def region_rule(config) -> data_lib.RegionRule:
  """The official num_bb rule of `config.data`."""
  d = config.data
  return data_lib.RegionRule(conf_th=d.conf_th, min_bb=d.min_bb,
                             max_bb=d.max_bb,
                             num_bb=d.num_bb if d.num_bb > 0 else None)


def num_workers(config) -> int:
  """`data.num_workers` with -1 (the default) resolved from the host's
  cores (`data.auto_num_workers`)."""
  n = int(config.data.get("num_workers", -1))
  return data_lib.auto_num_workers() if n < 0 else n


def img_feat_dtype(config) -> str:
  """`data.img_feat_dtype`, with "auto" (the default) resolved: the stored
  float16 when the model computes in bfloat16 or float16 (the device
  widens it; half the host memory and host-to-device bytes), else float32.
  """
  d = config.data.get("img_feat_dtype", "auto")
  if d == "auto":
    low = str(config.model.get("dtype", "float32")) in ("bfloat16", "float16")
    return "float16" if low else "float32"
  if d not in ("float32", "float16"):
    raise ValueError(f"data.img_feat_dtype must be 'auto', 'float32' or "
                     f"'float16', got {d!r}")
  return d


def loading(config) -> data_lib.Loading:
  """Threads, prefetch and input worker processes of `config.data`."""
  return data_lib.Loading(num_threads=config.data.num_threads,
                          prefetch=config.data.prefetch,
                          num_workers=num_workers(config))


def make_dataset(config, task: tasks_lib.Task, text: str, split: str, *,
                 token_budget: int, batch_multiple: int, seed: int,
                 buckets=None, held_out: bool = False) -> data_lib.UniterData:
  """The `UniterData` of one text split read for `task` (its ops, batch
  ops, fields, rows per example and soft labels) under the config's data
  settings; `buckets` fixes the shapes (else chosen from the split).

  Training data drop texts longer than `data.max_txt_len`; held-out data
  (`held_out`) keep them up to `data.eval_max_txt_len` (-1: all), as the
  official evaluation reads its dbs with no limit. Batches hold whole
  examples on every device: for examples of several rows (NLVR2 pairs) the
  row multiple is `batch_multiple * rows_per_example`, so per-example
  outputs (one label per pair) shard evenly too.
  """
  max_txt_len = (config.data.get("eval_max_txt_len", -1) if held_out
                 else config.data.max_txt_len)
  kwargs = dict(
      token_budget=token_budget,
      batch_multiple=batch_multiple * int(task.rows_per_example),
      max_buckets=config.data.max_buckets,
      target_padding=config.data.target_padding,
      max_txt_len=max_txt_len, region_rule=region_rule(config),
      with_soft_labels=task.with_soft_labels,
      ops=dict(task.data_ops()), op_params=task.op_params(),
      batch_ops=task.batch_ops(), fields=task.batch_fields(),
      rows_per_example=task.rows_per_example,
      row_regions=task.row_regions, seed=seed,
      img_feat_dtype=img_feat_dtype(config), loading=loading(config))
  if buckets is not None:
    kwargs["buckets"] = buckets
  return data_lib.UniterData(data_dir(config), text, split, **kwargs)


def make_datasets(config, tasks: dict[str, tasks_lib.Task], *,
                  split_field: str, text_field: str,
                  token_budget: int, batch_multiple: int,
                  seed: int, held_out: bool = False
                  ) -> dict[str, data_lib.UniterData]:
  """UniterData per "{task}_{dataset}" key; tasks of one dataset share
  their bucket shapes (fewer compiled programs). `held_out`: see
  `make_dataset`."""
  out: dict[str, data_lib.UniterData] = {}
  shapes: dict[str, Any] = {}
  for key, task_name, name in task_keys(config):
    ds = config.datasets[name]
    split = ds[split_field]
    if not split:
      continue
    out[key] = make_dataset(config, tasks[task_name], ds[text_field], split,
                            token_budget=token_budget,
                            batch_multiple=batch_multiple, seed=seed,
                            buckets=shapes.get(name), held_out=held_out)
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
