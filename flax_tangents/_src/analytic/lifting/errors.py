"""The error of a plain function that cannot be lifted, with its source line."""

from __future__ import annotations

import os
from typing import Any, Optional

import flax
from jax.extend import source_info_util

import flax_tangents
from flax_tangents._src.analytic.errors import KernelRuleError

__all__ = ["LiftingError", "source_line"]

# Frames inside these packages are library code, not the user's line.
_LIBRARY_DIRS = tuple(
    os.path.dirname(package.__file__) + os.sep
    for package in (flax, flax_tangents))


def source_line(source_info: Any) -> str:
  """`file:line (function)` of the user's code that made an equation.

  JAX's own frames are already dropped by `summarize`; Flax's and this
  library's frames are skipped here, so a primitive from `nn.avg_pool` is
  reported at the user's call of `nn.avg_pool`.
  """
  if source_info is None:
    return "an unknown line"
  frames = source_info_util.summarize(source_info, num_frames=32)
  frames = [f for f in frames.split("\n") if f and f != "unknown"]
  # `summarize` lists the outermost frame first.
  for frame in reversed(frames):
    if not frame.startswith(_LIBRARY_DIRS):
      return frame
  return frames[-1] if frames else "an unknown line"


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
