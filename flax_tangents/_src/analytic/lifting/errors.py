"""The error of a plain function that cannot be lifted, with its source line."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

import flax
from jax.extend import source_info_util

from flax_tangents._src.analytic.errors import KernelRuleError

__all__ = ["LiftingError", "add_line", "source_line", "user_frame",
           "user_source_line"]

# Frames inside these packages are library code, not the user's line. This
# file is flax_tangents/_src/analytic/lifting/errors.py (no import of the
# package itself, which would be an import cycle).
_LIBRARY_DIRS = (os.path.dirname(flax.__file__) + os.sep,
                 str(pathlib.Path(__file__).parents[3]) + os.sep)


def _frames(source_info: Any) -> list[str]:
  if source_info is None:
    return []
  frames = source_info_util.summarize(source_info, num_frames=32)
  # `summarize` lists the outermost frame first.
  return [f for f in frames.split("\n") if f and f != "unknown"]


def source_line(source_info: Any) -> str:
  """`file:line (function)` of the user's code that made an equation.

  JAX's own frames are already dropped by `summarize`; Flax's and this
  library's frames are skipped here, so a primitive from `nn.avg_pool` is
  reported at the user's call of `nn.avg_pool`.
  """
  frames = _frames(source_info)
  found = user_frame(frames)
  if found is not None:
    return found
  return frames[-1] if frames else "an unknown line"


def user_source_line(source_info: Any) -> Optional[str]:
  """Like `source_line`, but `None` when no frame is the user's code."""
  return user_frame(_frames(source_info))


def user_frame(frames: list[str]) -> Optional[str]:
  """The innermost frame (`file:line (function)`) outside Flax, JAX and
  this library, or `None` if every frame is library code."""
  for frame in reversed(frames):
    if not frame.startswith(_LIBRARY_DIRS) and "/jax/" not in frame and (
        "/jaxlib/" not in frame):
      return frame
  return None


def add_line(error: BaseException, line: Optional[str]) -> None:
  """Appends the user's line that called a refused module to `error`.

  A refusal raised by a submodule's rule (e.g. `nn.BatchNorm` in training
  mode) names the module but not the line of the lifted code that called
  it; the innermost lifted call adds it, once. `LiftingError`s already name
  their line and are left alone.

  Args:
    error: the exception (its first argument is the message).
    line: `file:line (function)`, or `None` to leave the error unchanged.

  >>> error = TypeError("no rule")
  >>> add_line(error, "net.py:7 (Net.__call__)")
  >>> str(error)
  'no rule (called at net.py:7 (Net.__call__))'
  """
  if (line is None or isinstance(error, LiftingError) or
      getattr(error, "flax_tangents_line", None) is not None):
    return
  if not error.args or not isinstance(error.args[0], str):
    return
  setattr(error, "flax_tangents_line", line)
  error.args = (f"{error.args[0]} (called at {line})",) + error.args[1:]


class LiftingError(KernelRuleError):
  """A plain function in a module's call has no exact infinite-width rule.

  Attributes:
    module: the module being lifted (its path and type).
    primitive: the JAX primitive (or Python construct) that was refused.
    line: `file:line (function)` of the user's code.
  """

  def __init__(self, module: str, primitive: str, line: Optional[str],
               reason: str):
    self.module = module
    self.primitive = primitive
    self.line = line
    where = f" at {line}" if line else ""
    super().__init__(
        f"{module}: cannot lift `{primitive}`{where} to an infinite-width "
        f"kernel: {reason}")
