"""Dense layers with NTK or standard parameterization, and their limits."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic.affine import affine_kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import supports_masking
from flax_tangents.kernel import Kernel
from flax_tangents.nn._parameterization import affine_params

__all__ = ["Dense"]


def _dense_rule(module: "Dense", kernel: Kernel, **kwargs: Any) -> Kernel:
  del kwargs
  return affine_kernel(
      kernel, W_std=module.W_std, b_std=module.b_std,
      parameterization=module.parameterization, fan_in=kernel.shape1[-1],
      shape1=kernel.shape1[:-1] + (module.features,),
      shape2=kernel.shape2[:-1] + (module.features,))


@kernel_rule(_dense_rule)
class Dense(nn.Module):
  """A fully connected layer acting on the last (channel) axis.

  With `parameterization='ntk'` (the default) the parameters are N(0, 1) and
  the output is `W_std / sqrt(fan_in) * x @ kernel + b_std * bias`, so the
  kernels have a finite limit as `features` grows. With `'standard'` they are
  drawn with those standard deviations and used directly.

  Attributes:
    features: number of output channels.
    W_std: weight standard deviation.
    b_std: bias standard deviation; `None` means no bias.
    parameterization: `'ntk'` or `'standard'`.
    param_dtype: dtype of the parameters.

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

  @supports_masking(lambda self, mask, shape: masking.collapse_channels(mask))
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    weights, bias = affine_params(
        self, (fan_in, self.features), fan_in, self.features, self.W_std,
        self.b_std, self.parameterization, self.param_dtype)
    y = jnp.matmul(x, weights)
    if bias is None:
      return y
    return y + bias.reshape((1,) * (y.ndim - 1) + (self.features,))
