"""Evaluators, chosen by `type` in `config.evals` (see `base`).

Types: `task_metrics` (every task's metrics on held-out batches),
`zero_shot_retrieval` (R@K from the ITM match logit), `loss_curves` and
`wra_plan` (plots). Register another with `@register_evaluator`.
"""
from uniter_jax.evaluators import base
from uniter_jax.evaluators import plots
from uniter_jax.evaluators import retrieval
from uniter_jax.evaluators import task_metrics
from uniter_jax.evaluators.base import EVALUATORS
from uniter_jax.evaluators.base import EvalContext
from uniter_jax.evaluators.base import Evaluator
from uniter_jax.evaluators.base import register_evaluator

__all__ = ["EVALUATORS", "EvalContext", "Evaluator", "base", "plots",
           "register_evaluator", "retrieval", "task_metrics"]
