"""Which tiles of a kernel to compute, and where each lands in the result.

The kernel between `n1` and `n2` inputs is cut into a grid of
`ceil(n1 / b) x ceil(n2 / b)` tiles of `b x b` rows and columns; inputs are
padded (with copies of their first row, which keep every kernel finite) to a
whole number of tiles, and the result is trimmed back.

Tile ids number the tiles to compute in a fixed order that depends only on
the grid, never on the number of devices, so that a checkpoint written on
one mesh resumes on another.

For a symmetric kernel (`x2=None`), diagonal tiles are computed with
`x2=None` (so the wrapped function sees exactly the call it would see
unbatched) and, when the layout of every output is known, each off-diagonal
pair of tiles is computed once and the mirror tile is its transpose.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np

__all__ = ["Tile", "TilePlan", "pad_rows", "tile_rows"]

# Kinds of tile programs: the generic `(x1, x2)` tile, and for symmetric
# kernels the diagonal `(x1_i, None)` tile and the off-diagonal
# `(x1_i, x1_j)` tile (from which only the pair outputs are kept).
FULL, DIAG, OFFDIAG = "full", "diag", "offdiag"


@dataclasses.dataclass(frozen=True)
class Tile:
  """One tile to compute: rows block `i`, columns block `j`, its program."""
  id: int
  i: int
  j: int
  kind: str


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """The tiles of an `n1 x n2` kernel in `batch_size` blocks.

  Attributes:
    n1: rows of the kernel (size of `x1`).
    n2: columns of the kernel (size of `x2`, or `n1` when symmetric).
    batch_size: rows and columns per tile.
    symmetric: whether `x2=None`.
    mirror: whether off-diagonal tiles are computed once and transposed.
  """
  n1: int
  n2: int
  batch_size: int
  symmetric: bool
  mirror: bool

  @property
  def n1_blocks(self) -> int:
    return math.ceil(self.n1 / self.batch_size)

  @property
  def n2_blocks(self) -> int:
    return math.ceil(self.n2 / self.batch_size)

  @functools.cached_property
  def tiles(self) -> list[Tile]:
    """Tiles to compute, in id order."""
    cells = []
    if not self.symmetric:
      cells = [(i, j, FULL) for i in range(self.n1_blocks)
               for j in range(self.n2_blocks)]
    else:
      cells = [(i, i, DIAG) for i in range(self.n1_blocks)]
      cells += [(i, j, OFFDIAG) for i in range(self.n1_blocks)
                for j in range(self.n1_blocks)
                if (i < j if self.mirror else i != j)]
    return [Tile(n, i, j, kind) for n, (i, j, kind) in enumerate(cells)]

  def grid(self) -> tuple[np.ndarray, np.ndarray]:
    """For every grid cell `(i, j)`: the id of the tile holding it and
    whether that tile must be transposed (it is the mirror cell's tile)."""
    source = np.full((self.n1_blocks, self.n2_blocks), -1, np.int64)
    transposed = np.zeros((self.n1_blocks, self.n2_blocks), bool)
    for tile in self.tiles:
      source[tile.i, tile.j] = tile.id
      if tile.kind == OFFDIAG and self.mirror:
        source[tile.j, tile.i] = tile.id
        transposed[tile.j, tile.i] = True
    return source, transposed

  def row_sources(self) -> np.ndarray:
    """Id of the tile providing `cov1`-like outputs of each row block."""
    by_cell = {(t.i, t.j): t.id for t in self.tiles}
    column = 0
    return np.asarray([by_cell[(i, i) if self.symmetric else (i, column)]
                       for i in range(self.n1_blocks)], np.int64)

  def column_sources(self) -> np.ndarray:
    """Id of the tile providing `cov2`-like outputs of each column block."""
    by_cell = {(t.i, t.j): t.id for t in self.tiles}
    return np.asarray([by_cell[(0, j)] for j in range(self.n2_blocks)],
                      np.int64)

  def describe(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def pad_rows(x: Any, n_rows: int) -> Any:
  """Pads every leaf's leading axis to `n_rows` with copies of row 0."""
  def pad(leaf):
    leaf = np.asarray(leaf)
    missing = n_rows - leaf.shape[0]
    if missing == 0:
      return leaf
    filler = np.broadcast_to(leaf[:1], (missing,) + leaf.shape[1:])
    return np.concatenate([leaf, filler], axis=0)
  return jax.tree.map(pad, x)


def tile_rows(x_padded: Any, blocks: np.ndarray, batch_size: int) -> Any:
  """Stacks row blocks `blocks` of padded inputs: `(len(blocks), b, ...)`."""
  def take(leaf):
    tiles = leaf.reshape((-1, batch_size) + leaf.shape[1:])
    return tiles[blocks]
  return jax.tree.map(take, x_padded)


def leading_size(x: Any, what: str) -> int:
  """The common leading (batch) size of all leaves of `x`."""
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None
           for leaf in jax.tree.leaves(x)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"`{what}` must be an array (or a pytree of arrays) "
                     f"with one leading batch size; got sizes {sizes}.")
  size = sizes.pop()
  assert size is not None  # Refused above.
  return size
