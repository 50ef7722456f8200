"""A dependency-free progress bar for tiled kernel computations."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Union

__all__ = ["Progress", "ProgressArg"]

ProgressArg = Union[None, bool, Callable[[int, int], None]]

_WIDTH = 24
_MIN_INTERVAL_S = 0.2


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


class Progress:
  """Reports tiles done and an estimate of the time left.

  Args:
    total: number of tiles in the kernel.
    done: tiles already finished (restored from a checkpoint).
    setting: `True` draws a bar on stderr, `False` nothing, `None` draws it
      when stderr is a terminal, and a callable is called as
      `setting(tiles_done, tiles_total)` after every round of tiles.
    primary: whether this process reports (one process of many does).
  """

  def __init__(self, total: int, done: int, setting: ProgressArg,
               primary: bool = True):
    self.total, self.done, self._start_done = total, done, done
    self._callback: Optional[Callable[[int, int], None]] = None
    self._draw = False
    if callable(setting):
      self._callback = setting
    elif primary:
      self._draw = (sys.stderr.isatty() if setting is None else bool(setting))
    self._start = time.perf_counter()
    self._last_draw = 0.0
    self._report(force=True)

  def update(self, n_tiles: int) -> None:
    self.done += n_tiles
    self._report(force=self.done == self.total)

  def close(self) -> None:
    if self._draw:
      if self.done != self.total:  # A finished bar is already drawn.
        self._report(force=True)
      sys.stderr.write("\n")
      sys.stderr.flush()

  def _report(self, force: bool) -> None:
    if self._callback is not None:
      self._callback(self.done, self.total)
    if not self._draw:
      return
    now = time.perf_counter()
    if not force and now - self._last_draw < _MIN_INTERVAL_S:
      return
    self._last_draw = now
    elapsed = now - self._start
    computed = self.done - self._start_done
    left = self.total - self.done
    eta = (f"~{_format_seconds(elapsed / computed * left)} left"
           if computed else "")
    fraction = self.done / max(self.total, 1)
    filled = int(_WIDTH * fraction)
    bar = "#" * filled + "." * (_WIDTH - filled)
    sys.stderr.write(f"\rft.batch [{bar}] {self.done}/{self.total} tiles "
                     f"{_format_seconds(elapsed)} elapsed {eta}   ")
    sys.stderr.flush()
