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

__all__ = ["Recording", "is_recording", "record_full_batch",
           "record_full_spatial", "recording"]


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
