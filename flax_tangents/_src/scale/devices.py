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
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

__all__ = [
    "all_processes_agree",
    "default_mesh",
    "gather_strings",
    "gather_to_host",
    "is_primary_process",
    "multi_process",
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


def multi_process() -> bool:
  """Whether this is one of several processes (`jax.distributed`)."""
  return jax.process_count() > 1


def is_primary_process() -> bool:
  """Whether this process writes shared files and prints progress."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes; nothing on a single process."""
  if multi_process():
    multihost_utils.sync_global_devices(name)


def _put(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  if not multi_process():
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
    if isinstance(x, jax.Array) and not multi_process():
      return jax.device_put(x, sharding)
    return _put(np.asarray(x), sharding)

  return jax.tree.map(put, tree)


def gather_to_host(tree: Any) -> Any:
  """Global arrays as host numpy arrays, on every process."""
  if multi_process():
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


_MAX_MESSAGE_BYTES = 2048


def gather_strings(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective)."""
  if not multi_process():
    return [text]
  encoded = text.encode()[:_MAX_MESSAGE_BYTES]
  buffer = np.zeros(_MAX_MESSAGE_BYTES + 4, np.uint8)
  buffer[:4] = np.frombuffer(np.uint32(len(encoded)).tobytes(), np.uint8)
  buffer[4:4 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  texts = []
  for row in gathered.reshape(jax.process_count(), -1):
    length = int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])
    texts.append(row[4:4 + length].tobytes().decode(errors="replace"))
  return texts


def all_processes_agree(mask: np.ndarray) -> np.ndarray:
  """Elementwise AND of a boolean array over all processes (a collective)."""
  if not multi_process():
    return np.asarray(mask, bool)
  gathered = np.asarray(multihost_utils.process_allgather(
      np.asarray(mask, np.uint8)))
  return np.asarray(
      gathered.reshape((jax.process_count(),) + np.shape(mask)).all(0))
