"""The train loop, train state and steps, optimizer, sharding, checkpoints,
metrics and plots."""

from uniter_jax.data.pipeline import WorkerError
from uniter_jax.train.checkpoint import CheckpointRestoreError
from uniter_jax.train.checkpoint import CheckpointWriteError
from uniter_jax.train.step import eval_step, train_step, TrainState
from uniter_jax.train.trainer import NonFiniteError
from uniter_jax.train.trainer import PeerLostError
from uniter_jax.train.trainer import train_and_evaluate
from uniter_jax.train.workdir import WorkdirBusyError

# Errors of a run that a person acts on (run.py prints them in one line).
# A dead input worker process is reported in one line too (it names the
# worker, its pid and the signal).
RUN_ERRORS = (NonFiniteError, WorkdirBusyError, CheckpointWriteError,
              CheckpointRestoreError, WorkerError)

__all__ = ["CheckpointRestoreError", "CheckpointWriteError", "NonFiniteError",
           "PeerLostError",
           "RUN_ERRORS", "TrainState", "WorkdirBusyError", "eval_step",
           "train_and_evaluate", "train_step"]
