"""Placing tiles on a mesh and bringing them back, on one host or many.

Every function here works the same under `jax.distributed.initialize`: the
mesh then spans the devices of all processes, arrays built here are global
`jax.Array`s (each process supplies the shards of its own devices from the
host copy it holds), and gathering to the host is a collective that every
process calls in the same order.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

__all__ = [
    "default_mesh",
    "gather_to_host",
    "is_primary_process",
    "put_replicated",
    "put_sharded",
    "result_sharding",
    "sync",
    "tile_axis_spec",
]


def default_mesh() -> Mesh:
  """A one-axis mesh over every device (all processes' under multi-host)."""
  return Mesh(np.asarray(jax.devices()), ("tiles",))


def tile_axis_spec(mesh: Mesh) -> PartitionSpec:
  """Splits a leading axis over all devices of `mesh`, whatever its axes."""
  return PartitionSpec(tuple(mesh.axis_names))


def _multi_process() -> bool:
  return jax.process_count() > 1


def is_primary_process() -> bool:
  """Whether this process writes shared files and prints progress."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes; nothing on a single process."""
  if _multi_process():
    multihost_utils.sync_global_devices(name)


def _put(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  if not _multi_process():
    return jax.device_put(host, sharding)
  # Every process holds the same host copy; each fills its own devices.
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def put_sharded(tree: Any, mesh: Mesh) -> Any:
  """Host arrays with a leading axis of `mesh.size` split over the mesh."""
  sharding = NamedSharding(mesh, tile_axis_spec(mesh))
  return jax.tree.map(lambda x: _put(np.asarray(x), sharding), tree)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Arrays copied to every device of `mesh` (e.g. parameters)."""
  sharding = NamedSharding(mesh, PartitionSpec())

  def put(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(
        sharding, x.ndim):
      return x
    if isinstance(x, jax.Array) and not _multi_process():
      return jax.device_put(x, sharding)
    return _put(np.asarray(x), sharding)

  return jax.tree.map(put, tree)


def gather_to_host(tree: Any) -> Any:
  """Global arrays as host numpy arrays, on every process."""
  if _multi_process():
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
        tree)
  return jax.device_get(tree)


def result_sharding(mesh: Mesh, sizes: tuple[int, ...]) -> NamedSharding:
  """Sharding of a result over the whole `mesh`: by its first axis among
  `sizes` that the device count divides (JAX requires even shards), else
  replicated. Staying on the caller's mesh lets results combine freely."""
  spec = tile_axis_spec(mesh)[0]
  for axis, size in enumerate(sizes):
    if size % mesh.size == 0:
      return NamedSharding(mesh, PartitionSpec(*([None] * axis), spec))
  return NamedSharding(mesh, PartitionSpec())
