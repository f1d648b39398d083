"""Pretraining loop, optimizer, sharding, checkpoints, metrics, evaluators."""

from uniter_jax.train.trainer import NonFiniteError, TrainState
from uniter_jax.train.trainer import train_and_evaluate

__all__ = ["NonFiniteError", "TrainState", "train_and_evaluate"]
