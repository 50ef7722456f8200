"""Stitching computed tiles into whole kernels, on the host or on devices.

Tiles arrive in rounds: `ids` (tile ids, `-1` for padding) and a dict
`leaf<k> -> array of shape (len(ids), *tile_shape_k)` for the outputs the
round's program computed (off-diagonal tiles of symmetric kernels carry only
pair outputs).

- `HostAssembler` writes each tile into preallocated numpy arrays as it
  arrives (memory: the kernel once).
- `DeviceAssembler` keeps rounds on the devices and stitches them in one
  compiled gather at the end into arrays sharded over the mesh by rows (or
  columns) when the device count divides their number, else replicated
  (transient memory: about three times the kernel).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from flax_tangents._src.scale import devices
from flax_tangents._src.scale.tile_outputs import COL
from flax_tangents._src.scale.tile_outputs import OutputTemplate
from flax_tangents._src.scale.tile_outputs import PAIR
from flax_tangents._src.scale.tile_outputs import ROW
from flax_tangents._src.scale.tile_plan import TilePlan

__all__ = ["DeviceAssembler", "HostAssembler", "leaf_name"]

# Compiled stitching programs, reused by calls with the same tiling.
_STITCHERS: dict[tuple, Any] = {}
_MAX_STITCHERS = 64


def leaf_name(index: int) -> str:
  return f"leaf{index}"


def _block_sources(plan: TilePlan, role: str) -> np.ndarray:
  return plan.row_sources() if role == ROW else plan.column_sources()


def _trim(x, role: str, n1: int, n2: int):
  if role == PAIR:
    return x[:n1, :n2]
  return x[:n1] if role == ROW else x[:n2]


class HostAssembler:
  """Places tiles into host numpy arrays as they arrive."""

  def __init__(self, template: OutputTemplate, plan: TilePlan):
    self.template, self.plan = template, plan
    b = plan.batch_size
    rows, cols = plan.n1_blocks * b, plan.n2_blocks * b
    self.arrays = []
    for leaf in template.leaves:
      lead = {PAIR: (rows, cols), ROW: (rows,), COL: (cols,)}[leaf.role]
      n_lead = len(lead)
      self.arrays.append(np.zeros(lead + leaf.shape[n_lead:],
                                  np.dtype(leaf.dtype)))
    # Where each tile id goes: pair cells (i, j, transposed), row and column
    # blocks.
    source, transposed = plan.grid()
    self.cells: dict[int, list[tuple[int, int, bool]]] = {}
    for (i, j), tile_id in np.ndenumerate(source):
      self.cells.setdefault(int(tile_id), []).append(
          (i, j, bool(transposed[i, j])))
    self.blocks = {role: {} for role in (ROW, COL)}
    for role in (ROW, COL):
      for block, tile_id in enumerate(_block_sources(plan, role)):
        self.blocks[role].setdefault(int(tile_id), []).append(block)

  def add(self, ids: np.ndarray, leaves: dict[str, np.ndarray]) -> None:
    b = self.plan.batch_size
    for k, leaf in enumerate(self.template.leaves):
      values = leaves.get(leaf_name(k))
      if values is None:
        continue
      target = self.arrays[k]
      for position, tile_id in enumerate(np.asarray(ids)):
        tile = values[position]
        if leaf.role == PAIR:
          for i, j, transposed in self.cells.get(int(tile_id), ()):
            target[i * b:(i + 1) * b, j * b:(j + 1) * b] = (
                np.transpose(tile, leaf.perm) if transposed else tile)
        else:
          for block in self.blocks[leaf.role].get(int(tile_id), ()):
            target[block * b:(block + 1) * b] = tile

  def result(self) -> dict[str, np.ndarray]:
    n1, n2 = self.plan.n1, self.plan.n2
    return {leaf.key: _trim(array, leaf.role, n1, n2)
            for leaf, array in zip(self.template.leaves, self.arrays)}


class DeviceAssembler:
  """Keeps rounds on the devices; stitches them when all are done."""

  def __init__(self, template: OutputTemplate, plan: TilePlan, mesh: Mesh):
    self.template, self.plan, self.mesh = template, plan, mesh
    self.rounds: list[tuple[np.ndarray, dict[str, jax.Array]]] = []

  def add(self, ids: np.ndarray, leaves: dict[str, jax.Array]) -> None:
    self.rounds.append((np.asarray(ids), leaves))

  def add_host(self, ids: np.ndarray, leaves: dict[str, np.ndarray]) -> None:
    """Adds restored tiles: padded to a whole number of devices, sharded."""
    size = self.mesh.size
    missing = -len(ids) % size
    if missing:
      ids = np.concatenate([ids, np.full(missing, -1, ids.dtype)])
      leaves = {name: np.concatenate(
          [v, np.zeros((missing,) + v.shape[1:], v.dtype)])
                for name, v in leaves.items()}
    self.add(ids, devices.put_sharded(leaves, self.mesh))

  def result(self) -> dict[str, jax.Array]:
    plan, b = self.plan, self.plan.batch_size
    output = {}
    for k, leaf in enumerate(self.template.leaves):
      name = leaf_name(k)
      parts, position_of = [], {}
      offset = 0
      for ids, leaves in self.rounds:
        if name not in leaves:
          continue
        parts.append(leaves[name])
        for position, tile_id in enumerate(ids):
          if tile_id >= 0:
            position_of[int(tile_id)] = offset + position
        offset += len(ids)
      if leaf.role == PAIR:
        source, transposed = plan.grid()
        index = np.vectorize(position_of.__getitem__, otypes=[np.int64])(
            source)
        sizes = (plan.n1, plan.n2)
      else:
        index = np.asarray([position_of[int(t)]
                            for t in _block_sources(plan, leaf.role)])
        transposed = None
        sizes = (plan.n1 if leaf.role == ROW else plan.n2,)
      sharding = devices.result_sharding(self.mesh, sizes)
      cache_key = (leaf.role, leaf.perm, index.shape, index.tobytes(),
                   None if transposed is None else transposed.tobytes(), b,
                   plan.n1, plan.n2, sharding)
      stitch = _STITCHERS.get(cache_key)
      if stitch is None:
        stitch = jax.jit(_stitcher(leaf.role, leaf.perm, index, transposed, b,
                                   plan.n1, plan.n2), out_shardings=sharding)
        if len(_STITCHERS) > _MAX_STITCHERS:
          _STITCHERS.clear()
        _STITCHERS[cache_key] = stitch
      output[leaf.key] = stitch(parts)
    return output


def _stitcher(role, perm, index, transposed, b, n1, n2):
  """A function of the round arrays returning one stitched output."""
  any_transposed = transposed is not None and bool(transposed.any())

  def stitch(parts: list[jax.Array]) -> jax.Array:
    tiles = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    tile_shape = tiles.shape[1:]
    gathered = tiles[index.reshape(-1)]
    if role != PAIR:
      blocks = gathered.reshape((-1,) + tile_shape[1:])
      return _trim(blocks, role, n1, n2)
    gathered = gathered.reshape(index.shape + tile_shape)
    if any_transposed:
      assert transposed is not None  # `any_transposed` says so.
      mirrored = jnp.transpose(gathered, (0, 1) + tuple(2 + p for p in perm))
      mask = transposed.reshape(transposed.shape + (1,) * len(tile_shape))
      gathered = jnp.where(mask, mirrored, gathered)
    # (I, J, b, b, rest) -> (I, b, J, b, rest) -> (I * b, J * b, rest).
    rest = tuple(range(4, gathered.ndim))
    gathered = jnp.transpose(gathered, (0, 2, 1, 3) + rest)
    full = gathered.reshape((index.shape[0] * b, index.shape[1] * b)
                            + tile_shape[2:])
    return _trim(full, role, n1, n2)

  return stitch
