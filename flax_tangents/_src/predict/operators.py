"""Kernel matrices as linear operators for the iterative solvers.

An operator computes `K @ V` for a block of vectors `V` of shape `(n2, c)`
and the diagonal of `K`, without ever forming `K` on one device:

- `ArrayOperator`: a kernel held as a `jax.Array`, e.g. sharded over a
  mesh by `ft.batch`. Products are compiled with the kernel's sharding, so
  each device multiplies its own rows. A kernel replicated over several
  devices (as `ft.batch` returns one whose size the device count does not
  divide) is first split by rows, padded to a whole number of rows per
  device, each device keeping its slice of its own copy.
- `TiledOperator`: a kernel held on disk as `ft.batch` checkpoint tiles
  (`TiledKernel`), streamed tile by tile, one tile per device per round,
  while a background thread reads the next round; each device accumulates
  its products locally and the sums are combined once per product. Under
  multi-host, each process reads only its own devices' tiles.

Under multi-host (`jax.distributed`) the kernel spans devices of several
processes; the vectors the solvers work on stay process-local (each process
holds all `N x c` of them and does the same small vector algebra): a
product puts them on the kernel's mesh, replicated, and hands each process
back its own copy of the replicated result (one all-gather of `N x c`
numbers per product, never of the kernel).

Products run at `Precision.HIGHEST`: on accelerators the default precision
of float32 matrix products is lower than float32.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from flax_tangents._src.scale import devices
from flax_tangents._src.scale.tiled_kernel import TiledKernel

__all__ = ["ArrayOperator", "TiledOperator", "as_operator"]

_HIGHEST = jax.lax.Precision.HIGHEST


class ArrayOperator:
  """`K @ V` for a kernel matrix held as an array (sharded or not).

  Args:
    kernel: an `(n1, n2)` array.
  """

  def __init__(self, kernel: Any):
    kernel = kernel if isinstance(kernel, jax.Array) else jnp.asarray(kernel)
    self.shape = tuple(kernel.shape)
    self.dtype = kernel.dtype
    self.n_devices = len(kernel.sharding.device_set)
    self.kernel = _split_rows(kernel)
    self.description = (f"a {self.shape[0]}x{self.shape[1]} array on "
                        f"{self.n_devices} device(s)")
    self.mesh = None  # Set when the kernel spans several processes.
    if not kernel.is_fully_addressable:
      if not isinstance(kernel.sharding, NamedSharding):
        raise ValueError(
            f"A kernel spread over several processes must have a "
            f"NamedSharding (as ft.batch returns it); got "
            f"{type(kernel.sharding).__name__}.")
      mesh = kernel.sharding.mesh
      assert isinstance(mesh, Mesh)  # A concrete array's mesh.
      self.mesh = mesh

  def matmul(self, v: jax.Array) -> jax.Array:
    if self.mesh is None:
      return _matmul(self.kernel, v.astype(self.dtype), self.shape[0])
    v = to_mesh(np.asarray(v, self.dtype), self.mesh)
    return to_local(_replicated(self.mesh)(
        _matmul(self.kernel, v, self.shape[0])))

  def diagonal(self) -> jax.Array:
    diagonal = _diagonal(self.kernel, min(self.shape))
    if self.mesh is None:
      return diagonal
    return to_local(_replicated(self.mesh)(diagonal))


def to_mesh(host: np.ndarray, mesh: Mesh) -> jax.Array:
  """A process-local value (the same on every process), replicated on
  `mesh` (which may span several processes)."""
  return jax.make_array_from_callback(
      host.shape, NamedSharding(mesh, PartitionSpec()),
      lambda index: host[index])


def to_local(replicated: jax.Array) -> jax.Array:
  """This process's copy of an array replicated over a (multi-process)
  mesh, as a process-local array."""
  return replicated.addressable_data(0)


@functools.lru_cache(maxsize=16)
def _replicated(mesh: Mesh):
  return jax.jit(lambda x: x,
                 out_shardings=NamedSharding(mesh, PartitionSpec()))


def _split_rows(kernel: jax.Array) -> jax.Array:
  """A kernel replicated over several devices, split by rows (padded)."""
  sharding = kernel.sharding
  if (not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1
      or any(axis is not None for axis in sharding.spec)):
    return kernel  # One device, or already split.
  mesh = sharding.mesh
  assert isinstance(mesh, Mesh)  # A concrete array's mesh.
  n_pad = math.ceil(kernel.shape[0] / mesh.size) * mesh.size
  rows = NamedSharding(mesh, PartitionSpec(devices.tile_axis_spec(mesh)[0]))
  # Each device slices its rows out of its own copy: no communication.
  return jax.jit(lambda k: jnp.pad(k, ((0, n_pad - k.shape[0]), (0, 0))),
                 out_shardings=rows)(kernel)


@functools.partial(jax.jit, static_argnums=(2,))
def _matmul(kernel: jax.Array, v: jax.Array, n_rows: int) -> jax.Array:
  return jnp.matmul(kernel, v, precision=_HIGHEST)[:n_rows]


@functools.partial(jax.jit, static_argnums=(1,))
def _diagonal(kernel: jax.Array, n: int) -> jax.Array:
  return jnp.diagonal(kernel[:n, :n])


class TiledOperator:
  """`K @ V` for a kernel streamed from `ft.batch` checkpoint tiles.

  Args:
    tiled: the kernel on disk.
    mesh: devices to use (default: all of them).
    progress: called as `progress(tiles_done, tiles_total)` during each
      product, or None.
  """

  def __init__(self, tiled: TiledKernel, mesh: Optional[Mesh] = None,
               progress: Optional[Callable[[int, int], None]] = None):
    # Under multi-host, ft.batch returns on each process once its own tiles
    # are written: wait for every process before looking for them.
    devices.sync("ft.predict: TiledKernel tiles written")
    tiled.check_complete()
    self.tiled = tiled
    self.shape = tiled.shape
    self.dtype = jnp.dtype(tiled.dtype)
    self.mesh = mesh if mesh is not None else devices.default_mesh()
    self.progress = progress
    self.description = (f"{tiled!r} streamed over {self.mesh.size} "
                        "device(s)")
    b = tiled.batch_size
    self._n1_pad = tiled.plan.n1_blocks * b
    self._n2_pad = tiled.plan.n2_blocks * b
    self._mirror = tiled.symmetric and tiled.plan.mirror
    tiles = tiled.stored_tiles
    size = self.mesh.size
    self._rounds = [tiles[k:k + size] for k in range(0, len(tiles), size)]
    self._step = _accumulate_program(self.mesh, b, self._mirror)
    self._local_positions = _local_positions(self.mesh)
    self._diagonal = None
    replicated = NamedSharding(self.mesh, PartitionSpec())
    stacked = NamedSharding(self.mesh, devices.tile_axis_spec(self.mesh))
    self._pad = jax.jit(
        lambda v: jnp.pad(v, ((0, self._n2_pad - v.shape[0]), (0, 0))),
        out_shardings=replicated)
    self._zeros = jax.jit(
        lambda c: jnp.zeros((self.mesh.size, self._n1_pad, c), self.dtype),
        static_argnums=0, out_shardings=stacked)

  @property
  def n_tiles(self) -> int:
    return len(self.tiled.stored_tiles)

  def matmul(self, v: jax.Array) -> jax.Array:
    """`K @ v` for `v` of shape `(n2, c)`: one pass over the tiles."""
    if devices.multi_process():
      v = to_mesh(np.asarray(v, self.dtype), self.mesh)
    v_pad = self._pad(v.astype(self.dtype))
    accumulator = self._zeros(v.shape[1])
    done = 0
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
      pending = reader.submit(self._read_round, 0)
      for k in range(len(self._rounds)):
        round_arrays = pending.result()
        if k + 1 < len(self._rounds):
          pending = reader.submit(self._read_round, k + 1)
        accumulator = self._step(accumulator, *round_arrays, v_pad)
        done += len(self._rounds[k])
        if self.progress is not None:
          self.progress(done, self.n_tiles)
    result = _sum_devices(accumulator, self.shape[0])
    if devices.multi_process():
      return to_local(_replicated(self.mesh)(result))
    return result

  def _read_round(self, k: int) -> tuple[jax.Array, ...]:
    """The round's tiles and block indices, one per device (read from disk
    only for this process's devices)."""
    chunk = self._rounds[k]
    size, b = self.mesh.size, self.tiled.batch_size
    ids = [t.id for t in chunk] + [-1] * (size - len(chunk))
    rows = np.asarray([t.i for t in chunk] + [0] * (size - len(chunk)))
    cols = np.asarray([t.j for t in chunk] + [0] * (size - len(chunk)))
    mirrored = np.asarray([self._mirror and t.i != t.j for t in chunk]
                          + [False] * (size - len(chunk)))
    tiles = {}
    for position in self._local_positions:
      tiles[position] = (self.tiled.read(ids[position]) if ids[position] >= 0
                         else np.zeros((b, b), self.tiled.dtype))
    sharding = NamedSharding(self.mesh, devices.tile_axis_spec(self.mesh))

    def stacked_tiles(index):
      start = index[0].start or 0
      stop = index[0].stop if index[0].stop is not None else size
      return np.stack([tiles[p] for p in range(start, stop)])

    tile_array = jax.make_array_from_callback((size, b, b), sharding,
                                              stacked_tiles)
    indices = devices.put_sharded([rows, cols, mirrored], self.mesh)
    return (tile_array, *indices)

  def diagonal(self) -> jax.Array:
    if self._diagonal is None:
      b = self.tiled.batch_size
      diagonal = np.zeros(self.tiled.plan.n1_blocks * b, self.tiled.dtype)
      for tile in self.tiled.stored_tiles:
        if tile.i == tile.j:
          diagonal[tile.i * b:(tile.i + 1) * b] = np.diagonal(
              self.tiled.read(tile.id))
      self._diagonal = jnp.asarray(diagonal[:min(self.shape)])
    return self._diagonal


def _local_positions(mesh: Mesh) -> list[int]:
  """Positions along the stacked tile axis held by this process."""
  flat = list(mesh.devices.flat)
  return [k for k, d in enumerate(flat)
          if d.process_index == jax.process_index()]


@functools.lru_cache(maxsize=16)
def _accumulate_program(mesh: Mesh, b: int, mirror: bool):
  """Adds each device's tile products into its own accumulator."""
  spec = devices.tile_axis_spec(mesh)

  def local(accumulator, tile, row, col, mirrored, v):
    acc, tile = accumulator[0], tile[0]
    row, col, mirrored = row[0] * b, col[0] * b, mirrored[0]

    def add(acc, start, block):
      current = jax.lax.dynamic_slice_in_dim(acc, start, b)
      return jax.lax.dynamic_update_slice_in_dim(acc, current + block, start,
                                                 0)

    v_col = jax.lax.dynamic_slice_in_dim(v, col, b)
    acc = add(acc, row, jnp.matmul(tile, v_col, precision=_HIGHEST))
    if mirror:  # The stored tile (i, j) is also the transpose of (j, i).
      v_row = jax.lax.dynamic_slice_in_dim(v, row, b)
      block = jnp.matmul(tile.T, v_row, precision=_HIGHEST)
      acc = add(acc, col, jnp.where(mirrored, block, 0.))
    return acc[None]

  return jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(spec, spec, spec, spec, spec,
                                  PartitionSpec()),
      out_specs=spec, check_vma=False), donate_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(1,))
def _sum_devices(accumulator: jax.Array, n_rows: int) -> jax.Array:
  return jnp.sum(accumulator, axis=0)[:n_rows]


def as_operator(kernel: Any, mesh: Optional[Mesh] = None,
                progress: Optional[Callable[[int, int], None]] = None):
  """An operator for a kernel array or a `TiledKernel`."""
  if isinstance(kernel, TiledKernel):
    return TiledOperator(kernel, mesh, progress)
  return ArrayOperator(kernel)
