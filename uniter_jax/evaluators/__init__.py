"""Evaluators, chosen by `type` in `config.evals` (see `base`).

Types: `task_metrics` (every task's metrics on held-out batches),
`zero_shot_retrieval` (R@K from the ITM match logit on a subset),
`retrieval` (every text x every image, IR/TR R@1/5/10 as the official
`itm_eval`), `vqa_predictions` and `ve_predictions` (VQA score / SNLI-VE
accuracy and the prediction files), `nlvr2` (accuracy, consistency, the
results CSV), `loss_curves` and `wra_plan` (plots). `predict` runs a model
over every held-out example exactly once (the finetuning evaluators use
it). Register another with `@register_evaluator`.
"""
from uniter_jax.evaluators import base
from uniter_jax.evaluators import nlvr2
from uniter_jax.evaluators import predict
from uniter_jax.evaluators import plots
from uniter_jax.evaluators import retrieval
from uniter_jax.evaluators import task_metrics
from uniter_jax.evaluators import vqa
from uniter_jax.evaluators.base import EVALUATORS
from uniter_jax.evaluators.base import EvalContext
from uniter_jax.evaluators.base import Evaluator
from uniter_jax.evaluators.base import register_evaluator

__all__ = ["EVALUATORS", "EvalContext", "Evaluator", "base", "nlvr2",
           "plots", "predict", "register_evaluator", "retrieval",
           "task_metrics", "vqa"]
