"""Finished kernel tiles as files: one `.npz` archive per tile.

A tile file `tile_<id>.npz` holds the tile's output arrays (`leaf<k>`, one
tile each, without the round axis) and its id. It is written to a temporary
name and renamed into place, so a file under its final name is complete;
the zip format's CRC-32 of every member is checked when the file is read,
so a truncated or altered file is detected, never read as numbers.

These files are shared by the checkpoints of `ft.batch` and the out-of-core
solvers of `ft.predict`, which stream a kernel tile by tile from them.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Mapping, Optional

import numpy as np

__all__ = ["DamagedTileError", "probe_writable", "read_tile",
           "temporary_files", "tile_ids", "tile_path", "write_tile"]

_TILE_NAME = re.compile(r"^tile_(\d+)\.npz$")
_TEMPORARY = ".tmp-"


class DamagedTileError(ValueError):
  """A tile file cannot be read back as the tile it should hold."""


def tile_path(directory: str, tile_id: int) -> str:
  return os.path.join(directory, f"tile_{int(tile_id):08d}.npz")


def tile_ids(directory: str) -> dict[int, str]:
  """`{tile id: path}` of the tile files under their final names."""
  if not os.path.isdir(directory):
    return {}
  found = {}
  for name in os.listdir(directory):
    match = _TILE_NAME.match(name)
    if match:
      found[int(match.group(1))] = os.path.join(directory, name)
  return found


def temporary_files(directory: str) -> list[str]:
  """Leftovers of writes interrupted by a crash."""
  if not os.path.isdir(directory):
    return []
  return [os.path.join(directory, n) for n in os.listdir(directory)
          if _TEMPORARY in n]


def probe_writable(directory: str) -> None:
  """Raises `OSError` unless a file can be created in `directory`."""
  probe = os.path.join(directory, f"probe{_TEMPORARY}{os.getpid()}-"
                       f"{threading.get_ident()}")
  with open(probe, "wb") as file:
    file.write(b"0")
  os.remove(probe)


def _save(file, arrays: Mapping[str, np.ndarray]) -> None:
  named: dict[str, Any] = dict(arrays)
  np.savez(file, **named)


def write_tile(directory: str, tile_id: int,
               arrays: Mapping[str, np.ndarray]) -> None:
  """Writes one tile atomically (temporary file, then rename).

  Raises:
    OSError: if the file cannot be written (no space, no permission); no
      file is left under the final name or a temporary one.
  """
  path = tile_path(directory, tile_id)
  temporary = f"{path}{_TEMPORARY}{os.getpid()}-{threading.get_ident()}"
  contents = {"id": np.asarray(tile_id, np.int64)}
  contents.update(arrays)
  try:
    with open(temporary, "wb") as file:
      _save(file, contents)
    os.replace(temporary, path)
  except BaseException:
    try:
      os.remove(temporary)
    except OSError:
      pass
    raise


def read_tile(path: str, tile_id: int,
              expected: Optional[Mapping[str, tuple[tuple[int, ...], str]]]
              = None) -> dict[str, np.ndarray]:
  """Reads and verifies one tile file.

  Args:
    path: the file.
    tile_id: the id it must hold.
    expected: `{name: (shape, dtype name)}` of the arrays a tile may hold;
      each array in the file must be one of them, with that shape and dtype.

  Returns:
    `{name: array}` of the tile's output arrays.

  Raises:
    DamagedTileError: if the file is unreadable, fails its checksums, or
      holds another tile or other arrays than expected.
  """
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {name: archive[name] for name in archive.files}
  except Exception as error:  # pylint: disable=broad-except
    # zipfile.BadZipFile (CRC mismatch, truncation), ValueError, OSError...
    raise DamagedTileError(f"{type(error).__name__}: {error}") from error
  stored_id = arrays.pop("id", None)
  if stored_id is None or stored_id.shape != () or int(stored_id) != tile_id:
    raise DamagedTileError(f"it holds tile {stored_id}, not {tile_id}")
  if expected is not None:
    for name, array in arrays.items():
      if name not in expected:
        raise DamagedTileError(f"unexpected array {name!r}")
      shape, dtype = expected[name]
      if array.shape != tuple(shape) or array.dtype.name != dtype:
        raise DamagedTileError(
            f"{name} has shape {array.shape} and dtype {array.dtype}, "
            f"expected {tuple(shape)} and {dtype}")
  if not arrays:
    raise DamagedTileError("it holds no arrays")
  return arrays
