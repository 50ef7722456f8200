"""Layer normalization, and its infinite-width kernel."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.normalization import canonical_axes
from flax_tangents._src.analytic.normalization import layer_norm_kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import MaskedArray
from flax_tangents._src.masked_array import MaybeMasked
from flax_tangents._src.masked_array import split
from flax_tangents._src.typing import Axes

__all__ = ["LayerNorm", "layer_norm_kernel"]


def _layer_norm_rule(module: "LayerNorm", kernel: Kernel,
                     **kwargs: Any) -> Kernel:
  del kwargs
  return layer_norm_kernel(kernel, module.axis, module.eps,
                           f"LayerNorm(axis={module.axis})")


@kernel_rule(_layer_norm_rule)
class LayerNorm(nn.Module):
  """Normalizes activations to zero mean and unit variance over `axis`.

  `(x - mean) / sqrt(var + eps)`, with mean and variance over `axis`; no
  learnable scale or bias (as Neural Tangents' `stax.LayerNorm`; stock
  `flax.linen.LayerNorm` with its scale and bias also has a kernel rule).
  `axis` must include the channel axis for the limit to exist; it may also
  include spatial axes.

  Attributes:
    axis: axis or axes normalized over.
    eps: added to the variance.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> y = ftn.LayerNorm().apply({}, jnp.array([[1.0, 2.0, 3.0, 6.0]]))
  >>> round(float(y.mean()), 6), round(float((y ** 2).mean()), 6)
  (0.0, 1.0)
  """

  axis: Axes = -1
  eps: float = 1e-12

  def __call__(self, x: MaybeMasked) -> MaybeMasked:
    value, mask, was_masked = split(x)
    axes = canonical_axes(self.axis, value.ndim)
    # Statistics over unpadded entries only.
    mean = mask_arrays.masked_mean(value, mask, axes, keepdims=True)
    var = mask_arrays.masked_mean((value - mean)**2, mask, axes, keepdims=True)
    y = (value - mean) / jnp.sqrt(var + self.eps)
    return MaskedArray(y, mask) if was_masked else y
