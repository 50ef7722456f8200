"""Convolutions (shared, transposed, unshared) and their infinite-width limits.

Inputs are `(N, *spatial, C)` with 1, 2 or 3 spatial dimensions; filters are
`(*kernel_size, C, features)` (HWIO). Parameters are N(0, 1) and the forward
pass scales them by `W_std / sqrt(C * prod(kernel_size))` (NTK
parameterization), or they are drawn at that scale (`'standard'`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import conv as conv_math
from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic.affine import affine_kernel
from flax_tangents._src.analytic.affine import check_width_scale
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.analytic.registry import register_fresh_affine
from flax_tangents._src.masked_array import supports_masking
from flax_tangents.nn._parameterization import affine_params

__all__ = ["Conv", "ConvLocal", "ConvTranspose"]


def _dimension_numbers(n_spatial: int) -> tuple[str, str, str]:
  if not 1 <= n_spatial <= 3:
    raise ValueError(
        f"Convolutions take 1, 2 or 3 spatial dimensions, got {n_spatial}.")
  spatial = "DHW"[-n_spatial:]
  return "N" + spatial + "C", spatial + "IO", "N" + spatial + "C"


class _ConvBase(nn.Module):
  """Fields and geometry shared by the convolutions."""

  features: int
  kernel_size: Sequence[int]
  strides: Optional[Sequence[int]] = None
  padding: str = "VALID"
  W_std: float = 1.0
  b_std: Optional[float] = None
  parameterization: str = "ntk"
  param_dtype: Any = jnp.float32
  s: Sequence[int] = (1, 1)

  def width_scale(self) -> tuple[int, int]:
    """NT's `(s_in, s_out)`, validated (see `Dense`)."""
    return check_width_scale(self.s, self.parameterization,
                             type(self).__name__)

  @property
  def width(self) -> int:
    """Output channels of the finite layer: `features * s_out`."""
    return self.features * self.width_scale()[1]

  def geometry(self, spatial_shape: Sequence[int]
               ) -> tuple[tuple[int, ...], tuple[int, ...],
                          conv_math.Pads, bool]:
    """`(kernel_size, strides, pads, circular)` for this input shape."""
    name = type(self).__name__
    n = (1 if isinstance(self.kernel_size, int) else len(self.kernel_size))
    if len(spatial_shape) != n:
      raise ValueError(
          f"{name}: kernel_size {self.kernel_size} is {n}-D but the input "
          f"has spatial shape {tuple(spatial_shape)}; inputs must be "
          "(N, *spatial, C) with one kernel_size entry per spatial axis.")
    kernel_size = conv_math.as_tuple(self.kernel_size, n, "kernel_size")
    strides = conv_math.as_tuple(self.strides, n, "strides")
    padding = conv_math.check_padding(self.padding, name)
    pads, circular = conv_math.pad_config(padding, spatial_shape, kernel_size,
                                          strides)
    return kernel_size, strides, pads, circular

  def output_mask(self, mask: jax.Array,
                  shape: Sequence[int]) -> Optional[jax.Array]:
    """A location is padding iff its receptive field's centre is (as NT)."""
    kernel_size, strides, pads, circular = self.geometry(shape[1:-1])
    return mask_arrays.window_mask(mask_arrays.collapse_channels(mask),
                                   kernel_size, strides, pads, circular)

  def _weights(self, kernel_shape: tuple[int, ...], fan_in: int
               ) -> tuple[jax.Array, Optional[jax.Array]]:
    return affine_params(self, kernel_shape, fan_in, self.width,
                         self.W_std, self.b_std, self.parameterization,
                         self.param_dtype, self.width_scale())


def _lift(bias: jax.Array, y: jax.Array) -> jax.Array:
  """`bias` with leading unit axes, to add to `y` without rank promotion."""
  return bias.astype(y.dtype).reshape((1,) * (y.ndim - bias.ndim) +
                                      bias.shape)


def _pad_input(x: jax.Array, pads: conv_math.Pads,
               circular: bool) -> tuple[jax.Array, Any]:
  """Wraps `x` for CIRCULAR padding; otherwise returns lax-style pads."""
  if circular:
    return jnp.pad(x, [(0, 0)] + list(pads) + [(0, 0)], mode="wrap"), "VALID"
  return x, list(pads)


def _conv_rule(module: "Conv", kernel: Kernel, **kwargs: Any) -> Kernel:
  del kwargs
  kernel_size, strides, pads, circular = module.geometry(kernel.shape1[1:-1])
  return conv_math.conv_kernel(
      kernel, filter_shape=kernel_size, strides=strides, pads=pads,
      circular=circular, features=module.width, W_std=module.W_std,
      b_std=module.b_std, parameterization=module.parameterization,
      layer="Conv", s_in=module.width_scale()[0])


@kernel_rule(_conv_rule)
class Conv(_ConvBase):
  """A convolution over 1, 2 or 3 spatial dimensions (NHWC inputs).

  `'CIRCULAR'` padding wraps the input around with the pads `'SAME'` would
  use (periodic boundary conditions), so output shapes match `'SAME'`.

  Attributes:
    features: number of output channels.
    kernel_size: spatial filter shape, one entry per spatial dimension.
    strides: strides; `None` means 1 everywhere.
    padding: `'VALID'`, `'SAME'` or `'CIRCULAR'`.
    W_std: weight standard deviation (times `1/sqrt(fan_in)`, with `fan_in =
      C * prod(kernel_size)`).
    b_std: bias standard deviation; `None` means no bias.
    parameterization: `'ntk'` or `'standard'` (any case).
    param_dtype: dtype of the parameters.
    s: NT's width scales `(s_in, s_out)` for `'standard'` (see
      `ftn.Dense`): `s_out * features` output channels, fan-in divided by
      `s_in`.

  >>> import jax, jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> layer = ftn.Conv(4, (3, 3), padding='SAME', b_std=0.1)
  >>> x = jnp.ones((2, 5, 5, 3))
  >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
  (2, 5, 5, 4)
  """

  @supports_masking(_ConvBase.output_mask)
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size, strides, pads, circular = self.geometry(x.shape[1:-1])
    channels = x.shape[-1]
    weights, bias = self._weights(kernel_size + (channels, self.width),
                                  channels * math.prod(kernel_size))
    x, padding = _pad_input(x, pads, circular)
    y = jax.lax.conv_general_dilated(
        x, weights.astype(x.dtype), strides, padding,
        dimension_numbers=_dimension_numbers(len(kernel_size)))
    return y if bias is None else y + _lift(bias, y)


def _transpose_output_shape(spatial: Sequence[int],
                            kernel_size: Sequence[int],
                            strides: Sequence[int], padding: str
                            ) -> tuple[int, ...]:
  lax_padding = "SAME" if padding == "CIRCULAR" else padding
  n = len(kernel_size)
  out = jax.eval_shape(
      lambda x, w: jax.lax.conv_transpose(
          x, w, strides, lax_padding,
          dimension_numbers=_dimension_numbers(n)),
      jax.ShapeDtypeStruct((1,) + tuple(spatial) + (1,), jnp.float32),
      jax.ShapeDtypeStruct(tuple(kernel_size) + (1, 1), jnp.float32))
  return tuple(out.shape[1:-1])


def _conv_transpose_rule(module: "ConvTranspose", kernel: Kernel,
                         **kwargs: Any) -> Kernel:
  del kwargs
  spatial = kernel.shape1[1:-1]
  kernel_size, strides, _, _ = module.geometry(spatial)
  padding = module.padding.upper()
  out_spatial = _transpose_output_shape(spatial, kernel_size, strides,
                                        padding)

  def spatial_map(cov: jax.Array, n_batch: int) -> jax.Array:
    return conv_math.conv_transpose_covariance(
        cov, n_batch, diagonal_spatial=kernel.diagonal_spatial,
        filter_shape=kernel_size, strides=strides, padding=padding)

  return affine_kernel(
      kernel, W_std=module.W_std, b_std=module.b_std,
      parameterization=module.parameterization,
      fan_in=kernel.shape1[-1] * math.prod(kernel_size) /
      module.width_scale()[0],
      spatial_map=spatial_map,
      shape1=(kernel.shape1[0],) + out_spatial + (module.width,),
      shape2=(kernel.shape2[0],) + out_spatial + (module.width,),
      mask_map=lambda mask: mask_arrays.transpose_window_mask(
          mask, kernel_size, strides, padding))


def _transpose_output_mask(module: "ConvTranspose", mask: jax.Array,
                           shape: Sequence[int]) -> Optional[jax.Array]:
  kernel_size, strides, _, _ = module.geometry(shape[1:-1])
  return mask_arrays.transpose_window_mask(mask, kernel_size, strides,
                                       module.padding.upper())


@kernel_rule(_conv_transpose_rule)
class ConvTranspose(_ConvBase):
  """A transposed convolution (`lax.conv_transpose`), as NT's ConvTranspose.

  `'CIRCULAR'` padding computes the `'VALID'` transposed convolution and
  folds it periodically onto the `'SAME'` output shape (`input * strides`).
  `fan_in` is `C * prod(kernel_size)`, as in Neural Tangents.

  Attributes:
    features: number of output channels.
    kernel_size: spatial filter shape.
    strides: strides (upsampling factors); `None` means 1.
    padding: `'VALID'`, `'SAME'` or `'CIRCULAR'`.
    W_std: weight standard deviation.
    b_std: bias standard deviation; `None` means no bias.
    parameterization: `'ntk'` or `'standard'` (any case).
    param_dtype: dtype of the parameters.
    s: NT's width scales `(s_in, s_out)` for `'standard'` (see
      `ftn.Dense`): `s_out * features` output channels, fan-in divided by
      `s_in`.

  >>> import jax, jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> layer = ftn.ConvTranspose(4, (3,), strides=(2,), padding='SAME')
  >>> x = jnp.ones((2, 5, 3))
  >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
  (2, 10, 4)
  """

  @supports_masking(_transpose_output_mask)
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size, strides, _, _ = self.geometry(x.shape[1:-1])
    padding = self.padding.upper()
    channels = x.shape[-1]
    weights, bias = self._weights(kernel_size + (channels, self.width),
                                  channels * math.prod(kernel_size))
    y = jax.lax.conv_transpose(
        x, weights.astype(x.dtype), strides,
        "VALID" if padding == "CIRCULAR" else padding,
        dimension_numbers=_dimension_numbers(len(kernel_size)))
    if padding == "CIRCULAR":
      for axis, (size, s) in enumerate(zip(x.shape[1:-1], strides), start=1):
        fold = conv_math.circular_fold_matrix(y.shape[axis], size * s)
        y = conv_math.fold_axes(y, (axis,), fold)
    return y if bias is None else y + _lift(bias, y)


def _conv_local_rule(module: "ConvLocal", kernel: Kernel,
                     **kwargs: Any) -> Kernel:
  del kwargs
  kernel_size, strides, pads, circular = module.geometry(kernel.shape1[1:-1])
  n = len(kernel_size)
  geometry: dict[str, Any] = dict(
      filter_shape=kernel_size, strides=strides, pads=pads,
      circular=circular, features=module.width,
      W_std=module.W_std, b_std=module.b_std,
      parameterization=module.parameterization,
      layer="ConvLocal", s_in=module.width_scale()[0])
  if kernel.diagonal_spatial:
    return conv_math.conv_kernel(kernel, **geometry)
  # Unshared weights decorrelate distinct output locations: the output is
  # the shared convolution's spatial diagonal, zero elsewhere (bias included).
  # Only the input's spatial diagonal matters.
  diagonal = covariance.map_covariances(
      kernel, lambda cov, n_batch: covariance.spatial_diagonal(
          cov, n_batch, n, False)).replace(diagonal_spatial=True)
  out = conv_math.conv_kernel(diagonal, **geometry)
  return covariance.map_covariances(
      out, lambda cov, n_batch: conv_math.embed_spatial_diagonal(
          cov, n_batch, n)).replace(diagonal_spatial=False)


@kernel_rule(_conv_local_rule)
class ConvLocal(_ConvBase):
  """An unshared (locally connected) convolution, as NT's ConvLocal.

  Each output location has its own filter and bias (bias shape
  `(*out_spatial, features)`), so distinct output locations are
  uncorrelated in the infinite-width limit.

  Attributes:
    features: number of output channels.
    kernel_size: spatial filter shape.
    strides: strides; `None` means 1.
    padding: `'VALID'`, `'SAME'` or `'CIRCULAR'`.
    W_std: weight standard deviation.
    b_std: bias standard deviation; `None` means no bias.
    parameterization: `'ntk'` or `'standard'` (any case).
    param_dtype: dtype of the parameters.
    s: NT's width scales `(s_in, s_out)` for `'standard'` (see
      `ftn.Dense`): `s_out * features` output channels, fan-in divided by
      `s_in`.

  >>> import jax, jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> layer = ftn.ConvLocal(4, (2, 2))
  >>> x = jnp.ones((2, 5, 5, 3))
  >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
  (2, 4, 4, 4)
  """

  @supports_masking(_ConvBase.output_mask)
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size, strides, pads, circular = self.geometry(x.shape[1:-1])
    channels = x.shape[-1]
    fan_in = channels * math.prod(kernel_size)
    out_spatial = tuple(
        conv_math.conv_output_size(size, k, s, pad) for size, k, s, pad in
        zip(x.shape[1:-1], kernel_size, strides, pads))
    # Weights only: the per-location bias is created below.
    width = self.width
    weights, _ = affine_params(self, out_spatial + (fan_in, width),
                               fan_in, width, self.W_std, None,
                               self.parameterization, self.param_dtype,
                               self.width_scale())
    x, padding = _pad_input(x, pads, circular)
    y = jax.lax.conv_general_dilated_local(
        x, weights.astype(x.dtype), strides, padding, kernel_size,
        dimension_numbers=_dimension_numbers(len(kernel_size)))
    if self.b_std is None:
      return y
    ntk = self.parameterization.lower() == "ntk"
    bias = self.param("bias", nn.initializers.normal(
        1.0 if ntk else self.b_std), out_spatial + (width,),
                      self.param_dtype)
    return y + _lift(bias * self.b_std if ntk else bias, y)


register_fresh_affine(Conv, ConvTranspose, ConvLocal)
