"""Covariances through sum and average pooling (`ftn.AvgPool`, `SumPool`).

Pooling sums over all pairs `(s t + j, s t' + j')` of its window, one window
sum per axis of each spatial pair (the strided slices of `conv`), then
divides by the window size or by the number of real inputs in it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import conv
from flax_tangents._src.analytic import spatial_maps

__all__ = ["pool_covariance", "window_counts"]


def window_counts(size: int, window: int, stride: int,
                  pad: tuple[int, int]) -> np.ndarray:
  """How many real (unpadded) inputs each output window covers."""
  ones = np.ones(size)
  ones = np.pad(ones, pad)
  out = conv.conv_output_size(size, window, stride, pad)
  return np.array([ones[t * stride:t * stride + window].sum()
                   for t in range(out)])


def pool_covariance(cov: jax.Array, n_batch: int, *, diagonal_spatial: bool,
                    window_shape: Sequence[int], strides: Sequence[int],
                    pads: conv.Pads, circular: bool,
                    normalize: Optional[str]) -> jax.Array:
  """Covariance of sum or average pooling.

  Args:
    cov: covariance with `n_batch` leading batch axes.
    n_batch: 1 or 2.
    diagonal_spatial: layout of `cov` (then off-diagonal covariances are
      taken to be zero, as after an unshared convolution).
    window_shape: pooling window.
    strides: strides.
    pads: `(low, high)` pads per dimension.
    circular: pads wrap around.
    normalize: `None` (sum), `'window'` (divide by the window size) or
      `'edges'` (divide by the number of real inputs in each window).

  Returns:
    The pooled covariance.

  >>> import jax.numpy as jnp
  >>> cov = jnp.eye(4)[None]  # one input, 4 uncorrelated unit locations
  >>> pool_covariance(cov, 1, diagonal_spatial=False, window_shape=(2,),
  ...                 strides=(2,), pads=((0, 0),), circular=False,
  ...                 normalize='window')[0]
  Array([[0.5, 0. ],
         [0. , 0.5]], dtype=float...)
  """
  sizes = conv.spatial_sizes(cov, n_batch, len(window_shape),
                             diagonal_spatial)
  if spatial_maps.use_matrices(sizes, diagonal_spatial):
    maps = []
    for size, k, s, pad in zip(sizes, window_shape, strides, pads):
      window_matrix = spatial_maps.offset_matrices(
          size, k, s, tuple(pad), circular).sum(axis=0)
      if normalize == "edges" and not circular:
        window_matrix = window_matrix / window_counts(size, k, s,
                                                      pad)[:, None]
      elif normalize is not None:
        window_matrix = window_matrix / k
      maps.append(spatial_maps.pool_maps(window_matrix, diagonal_spatial))
    return spatial_maps.apply_maps(cov, n_batch, maps, diagonal_spatial)
  for i, (k, s, pad) in enumerate(zip(window_shape, strides, pads)):
    axes = conv.spatial_axes(n_batch, i, diagonal_spatial)
    size = cov.shape[axes[0]]
    for axis in axes:
      cov = conv.window_sum(cov, (axis,), k, s, pad, circular)
    if normalize is None:
      continue
    if normalize == "edges" and not circular:
      counts = window_counts(size, k, s, pad)
    else:
      counts = np.full(conv.conv_output_size(size, k, s, pad), float(k))
    # Each axis of the pair is an average; the diagonal layout stands for
    # uncorrelated locations, whose mean has variance sum / count**2.
    denominator = (np.outer(counts, counts) if not diagonal_spatial else
                   counts**2)
    shape = [1] * cov.ndim
    for axis in axes:
      shape[axis] = len(counts)
    cov = cov / jnp.asarray(denominator.reshape(shape), cov.dtype)
  return cov
