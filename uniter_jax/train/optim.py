"""Optimizer of the official pretraining: AdamW, warmup-linear, clipping.

- AdamW with eps 1e-6, the config's betas and decoupled weight decay; the
  official no-decay set is name based (`bias`, `LayerNorm.bias`,
  `LayerNorm.weight` in the PyTorch parameter name), so it is decided on the
  official names here too: `img_layer_norm.weight` and the LayerNorms inside
  `nn.Sequential` heads ARE decayed, as in the official runs.
- `optim/sched.py: warmup_linear` with the step counter starting at 1.
- Global-norm clipping before the Adam moments (`grad_norm` <= 0: off).
- Gradient accumulation by optax.MultiSteps, summing (official) or
  averaging the micro-batch gradients.
- A learning-rate multiplier on some parameters (`train.lr_mul` on the
  globs `train.lr_mul_params`): the official VQA optimizer puts the
  `vqa_output` parameters in groups whose learning rate is `lr * lr_mul`.
  Its AdamW applies weight decay as `lr * wd * p`, so the multiplier scales
  the whole AdamW update (decay included), which is what scaling the
  updates of those parameters after `optax.adamw` does.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from uniter_jax.convert import names

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def warmup_linear(learning_rate: float, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
  """`lr * step / warmup` then linear decay to 0 at `total_steps`.

  optax passes the number of updates already applied (0 for the first);
  the official counter starts at 1, hence `count + 1`. Values <= 0 are
  clamped to 1e-8 as the official code does.
  """
  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    warm = learning_rate * step / max(warmup_steps, 1)
    decay = learning_rate * jnp.maximum(
        0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))
    lr = jnp.where(step < warmup_steps, warm, decay)
    return jnp.where(lr <= 0, 1e-8, lr)
  return schedule


def torch_name(path: tuple[str, ...]) -> str:
  """The official name of a Flax param (scanned layers map to layer 0)."""
  path = tuple(path)
  if names.is_scanned_layer(path):
    path = names.unscanned_paths(path, 1)[0]
  return names.flax_to_torch(path)[0]


def decay_mask(params) -> Any:
  """True where the official optimizer applies weight decay."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({
      p: not any(nd in torch_name(p) for nd in NO_DECAY) for p in flat})


def lr_multipliers(params, lr_mul: float, patterns) -> Any:
  """Per-parameter learning-rate multipliers: `lr_mul` where the
  '/'-joined Flax path matches one of `patterns` (fnmatch globs, e.g.
  "vqa_output/*"), 1.0 elsewhere. A pattern that matches nothing is an
  error (a misspelt head name would silently train at the base rate)."""
  flat = traverse_util.flatten_dict(params)
  paths = {p: "/".join(str(k) for k in p) for p in flat}
  unused = [g for g in patterns
            if not any(fnmatch.fnmatchcase(s, g) for s in paths.values())]
  if unused:
    raise ValueError(f"config.train.lr_mul_params: {unused} match no "
                     "parameter of the model (paths look like "
                     f"{sorted(paths.values())[-1]!r})")
  return traverse_util.unflatten_dict({
      p: float(lr_mul) if any(fnmatch.fnmatchcase(s, g) for g in patterns)
      else 1.0 for p, s in paths.items()})


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by the matching leaf of `multipliers`."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(
        lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype),
        updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(train_cfg, params) -> optax.GradientTransformation:
  """The optimizer of `train_cfg` (a `config.train` ConfigDict)."""
  sched = warmup_linear(train_cfg.learning_rate, train_cfg.warmup_steps,
                        train_cfg.num_train_steps)
  b1, b2 = train_cfg.betas
  parts = []
  if train_cfg.grad_norm > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_norm))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=train_cfg.adam_eps,
                           weight_decay=train_cfg.weight_decay,
                           mask=decay_mask(params)))
  lr_mul = float(train_cfg.get("lr_mul", 1.0))
  patterns = tuple(train_cfg.get("lr_mul_params", ()) or ())
  if lr_mul != 1.0 and patterns:
    parts.append(scale_by_tree(lr_multipliers(params, lr_mul, patterns)))
  tx = optax.chain(*parts)
  k = int(train_cfg.gradient_accumulation_steps)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k,
                          use_grad_mean=not train_cfg.sum_grads)
  return tx


def learning_rate_at(train_cfg, update: jax.Array) -> jax.Array:
  return warmup_linear(train_cfg.learning_rate, train_cfg.warmup_steps,
                       train_cfg.num_train_steps)(update)
