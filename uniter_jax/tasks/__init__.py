"""Pretraining objectives: per-example masking ops and losses.

``masking`` holds the numpy ops run in the input pipeline (``TASK_OPS``);
``losses`` the jnp losses on the model outputs (``pretrain_loss``). The WRA
optimal-transport solvers live in ``uniter_jax.ot``.
"""
from uniter_jax.tasks.losses import add_masked_positions
from uniter_jax.tasks.losses import masked_positions
from uniter_jax.tasks.losses import max_masked_count
from uniter_jax.tasks.losses import pretrain_loss
from uniter_jax.tasks.masking import itm_op
from uniter_jax.tasks.masking import mlm_op
from uniter_jax.tasks.masking import mrm_op
from uniter_jax.tasks.masking import TASK_OPS

__all__ = [
    "TASK_OPS", "add_masked_positions", "itm_op", "masked_positions",
    "max_masked_count", "mlm_op", "mrm_op", "pretrain_loss",
]
