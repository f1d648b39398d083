"""Data a run needs before it starts: today, the embedded synthetic corpus.

`run.py` (and the notebook) call `ensure_synthetic(config)` before training,
so the `uniter_jax` library only ever reads datasets and never imports
data_prep (which needs TFDS builders the library has no business with).
Real datasets are built once by hand with `python -m data_prep ...`; the
synthetic corpus is cheap, so a config can ask for it with
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

LOCK_FILE = ".synthetic_build.lock"


def ensure_synthetic(config) -> None:
  """Builds preset `config.data.synthetic` into `config.data.data_dir`.

  A no-op when `config.data.synthetic` is "" (every real-data config).
  A build already there is accepted when it was made from the same preset
  settings and refused (ValueError) when the preset changed since, so a
  run never trains silently on other data than its config names.

  Args:
    config: a run config (`configs/common.py`); reads `data.synthetic` and
      `data.data_dir`.
  """
  preset = config.data.synthetic
  if not preset:
    return
  cfg = synthetic.PRESETS.get(preset)
  if cfg is None:
    raise ValueError(f"config.data.synthetic={preset!r}; expected '' or one "
                     f"of {sorted(synthetic.PRESETS)}")
  d = os.path.abspath(os.path.expanduser(config.data.data_dir))
  # Two runs started together on one data_dir (a sweep, two terminals, the
  # processes of one multi-process run) would both build and the second
  # would fail on TFDS's final rename; the lock makes the others wait and
  # then find the first one's build.
  os.makedirs(d, exist_ok=True)
  with _file_lock(os.path.join(d, LOCK_FILE)):
    _build_or_check(cfg, d)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  """An exclusive advisory lock on `path`, held for the `with` body."""
  with open(path, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build_or_check(cfg: synthetic.SyntheticConfig, d: str) -> None:
  """Builds preset `cfg` into `d`, or checks that the build there is it."""
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
    # silently train on other data; refuse it instead. The builder's own
    # metadata (read back from the build) records the settings it used.
    have = dict(builder.info.metadata.get("config") or {})
    # Fields added after a build was written hold their default there.
    have = {**synthetic.config_dict(synthetic.SyntheticConfig(name=preset)),
            **have}
    if have != want:
      raise ValueError(
          f"{builder.data_dir} holds synthetic preset {preset!r} built with "
          f"{have}, but the preset is now {want}; delete that directory (it "
          f"is rebuilt on the next run) or set config.data.data_dir to "
          f"another place")
