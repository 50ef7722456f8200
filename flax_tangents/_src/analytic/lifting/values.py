"""What a variable of a lifted program holds while it is interpreted.

- `Const`: a value that does not depend on the network's input (a literal, a
  constant array, anything computed from those), with a flag for values
  derived from the module's own parameters.
- `Net`: a value that does, described by its `Kernel` (activations
  `(N, *spatial, C)`, channels infinitely many) and its `Provenance`.
- `Elem`: an elementwise function of one `Net`, kept symbolic until another
  kind of operation needs its kernel (so that `0.5 * x * (1 + erf(x /
  sqrt2))` is recognized as a whole).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import numpy as np

from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.lifting import expressions as ex
from flax_tangents._src.analytic.lifting.provenance import Provenance

__all__ = ["Const", "Elem", "Net", "Value", "uniform_value"]


@dataclasses.dataclass(frozen=True, eq=False)
class Const:
  """A value independent of the network's input.

  Attributes:
    value: the array (possibly a tracer under `jit`).
    from_params: computed from the module's own parameters.
  """
  value: Any
  from_params: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Net:
  """A value that depends on the network's input, by its kernel.

  Attributes:
    kernel: its kernel.
    provenance: which layers it depends on (see `provenance`).
  """
  kernel: Kernel
  provenance: Provenance


@dataclasses.dataclass(frozen=True, eq=False)
class Elem:
  """`expr` applied elementwise to the value of `root`.

  Attributes:
    root: the pre-activation.
    expr: the function, an expression over `expressions.Root`.
    origin: the equation that started it (for messages).
  """
  root: Net
  expr: ex.Expr
  origin: Any = None


Value = Union[Const, Net, Elem]


def uniform_value(value: Any) -> Optional[np.ndarray]:
  """The single value of a constant array (0-d), or `None` if it varies.

  Values unknown at trace time (tracers) are not uniform.
  """
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except  (a tracer)
    return None
  if array.size == 0:
    return None
  first = array.reshape(-1)[0]
  if array.dtype == object or not np.all(array == first):
    return None
  return np.asarray(first)
