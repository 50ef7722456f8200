"""Kernel rules for stock `flax.linen` modules.

Stock layers use the standard parameterization with their default
initializers: `lecun_normal` weights (variance `1 / fan_in`, so `W_std = 1`)
and zero biases (`b_std = 0`, though a bias still adds its gradient to the
NTK). Custom initializers are not inspected; use the `flax_tangents.nn`
layers for other scales.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from flax_tangents._src.analytic.affine import affine_kernel
from flax_tangents._src.analytic.registry import register_kernel_rule
from flax_tangents.kernel import Kernel

__all__: list[str] = []


def _stock_dense_rule(module: nn.Dense, kernel: Kernel,
                      **kwargs: Any) -> Kernel:
  del kwargs
  return affine_kernel(
      kernel, W_std=1.0, b_std=0.0 if module.use_bias else None,
      parameterization="standard", fan_in=kernel.shape1[-1],
      shape1=kernel.shape1[:-1] + (module.features,),
      shape2=kernel.shape2[:-1] + (module.features,))


register_kernel_rule(nn.Dense, _stock_dense_rule)
