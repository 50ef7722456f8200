"""A kernel held on disk as the finished tiles of an `ft.batch` checkpoint.

`TiledKernel(checkpoint_dir, get)` reads the checkpoint's `layout.json` (the
tiling and the arrays each tile holds) and serves the kernel matrix tile by
tile, never whole: `ft.predict`'s iterative solvers stream it from disk, so
a kernel larger than the memory of all devices together can be solved.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from flax_tangents._src.scale import tile_files
from flax_tangents._src.scale.tile_checkpoint import LAYOUT_FILE
from flax_tangents._src.scale.tile_plan import TilePlan

__all__ = ["TiledKernel"]


class TiledKernel:
  """An `(n1, n2)` kernel matrix stored as `ft.batch` checkpoint tiles.

  Args:
    checkpoint_dir: the `checkpoint_dir` of a finished `ft.batch` call.
    get: which output to use when the tiles hold several kernel arrays
      (`'nngp'`, `'ntk'`, or a namedtuple field); optional when there is
      one.

  Attributes:
    shape: `(n1, n2)`.
    dtype: the kernel's dtype.
    symmetric: whether it was computed with `x2=None` (then only tiles on
      and above the diagonal are stored; the others are their transposes).
    batch_size: rows and columns of a tile.

  Raises:
    FileNotFoundError: if `checkpoint_dir` holds no `ft.batch` checkpoint.
    ValueError: if `get` names no kernel array of it, or the array is not a
      matrix (kernels with `trace_axes=()` or spatial axes are not).

  >>> import numpy as np, tempfile
  >>> import flax_tangents as ft
  >>> directory = tempfile.mkdtemp()
  >>> x = np.random.RandomState(0).randn(7, 3)
  >>> k = ft.batch(lambda a, b=None, get=None: a @ (a if b is None else b).T,
  ...              3, checkpoint_dir=directory)(x)
  >>> tiled = ft.predict.TiledKernel(directory)
  >>> tiled.shape, tiled.batch_size, tiled.symmetric
  ((7, 7), 3, True)
  >>> bool(np.allclose(tiled.to_array(), k))
  True
  """

  def __init__(self, checkpoint_dir: str | os.PathLike,
               get: Optional[str] = None):
    self.directory = os.path.abspath(os.fspath(checkpoint_dir))
    path = os.path.join(self.directory, LAYOUT_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{self.directory!r} holds no ft.batch checkpoint (no "
          f"{LAYOUT_FILE}); compute the kernel with ft.batch(kernel_fn, "
          "batch_size, checkpoint_dir=...) first.")
    with open(path) as f:
      layout = json.load(f)
    plan = layout["plan"]
    self.plan = TilePlan(plan["n1"], plan["n2"], plan["batch_size"],
                         plan["symmetric"], plan["mirror"])
    self.leaf_index, leaf = self._select(layout["leaves"], get)
    self.leaf_name = f"leaf{self.leaf_index}"
    self.name = leaf["name"] or get or "kernel"
    if len(leaf["shape"]) != 2:
      raise ValueError(
          f"The {self.name!r} tiles in {self.directory!r} have shape "
          f"{tuple(leaf['shape'])}; the iterative solvers need an (N1, N2) "
          "kernel matrix (compute it with trace_axes covering the output "
          "axes and without spatial axes, e.g. get='ntk' of a network "
          "ending in pooling or Flatten).")
    self.dtype = np.dtype(leaf["dtype"])
    self.shape = (self.plan.n1, self.plan.n2)
    self.batch_size = self.plan.batch_size
    self.symmetric = self.plan.symmetric
    self.tiles_directory = os.path.join(self.directory, "tiles")
    self._expected = {f"leaf{k}": (tuple(other["shape"]), other["dtype"])
                      for k, other in enumerate(layout["leaves"])}

  def _select(self, leaves: list[dict[str, Any]],
              get: Optional[str]) -> tuple[int, dict[str, Any]]:
    pairs = [(k, leaf) for k, leaf in enumerate(leaves)
             if leaf["role"] == "pair"]
    if get is not None:
      named = [(k, leaf) for k, leaf in pairs if leaf["name"] == get]
      if len(named) == 1:
        return named[0]
    elif len(pairs) == 1:
      return pairs[0]
    names = [leaf["name"] for _, leaf in pairs]
    raise ValueError(
        f"Pass get= one of {names} to choose the kernel array of "
        f"{self.directory!r}" + ("" if get is None else f" (got {get!r})")
        + ".")

  def __repr__(self) -> str:
    return (f"TiledKernel({self.directory!r}, get={self.name!r}, "
            f"shape={self.shape}, dtype={self.dtype.name}, "
            f"batch_size={self.batch_size})")

  # --------------------------------------------------------------- tiles

  @property
  def stored_tiles(self):
    """The tiles on disk: `Tile(id, i, j, kind)`, row block `i`, column
    block `j` (for a symmetric kernel: those with `i <= j`)."""
    return self.plan.tiles

  def missing(self) -> list[int]:
    """Ids of tiles not (yet) on disk."""
    present = tile_files.tile_ids(self.tiles_directory)
    return [tile.id for tile in self.plan.tiles if tile.id not in present]

  def check_complete(self) -> None:
    """Raises `ValueError` naming the missing tiles, if any."""
    missing = self.missing()
    if missing:
      raise ValueError(
          f"The kernel in {self.directory!r} is unfinished: {len(missing)} "
          f"of {len(self.plan.tiles)} tiles are missing (e.g. tile "
          f"{missing[0]}). Rerun the ft.batch call that computes it (it "
          "resumes and computes only those), then solve.")

  def read(self, tile_id: int) -> np.ndarray:
    """One tile, `(batch_size, batch_size)`, padded past the kernel's edge.

    Raises:
      ValueError: if the tile is missing or its file is damaged (rerun the
        ft.batch call to recompute it).
    """
    path = tile_files.tile_path(self.tiles_directory, tile_id)
    try:
      arrays = tile_files.read_tile(path, tile_id, self._expected)
    except FileNotFoundError:
      raise ValueError(f"Tile {tile_id} of {self.directory!r} is missing; "
                       "rerun the ft.batch call that computes it.") from None
    except tile_files.DamagedTileError as error:
      raise ValueError(
          f"Tile file {path!r} is damaged ({error}); rerun the ft.batch call "
          "that computed the kernel: it recomputes damaged tiles.") from error
    if self.leaf_name not in arrays:
      raise ValueError(f"Tile file {path!r} lacks the {self.name!r} array.")
    return arrays[self.leaf_name]

  def to_array(self) -> np.ndarray:
    """The whole kernel in host memory (for kernels that fit)."""
    self.check_complete()
    b = self.batch_size
    full = np.zeros((self.plan.n1_blocks * b, self.plan.n2_blocks * b),
                    self.dtype)
    for tile in self.plan.tiles:
      values = self.read(tile.id)
      full[tile.i * b:(tile.i + 1) * b, tile.j * b:(tile.j + 1) * b] = values
      if self.symmetric and tile.i != tile.j and self.plan.mirror:
        full[tile.j * b:(tile.j + 1) * b, tile.i * b:(tile.i + 1) * b] = (
            values.T)
    return full[:self.shape[0], :self.shape[1]]
