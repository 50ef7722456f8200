"""`DotGeneral`: `lax.dot_general` with a constant operand, and its limit."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import dot_general as dot_math
from flax_tangents._src.analytic import requirements
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import supports_masking

__all__ = ["DotGeneral"]

_NO_AXES = (((), ()), ((), ()))


def _constant(module: "DotGeneral") -> tuple[Optional[jax.Array], bool]:
  """`(other, is_lhs)`; `other` is `None` for the identity."""
  if module.lhs is not None and module.rhs is not None:
    raise ValueError(
        "DotGeneral: give at most one of the constants `lhs` and `rhs`; the "
        "layer's input is the other operand.")
  is_lhs = module.rhs is None
  other = module.lhs if is_lhs else module.rhs
  return (None if other is None else jnp.asarray(other)), is_lhs


def _dot_general_rule(module: "DotGeneral", kernel: Kernel,
                      **kwargs: Any) -> Kernel:
  del kwargs
  other, is_lhs = _constant(module)
  if other is None:
    return kernel
  n_x = len(kernel.shape1)
  layout = dot_math.dot_layout(n_x, other.ndim, is_lhs,
                               module.dimension_numbers)
  if layout.contracts_batch or 0 in layout.x_batch:
    # Outputs depend on other inputs, or on an input's position. Recorded
    # first, so that `ft.batch` names this rather than a refusal below.
    requirements.record_batch_mixing("DotGeneral")
  if layout.contracts_spatial(n_x):
    covariance.require_spatial_covariances(kernel, "DotGeneral")
  if layout.contracts_batch:
    covariance.require_batch_covariances(kernel, "DotGeneral")
  return kernel.dot_general(other, other, is_lhs, module.dimension_numbers)


@kernel_rule(_dot_general_rule)
class DotGeneral(nn.Module):
  """`lax.dot_general` of the input with a constant (NT's `DotGeneral`).

  The constant `rhs` gives `lax.dot_general(x, rhs, dimension_numbers)`,
  the constant `lhs` gives `lax.dot_general(lhs, x, dimension_numbers)`;
  with neither the layer is the identity. Any fixed linear map is one:
  scaling, mixing or subtracting positions, pooling, per-example weights
  (the batch axis as a dot batch dimension), or a weighted sum over the
  batch. The constant is not trained.

  The channel axis (-1) may not be contracted: it is the one taken to
  infinite width. Unlike NT, whose output is in `lax.dot_general`'s layout
  (dot batch dimensions first), the output here is batch-first and
  channels-last like every activation in this library: the batch axis
  moves to the front and the channel axis to the end, the other axes
  keeping lax's order. Contracting the batch axis leaves a batch axis of
  size 1 (NT drops it and allows no later layer); its kernel is that of
  the one combined example, and later layers work on it.

  The kernel is the covariance mapped by the same linear map; contracting
  spatial axes makes `ft.kernel_fn` keep full spatial covariances below
  the layer, contracting the batch axis full batch covariances.

  Attributes:
    lhs: the constant left operand, or `None` (the input is the left one).
    rhs: the constant right operand, or `None`.
    dimension_numbers: `((lhs_contracting, rhs_contracting), (lhs_batch,
      rhs_batch))` as for `jax.lax.dot_general`, axes of the input
      counted in its `(N, *spatial, C)` layout.
    precision: `jax.lax.Precision` of the finite pass, or `None`.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> x = jnp.ones((5, 2, 30, 3))              # (N, H, W, C)
  >>> diff = ftn.DotGeneral(rhs=jnp.array([1., -1.]),
  ...                       dimension_numbers=(((1,), (0,)), ((), ())))
  >>> diff.apply({}, x).shape                  # first row minus second
  (5, 30, 3)
  >>> ftn.DotGeneral(lhs=2.).apply({}, x).shape
  (5, 2, 30, 3)
  """

  lhs: Optional[Any] = None
  rhs: Optional[Any] = None
  dimension_numbers: Any = _NO_AXES
  precision: Any = None

  def output_mask(self, mask: jax.Array,
                  shape: tuple[int, ...]) -> Optional[jax.Array]:
    """Padding iff no real entry reaches it with a non-zero weight (NT)."""
    other, is_lhs = _constant(self)
    if other is None:
      return mask
    return dot_math.dot_mask(mask, shape, other, is_lhs,
                             self.dimension_numbers)

  @supports_masking(output_mask)
  def __call__(self, x: jax.Array) -> jax.Array:
    other, is_lhs = _constant(self)
    if other is None:
      return x
    return dot_math.apply_dot_general(x, other, is_lhs,
                                      self.dimension_numbers, self.precision)
