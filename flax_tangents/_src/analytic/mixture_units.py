"""Operations on every unit alike, applied exactly to mixtures.

A mixture (see `mixtures`) keeps the kernels of its parts; an operation
that acts on every unit alike (a nonlinearity, scalar arithmetic, batch
slicing) applies to each part, and the parts are averaged again: over
locations after `Flatten` (`spatial.flattened_average`), over branches
after a channel concatenation (`combinators.channel_average`).
"""

from __future__ import annotations

from typing import Callable

from flax_tangents._src.analytic import combinators
from flax_tangents._src.analytic import mixtures
from flax_tangents._src.analytic import spatial
from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["assemble", "map_units"]


def assemble(parts: tuple[Kernel, ...], assembly: str) -> Kernel:
  """The mixture of `parts`: flattened (one part) or concatenated."""
  if assembly == mixtures.FLATTEN:
    (part,) = parts
    return mixtures.with_parts(spatial.flattened_average(part), parts,
                               assembly)
  if assembly == mixtures.CONCAT:
    return mixtures.with_parts(combinators.channel_average(parts), parts,
                               assembly)
  raise ValueError(f"Unknown mixture assembly {assembly!r}.")


def map_units(kernel: Kernel, op: Callable[[Kernel], Kernel]) -> Kernel:
  """Applies `op`, which acts on every unit alike, exactly to a mixture.

  Args:
    kernel: any kernel.
    op: maps the kernel of identically distributed units to the kernel of
      the transformed units (e.g. a nonlinearity's rule).

  Returns:
    `op(kernel)` for identically distributed units; for a mixture, the
    mixture of `op` applied to each part.
  """
  parts = mixtures.parts_of(kernel)
  if parts is None:
    return op(kernel)
  new_parts = tuple(map_units(part, op) for part in parts)
  assembly = kernel._assembly  # pylint: disable=protected-access
  assert assembly is not None, "a mixture has an assembly"
  return assemble(new_parts, assembly)
