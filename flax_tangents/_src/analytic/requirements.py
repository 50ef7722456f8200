"""The requirement pass: which covariances the whole network needs.

Storing only spatial diagonals (or only batch diagonals of `cov1`/`cov2`) is
far cheaper, and is exact when no layer mixes locations (or inputs).
`ft.kernel_fn` first runs the model abstractly (`jax.eval_shape`) with full
covariances while a `Recording` is active; rules that need full covariances
say so through `record_full_spatial` / `record_full_batch`. The real pass then
uses the cheapest layout that serves every layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator, Optional

__all__ = ["Recording", "is_recording", "record_batch_mixing",
           "record_full_batch", "record_full_spatial", "recording",
           "watching_batch_mixing"]


@dataclasses.dataclass
class Recording:
  """Layers that asked for full covariances during a requirement pass."""
  full_spatial: list[str] = dataclasses.field(default_factory=list)
  full_batch: list[str] = dataclasses.field(default_factory=list)


_state = threading.local()


def _active() -> Optional[Recording]:
  return getattr(_state, "recording", None)


def is_recording() -> bool:
  """Whether a requirement pass is running (only shapes matter then)."""
  return _active() is not None


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
  """Collects requirements of the rules run inside the context."""
  previous = _active()
  _state.recording = Recording()
  try:
    yield _state.recording
  finally:
    _state.recording = previous


def record_full_spatial(layer: str) -> None:
  """Notes that `layer` needs location-location covariances."""
  active = _active()
  if active is not None:
    active.full_spatial.append(layer)


def record_full_batch(layer: str) -> None:
  """Notes that `layer` needs input-input covariances in `cov1`/`cov2`."""
  active = _active()
  if active is not None:
    active.full_batch.append(layer)


@contextlib.contextmanager
def watching_batch_mixing() -> Iterator[list[str]]:
  """Collects the layers run inside that combine inputs along the batch axis.

  Separate from `recording` (which marks a shapes-only requirement pass):
  `ft.batch` watches real passes, whose kernels must be computed in full.
  """
  previous = getattr(_state, "batch_mixing", None)
  current: list[str] = []
  _state.batch_mixing = current
  try:
    yield current
  finally:
    _state.batch_mixing = previous
    if previous is not None:
      previous.extend(current)


def record_batch_mixing(layer: str) -> None:
  """Notes that `layer` concatenates, selects or mixes along the batch axis.

  The kernel of a tile of such a layer's inputs is not a tile of its
  kernel, so `ft.batch` refuses models containing one.
  """
  watched = getattr(_state, "batch_mixing", None)
  if watched is not None:
    watched.append(layer)
