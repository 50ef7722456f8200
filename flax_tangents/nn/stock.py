"""Kernel rules for stock `flax.linen` modules.

Stock layers use the standard parameterization with their default
initializers: `lecun_normal` weights (variance `1 / fan_in`, so `W_std = 1`)
and zero biases (`b_std = 0`, though a bias still adds its gradient to the
NTK). Custom initializers are not inspected; use the `flax_tangents.nn`
layers for other scales. `nn.LayerNorm` (default scale 1, bias 0) and
`nn.Dropout` have rules too.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from flax_tangents._src.analytic import conv as conv_math
from flax_tangents._src.analytic.affine import affine_kernel
from flax_tangents._src.analytic.registry import register_kernel_rule
from flax_tangents.kernel import Kernel
from flax_tangents.nn.dropout import dropout_rule
from flax_tangents.nn.normalization import layer_norm_kernel

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


def _stock_layer_norm_rule(module: nn.LayerNorm, kernel: Kernel,
                           **kwargs: Any) -> Kernel:
  """`nn.LayerNorm`: normalization, then `scale * y + bias` per channel.

  At initialization `scale = 1` and `bias = 0`, so the NNGP is that of the
  plain normalization. Both parameters are trained, though: the gradient of
  output channel `c` in `scale_c` is the normalized activation `y_c` and in
  `bias_c` it is 1, which adds `E[y_c(x1) y_c(x2)]` (the new NNGP) and 1 to
  the NTK.

  The scale's contribution `y_c(x1) y_c(x2)` is random per channel and
  correlated with the outputs themselves, so a nonlinearity `phi` applied
  next would need `E[phi'(u) phi'(v) u v]`, which the kernel cannot carry.
  With `use_scale` the output is therefore marked non-Gaussian: an affine
  layer (which averages the contribution over channels exactly) must come
  next, and a nonlinearity there raises a clear error.
  """
  del kwargs
  layer = f"nn.LayerNorm(reduction_axes={module.reduction_axes})"
  ndim = len(kernel.shape1)
  features = module.feature_axes
  features = (features,) if isinstance(features, int) else tuple(features)
  if tuple(sorted({a % ndim for a in features})) != (ndim - 1,):
    raise NotImplementedError(
        f"{layer} with feature_axes={module.feature_axes}: only per-channel "
        "scale and bias (feature_axes=-1) have an infinite-width kernel "
        "here.")
  if module.axis_name is not None:
    raise NotImplementedError(
        f"{layer} with axis_name={module.axis_name!r} (cross-device "
        "statistics) has no kernel rule.")
  if ((module.use_scale and module.scale_init is not nn.initializers.ones)
      or (module.use_bias and module.bias_init is not nn.initializers.zeros)):
    raise NotImplementedError(
        f"{layer} with custom scale_init/bias_init: only the default "
        "initializers (scale 1, bias 0) are supported; use "
        "`ftn.LayerNorm` followed by an explicit affine layer instead.")
  out = layer_norm_kernel(kernel, module.reduction_axes, module.epsilon,
                          layer)
  if out.ntk is not None:
    ntk = out.ntk
    if module.use_scale:
      ntk = ntk + out.nngp
    if module.use_bias:
      ntk = ntk + 1.0
    out = out.replace(ntk=ntk)
  if module.use_scale:
    out = out.replace(is_gaussian=False)
  return out


register_kernel_rule(nn.LayerNorm, _stock_layer_norm_rule)
# `flax_tangents.nn.Dropout` subclasses `nn.Dropout`: one rule serves both.
register_kernel_rule(nn.Dropout, dropout_rule)


def _stock_conv_geometry(module: nn.Conv, spatial_shape: tuple[int, ...]):
  """`(kernel_size, strides, pads, circular)` of a stock `nn.Conv`.

  Raises:
    NotImplementedError: for options without an infinite-width rule here.
  """
  n = len(spatial_shape)
  where = f"stock nn.Conv (module '{'/'.join(map(str, module.path))}')"
  for option in ("input_dilation", "kernel_dilation", "feature_group_count"):
    value = getattr(module, option)
    values = (value,) if isinstance(value, int) or value is None else value
    if any(v not in (1, None) for v in values):
      raise NotImplementedError(
          f"{where} has {option}={value!r}; only 1 is supported in the "
          "infinite-width limit. Use dilation/grouping 1, or `ftn.Conv`.")
  if getattr(module, "mask", None) is not None:
    raise NotImplementedError(f"{where} has a kernel mask; not supported.")
  kernel_size = conv_math.as_tuple(module.kernel_size, n, "kernel_size")
  strides = conv_math.as_tuple(module.strides, n, "strides")
  padding = module.padding
  if isinstance(padding, str):
    padding = padding.upper()
    if padding in ("VALID", "SAME"):
      return (kernel_size, strides) + conv_math.pad_config(
          padding, spatial_shape, kernel_size, strides)
    if padding == "CIRCULAR":
      # Flax wraps by ((k - 1) // 2, k // 2) whatever the strides.
      return kernel_size, strides, tuple(
          ((k - 1) // 2, k // 2) for k in kernel_size), True
    if padding == "CAUSAL" and n == 1:
      return kernel_size, strides, ((kernel_size[0] - 1, 0),), False
    raise NotImplementedError(
        f"{where} has padding={module.padding!r}; supported: 'SAME', "
        "'VALID', 'CIRCULAR', 'CAUSAL' (1-D) and explicit pads.")
  pads = nn.linear.canonicalize_padding(padding, n)
  return kernel_size, strides, tuple(tuple(p) for p in pads), False


def _stock_conv_rule(module: nn.Conv, kernel: Kernel,
                     **kwargs: Any) -> Kernel:
  del kwargs
  if len(kernel.shape1) < 3:
    raise ValueError(
        f"stock nn.Conv got inputs of shape {kernel.shape1}; the kernel "
        "rule needs (N, *spatial, C).")
  kernel_size, strides, pads, circular = _stock_conv_geometry(
      module, kernel.shape1[1:-1])
  return conv_math.conv_kernel(
      kernel, filter_shape=kernel_size, strides=strides, pads=pads,
      circular=circular, features=module.features, W_std=1.0,
      b_std=0.0 if module.use_bias else None, parameterization="standard",
      layer="nn.Conv")


# Stock `nn.Conv` (shared weights only; `nn.ConvLocal` is another class).
register_kernel_rule(nn.Conv, _stock_conv_rule)
