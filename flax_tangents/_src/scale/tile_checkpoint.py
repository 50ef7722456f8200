"""Finished kernel tiles on disk, for resuming after a crash.

Layout of a checkpoint directory:

    fingerprint.json       what the tiles were computed for
    layout.json            the tiling and the output arrays of each tile
    lock                   held (flock) by the process computing into it
    tiles/tile_<id>.npz    one file per finished tile (see `tile_files`)

Guarantees:

- A crash (even SIGKILL) loses at most the round being computed and the
  one being written: rounds are written by a background thread while the
  next round computes, and a round is queued only once the previous one is
  on disk. A file under its final name is complete (written under a
  temporary name, then renamed); leftovers of interrupted writes are removed
  when the directory is next opened.
- A damaged tile file (truncated, altered bytes: the zip CRC-32 of each
  array is checked) is reported with a warning naming it, set aside as
  `tile_<id>.npz.damaged`, and recomputed.
- A directory that cannot be written is reported before anything is
  computed (a finished checkpoint can still be read from it).
- One directory, one computation: a second process starting on a directory
  in use gets `CheckpointInUseError` naming the holder. Under multi-host,
  process 0 holds the lock for all processes of the run.
- A failed write (a full disk) stops the computation with
  `CheckpointWriteError`, which says how much is saved; the directory
  resumes once space is freed.

Tile ids do not depend on the number of devices, so a run resumes on any
mesh. Under multi-host, every process writes the tiles its own devices
computed, and the processes agree on which tiles are finished.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any, Iterator, Mapping, Optional
import warnings

import jax
import numpy as np

from flax_tangents._src.scale import devices
from flax_tangents._src.scale import fingerprint as fingerprint_lib
from flax_tangents._src.scale import tile_files
from flax_tangents._src.scale import tile_writer

try:
  import fcntl
except ImportError:  # Windows: no advisory locks; the lock is skipped.
  fcntl = None

__all__ = ["CheckpointInUseError", "CheckpointMismatchError",
           "CheckpointWriteError", "TileCheckpoint"]

_FINGERPRINT_FILE = "fingerprint.json"
LAYOUT_FILE = "layout.json"
_LOCK_FILE = "lock"
# Tiles restored per group handed to the assembler (bounds host memory).
_RESTORE_GROUP = 64


class CheckpointMismatchError(ValueError):
  """A checkpoint directory holds tiles of a different kernel."""


class CheckpointInUseError(RuntimeError):
  """Another process is computing into the same checkpoint directory."""


class CheckpointWriteError(OSError):
  """A checkpoint directory cannot be written (permissions, full disk)."""


def _is_write_error(error: BaseException) -> bool:
  return isinstance(error, OSError) and not isinstance(
      error, (FileNotFoundError, IsADirectoryError))


class TileCheckpoint:
  """Reads and writes finished tiles under `directory`.

  Args:
    directory: the checkpoint directory (created if missing). Under
      multi-host it must be on a file system all processes share.
    fingerprint: named digests of what is computed (see `fingerprint`).
    layout: how tiles form the kernel (the tiling and the output arrays),
      written for readers such as `ft.predict.TiledKernel`.

  Raises:
    CheckpointMismatchError: if `directory` was written for another
      fingerprint.
    CheckpointInUseError: if another process holds the directory.
    CheckpointWriteError: if a new directory cannot be created.
  """

  def __init__(self, directory: str | os.PathLike,
               fingerprint: dict[str, str],
               layout: Optional[dict[str, Any]] = None):
    self.directory = os.path.abspath(os.fspath(directory))
    self.tiles_directory = os.path.join(self.directory, "tiles")
    self._lock_file = None
    self._writer: Optional[tile_writer.TileWriter] = None
    try:
      self._lock()
      self._check_or_write_fingerprint(fingerprint)
      if layout is not None:
        self._write_layout(layout)
      if devices.is_primary_process() and self._lock_file is not None:
        for leftover in tile_files.temporary_files(self.tiles_directory):
          _remove(leftover)
    except BaseException:
      self._unlock()
      raise

  # ------------------------------------------------------------- opening

  def _lock(self) -> None:
    """Takes the directory's lock (process 0), or learns it is read-only."""
    state = "ok"
    if devices.is_primary_process():
      state = self._try_lock()
    states = devices.gather_strings(state)
    if states[0] == "ok":
      return
    self._unlock()
    if states[0].startswith("in use"):
      holder = states[0][len("in use"):].strip() or "holder unknown"
      raise CheckpointInUseError(
          f"checkpoint_dir {self.directory!r} is in use by another "
          f"computation ({holder}). Two runs writing one directory would "
          "compete for the same tiles: wait for the other run to finish "
          "(then rerun: finished tiles are reused), or give this run its "
          "own checkpoint_dir.")
    raise CheckpointWriteError(errno.EACCES, states[0])

  def _try_lock(self) -> str:
    try:
      os.makedirs(self.tiles_directory, exist_ok=True)
    except OSError as error:
      if not os.path.isdir(self.directory):
        return (f"checkpoint_dir {self.directory!r} cannot be created "
                f"({error}); choose a writable location.")
    if fcntl is None:
      return "ok"
    path = os.path.join(self.directory, _LOCK_FILE)
    try:
      lock_file = open(path, "a+")  # pylint: disable=consider-using-with
    except OSError:
      return "ok"  # A read-only directory: nothing will be written to it.
    try:
      fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      lock_file.seek(0)
      holder = lock_file.read().strip()
      lock_file.close()
      if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return f"in use {holder}"
      return "ok"  # A file system without locks: proceed unlocked.
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"process {os.getpid()} on host {socket.gethostname()} "
                    f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock_file.flush()
    self._lock_file = lock_file
    return "ok"

  def _unlock(self) -> None:
    if self._lock_file is not None:
      assert fcntl is not None  # A lock file is only held with fcntl.
      try:
        fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
      finally:
        self._lock_file.close()
        self._lock_file = None

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
    failure = ""
    if devices.is_primary_process():
      try:
        _write_json(path, fingerprint)
      except OSError as error:
        failure = (f"checkpoint_dir {self.directory!r} cannot be written "
                   f"({error}); choose a writable location, or pass "
                   "checkpoint_dir=None to compute without saving.")
    failure = devices.gather_strings(failure)[0]
    if failure:
      raise CheckpointWriteError(errno.EACCES, failure)

  def _write_layout(self, layout: dict[str, Any]) -> None:
    path = os.path.join(self.directory, LAYOUT_FILE)
    if devices.is_primary_process() and not os.path.exists(path):
      try:
        _write_json(path, layout)
      except OSError:
        pass  # Read-only and finished: readers need it, computing does not.
    devices.sync("flax_tangents_layout_written")

  # ------------------------------------------------------------- reading

  def load(self, n_tiles: int,
           expected: Mapping[str, tuple[tuple[int, ...], str]]
           ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yields `(tile ids, output arrays)` of the finished tiles, in groups.

    Every tile file is read and verified; damaged ones are set aside with a
    warning (their tiles are then computed again). Under multi-host, a tile
    counts as finished only if every process read it.

    Args:
      n_tiles: the number of tiles of the plan (ids are below it).
      expected: `{leaf name: (tile shape, dtype name)}` of the outputs.
    """
    found = {i: p for i, p in tile_files.tile_ids(self.tiles_directory).items()
             if i < n_tiles}
    tiles, damaged = {}, {}
    for tile_id in sorted(found):
      try:
        tiles[tile_id] = tile_files.read_tile(found[tile_id], tile_id,
                                              expected)
      except tile_files.DamagedTileError as error:
        damaged[tile_id] = str(error)
    ok = np.zeros(n_tiles, bool)
    ok[list(tiles)] = True
    ok = devices.all_processes_agree(ok)
    for tile_id in sorted(set(found) - set(np.flatnonzero(ok).tolist())):
      tiles.pop(tile_id, None)
      self._set_aside(found[tile_id], damaged.get(
          tile_id, "another process could not read it"))
    by_names: dict[tuple[str, ...], list[int]] = {}
    for tile_id, arrays in tiles.items():
      by_names.setdefault(tuple(sorted(arrays)), []).append(tile_id)
    for names, ids in by_names.items():
      for start in range(0, len(ids), _RESTORE_GROUP):
        group = ids[start:start + _RESTORE_GROUP]
        yield np.asarray(group, np.int64), {
            name: np.stack([tiles[i][name] for i in group]) for name in names}
        for i in group:
          del tiles[i]

  def _set_aside(self, path: str, reason: str) -> None:
    if devices.is_primary_process():
      warnings.warn(
          f"Checkpoint tile file {path!r} is damaged ({reason}); its tile "
          "is computed again, and the file is kept as "
          f"{os.path.basename(path)}.damaged.", RuntimeWarning, stacklevel=4)
      try:
        os.replace(path, path + ".damaged")
      except OSError:
        pass  # Read-only: the recomputed tile cannot be saved either.
    devices.sync("flax_tangents_damaged_tiles")

  # ------------------------------------------------------------- writing

  def ensure_writable(self) -> None:
    """Raises `CheckpointWriteError` unless every process can write tiles."""
    failure = ""
    try:
      tile_files.probe_writable(self.tiles_directory)
    except OSError as error:
      failure = (
          f"checkpoint_dir {self.directory!r} is not writable ({error}): "
          f"the tiles still missing there could not be saved. Make it "
          "writable, copy it to a writable location and pass that, or pass "
          "checkpoint_dir=None to compute without saving.")
    failures = [f for f in devices.gather_strings(failure) if f]
    if failures:
      raise CheckpointWriteError(errno.EACCES, failures[0])

  def save(self, ids: np.ndarray, leaves: Mapping[str, Any]) -> None:
    """Queues a round for writing once the previous round is written.

    Args:
      ids: tile ids of the round (-1 for padding).
      leaves: `{leaf name: array with a leading round axis}`, host numpy
        arrays or `jax.Array`s sharded one tile per device.

    Raises:
      CheckpointWriteError: if writing an earlier round failed.
    """
    if self._writer is None:
      self._writer = tile_writer.TileWriter(self.tiles_directory)
    for leaf in leaves.values():
      if isinstance(leaf, jax.Array):
        leaf.copy_to_host_async()
    self._writer.wait()
    self._raise_write_error()
    self._writer.put((np.asarray(ids), dict(leaves)))

  def _raise_write_error(self) -> None:
    error = None if self._writer is None else self._writer.error
    if error is None:
      return
    if not _is_write_error(error):
      raise error
    written = len(tile_files.tile_ids(self.tiles_directory))
    raise CheckpointWriteError(
        getattr(error, "errno", None) or errno.EIO,
        f"Writing kernel tiles to checkpoint_dir {self.directory!r} failed "
        f"({error}). The computation stopped; the {written} tiles on disk "
        "are complete and a rerun resumes from them once the cause is "
        "fixed (free disk space, or pass another checkpoint_dir).") from error

  def close(self) -> None:
    """Waits for pending writes; raises if any failed."""
    try:
      if self._writer is not None:
        self._writer.stop()
        self._raise_write_error()
    finally:
      self._unlock()

  def abandon(self) -> None:
    """After an error: lets pending writes finish (they are complete tiles)."""
    try:
      if self._writer is not None:
        self._writer.stop()
    finally:
      self._unlock()


def _write_json(path: str, contents: Any) -> None:
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    json.dump(contents, f, indent=1, sort_keys=True)
  os.replace(temporary, path)  # Atomic: never a half-written file.


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass
