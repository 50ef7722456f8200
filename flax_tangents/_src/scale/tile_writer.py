"""The background writer of `TileCheckpoint`: rounds of tiles to disk.

Each round (the tiles one step of the computation made, one per device) is
written by a thread while the next round computes. Under multi-host every
process writes only the tiles its own devices hold. The first error stops
further writes and is kept in `error` for the checkpoint to raise.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Optional

import jax
import numpy as np

from flax_tangents._src.scale import tile_files

__all__ = ["TileWriter"]


class TileWriter:
  """A background thread writing rounds of tiles, one round at a time.

  Args:
    directory: the directory of the tile files.

  >>> import tempfile, numpy as np
  >>> from flax_tangents._src.scale import tile_files
  >>> directory = tempfile.mkdtemp()
  >>> writer = TileWriter(directory)
  >>> writer.put((np.asarray([0, -1]), {"leaf_0": np.ones((2, 3))}))
  >>> writer.stop()
  >>> writer.error, sorted(tile_files.tile_ids(directory))
  (None, [0])
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.error: Optional[BaseException] = None
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="flax_tangents tile writer")
    self._thread.start()

  def put(self, item: Any) -> None:
    """Queues `(ids, {leaf name: leaf})`: a round of tiles (-1: padding)."""
    self._queue.put(item)

  def wait(self) -> None:
    """Waits until every queued round is written (or failed)."""
    self._queue.join()

  def stop(self) -> None:
    """Writes the queued rounds and ends the thread."""
    self._queue.put(None)
    self._thread.join()

  def _run(self) -> None:
    while True:
      item = self._queue.get()
      try:
        if item is None:
          return
        if self.error is None:
          self._write_round(*item)
      except BaseException as error:  # pylint: disable=broad-except
        self.error = error
      finally:
        self._queue.task_done()

  def _write_round(self, ids: np.ndarray, leaves: dict[str, Any]) -> None:
    tiles: dict[int, dict[str, np.ndarray]] = {}
    for name, leaf in leaves.items():
      for position, value in _local_tiles(leaf):
        if ids[position] >= 0:
          tiles.setdefault(position, {})[name] = value
    for position, arrays in sorted(tiles.items()):
      tile_files.write_tile(self.directory, int(ids[position]), arrays)


def _local_tiles(leaf: Any) -> Iterator[tuple[int, np.ndarray]]:
  """`(position in the round, tile)` for the tiles this process holds."""
  if not isinstance(leaf, jax.Array):
    array = np.asarray(leaf)
    yield from enumerate(array)
    return
  for shard in leaf.addressable_shards:
    start = shard.index[0].start or 0
    for offset, tile in enumerate(np.asarray(shard.data)):
      yield start + offset, tile
