"""Covariances through convolutions, and the window sums pooling shares.

A convolution with i.i.d. weights averages, for each output location pair
`(t, t')`, the input covariances at the pairs `(s t + j, s t' + j)` of the
same filter offset `j` (a *diagonal* filter `eye(k) / k` on the pair of axes).
Pooling (`pooling.py`) sums over all pairs `(s t + j, s t' + j')` of its
window (separable: one window sum per axis). Both factorize over spatial
dimensions and are
written here as sums of strided slices of a padded array: XLA fuses them into
one loop, which on CPU is much faster than a convolution with a one-hot
filter.

Layouts follow `covariance`: spatial dimension `i` of a covariance with
`n_batch` leading batch axes is the axis pair `(n_batch + 2 i,
n_batch + 2 i + 1)`, or the single axis `n_batch + i` when
`diagonal_spatial`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import affine
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import spatial_maps
from flax_tangents._src.analytic.spatial_maps import circular_fold_matrix

__all__ = [
    "PADDINGS",
    "Pads",
    "as_tuple",
    "check_padding",
    "check_spatial_input",
    "conv_covariance",
    "conv_kernel",
    "conv_output_size",
    "conv_transpose_covariance",
    "circular_fold_matrix",
    "embed_spatial_diagonal",
    "fold_axes",
    "pad_config",
    "spatial_axes",
    "spatial_sizes",
    "window_sum",
]

PADDINGS = ("VALID", "SAME", "CIRCULAR")
Pads = tuple[tuple[int, int], ...]


def check_padding(padding: str, layer: str) -> str:
  """Upper-cases and validates an NT-style padding string."""
  if not isinstance(padding, str) or padding.upper() not in PADDINGS:
    raise ValueError(f"{layer}: padding={padding!r} is not one of {PADDINGS}.")
  return padding.upper()


def pad_config(padding: str, in_shape: Sequence[int],
               window: Sequence[int],
               strides: Sequence[int]) -> tuple[Pads, bool]:
  """Per-dimension `(low, high)` pads and whether they wrap around.

  `'CIRCULAR'` wraps the input with the pads `'SAME'` would use, then
  convolves `'VALID'` (as Neural Tangents does), so outputs keep `'SAME'`
  shapes.

  Args:
    padding: `'VALID'`, `'SAME'` or `'CIRCULAR'`.
    in_shape: spatial input shape.
    window: filter or pooling window shape.
    strides: strides.

  Returns:
    `(pads, circular)`.
  """
  padding = check_padding(padding, "padding")
  if padding == "VALID":
    return tuple((0, 0) for _ in in_shape), False
  pads = jax.lax.padtype_to_pads(tuple(in_shape), tuple(window),
                                 tuple(strides), "SAME")
  return tuple((int(lo), int(hi)) for lo, hi in pads), padding == "CIRCULAR"


def conv_output_size(size: int, window: int, stride: int,
                     pad: tuple[int, int]) -> int:
  """Output length of a window sliding over `size` padded by `pad`."""
  out = (size + pad[0] + pad[1] - window) // stride + 1
  if out < 1:
    raise ValueError(
        f"A window of size {window} does not fit into a spatial axis of size "
        f"{size} padded by {pad}; use smaller filters or 'SAME' padding.")
  return out


def _pad(x: jax.Array, axes: Sequence[int], pad: tuple[int, int],
         circular: bool) -> jax.Array:
  if pad == (0, 0):
    return x
  widths = [(0, 0)] * x.ndim
  for axis in axes:
    widths[axis] = pad
  if circular:
    if max(pad) > min(x.shape[a] for a in axes):
      raise ValueError(f"CIRCULAR pads {pad} exceed the axis size.")
    return jnp.pad(x, widths, mode="wrap")
  return jnp.pad(x, widths)


def _strided(x: jax.Array, axes: Sequence[int], start: int, stride: int,
             size: int) -> jax.Array:
  index = [slice(None)] * x.ndim
  for axis in axes:
    index[axis] = slice(start, start + stride * (size - 1) + 1, stride)
  return x[tuple(index)]


def window_sum(x: jax.Array, axes: Sequence[int], window: int, stride: int,
                pad: tuple[int, int], circular: bool) -> jax.Array:
  """`sum_j x[s t + j, s t' + j, ...]` over the padded `axes` (jointly).

  With one axis this is a plain window sum; with the two axes of a pair it is
  the diagonal filter of a convolution's covariance.
  """
  size = conv_output_size(x.shape[axes[0]], window, stride, pad)
  x = _pad(x, axes, pad, circular)
  out = _strided(x, axes, 0, stride, size)
  for j in range(1, window):
    out = out + _strided(x, axes, j, stride, size)
  return out


def spatial_sizes(cov: jax.Array, n_batch: int, n_spatial: int,
                  diagonal_spatial: bool) -> list[int]:
  """The spatial sizes of a covariance with `n_batch` batch axes."""
  step = 1 if diagonal_spatial else 2
  return [cov.shape[n_batch + step * i] for i in range(n_spatial)]


def spatial_axes(n_batch: int, i: int,
                 diagonal_spatial: bool) -> tuple[int, ...]:
  """The axes of spatial dimension `i`: a pair, or one when diagonal."""
  return ((n_batch + i,) if diagonal_spatial else
          (n_batch + 2 * i, n_batch + 2 * i + 1))


def conv_covariance(cov: jax.Array, n_batch: int, *, diagonal_spatial: bool,
                    filter_shape: Sequence[int], strides: Sequence[int],
                    pads: Pads, circular: bool) -> jax.Array:
  """Covariance of `conv(x, W)` (per unit weight variance) given that of `x`.

  Args:
    cov: covariance with `n_batch` leading batch axes.
    n_batch: 1 or 2.
    diagonal_spatial: layout of `cov`.
    filter_shape: spatial filter shape.
    strides: strides.
    pads: `(low, high)` pads per dimension.
    circular: pads wrap around.

  Returns:
    The average of `cov` over the receptive field of each output location
    pair (same filter offset in both).
  """
  sizes = spatial_sizes(cov, n_batch, len(filter_shape), diagonal_spatial)
  if spatial_maps.use_matrices(sizes, diagonal_spatial):
    maps = [spatial_maps.conv_maps(
        spatial_maps.offset_matrices(size, k, s, tuple(pad), circular),
        diagonal_spatial)
            for size, k, s, pad in zip(sizes, filter_shape, strides, pads)]
    return spatial_maps.apply_maps(cov, n_batch, maps, diagonal_spatial)
  for i, (k, s, pad) in enumerate(zip(filter_shape, strides, pads)):
    cov = window_sum(cov, spatial_axes(n_batch, i, diagonal_spatial), k, s,
                     pad, circular)
  # Materialize: XLA would otherwise fuse stacked layers' slices into one loop
  # that recomputes each layer's output once per filter offset above it.
  return jax.lax.optimization_barrier(cov / math.prod(filter_shape))


def fold_axes(x: jax.Array, axes: Sequence[int],
              fold: jax.typing.ArrayLike) -> jax.Array:
  """Applies `fold` (`(size, valid_size)`) along each of `axes`."""
  fold = jnp.asarray(fold, x.dtype)
  for axis in axes:
    x = jnp.moveaxis(
        jnp.tensordot(x, fold, axes=((axis,), (1,)),
                      precision=jax.lax.Precision.HIGHEST), -1, axis)
  return x


def conv_transpose_covariance(cov: jax.Array, n_batch: int, *,
                              diagonal_spatial: bool,
                              filter_shape: Sequence[int],
                              strides: Sequence[int],
                              padding: str) -> jax.Array:
  """Covariance of `lax.conv_transpose(x, W)` given that of `x`.

  Each pair of axes goes through a 2-D transposed convolution with the
  diagonal filter `eye(k) / k` (one axis with `ones(k) / k` when
  `diagonal_spatial`); `'CIRCULAR'` convolves `'VALID'` and folds (see
  `circular_fold_matrix`; in the diagonal layout the fold sums variances, as
  Neural Tangents does).
  """
  padding = check_padding(padding, "ConvTranspose")
  lax_padding = "VALID" if padding == "CIRCULAR" else padding
  sizes = spatial_sizes(cov, n_batch, len(filter_shape), diagonal_spatial)
  if spatial_maps.use_matrices(sizes, diagonal_spatial):
    maps = [spatial_maps.conv_maps(spatial_maps.transpose_offset_matrices(
        size, k, s, lax_padding,
        size * s if padding == "CIRCULAR" else None), diagonal_spatial)
            for size, k, s in zip(sizes, filter_shape, strides)]
    return spatial_maps.apply_maps(cov, n_batch, maps, diagonal_spatial)
  for i, (k, s) in enumerate(zip(filter_shape, strides)):
    axes = spatial_axes(n_batch, i, diagonal_spatial)
    n = len(axes)
    size = cov.shape[axes[0]]
    x = jnp.moveaxis(cov, axes, tuple(range(-n, 0)))
    preshape = x.shape[:-n]
    x = x.reshape((-1, 1) + x.shape[-n:])
    rhs = (jnp.eye(k, dtype=x.dtype) if n == 2 else
           jnp.ones((k,), x.dtype)) / k
    spec = "HW"[:n]
    x = jax.lax.conv_transpose(
        x, rhs.reshape((1, 1) + rhs.shape), (s,) * n, lax_padding,
        dimension_numbers=("NC" + spec, "OI" + spec, "NC" + spec),
        precision=jax.lax.Precision.HIGHEST)
    x = x.reshape(preshape + x.shape[-n:])
    if padding == "CIRCULAR":
      fold = circular_fold_matrix(x.shape[-1], size * s)
      x = fold_axes(x, tuple(range(x.ndim - n, x.ndim)), fold)
    cov = jnp.moveaxis(x, tuple(range(-n, 0)), axes)
  return cov


def embed_spatial_diagonal(diag: jax.Array, n_batch: int,
                           n_spatial: int) -> jax.Array:
  """Inverse of taking pair diagonals: zeros off the spatial diagonal."""
  out = diag
  for i in range(n_spatial):
    axis = n_batch + 2 * i
    size = out.shape[axis]
    shape = [1] * (out.ndim + 1)
    shape[axis] = shape[axis + 1] = size
    out = (jnp.expand_dims(out, axis + 1) *
           jnp.eye(size, dtype=out.dtype).reshape(shape))
  return out


def as_tuple(value: Union[int, Sequence[int], None], n: int,
             name: str) -> tuple[int, ...]:
  """Broadcasts an int (or `None` -> 1) to `n` spatial dimensions."""
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(
        f"{name}={value} has {len(value)} entries but the input has {n} "
        "spatial dimensions.")
  return value


def conv_kernel(kernel, *, filter_shape: Sequence[int],
                strides: Sequence[int], pads: Pads, circular: bool,
                features: int, W_std: float, b_std: Optional[float],
                parameterization: str, layer: str, s_in: int = 1):
  """The kernel rule of a shared-weight convolution (any padding).

  Args:
    kernel: the input `Kernel`, activations `(N, *spatial, C)`.
    filter_shape, strides, pads, circular: the convolution's geometry.
    features: output channels (of the finite layer).
    W_std, b_std, parameterization: as for `affine_kernel`.
    layer: name for error messages.
    s_in: NT's input width scale (standard parameterization): the fan-in
      is `C * prod(filter_shape) / s_in`.

  Returns:
    The output `Kernel`.
  """
  check_spatial_input(kernel, len(filter_shape), layer)
  out_spatial = tuple(
      conv_output_size(size, k, s, pad) for size, k, s, pad in zip(
          kernel.shape1[1:-1], filter_shape, strides, pads))

  def spatial_map(cov: jax.Array, n_batch: int) -> jax.Array:
    return conv_covariance(
        cov, n_batch, diagonal_spatial=kernel.diagonal_spatial,
        filter_shape=filter_shape, strides=strides, pads=pads,
        circular=circular)

  return affine.affine_kernel(
      kernel, W_std=W_std, b_std=b_std, parameterization=parameterization,
      fan_in=kernel.shape1[-1] * math.prod(filter_shape) / s_in,
      spatial_map=spatial_map,
      shape1=(kernel.shape1[0],) + out_spatial + (features,),
      shape2=(kernel.shape2[0],) + out_spatial + (features,),
      mask_map=lambda mask: mask_arrays.window_mask(mask, filter_shape, strides,
                                                pads, circular))


def check_spatial_input(kernel, n_spatial: int, layer: str) -> None:
  """Raises unless the kernel's activations have `n_spatial` spatial axes."""
  have = len(kernel.shape1) - 2
  if have != n_spatial:
    raise ValueError(
        f"{layer} has a {n_spatial}-D window but its inputs of shape "
        f"{kernel.shape1} have {have} spatial dimensions; inputs must be "
        "(N, *spatial, C) with one window entry per spatial dimension.")
