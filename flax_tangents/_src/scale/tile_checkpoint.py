"""Finished kernel tiles on disk, through orbax, for resuming after a crash.

Layout of a checkpoint directory:

    fingerprint.json            what the tiles were computed for
    tiles/tiles_<first>_<last>/ one orbax checkpoint per round of tiles:
                                {'ids': tile ids (-1 for padding),
                                 'leaf<k>': the k-th output array of each
                                 tile, for the arrays the round computed}

Orbax writes each round into a temporary directory and renames it when
complete, so a crash leaves only finished rounds under their final names;
temporary leftovers are ignored. Tile ids do not depend on the number of
devices, so a run resumes on any mesh. Saving is asynchronous: the next
round computes while the previous one is written.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from flax_tangents._src.scale import devices
from flax_tangents._src.scale import fingerprint as fingerprint_lib

__all__ = ["CheckpointMismatchError", "TileCheckpoint"]

_ROUND_NAME = re.compile(r"^tiles_(\d+)_(\d+)$")
_FINGERPRINT_FILE = "fingerprint.json"


class CheckpointMismatchError(ValueError):
  """A checkpoint directory holds tiles of a different kernel."""


class TileCheckpoint:
  """Reads and writes rounds of finished tiles under `directory`.

  Args:
    directory: the checkpoint directory (created if missing). Under
      multi-host it must be on a file system all processes share.
    fingerprint: named digests of what is computed (see `fingerprint`).

  Raises:
    CheckpointMismatchError: if `directory` was written for another
      fingerprint.
  """

  def __init__(self, directory: str | os.PathLike,
               fingerprint: dict[str, str]):
    self.directory = os.path.abspath(os.fspath(directory))
    self.tiles_directory = os.path.join(self.directory, "tiles")
    self._check_or_write_fingerprint(fingerprint)
    self._saver = ocp.StandardCheckpointer()
    self._reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

  def _check_or_write_fingerprint(self, fingerprint: dict[str, str]) -> None:
    path = os.path.join(self.directory, _FINGERPRINT_FILE)
    # Every process reads before any writes, so all take the same branch.
    devices.sync("flax_tangents_fingerprint_read")
    stored = None
    if os.path.exists(path):
      with open(path) as f:
        stored = json.load(f)
    devices.sync("flax_tangents_fingerprint_checked")
    if stored is not None:
      differing = fingerprint_lib.mismatches(stored, fingerprint)
      if differing:
        raise CheckpointMismatchError(
            f"checkpoint_dir {self.directory!r} holds kernel tiles computed "
            f"for different {', '.join(differing)} than this call; refusing "
            "to mix them. Use a new directory for this kernel, or delete "
            "the old one to start over.")
      return
    if devices.is_primary_process():
      os.makedirs(self.tiles_directory, exist_ok=True)
      temporary = path + ".tmp"
      with open(temporary, "w") as f:
        json.dump(fingerprint, f, indent=1, sort_keys=True)
      os.replace(temporary, path)  # Atomic: never a half-written file.
    devices.sync("flax_tangents_fingerprint_written")

  def finished_rounds(self) -> list[str]:
    """Paths of the rounds written completely."""
    if not os.path.isdir(self.tiles_directory):
      return []
    names = sorted(n for n in os.listdir(self.tiles_directory)
                   if _ROUND_NAME.match(n))
    return [os.path.join(self.tiles_directory, n) for n in names]

  def load(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yields `(tile ids, output arrays)` of every finished round."""
    for path in self.finished_rounds():
      metadata = self._reader.metadata(path)
      tree = getattr(metadata, "item_metadata", metadata)
      tree = getattr(tree, "tree", tree)
      restore_args = jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree))
      restored = self._reader.restore(
          path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
      ids = np.asarray(restored.pop("ids"))
      yield ids, {name: np.asarray(v) for name, v in restored.items()}

  def save(self, ids: np.ndarray, leaves: dict[str, jax.Array]) -> None:
    """Starts writing a round; returns once its arrays are copied."""
    real = ids[ids >= 0]
    name = f"tiles_{int(real.min()):08d}_{int(real.max()):08d}"
    tree = {"ids": np.asarray(ids, np.int64)}
    tree.update(leaves)
    self._saver.save(os.path.join(self.tiles_directory, name), tree)

  def close(self) -> None:
    """Waits for pending writes."""
    self._saver.wait_until_finished()
    self._saver.close()

  def abandon(self) -> None:
    """After an error: lets pending writes finish (they are complete tiles)."""
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass  # The original error matters more; unfinished rounds are ignored.
