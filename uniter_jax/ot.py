"""Word-region alignment (WRA) by optimal transport.

UNITER's WRA term measures how well the final-layer text states of a pair can
be transported onto its region states under a cosine cost. The transport plan
is treated as a constant: the distance is ``sum_ij C_ij * T_ij`` with ``T``
under ``stop_gradient``, so gradients reach the encoder only through the cost
``C``. Because the plan never needs a derivative, no solver is differentiated:
a custom VJP computes the gradient of ``sum(C * T)`` directly, with the two
matmuls of the cosine cost and nothing else.

Two solvers are provided:

* ``'sinkhorn'`` (default): OTT-JAX's
  :class:`ott.solvers.linear.sinkhorn.Sinkhorn`, vmapped over the batch, in
  kernel (non-log) mode and float32, for a fixed number of iterations run by
  a ``scan`` (no convergence test). Before solving, each row and then each
  column of the cost is shifted so its smallest valid entry is 0: the plan is
  invariant to these shifts, and every kernel row and column then holds a 1,
  which keeps kernel-mode iterations away from underflow. A small geometry
  subclass applies the precomputed kernel as a fused multiply-reduce. The
  settings are chosen and measured in docs/objectives.md.
* ``'ipot'``: the inexact proximal point method of the official code
  (``beta=0.5``, 50 iterations, ``k=1``), following its update order.

Inputs may be any float dtype (bf16 included); the cost and the plan are
computed in float32. Padded rows and columns (``valid == False``) get no mass,
contribute nothing, and produce no NaN values or gradients, also for an
example whose text or regions are entirely padding (its distance is 0).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

NORMALIZE_EPS = 1e-5  # as torch.nn.functional.normalize(eps=1e-5) officially.


@dataclasses.dataclass(frozen=True)
class OTConfig:
  """Settings of the WRA optimal-transport solver.

  Attributes:
    solver: 'sinkhorn' (OTT-JAX, default) or 'ipot' (official algorithm).
    epsilon: Sinkhorn entropic regularisation, absolute, on the cosine cost
      (which lies in [0, 2]).
    num_iters: Sinkhorn iterations (fixed count: run with a scan).
    threshold: if > 0, Sinkhorn instead stops when the marginal error falls
      below this value (checked every ``inner_iterations``), with at most
      ``num_iters`` iterations. 0 means the fixed count.
    inner_iterations: how often the marginal error is checked when
      ``threshold > 0``.
    lse_mode: run Sinkhorn in log-sum-exp mode instead of kernel mode.
    ipot_beta, ipot_iters, ipot_k: IPOT's proximal step, outer and inner
      iteration counts (official: 0.5, 50, 1).
  """
  solver: Literal["sinkhorn", "ipot"] = "sinkhorn"
  epsilon: float = 0.05
  num_iters: int = 50
  threshold: float = 0.0
  inner_iterations: int = 5
  lse_mode: bool = False
  ipot_beta: float = 0.5
  ipot_iters: int = 50
  ipot_k: int = 1


def _normalize(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis, NaN-free at ``x == 0``."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  # sqrt(max(sq, eps^2)) == max(||x||, eps), and its gradient is finite at 0.
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def cosine_cost(txt: jax.Array, img: jax.Array) -> jax.Array:
  """Cosine distance ``1 - cos`` between every text and region state.

  Args:
    txt: [B, Lt, H] text states (any float dtype; computed in float32).
    img: [B, Li, H] region states.

  Returns:
    [B, Lt, Li] float32 cost.
  """
  x = _normalize(txt.astype(jnp.float32))
  y = _normalize(img.astype(jnp.float32))
  sim = jnp.einsum("bmh,bnh->bmn", x, y,
                   precision=jax.lax.Precision.HIGHEST)
  return 1.0 - sim


@jax.tree_util.register_pytree_node_class
class _FixedEpsilonGeometry(geometry.Geometry):
  """OTT geometry with a precomputed kernel and a constant epsilon.

  ``Geometry.apply_kernel`` raises the kernel to the power
  ``epsilon / epsilon_t`` on every Sinkhorn iteration to support epsilon
  schedules; with a constant epsilon that power is 1, but it still costs a
  full-matrix ``pow`` per iteration. This subclass applies the stored kernel
  as is, which is exact for a constant epsilon.
  """

  @property
  def kernel_matrix(self) -> jax.Array:
    return self._kernel_matrix

  def apply_kernel(self, vec, eps=None, axis=0):
    del eps  # constant epsilon: the scheduled power is exactly 1.
    # A broadcast multiply + reduce instead of a matvec: once vmapped over the
    # batch, XLA fuses it into one loop over [B, Lt, Li], where a batched
    # matvec of this small size runs as many tiny GEMV calls.
    if axis == 1:
      return jnp.sum(self._kernel_matrix * vec[None, :], axis=1)
    return jnp.sum(self._kernel_matrix * vec[:, None], axis=0)


def _sinkhorn_plan_one(cost, a, b, cfg: OTConfig) -> jax.Array:
  """Transport plan for one example with OTT-JAX Sinkhorn ([Lt, Li])."""
  if cfg.lse_mode:
    geom = geometry.Geometry(cost_matrix=cost, epsilon=cfg.epsilon)
  else:
    geom = _FixedEpsilonGeometry(
        cost_matrix=cost, kernel_matrix=jnp.exp(-cost / cfg.epsilon),
        epsilon=cfg.epsilon)
  prob = linear_problem.LinearProblem(geom, a=a, b=b)
  if cfg.threshold > 0:
    min_iters, threshold, inner = 0, cfg.threshold, cfg.inner_iterations
  else:
    # min == max makes OTT run a plain scan without any error evaluation.
    min_iters, threshold, inner = cfg.num_iters, -1.0, cfg.num_iters
  solver = sinkhorn.Sinkhorn(
      lse_mode=cfg.lse_mode,
      threshold=threshold,
      min_iterations=min_iters,
      max_iterations=cfg.num_iters,
      inner_iterations=inner,
      implicit_diff=None,  # The plan is constant: nothing to differentiate.
  )
  return solver(prob).matrix


def sinkhorn_plan(cost: jax.Array, txt_valid: jax.Array, img_valid: jax.Array,
                  cfg: OTConfig = OTConfig()) -> jax.Array:
  """Batched OTT-JAX Sinkhorn plan, [B, Lt, Li], zero at padding.

  Marginals are uniform over the valid positions of each side. An example
  with no valid text or no valid region gets uniform dummy marginals (so the
  solver stays finite) and a zero plan.
  """
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  tv = txt_valid.astype(jnp.float32)
  iv = img_valid.astype(jnp.float32)
  nt = tv.sum(-1, keepdims=True)
  ni = iv.sum(-1, keepdims=True)
  ok = (nt > 0) & (ni > 0)  # [B, 1]
  a = jnp.where(ok, tv / jnp.maximum(nt, 1.0), 1.0 / tv.shape[-1])
  b = jnp.where(ok, iv / jnp.maximum(ni, 1.0), 1.0 / iv.shape[-1])
  joint = (tv[:, :, None] * iv[:, None, :]) > 0
  joint = joint | ~ok[:, :, None]  # dummy problem uses the full matrix
  # Subtract each row's and then each column's smallest valid cost. Both are
  # diagonal rescalings of the kernel, absorbed by the scalings, so the plan
  # is unchanged; afterwards every row and column of the kernel holds a 1, so
  # kernel-mode iterations in float32 cannot hit an all-zero row or column
  # even for a small epsilon. Padded entries get cost 0 (their marginal is 0,
  # so they carry no mass whatever the kernel holds there).
  big = jnp.float32(1e4)
  c = jnp.where(joint, cost, big)
  c = c - jnp.min(c, axis=2, keepdims=True)
  c = jnp.where(joint, c, big)
  c = c - jnp.min(c, axis=1, keepdims=True)
  shifted = jnp.where(joint, c, 0.0)
  plan = jax.vmap(lambda c, a_, b_: _sinkhorn_plan_one(c, a_, b_, cfg))(
      shifted, a, b)
  plan = jnp.where(joint & ok[:, :, None], plan, 0.0)
  return jax.lax.stop_gradient(plan)


def ipot_plan(cost: jax.Array, txt_valid: jax.Array, img_valid: jax.Array,
              beta: float = 0.5, iters: int = 50, k: int = 1) -> jax.Array:
  """IPOT plan as in the official code, returned as [B, Lt, Li].

  Follows the official update order: with ``A = exp(-C^T / beta)`` and
  ``T = 1`` (both zero at padding) and ``sigma = 1/n_txt``, each iteration
  sets ``Q = A * T``, then ``k`` times ``delta = 1 / (n_img * Q sigma +
  1e4 * img_pad)`` and ``sigma = 1 / (n_txt * delta Q + 1e4 * txt_pad)``, and
  finally ``T = diag(delta) Q diag(sigma)``. Examples with no valid text or
  region return a zero plan (the official code would produce NaN).
  """
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  tv = txt_valid.astype(bool)
  iv = img_valid.astype(bool)
  txt_pad = (~tv).astype(jnp.float32)  # [B, M]
  img_pad = (~iv).astype(jnp.float32)  # [B, N]
  x_len = tv.sum(-1).astype(jnp.float32)  # [B]
  y_len = iv.sum(-1).astype(jnp.float32)
  ok = (x_len > 0) & (y_len > 0)
  x_len_s = jnp.where(ok, x_len, 1.0)[:, None]
  y_len_s = jnp.where(ok, y_len, 1.0)[:, None]
  joint_valid = (tv[:, :, None] & iv[:, None, :]).swapaxes(1, 2)  # [B, N, M]
  c_t = jnp.where(joint_valid, cost.swapaxes(1, 2), 0.0)
  a_mat = jnp.where(joint_valid, jnp.exp(-c_t / beta), 0.0)
  t_mat = joint_valid.astype(jnp.float32)
  sigma = jnp.where(tv, 1.0 / x_len_s, 0.0)  # [B, M]
  delta = jnp.zeros_like(img_pad)
  x_mask = txt_pad * 1e4
  y_mask = img_pad * 1e4
  hi = jax.lax.Precision.HIGHEST

  def body(_, carry):
    t_mat, sigma, delta = carry
    q = a_mat * t_mat
    for _ in range(k):
      delta = 1.0 / (y_len_s * jnp.einsum("bnm,bm->bn", q, sigma, precision=hi)
                     + y_mask)
      sigma = 1.0 / (x_len_s * jnp.einsum("bn,bnm->bm", delta, q, precision=hi)
                     + x_mask)
    t_mat = delta[:, :, None] * q * sigma[:, None, :]
    return t_mat, sigma, delta

  t_mat, _, _ = jax.lax.fori_loop(0, iters, body, (t_mat, sigma, delta))
  t_mat = jnp.where(joint_valid & ok[:, None, None], t_mat, 0.0)
  return jax.lax.stop_gradient(t_mat.swapaxes(1, 2))


def _plan(cost, txt_valid, img_valid, cfg: OTConfig) -> jax.Array:
  if cfg.solver == "sinkhorn":
    return sinkhorn_plan(cost, txt_valid, img_valid, cfg)
  if cfg.solver == "ipot":
    return ipot_plan(cost, txt_valid, img_valid, cfg.ipot_beta,
                     cfg.ipot_iters, cfg.ipot_k)
  raise ValueError(f"OTConfig.solver must be 'sinkhorn' or 'ipot', got "
                   f"{cfg.solver!r}.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _plan_distance(txt, img, txt_valid, img_valid, cfg):
  return _plan_distance_fwd(txt, img, txt_valid, img_valid, cfg)[0]


def _plan_distance_fwd(txt, img, txt_valid, img_valid, cfg):
  """``sum_ij (1 - cos_ij) T_ij`` with the normalisation applied to ``cos``.

  Same value as ``sum(cosine_cost(txt, img) * plan)``, but it scales the
  [Lt, Li] similarity by the inverse norms instead of materialising the
  normalised [L, H] copies, and keeps what the hand-written backward needs.
  """
  x = txt.astype(jnp.float32)
  y = img.astype(jnp.float32)
  sx = jnp.sum(x * x, axis=-1)
  sy = jnp.sum(y * y, axis=-1)
  eps2 = NORMALIZE_EPS * NORMALIZE_EPS
  rn = jax.lax.rsqrt(jnp.maximum(sx, eps2))  # 1 / max(|x|, eps)
  rm = jax.lax.rsqrt(jnp.maximum(sy, eps2))
  raw = jnp.einsum("bmh,bnh->bmn", x, y, precision=jax.lax.Precision.HIGHEST)
  sim = raw * rn[:, :, None] * rm[:, None, :]
  cost = 1.0 - sim
  plan = _plan(cost, txt_valid > 0, img_valid > 0, cfg)
  dist = jnp.sum(cost * plan, axis=(1, 2))
  dtypes = (jnp.zeros((0,), txt.dtype), jnp.zeros((0,), img.dtype))
  return dist, (x, y, rn, rm, sx > eps2, sy > eps2, sim, plan, dtypes,
                txt_valid, img_valid)


def _plan_distance_bwd(cfg, res, g):
  """Gradient through the cost only (the plan is a constant).

  With ``n_i = max(|x_i|, eps)``, ``m_j = max(|y_j|, eps)`` and
  ``S = cos``: ``d dist / d x_i = -(1/n_i) sum_j (T_ij / m_j) y_j
  + [|x_i| > eps] (sum_j T_ij S_ij) x_i / n_i^2``, and symmetrically for
  ``y_j``; i.e. exactly autodiff of ``F.normalize`` + matmul, in two matmuls.
  """
  del cfg
  x, y, rn, rm, act_x, act_y, sim, plan, dtypes, tv, iv = res
  pg = plan * g[:, None, None]
  hi = jax.lax.Precision.HIGHEST
  ax = jnp.einsum("bmn,bnh->bmh", pg * rm[:, None, :], y, precision=hi)
  ay = jnp.einsum("bmn,bmh->bnh", pg * rn[:, :, None], x, precision=hi)
  ps = pg * sim
  cx = jnp.where(act_x, jnp.sum(ps, axis=2) * rn * rn, 0.0)
  cy = jnp.where(act_y, jnp.sum(ps, axis=1) * rm * rm, 0.0)
  gx = cx[..., None] * x - ax * rn[..., None]
  gy = cy[..., None] * y - ay * rm[..., None]
  return (gx.astype(dtypes[0].dtype), gy.astype(dtypes[1].dtype),
          jnp.zeros_like(tv), jnp.zeros_like(iv))


_plan_distance.defvjp(_plan_distance_fwd, _plan_distance_bwd)


def wra_distance(txt_output: jax.Array, img_output: jax.Array,
                 txt_valid: jax.Array, img_valid: jax.Array,
                 cfg: OTConfig = OTConfig()) -> jax.Array:
  """Per-example OT distance ``sum_ij C_ij T_ij`` with a constant plan.

  Args:
    txt_output: [B, Lt, H] final-layer text states (CLS/SEP included).
    img_output: [B, Li, H] final-layer region states.
    txt_valid: [B, Lt] bool/int, True at real text tokens.
    img_valid: [B, Li] bool/int, True at real regions.
    cfg: solver settings.

  Returns:
    [B] float32 distances; differentiable w.r.t. both outputs through the cost
    only. Zero for examples with no valid text or no valid region. The plan
    is zero at padded rows and columns, so the official masking of the cost
    there changes neither the value nor the gradient.
  """
  if txt_output.ndim != 3 or img_output.ndim != 3:
    raise ValueError(
        "wra_distance: expected txt_output [B, Lt, H] and img_output "
        f"[B, Li, H], got {txt_output.shape} and {img_output.shape}.")
  if txt_valid.shape != txt_output.shape[:2]:
    raise ValueError(f"wra_distance: txt_valid shape {txt_valid.shape} does "
                     f"not match txt_output {txt_output.shape[:2]}.")
  if img_valid.shape != img_output.shape[:2]:
    raise ValueError(f"wra_distance: img_valid shape {img_valid.shape} does "
                     f"not match img_output {img_output.shape[:2]}.")
  if cfg.solver not in ("sinkhorn", "ipot"):
    raise ValueError(f"OTConfig.solver must be 'sinkhorn' or 'ipot', got "
                     f"{cfg.solver!r}.")
  tv = jnp.asarray(txt_valid).astype(jnp.float32)
  iv = jnp.asarray(img_valid).astype(jnp.float32)
  return _plan_distance(txt_output, img_output, tv, iv, cfg)


def wra_loss(dist: jax.Array, targets: jax.Array,
             example_mask: jax.Array | None = None) -> jax.Array:
  """``(sum dist[pos] - sum dist[neg]) / (n_pos + n_neg)`` (official).

  Args:
    dist: [B] distances.
    targets: [B] ITM labels, 1 = matched, 0 = mismatched.
    example_mask: optional [B] bool, False for batch padding rows.
  """
  sign = jnp.where(targets == 1, 1.0, -1.0)
  w = jnp.ones_like(dist) if example_mask is None else example_mask.astype(
      jnp.float32)
  return jnp.sum(sign * w * dist) / jnp.maximum(jnp.sum(w), 1.0)
