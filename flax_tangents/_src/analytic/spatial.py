"""Reductions over spatial locations of covariance arrays."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic import mixtures
from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["flatten_kernel", "flattened_average", "global_pool_kernel"]


def _drop_spatial_shape(kernel: Kernel, channels1: int,
                        channels2: int) -> dict[str, tuple[int, ...]]:
  return dict(shape1=(kernel.shape1[0], channels1),
              shape2=(kernel.shape2[0], channels2))


def flatten_kernel(kernel: Kernel) -> Kernel:
  """Kernel after flattening `(N, *spatial, C)` to `(N, prod(spatial) * C)`.

  A dense layer on flattened activations sees the mean over locations of each
  location's own covariance, so only spatial diagonals matter. Units of
  different locations have different variances, so the result is a mixture
  (see `mixtures`): a nonlinearity applied next acts on each location's own
  kernel, exactly as if it came before `Flatten`.
  """
  if covariance.spatial_ndim(kernel) == 0:
    return kernel
  return mixtures.with_parts(flattened_average(kernel), (kernel,),
                             mixtures.FLATTEN)


def flattened_average(kernel: Kernel) -> Kernel:
  """The channel-averaged kernel of flattened activations (no parts)."""
  n_spatial = covariance.spatial_ndim(kernel)
  if n_spatial == 0:
    return kernel

  def mean_of_diagonal(cov: jax.Array, n_batch: int) -> jax.Array:
    if not kernel.diagonal_spatial:
      cov = covariance.spatial_diagonal(cov, n_batch, n_spatial, False)
    return jnp.mean(cov, axis=tuple(range(n_batch, cov.ndim)))

  size = lambda shape: math.prod(shape[1:])
  out = covariance.map_covariances(kernel, mean_of_diagonal).replace(
      **_drop_spatial_shape(kernel, size(kernel.shape1), size(kernel.shape2)))
  # Padded entries are zeros among the flattened channels: the mean above
  # counts them as such, and the mask follows its entries.
  return masking.map_masks(out, kernel, mask_arrays.flatten_mask)


def global_pool_kernel(kernel: Kernel, *, average: bool, layer: str) -> Kernel:
  """Kernel after summing or averaging over all locations.

  With padding masks the average is over unpadded locations only, and the
  output is padding when all locations are.

  Raises:
    ValueError: if the kernel keeps only spatial diagonals.
  """
  n_spatial = covariance.spatial_ndim(kernel)
  if n_spatial == 0:
    return kernel
  covariance.require_spatial_covariances(kernel, layer)
  mask11, mask12, mask22 = masking.pair_masks(
      kernel, *masking.kernel_masks(kernel), layer)
  masks = {"nngp": mask12, "ntk": mask12, "cov1": mask11, "cov2": mask22}

  def pooled(name: str, cov: Optional[jax.Array]) -> Optional[jax.Array]:
    if cov is None:
      return None
    axes = tuple(range(covariance.batch_ndim(kernel, name), cov.ndim))
    if average:
      # The mean over pairs of unpadded locations (NT's masked mean).
      return mask_arrays.masked_mean(cov, masks[name], axes)
    return jnp.sum(mask_arrays.zero_masked(cov, masks[name]), axis=axes)

  out = kernel.replace(
      **{name: pooled(name, getattr(kernel, name)) for name in masks},
      **_drop_spatial_shape(kernel, kernel.shape1[-1], kernel.shape2[-1]))
  return masking.map_masks(
      out, kernel, lambda mask, shape: mask_arrays.global_mask(mask, layer))
