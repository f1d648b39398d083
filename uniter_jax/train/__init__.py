"""The train loop, train state and steps, optimizer, sharding, checkpoints,
metrics and plots."""

from uniter_jax.train.step import eval_step, train_step, TrainState
from uniter_jax.train.trainer import NonFiniteError
from uniter_jax.train.trainer import train_and_evaluate

__all__ = ["NonFiniteError", "TrainState", "eval_step", "train_and_evaluate",
           "train_step"]
