"""Dense layers with NTK or standard parameterization, and their limits."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic.affine import affine_kernel
from flax_tangents._src.analytic.affine import check_width_scale
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.analytic.registry import register_fresh_affine
from flax_tangents._src.masked_array import supports_masking
from flax_tangents.nn._parameterization import affine_params

__all__ = ["Dense"]


def _dense_rule(module: "Dense", kernel: Kernel, **kwargs: Any) -> Kernel:
  del kwargs
  s_in, s_out = check_width_scale(module.s, module.parameterization, "Dense")
  width = module.features * s_out
  return affine_kernel(
      kernel, W_std=module.W_std, b_std=module.b_std,
      parameterization=module.parameterization,
      fan_in=kernel.shape1[-1] / s_in,
      shape1=kernel.shape1[:-1] + (width,),
      shape2=kernel.shape2[:-1] + (width,))


@kernel_rule(_dense_rule)
class Dense(nn.Module):
  """A fully connected layer acting on the last (channel) axis.

  With `parameterization='ntk'` (the default) the parameters are N(0, 1) and
  the output is `W_std / sqrt(fan_in) * x @ kernel + b_std * bias`, so the
  kernels have a finite limit as `features` grows. With `'standard'` they are
  drawn with those standard deviations and used directly.

  Under the standard parameterization `s = (s_in, s_out)` are NT's width
  scales (Sohl-Dickstein et al., 2020): the layer has `s_out * features`
  output channels, expects `s_in` times its nominal fan-in, draws weights
  N(0, W_std^2 s_in / C) for `C` input channels and divides `x @ kernel`
  by `sqrt(s_in)`. The NNGP does not depend on `s`; the NTK does (its
  weight term is `C / s_in` times the input covariance). Chain layers with
  `s_in` of each equal to `s_out` of the one before.

  Attributes:
    features: number of output channels (times `s[1]`, see above).
    W_std: weight standard deviation.
    b_std: bias standard deviation; `None` means no bias.
    parameterization: `'ntk'` or `'standard'` (any case).
    param_dtype: dtype of the parameters.
    s: `(s_in, s_out)`, positive integers; only `(1, 1)` with `'ntk'`.

  >>> import jax, jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> layer = ftn.Dense(8, W_std=1.5, b_std=0.1)
  >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
  >>> layer.apply(variables, jnp.ones((2, 3))).shape
  (2, 8)
  """

  features: int
  W_std: float = 1.0
  b_std: Optional[float] = None
  parameterization: str = "ntk"
  param_dtype: Any = jnp.float32
  s: Sequence[int] = (1, 1)

  @supports_masking(
      lambda self, mask, shape: mask_arrays.collapse_channels(mask))
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = check_width_scale(self.s, self.parameterization, "Dense")
    fan_in, width = x.shape[-1], self.features * s[1]
    weights, bias = affine_params(
        self, (fan_in, width), fan_in, width, self.W_std, self.b_std,
        self.parameterization, self.param_dtype, s)
    y = jnp.matmul(x, weights)
    if bias is None:
      return y
    return y + bias.reshape((1,) * (y.ndim - 1) + (width,))


register_fresh_affine(Dense)
