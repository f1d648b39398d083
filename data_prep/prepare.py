"""Data a run needs before it starts: the embedded synthetic corpus.

`run.py` (and the notebook) call `ensure_synthetic(config)` before training,
so the `uniter_jax` library only ever reads datasets and never imports
data_prep (which needs TFDS builders the library has no business with).
Real datasets are built once by hand with `python -m data_prep ...`; the
synthetic corpus (images, captions, and the synthetic finetuning tasks a
config names) is cheap, so a config can ask for it with
`config.data.synthetic` and the first run builds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Iterator

from data_prep import common
from data_prep import synthetic
from data_prep import synthetic_tasks

LOCK_FILE = ".synthetic_build.lock"


def ensure_synthetic(config) -> None:
  """Builds preset `config.data.synthetic` into `config.data.data_dir`.

  A no-op when `config.data.synthetic` is "" (every real-data config).
  Builds the preset's images and captions, plus every synthetic task
  dataset (`uniter_synthetic_vqa/<preset>`, `_ve/`, `_nlvr2/`) that a
  `config.datasets.*.text` or `val_text` names (with that name's preset;
  its images and captions too). A build already there is accepted when it
  was made from the same preset settings (and, for a task, the same
  generator version) and refused (ValueError) otherwise, so a run never
  trains silently on other data than its config names.

  Args:
    config: a run config (`configs/common.py`); reads `data.synthetic`,
      `data.data_dir` and the `text`/`val_text` of `datasets`.
  """
  preset = config.data.synthetic
  if not preset:
    return
  if preset not in synthetic.PRESETS:
    raise ValueError(f"config.data.synthetic={preset!r}; expected '' or one "
                     f"of {sorted(synthetic.PRESETS)}")
  wanted = {preset: set()}
  for name in _dataset_names(config):
    got = parse_synthetic_name(name)
    if got is not None:
      task, p = got
      wanted.setdefault(p, set())
      if task in synthetic_tasks.TASKS:
        wanted[p].add(task)
  for p in wanted:
    if p not in synthetic.PRESETS:
      raise ValueError(f"a config.datasets text names synthetic preset "
                       f"{p!r}; expected one of {sorted(synthetic.PRESETS)}")
  d = os.path.abspath(os.path.expanduser(config.data.data_dir))
  # Two runs started together on one data_dir (a sweep, two terminals, the
  # processes of one multi-process run) would both build and the second
  # would fail on TFDS's final rename; the lock makes the others wait and
  # then find the first one's build.
  os.makedirs(d, exist_ok=True)
  with _file_lock(os.path.join(d, LOCK_FILE)):
    for p, tasks in wanted.items():
      _build_or_check(synthetic.PRESETS[p], d, sorted(tasks))


def parse_synthetic_name(name: str) -> tuple[str, str] | None:
  """(task, preset) of a synthetic dataset name, or None for other data.

  "uniter_synthetic_vqa/tiny:1.0.0" -> ("vqa", "tiny"); the captions
  ("uniter_synthetic_text/...") give task "captions".
  """
  builder, _, rest = str(name).partition("/")
  prefix = "uniter_synthetic_"
  if not builder.startswith(prefix) or not rest:
    return None
  task = builder[len(prefix):]
  if task == "text":
    task = "captions"
  elif task not in synthetic_tasks.TASKS:
    return None
  return task, rest.partition(":")[0]


def _dataset_names(config) -> list[str]:
  names = []
  for ds in (config.get("datasets") or {}).values():
    for field in ("text", "val_text"):
      value = ds.get(field) if hasattr(ds, "get") else None
      if value:
        names.append(str(value))
  return names


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  """An exclusive advisory lock on `path`, held for the `with` body."""
  with open(path, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build_or_check(cfg: synthetic.SyntheticConfig, d: str,
                    tasks: list[str] = ()) -> None:
  """Builds preset `cfg` (images, captions, `tasks`) into `d`, or checks
  that the builds there are of it."""
  preset = cfg.name
  want = synthetic.config_dict(cfg)
  classes = [synthetic.UniterSyntheticImages, synthetic.UniterSyntheticText]
  classes += [synthetic_tasks.BUILDERS[t] for t in tasks]
  for cls in classes:
    builder = cls(config=cfg, data_dir=d)
    if not os.path.exists(os.path.join(builder.data_dir,
                                       "dataset_info.json")):
      logging.info("building %s into %s", cls.__name__, d)
      common.build(builder)
      continue
    # A corpus built by an older release under the same preset name would
    # silently train on other data; refuse it instead. The builder's own
    # metadata (read back from the build) records the settings it used.
    md = builder.info.metadata
    have = dict(md.get("config") or {})
    # Fields added after a build was written hold their default there.
    have = {**synthetic.config_dict(synthetic.SyntheticConfig(name=preset)),
            **have}
    if have != want:
      raise ValueError(
          f"{builder.data_dir} holds synthetic preset {preset!r} built with "
          f"{have}, but the preset is now {want}; delete that directory (it "
          f"is rebuilt on the next run) or set config.data.data_dir to "
          f"another place")
    if cls in synthetic_tasks.BUILDERS.values():
      version = md.get("task_version")
      if version != synthetic_tasks.TASK_VERSION:
        raise ValueError(
            f"{builder.data_dir} holds synthetic task data of generator "
            f"version {version}, but this release generates version "
            f"{synthetic_tasks.TASK_VERSION}; delete that directory (it is "
            f"rebuilt on the next run) or set config.data.data_dir to "
            f"another place")
