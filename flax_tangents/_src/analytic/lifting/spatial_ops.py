"""Kernels of linear maps over locations, for lifted array operations.

Each function maps the kernel of `x`, activations `(N, *spatial, C)`, to the
kernel of a linear function of `x` that acts on locations only (the same for
every channel): reshapes of the spatial axes, new or broadcast axes,
selections and padding (per-axis 0/1 matrices), sums over axes, and
multiplication by constants that vary over locations.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import mixture_units
from flax_tangents._src.analytic import mixtures
from flax_tangents._src.analytic import resize
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.spatial import flatten_kernel

__all__ = [
    "add",
    "axis_maps",
    "merge_into_channels",
    "scale",
    "scale_locations",
    "spatial_reshape",
    "sum_axes",
]


def _with_spatial(kernel: Kernel, spatial: Sequence[int]) -> dict[str, Any]:
  spatial = tuple(int(s) for s in spatial)
  return dict(shape1=(kernel.shape1[0],) + spatial + (kernel.shape1[-1],),
              shape2=(kernel.shape2[0],) + spatial + (kernel.shape2[-1],))


def scale(kernel: Kernel, factor: Any) -> Kernel:
  """The kernel of `factor * x` for a scalar `factor` (every unit alike, so
  a mixture keeps its parts)."""
  square = factor * factor
  return mixture_units.map_units(kernel, lambda k: covariance.map_covariances(
      k, lambda cov, _: square * cov))


def add(a: Kernel, b: Kernel) -> Kernel:
  """The kernel of `x + y` for values whose cross-moments vanish.

  The caller has established that (`provenance`); the result is Gaussian
  when both are.
  """
  def total(field):
    x, y = getattr(a, field), getattr(b, field)
    return None if x is None or y is None else x + y

  out = a.replace(nngp=total("nngp"), ntk=total("ntk"), cov1=total("cov1"),
                  cov2=total("cov2"),
                  is_gaussian=a.is_gaussian and b.is_gaussian,
                  is_input=False,
                  # Padding in both summands (NT's FanInSum rule).
                  mask1=mask_arrays.sum_masks([a.mask1, b.mask1]),
                  mask2=mask_arrays.sum_masks([a.mask2, b.mask2]))
  if mixtures.is_mixed(a) or mixtures.is_mixed(b):
    mixtures.mark_mixed(out)
  return out


def spatial_reshape(kernel: Kernel, spatial: Sequence[int]) -> Kernel:
  """The kernel after a row-major reshape of the spatial axes to `spatial`."""
  spatial = tuple(int(s) for s in spatial)
  old = tuple(kernel.shape1[1:-1])
  if old == spatial:
    return kernel
  if math.prod(old) != math.prod(spatial):
    raise ValueError(f"cannot reshape locations {old} to {spatial}")
  n_old = len(old)

  def reshaped(cov, n_batch):
    batch = cov.shape[:n_batch]
    if kernel.diagonal_spatial:
      return cov.reshape(batch + spatial)
    # (b, s1, s1', s2, s2', ...) -> (b, s1, s2, ..., s1', s2', ...)
    order = (list(range(n_batch)) +
             [n_batch + 2 * i for i in range(n_old)] +
             [n_batch + 2 * i + 1 for i in range(n_old)])
    grouped = jnp.transpose(cov, order).reshape(batch + spatial + spatial)
    n = len(spatial)
    back = list(range(n_batch))
    for i in range(n):
      back += [n_batch + i, n_batch + n + i]
    return jnp.transpose(grouped, back)

  return covariance.map_covariances(kernel, reshaped).replace(
      **_with_spatial(kernel, spatial))


def axis_maps(kernel: Kernel, matrices: Sequence[np.ndarray],
              layer: str) -> Kernel:
  """The kernel of `y = M_i x` along every spatial axis `i`.

  Selections (each output reading at most one input: slices, flips, padding,
  broadcasting) work in either layout; other maps need full spatial
  covariances.
  """
  out_spatial = tuple(m.shape[0] for m in matrices)
  # pylint: disable=protected-access
  return resize._apply_axis_maps(kernel, [np.asarray(m, np.float64)
                                          for m in matrices],
                                 out_spatial, layer)


def sum_axes(kernel: Kernel, axes: Sequence[int], layer: str) -> Kernel:
  """The kernel after summing over spatial axes `axes` (0-based spatial)."""
  sizes = kernel.shape1[1:-1]
  matrices = [np.ones((1, n)) if i in axes else np.eye(n)
              for i, n in enumerate(sizes)]
  summed = axis_maps(kernel, matrices, layer)
  kept = [n for i, n in enumerate(sizes) if i not in axes]
  return spatial_reshape(summed, kept)


def scale_locations(kernel: Kernel, factors: Any) -> Kernel:
  """The kernel of `factors * x`, `factors` of the spatial shape.

  Covariances of locations `s, s'` are multiplied by `factors[s]
  factors[s']` (the square in the diagonal layout).
  """
  factors = jnp.asarray(factors)

  def scaled(cov, n_batch):
    pair = (factors * factors if kernel.diagonal_spatial else
            _outer_pairs(factors)).astype(cov.dtype)
    return cov * pair.reshape((1,) * n_batch + pair.shape)

  return covariance.map_covariances(kernel, scaled)


def _outer_pairs(factors: jnp.ndarray) -> jnp.ndarray:
  """`out[s1, s1', s2, s2', ...] = factors[s] factors[s']`."""
  left = factors.reshape(sum(((d, 1) for d in factors.shape), ()))
  right = factors.reshape(sum(((1, d) for d in factors.shape), ()))
  return left * right


def merge_into_channels(kernel: Kernel, n_axes: int) -> Kernel:
  """The kernel after merging the last `n_axes` spatial axes into channels.

  A later affine layer sums over the merged units, so it sees the average
  over the merged locations of each location's own covariance (as
  `Flatten` does for all of them).
  """
  if n_axes == 0:
    return kernel
  sizes = kernel.shape1[1:-1]
  if n_axes == len(sizes):
    return flatten_kernel(kernel)
  keep = len(sizes) - n_axes

  def merged(cov, n_batch):
    if not kernel.diagonal_spatial:
      # Diagonal over the merged pairs only: move them to the end first.
      for i in range(keep, len(sizes)):
        axis = n_batch + 2 * keep  # the next merged pair, after earlier ones
        cov = jnp.moveaxis(jnp.diagonal(cov, axis1=axis, axis2=axis + 1), -1,
                           cov.ndim - 2)
      return jnp.mean(cov, axis=tuple(range(cov.ndim - n_axes, cov.ndim)))
    return jnp.mean(cov, axis=tuple(range(n_batch + keep, cov.ndim)))

  channels1 = kernel.shape1[-1] * math.prod(sizes[keep:])
  channels2 = kernel.shape2[-1] * math.prod(sizes[keep:])
  out = covariance.map_covariances(kernel, merged)
  # Units are (location, channel) pairs of different variances: a mixture.
  return mixtures.mark_mixed(out.replace(
      shape1=(kernel.shape1[0],) + tuple(sizes[:keep]) + (channels1,),
      shape2=(kernel.shape2[0],) + tuple(sizes[:keep]) + (channels2,),
      is_gaussian=False))
