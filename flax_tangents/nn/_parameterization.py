"""Finite-width parameter scaling shared by affine layers."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax

from flax_tangents._src.analytic.affine import check_parameterization

__all__ = ["affine_params"]


def affine_params(module: nn.Module, kernel_shape: tuple[int, ...],
                  fan_in: int, features: int, W_std: float,
                  b_std: Optional[float], parameterization: str,
                  param_dtype: Any, s: Sequence[int] = (1, 1)
                  ) -> tuple[jax.Array, Optional[jax.Array]]:
  """Creates `kernel` and `bias` and returns them scaled for the forward pass.

  NTK parameterization: parameters are N(0, 1) and the forward pass multiplies
  them by `W_std / sqrt(fan_in)` and `b_std`. Standard parameterization with
  width scales `s = (s_in, s_out)` (NT's): they are drawn as
  N(0, W_std^2 s_in / fan_in) and N(0, b_std^2), and the forward pass divides
  the weights by `sqrt(s_in)`; `kernel_shape` and `features` are then the
  finite widths (`s_out` times the layer's `features`).

  Returns:
    `(weights, bias)` ready to use; `bias`, of shape `(features,)`, is `None`
    when `b_std is None`. Reshape it to the output's rank before adding.
  """
  ntk = check_parameterization(parameterization) == "ntk"
  s_in = s[0]
  w_scale = W_std / math.sqrt(fan_in if ntk else fan_in / s_in)
  kernel = module.param("kernel", nn.initializers.normal(1.0 if ntk else
                                                         w_scale),
                        kernel_shape, param_dtype)
  weights = kernel * w_scale if ntk else kernel / math.sqrt(s_in)
  if b_std is None:
    return weights, None
  bias = module.param("bias", nn.initializers.normal(1.0 if ntk else b_std),
                      (features,), param_dtype)
  return weights, (bias * b_std if ntk else bias)
