"""Device mesh, logical-axis rules and sharded train-state creation.

Shapes and shardings are worked out before any weight exists: the state is
`jax.eval_shape`d, its logical axis names become mesh shardings through the
config's rules table, and the real state is created by a jitted init with
those `out_shardings`, so no full copy of the weights is ever built on one
device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis "
                     "may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide "
                       f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{math.prod(sizes)} devices, {len(devices)} available")
  if math.prod(sizes) < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} must use all "
                       f"{len(devices)} devices of a multi-process run")
    devices = devices[:math.prod(sizes)]  # an explicit smaller mesh
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def batch_size_multiple(mesh: Mesh) -> int:
  """Global batch sizes must be a multiple of this (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(init_fn: Callable[[], Any], mesh: Mesh, rules) -> tuple:
  """(abstract state, shardings) of `init_fn` without running it.

  `init_fn` returns the state with logically boxed params (and whatever
  optax builds from them); boxes become NamedShardings through `rules`.
  """
  boxed = jax.eval_shape(init_fn)
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))
  plain = jax.tree_util.tree_map(
      lambda x: x.unbox(apply_constraint=False)
      if isinstance(x, nn.meta.AxisMetadata) else x, boxed,
      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      plain, shardings)
  return abstract, shardings


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local rows of a batch -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
