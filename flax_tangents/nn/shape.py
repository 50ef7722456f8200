"""Layers that only move activations around: Flatten and Identity."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.analytic.spatial import flatten_kernel
from flax_tangents._src.masked_array import supports_masking

__all__ = ["Flatten", "Identity"]


@kernel_rule(lambda module, kernel, **kwargs: flatten_kernel(kernel))
class Flatten(nn.Module):
  """Flattens all but the batch axis.

  Placed before the readout of a CNN without pooling, it lets every layer
  below store only spatial diagonals of its covariances.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Flatten().apply({}, jnp.ones((2, 3, 4, 5))).shape
  (2, 60)
  """

  @supports_masking(
      lambda self, mask, shape: mask_arrays.flatten_mask(mask, shape))
  def __call__(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _identity_rule(module: Any, kernel: Kernel, **kwargs: Any) -> Kernel:
  del module, kwargs
  return kernel


@kernel_rule(_identity_rule)
class Identity(nn.Module):
  """Returns its input unchanged.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Identity().apply({}, jnp.ones(2))
  Array([1., 1.], dtype=float...)
  """

  def __call__(self, x: Any) -> Any:
    return x
