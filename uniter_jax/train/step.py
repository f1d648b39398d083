"""The train state and the pure step functions every caller uses.

`train_step(state, batch, *, model, task)` and `eval_step(params, batch, *,
model, task)` are what `run.py`'s loop, the benchmarks and the tests jit:
the model returns outputs, the task turns them into a loss and metrics.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # micro-steps done (optimizer updates x accumulation)
  params: Any
  opt_state: Any
  rng: jax.Array         # raw key data (uint32), for checkpointing
  bad_step: jax.Array    # first micro-step with a non-finite loss/grad, or -1
  # The optax transformation (not a pytree leaf, not checkpointed).
  tx: Any = flax.struct.field(pytree_node=False, default=None)


def create_state(params, tx: optax.GradientTransformation,
                 rng: jax.Array) -> TrainState:
  """A fresh state at micro-step 0 (`rng`: a typed PRNG key)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=jax.random.key_data(rng),
                    bad_step=jnp.full((), -1, jnp.int32), tx=tx)


def _l2(tree) -> jax.Array:
  return optax.global_norm(tree)


def train_step(state: TrainState, batch, *, model, task,
               grad_scale: float = 1.0) -> tuple[TrainState, dict]:
  """One micro-step: gradients of `task`'s loss, then the optax update.

  The gradient is taken of `loss * grad_scale * task.loss_weight`
  (`grad_scale` holds the official summed-gradient scale); the reported
  `loss` is unscaled. Dropout draws from `fold_in(state.rng, state.step)`.

  A non-finite loss or gradient, or an update that would make a parameter
  or the optimizer state non-finite (a learning rate that overflows, Adam
  moments that overflow), leaves params and optimizer state as they were
  and records the step in `bad_step`; the host checks it at log and
  checkpoint steps (so a non-finite state is never saved), and no host sync
  happens here.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  scale = float(grad_scale) * float(task.loss_weight)

  def loss_fn(params):
    out = task.outputs(model, params, batch, deterministic=False,
                       rngs={"dropout": key})
    loss, metrics = task.loss(out, batch)
    return loss * scale, (loss, metrics)

  grads, (loss, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  l2_grads, l2_updates = _l2(grads), _l2(updates)
  # The norms (logged anyway) are the whole check: a NaN or inf anywhere
  # makes a sum of squares non-finite, and so does any element above ~1e19.
  # Finite gradients below that keep Adam's moments finite; finite updates
  # below it keep the new params finite (params + updates cannot reach the
  # float32 maximum). One scalar per tree instead of one test per tensor,
  # which doubled the step's compile time.
  finite = (jnp.isfinite(loss) & jnp.isfinite(l2_grads)
            & jnp.isfinite(l2_updates))
  keep = functools.partial(jax.tree_util.tree_map,
                           lambda new, old: jnp.where(finite, new, old))
  bad = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
  metrics = dict(metrics, loss=loss, l2_grads=l2_grads,
                 l2_params=_l2(state.params), l2_updates=l2_updates)
  new = state.replace(step=state.step + 1,
                      params=keep(params, state.params),
                      opt_state=keep(opt_state, state.opt_state),
                      bad_step=bad)
  return new, metrics


def eval_step(params, batch, *, model, task) -> dict:
  """`task`'s metrics on a batch, deterministic (no dropout)."""
  out = task.outputs(model, params, batch, deterministic=True)
  _, metrics = task.loss(out, batch)
  return metrics
