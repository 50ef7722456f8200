"""Pooling layers: windowed and global, sum and average."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import conv as conv_math
from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic import pooling as pooling_math
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.analytic.spatial import global_pool_kernel
from flax_tangents._src.masked_array import MaskedArray
from flax_tangents._src.masked_array import MaybeMasked
from flax_tangents._src.masked_array import split
from flax_tangents._src.masked_array import supports_masking

__all__ = ["AvgPool", "GlobalAvgPool", "GlobalSumPool", "SumPool"]


class _Pool(nn.Module):
  """Window, strides and padding shared by AvgPool and SumPool."""

  window_shape: Sequence[int]
  strides: Optional[Sequence[int]] = None
  padding: str = "VALID"

  def geometry(self, spatial_shape: Sequence[int]
               ) -> tuple[tuple[int, ...], tuple[int, ...],
                          conv_math.Pads, bool]:
    name = type(self).__name__
    n = len(spatial_shape)
    if len(self.window_shape) != n:
      raise ValueError(
          f"{name}: window_shape {tuple(self.window_shape)} has "
          f"{len(self.window_shape)} entries but the input has spatial shape "
          f"{tuple(spatial_shape)}; inputs must be (N, *spatial, C).")
    window = conv_math.as_tuple(self.window_shape, n, "window_shape")
    strides = conv_math.as_tuple(self.strides, n, "strides")
    padding = conv_math.check_padding(self.padding, name)
    pads, circular = conv_math.pad_config(padding, spatial_shape, window,
                                          strides)
    return window, strides, pads, circular

  def normalization(self) -> Optional[str]:
    """`None` (sum), `'window'` or `'edges'` (see `pool_covariance`)."""
    return None

  def output_mask(self, mask: jax.Array,
                  shape: Sequence[int]) -> Optional[jax.Array]:
    """A pooled location is padding iff its window's centre is (as NT)."""
    window, strides, pads, circular = self.geometry(shape[1:-1])
    return mask_arrays.window_mask(mask, window, strides, pads, circular)

  def pool(self, x: jax.Array) -> jax.Array:
    window, strides, pads, circular = self.geometry(x.shape[1:-1])
    lax_pads = [(0, 0)] + list(pads) + [(0, 0)]
    if circular:
      x = jnp.pad(x, lax_pads, mode="wrap")
      lax_pads = [(0, 0)] * x.ndim
    dims = (1,) + window + (1,)
    steps = (1,) + strides + (1,)
    y = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, dims,
                              steps, lax_pads)
    normalize = self.normalization()
    if normalize is None:
      return y
    if normalize == "edges" and not circular:
      counts = np.ones(())
      for i, (size, k, s, pad) in enumerate(
          zip(x.shape[1:-1], window, strides, pads)):
        axis_counts = pooling_math.window_counts(size, k, s, pad)
        counts = np.multiply.outer(counts, axis_counts)
      return y / jnp.asarray(counts[None, ..., None], y.dtype)
    return y / math.prod(window)


def _pool_rule(module: _Pool, kernel: Kernel, **kwargs: Any) -> Kernel:
  del kwargs
  name = type(module).__name__
  window, strides, pads, circular = module.geometry(kernel.shape1[1:-1])
  covariance.require_spatial_covariances(kernel, name)

  def pooled(cov: jax.Array, n_batch: int) -> jax.Array:
    return pooling_math.pool_covariance(
        cov, n_batch, diagonal_spatial=kernel.diagonal_spatial,
        window_shape=window, strides=strides, pads=pads, circular=circular,
        normalize=module.normalization())

  out_spatial = tuple(
      conv_math.conv_output_size(size, k, s, pad) for size, k, s, pad in
      zip(kernel.shape1[1:-1], window, strides, pads))
  out = covariance.map_covariances(kernel, pooled).replace(
      shape1=(kernel.shape1[0],) + out_spatial + (kernel.shape1[-1],),
      shape2=(kernel.shape2[0],) + out_spatial + (kernel.shape2[-1],))
  return masking.map_masks(out, kernel, module.output_mask)


@kernel_rule(_pool_rule)
class AvgPool(_Pool):
  """Average pooling over windows of locations (NT's `AvgPool`).

  With `'SAME'` padding, windows at the edges contain zeros; by default the
  sum is still divided by the full window size (as Neural Tangents does),
  `normalize_edges=True` divides by the number of real inputs instead.
  `'CIRCULAR'` wraps the input around.

  Attributes:
    window_shape: pooling window, one entry per spatial dimension.
    strides: strides; `None` means 1 (Neural Tangents' default, not the
      window shape).
    padding: `'VALID'`, `'SAME'` or `'CIRCULAR'`.
    normalize_edges: divide by the real window size at the edges.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> pool = ftn.AvgPool((2, 2), strides=(2, 2))
  >>> pool.apply({}, jnp.ones((1, 4, 4, 3))).shape
  (1, 2, 2, 3)
  """

  normalize_edges: bool = False

  def normalization(self) -> Optional[str]:
    return "edges" if self.normalize_edges else "window"

  @supports_masking(_Pool.output_mask)
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.pool(x)


@kernel_rule(_pool_rule)
class SumPool(_Pool):
  """Sum pooling over windows of locations (NT's `SumPool`).

  Attributes:
    window_shape: pooling window, one entry per spatial dimension.
    strides: strides; `None` means 1.
    padding: `'VALID'`, `'SAME'` or `'CIRCULAR'`.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.SumPool((2,)).apply({}, jnp.ones((1, 3, 1)))[0, :, 0]
  Array([2., 2.], dtype=float...)
  """

  @supports_masking(_Pool.output_mask)
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.pool(x)


def _global_rule(average: bool):
  def rule(module: nn.Module, kernel: Kernel, **kwargs: Any) -> Kernel:
    del kwargs
    return global_pool_kernel(kernel, average=average,
                              layer=type(module).__name__)
  return rule


def _spatial_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim - 1))


@kernel_rule(_global_rule(average=True))
class GlobalAvgPool(nn.Module):
  """Averages over all spatial locations: `(N, *spatial, C) -> (N, C)`.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.GlobalAvgPool().apply({}, jnp.ones((2, 4, 4, 3))).shape
  (2, 3)
  """

  def __call__(self, x: MaybeMasked) -> MaybeMasked:
    value, mask, was_masked = split(x)
    # Padded locations are skipped (NT's masked mean).
    y = mask_arrays.masked_mean(value, mask, _spatial_axes(value))
    if not was_masked:
      return y
    return MaskedArray(y, mask_arrays.global_mask(mask, "GlobalAvgPool"))


@kernel_rule(_global_rule(average=False))
class GlobalSumPool(nn.Module):
  """Sums over all spatial locations: `(N, *spatial, C) -> (N, C)`.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.GlobalSumPool().apply({}, jnp.ones((2, 4, 4, 3)))[0]
  Array([16., 16., 16.], dtype=float...)
  """

  def __call__(self, x: MaybeMasked) -> MaybeMasked:
    value, mask, was_masked = split(x)
    y = jnp.sum(value, axis=_spatial_axes(value))
    if not was_masked:
      return y
    return MaskedArray(y, mask_arrays.global_mask(mask, "GlobalSumPool"))
