"""Kernel rules for stock `flax.linen` affine layers.

Stock layers use the standard parameterization: their weights are drawn by
`kernel_init`, their biases by `bias_init`, and used as they are. The rules
read both initializers and use their exact entry variances (see
`lifting.initializers`: the `variance_scaling` family, `normal`,
`truncated_normal`, `zeros`...), with fans counted from the parameter's real
shape exactly as the initializer counts them. Initializers whose variance
cannot be known exactly, or whose entries are not centred, are refused.

Rules: `nn.Dense`, `nn.Conv`, `nn.ConvLocal`, `nn.ConvTranspose`. Stock
normalization layers are in `stock_normalization`, attention in
`stock_attention`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax

from flax_tangents._src.analytic import conv as conv_math
from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic.affine import affine_kernel
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.lifting import paths
from flax_tangents._src.analytic.lifting.initializers import entry_variance
from flax_tangents._src.analytic.registry import register_kernel_rule
from flax_tangents.nn import stock_attention as _stock_attention  # noqa: F401
from flax_tangents.nn import stock_normalization as _stock_norm  # noqa: F401
from flax_tangents.nn.dropout import dropout_rule

__all__: list[str] = []


def describe_stock(module: nn.Module) -> str:
  """`"stock nn.Dense (module 'path')"`, for messages."""
  path = paths.path_string(module)
  return f"stock nn.{type(module).__name__} (module '{path}')"


def _check_plain_computation(module: nn.Module, where: str,
                             options: Sequence[str]) -> None:
  """Refuses replaced computations (quantized dot products...)."""
  for option in options:
    if getattr(module, option, None) is not None:
      raise NotImplementedError(
          f"{where} has a custom {option}; its kernel is known only for the "
          f"default computation. Remove `{option}`, or use `flax_tangents.nn`.")
  if getattr(module, "promote_dtype", flax_dtypes.promote_dtype) is not (
      flax_dtypes.promote_dtype):
    raise NotImplementedError(
        f"{where} has a custom promote_dtype, which may change its "
        "parameters; only the default is supported.")
  if getattr(module, "mask", None) is not None:
    raise NotImplementedError(
        f"{where} has a weight mask; masked weights are not i.i.d., so the "
        "layer has no kernel rule here.")


def _std(module: nn.Module, kernel_shape: tuple[int, ...], fan_in: int,
         bias_shape: tuple[int, ...], where: str
         ) -> tuple[float, Optional[float]]:
  """`(W_std, b_std)` of `affine_kernel` for a stock layer's initializers.

  `W_std^2 = fan_in * Var(w)`: an output sums `fan_in` weighted inputs.
  `b_std` is `None` without a bias (a zero bias still adds its gradient).
  """
  dtype = module.param_dtype
  w_var = entry_variance(module.kernel_init, kernel_shape, where=where,
                         param="kernel_init", dtype=dtype)
  if not module.use_bias:
    return math.sqrt(w_var * fan_in), None
  b_var = entry_variance(module.bias_init, bias_shape, where=where,
                         param="bias_init", dtype=dtype)
  return math.sqrt(w_var * fan_in), math.sqrt(b_var)


def _stock_dense_rule(module: nn.Dense, kernel: Kernel,
                      **kwargs: Any) -> Kernel:
  del kwargs
  where = describe_stock(module)
  _check_plain_computation(module, where, ("dot_general", "dot_general_cls"))
  fan_in = kernel.shape1[-1]
  W_std, b_std = _std(module, (fan_in, module.features), fan_in,
                      (module.features,), where)
  return affine_kernel(
      kernel, W_std=W_std, b_std=b_std, parameterization="standard",
      fan_in=fan_in, shape1=kernel.shape1[:-1] + (module.features,),
      shape2=kernel.shape2[:-1] + (module.features,))


register_kernel_rule(nn.Dense, _stock_dense_rule)
# `flax_tangents.nn.Dropout` subclasses `nn.Dropout`: one rule serves both.
register_kernel_rule(nn.Dropout, dropout_rule)


def _stock_conv_geometry(
    module: nn.Module, spatial_shape: tuple[int, ...], where: str
) -> tuple[tuple[int, ...], tuple[int, ...], conv_math.Pads, bool]:
  """`(kernel_size, strides, pads, circular)` of a stock `nn.Conv`/`ConvLocal`.

  Raises:
    NotImplementedError: for options without an infinite-width rule here.
  """
  n = len(spatial_shape)
  for option in ("input_dilation", "kernel_dilation", "feature_group_count"):
    value = getattr(module, option)
    values = (value,) if isinstance(value, int) or value is None else value
    if any(v not in (1, None) for v in values):
      raise NotImplementedError(
          f"{where} has {option}={value!r}; only 1 is supported in the "
          "infinite-width limit. Use dilation/grouping 1, or `ftn.Conv`.")
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
  return kernel_size, strides, tuple((int(low), int(high))
                                     for low, high in pads), False


def _conv_input(module: nn.Module, kernel: Kernel, where: str) -> int:
  n_spatial = (1 if isinstance(module.kernel_size, int) else
               len(module.kernel_size))
  if len(kernel.shape1) != n_spatial + 2:
    raise ValueError(
        f"{where} got inputs of shape {kernel.shape1}; its kernel rule needs "
        f"(N, *spatial, C) with {n_spatial} spatial axes (one per "
        "kernel_size entry).")
  return kernel.shape1[-1]


def _stock_conv_rule(module: nn.Conv, kernel: Kernel,
                     **kwargs: Any) -> Kernel:
  del kwargs
  where = describe_stock(module)
  _check_plain_computation(module, where, ("conv_general_dilated",
                                           "conv_general_dilated_cls"))
  channels = _conv_input(module, kernel, where)
  kernel_size, strides, pads, circular = _stock_conv_geometry(
      module, kernel.shape1[1:-1], where)
  W_std, b_std = _std(module, kernel_size + (channels, module.features),
                      channels * math.prod(kernel_size), (module.features,),
                      where)
  return conv_math.conv_kernel(
      kernel, filter_shape=kernel_size, strides=strides, pads=pads,
      circular=circular, features=module.features, W_std=W_std, b_std=b_std,
      parameterization="standard", layer=where)


register_kernel_rule(nn.Conv, _stock_conv_rule)


def _stock_conv_local_rule(module: nn.ConvLocal, kernel: Kernel,
                           **kwargs: Any) -> Kernel:
  """Unshared weights: distinct output locations are uncorrelated.

  The output is the shared convolution's spatial diagonal, zero elsewhere
  (the per-location bias included), so only the input's spatial diagonal
  is needed. Flax draws the weights as an array `(*out_spatial, fan_in,
  features)`, whose fans `variance_scaling` counts with the output
  locations as a receptive field: the exact variance is used as it is.
  """
  del kwargs
  where = describe_stock(module)
  _check_plain_computation(module, where, ("conv_general_dilated",
                                           "conv_general_dilated_cls"))
  channels = _conv_input(module, kernel, where)
  kernel_size, strides, pads, circular = _stock_conv_geometry(
      module, kernel.shape1[1:-1], where)
  out_spatial = tuple(
      conv_math.conv_output_size(size, k, s, pad) for size, k, s, pad in
      zip(kernel.shape1[1:-1], kernel_size, strides, pads))
  fan_in = channels * math.prod(kernel_size)
  W_std, b_std = _std(module, out_spatial + (fan_in, module.features),
                      fan_in, out_spatial + (module.features,), where)
  geometry: dict[str, Any] = dict(
      filter_shape=kernel_size, strides=strides, pads=pads,
      circular=circular, features=module.features, W_std=W_std,
      b_std=b_std, parameterization="standard", layer=where)
  if kernel.diagonal_spatial:
    return conv_math.conv_kernel(kernel, **geometry)
  n = len(kernel_size)
  diagonal = covariance.map_covariances(
      kernel, lambda cov, n_batch: covariance.spatial_diagonal(
          cov, n_batch, n, False)).replace(diagonal_spatial=True)
  out = conv_math.conv_kernel(diagonal, **geometry)
  return covariance.map_covariances(
      out, lambda cov, n_batch: conv_math.embed_spatial_diagonal(
          cov, n_batch, n)).replace(diagonal_spatial=False)


register_kernel_rule(nn.ConvLocal, _stock_conv_local_rule)


def _stock_conv_transpose_rule(module: nn.ConvTranspose, kernel: Kernel,
                               **kwargs: Any) -> Kernel:
  """`lax.conv_transpose` with i.i.d. weights.

  `transpose_kernel=True` flips the filter and swaps its channel axes: the
  flip does not change the distribution of i.i.d. weights, and the swap only
  changes which axis `variance_scaling` counts as fan-in (used exactly).
  """
  del kwargs
  where = describe_stock(module)
  _check_plain_computation(module, where, ())
  channels = _conv_input(module, kernel, where)
  spatial = kernel.shape1[1:-1]
  n = len(spatial)
  kernel_size = conv_math.as_tuple(module.kernel_size, n, "kernel_size")
  strides = conv_math.as_tuple(module.strides, n, "strides")
  dilation = conv_math.as_tuple(module.kernel_dilation, n, "kernel_dilation")
  if any(d != 1 for d in dilation):
    raise NotImplementedError(
        f"{where} has kernel_dilation={module.kernel_dilation!r}; only 1 is "
        "supported in the infinite-width limit.")
  padding = module.padding
  if not isinstance(padding, str) or padding.upper() not in ("SAME",
                                                             "VALID"):
    raise NotImplementedError(
        f"{where} has padding={padding!r}; the kernel rule supports 'SAME' "
        "and 'VALID' (Flax's 'CIRCULAR' transposed convolution aligns its "
        "output differently from `ftn.ConvTranspose`; use that layer for "
        "periodic boundaries).")
  padding = padding.upper()
  channel_axes = ((module.features, channels) if module.transpose_kernel
                  else (channels, module.features))
  fan_in = channels * math.prod(kernel_size)
  W_std, b_std = _std(module, kernel_size + channel_axes, fan_in,
                      (module.features,), where)
  out_spatial = jax.eval_shape(
      lambda x, w: jax.lax.conv_transpose(
          x, w, strides, padding,
          dimension_numbers=conv_math_dimension_numbers(n)),
      jax.ShapeDtypeStruct((1,) + tuple(spatial) + (1,), "float32"),
      jax.ShapeDtypeStruct(kernel_size + (1, 1), "float32")).shape[1:-1]

  def spatial_map(cov, n_batch):
    return conv_math.conv_transpose_covariance(
        cov, n_batch, diagonal_spatial=kernel.diagonal_spatial,
        filter_shape=kernel_size, strides=strides, padding=padding)

  return affine_kernel(
      kernel, W_std=W_std, b_std=b_std, parameterization="standard",
      fan_in=fan_in, spatial_map=spatial_map,
      shape1=(kernel.shape1[0],) + tuple(out_spatial) + (module.features,),
      shape2=(kernel.shape2[0],) + tuple(out_spatial) + (module.features,))


def conv_math_dimension_numbers(n_spatial: int) -> tuple[str, str, str]:
  spatial = "DHW"[-n_spatial:]
  return "N" + spatial + "C", spatial + "IO", "N" + spatial + "C"


register_kernel_rule(nn.ConvTranspose, _stock_conv_transpose_rule)
