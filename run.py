"""The single entrypoint of uniter-jax.

  python run.py --config configs/demo.py --workdir /tmp/uniter-demo
  python run.py --config configs/pretrain_indomain_base.py:runlocal \
      --workdir /tmp/smoke --config.train.num_train_steps=20

`--config` names a config file with a `get_config(arg)` function and an
optional `:arg` variant; any field can be overridden with
`--config.<field>=<value>`, and a field that does not exist is an error.
`config.mode` chooses what runs: "train" (resumes by itself from a
checkpoint in the workdir) or "eval" (evaluates the workdir's latest
checkpoint). Unknown variants are an error that lists the file's known ones
(docs/training.md).

Before training, a config that names a synthetic preset
(`config.data.synthetic`) gets that corpus built into `config.data.data_dir`
here, by data_prep: the uniter_jax library only reads datasets.
"""

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (get_config), optionally with ':variant'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for config, metrics, checkpoints "
                               "and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # pylint: disable=g-import-not-at-top
  from data_prep import prepare
  from uniter_jax import train
  # pylint: enable=g-import-not-at-top
  config = _CONFIG.value
  # Every process of a multi-process run calls this; the build lock makes
  # one of them build and the others accept its build.
  prepare.ensure_synthetic(config)
  try:
    result = train.train_and_evaluate(config, _WORKDIR.value)
  except train.PeerLostError as e:
    # Exit now: JAX's shutdown at interpreter exit would wait for the dead
    # peer at a barrier and then abort with a native stack dump.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
  except KeyboardInterrupt:
    print("interrupted: stopped without saving (the last checkpoint in the "
          "workdir is kept; rerun the same command to resume)",
          file=sys.stderr)
    sys.exit(130)
  except train.RUN_ERRORS as e:
    # Conditions a person acts on (workdir in use, disk full, a run that
    # diverged): one line, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if result:
    print("final evaluation:")
    for k in sorted(result):
      print(f"  {k}: {result[k]:.4f}")


if __name__ == "__main__":
  sys.exit(app.run(main))
