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

Logs: the run's own lines at INFO (one at the start names the config, the
devices and mesh, the data, and whether the run starts fresh or resumes);
the libraries' (orbax, absl, tensorflow_datasets, jax) from WARNING, or
from `--log_level=info` / `debug` when asked.

Before training, a config that names a synthetic preset
(`config.data.synthetic`) gets that corpus built into `config.data.data_dir`
here, by data_prep: the uniter_jax library only reads datasets.
"""

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
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "warning", ["debug", "info", "warning", "error"],
    "Lowest level of the libraries' log lines shown (orbax, absl, "
    "tensorflow_datasets, jax); the run's own lines show from info (or from "
    "debug with --log_level=debug).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  # pylint: disable=g-import-not-at-top
  from uniter_jax import supervisor
  if (config.distributed.enabled and config.distributed.supervise
      and supervisor.available()):
    # This process stays small and JAX-free; the run is its child, and a
    # dead peer ends in one line instead of JAX's native abort.
    return supervisor.run([sys.executable, *sys.orig_argv[1:]],
                          os.path.abspath(os.path.expanduser(_WORKDIR.value)))
  from data_prep import prepare
  from uniter_jax import train
  # pylint: enable=g-import-not-at-top
  train.trainer.set_log_levels(_LOG_LEVEL.value)
  # Every process of a multi-process run calls this; the build lock makes
  # one of them build and the others accept its build.
  prepare.ensure_synthetic(config)
  try:
    result = train.train_and_evaluate(
        config, _WORKDIR.value,
        config_name=flags.FLAGS["config"].config_filename)
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
