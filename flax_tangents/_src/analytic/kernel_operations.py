"""The rule math behind `Kernel`'s methods, installed by `kernel_methods`.

`Kernel.slice`, `Kernel.transpose`, `Kernel.mask`, `Kernel.dot_general`,
`k[idx]`, `k * c`, `k / c` and `k1 + k2` are kernel rules: their math lives
with the other rules (`kernel_methods`, `masking`, `dot_general`), which
take `Kernel`s and so import `flax_tangents/_src/analytic/kernel.py`. To
keep the imports one way, `kernel.py` imports only this module, and
`kernel_methods` (imported by `flax_tangents`) calls `install` with the
functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["Operations", "install", "installed"]


@dataclasses.dataclass(frozen=True)
class Operations:
  """The functions behind `Kernel`'s rule methods; each returns a `Kernel`.

  Attributes:
    slice_batches: `(kernel, n1_slice, n2_slice)` for `Kernel.slice`.
    getitem: `(kernel, idx)` for `kernel[idx]`.
    multiply: `(kernel, other)` for `kernel * other`.
    divide: `(kernel, other)` for `kernel / other`.
    add: `(kernel, other)` for `kernel + other` and `kernel - other`.
    transpose: `(kernel, axes)` for `Kernel.transpose`.
    mask: `(kernel, mask1, mask2)` for `Kernel.mask`, with boolean masks.
    dot_general: `(kernel, other1, other2, is_lhs, dimension_numbers)` for
      `Kernel.dot_general`, with both operands given.
  """

  slice_batches: Callable[..., Any]
  getitem: Callable[..., Any]
  multiply: Callable[..., Any]
  divide: Callable[..., Any]
  add: Callable[..., Any]
  transpose: Callable[..., Any]
  mask: Callable[..., Any]
  dot_general: Callable[..., Any]


_installed: list[Operations] = []


def install(operations: Operations) -> None:
  """Gives `Kernel`'s methods their rule math (called by `kernel_methods`).

  Args:
    operations: the functions behind the methods.
  """
  _installed[:] = [operations]


def installed() -> Operations:
  """The installed operations.

  Returns:
    What `install` was last given.

  Raises:
    RuntimeError: if nothing was installed (`kernel_methods` not imported).

  >>> import flax_tangents  # installs them
  >>> isinstance(installed(), Operations)
  True
  """
  if not _installed:
    raise RuntimeError(
        "Kernel's methods have no rule math: import `flax_tangents` (or "
        "`flax_tangents._src.analytic.kernel_methods`) before using them.")
  return _installed[0]
