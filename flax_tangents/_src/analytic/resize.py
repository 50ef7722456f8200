"""Covariances through resizing and indexing of spatial axes.

Both layers act on each spatial dimension separately and linearly: output
location `t` is `sum_p M[t, p] x[p]`, with `M` the interpolation matrix of
`jax.image.resize` (obtained by resizing an identity basis, so it follows
JAX's conventions exactly, for every method) or a 0/1 selection matrix for
indexing. On the pair of axes `(S, S')` of a covariance this is `M (x) M`;
on the single axis of the diagonal layout it is exact only when every output
reads at most one input (then `M * M` maps variances), which holds for
nearest-neighbour resizing and for every index.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import conv as conv_math
from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import spatial_maps
from flax_tangents.kernel import Kernel

__all__ = [
    "index_kernel",
    "normalize_index",
    "resize_kernel",
    "resize_matrix",
    "resolve_resize_shape",
]

Method = Union[str, jax.image.ResizeMethod]


@functools.lru_cache(maxsize=None)
def _resize_matrix(size: int, out: int, method: jax.image.ResizeMethod,
                   antialias: bool) -> np.ndarray:
  with jax.ensure_compile_time_eval():
    basis = jnp.eye(size, dtype=jnp.result_type(float))
    responses = jax.image.resize(basis, (size, out), method=method,
                                 antialias=antialias,
                                 precision=jax.lax.Precision.HIGHEST)
    return np.asarray(responses, np.float64).T


def resize_matrix(size: int, out: int, method: Method,
                  antialias: bool = True) -> np.ndarray:
  """The `(out, size)` matrix of `jax.image.resize` along one axis.

  Args:
    size: input length.
    out: output length.
    method: any `jax.image.resize` method (all are linear).
    antialias: as for `jax.image.resize`.

  Returns:
    `M` with `resize(x)[t] = sum_p M[t, p] x[p]`.
  """
  if isinstance(method, str):
    method = jax.image.ResizeMethod.from_string(method)
  return _resize_matrix(int(size), int(out), method, bool(antialias))


def resolve_resize_shape(shape: Sequence[int], in_shape: Sequence[int],
                         layer: str = "ImageResize") -> tuple[int, ...]:
  """The output shape of `ImageResize(shape)` on inputs of shape `in_shape`.

  Entries `-1` keep the input size (Neural Tangents' convention).

  Raises:
    ValueError: if `shape` has the wrong length or a non-positive entry.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(in_shape):
    raise ValueError(
        f"{layer}: shape={shape} has {len(shape)} entries but the inputs have "
        f"shape {tuple(in_shape)}; give one entry per axis, -1 to keep one.")
  if any(s < 1 and s != -1 for s in shape):
    raise ValueError(f"{layer}: shape={shape} entries must be positive or -1.")
  return tuple(n if s == -1 else s for s, n in zip(shape, in_shape))


def _apply_axis_maps(kernel: Kernel, mats: Sequence[np.ndarray],
                     out_spatial: Sequence[int], layer: str) -> Kernel:
  """Applies `y = M_i x` along spatial dimension `i` to every covariance."""
  sizes = kernel.shape1[1:-1]
  diagonal = kernel.diagonal_spatial
  is_selection = all(np.count_nonzero(m, axis=1).max(initial=0) <= 1
                     for m in mats)
  if not is_selection:
    covariance.require_spatial_covariances(kernel, layer)

  def mapped(cov: jax.Array, n_batch: int) -> jax.Array:
    if spatial_maps.use_matrices(sizes, diagonal):
      maps = [spatial_maps.pool_maps(m, diagonal) for m in mats]
      return spatial_maps.apply_maps(cov, n_batch, maps, diagonal)
    for i, m in enumerate(mats):
      if m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(len(m))):
        continue
      axes = ((n_batch + i,) if diagonal else
              (n_batch + 2 * i, n_batch + 2 * i + 1))
      cov = conv_math.fold_axes(cov, axes, m * m if diagonal else m)
    return cov

  return covariance.map_covariances(kernel, mapped).replace(
      shape1=(kernel.shape1[0],) + tuple(out_spatial) + (kernel.shape1[-1],),
      shape2=(kernel.shape2[0],) + tuple(out_spatial) + (kernel.shape2[-1],))


def resize_kernel(kernel: Kernel, shape: Sequence[int], *, method: Method,
                  antialias: bool, layer: str = "ImageResize") -> Kernel:
  """The kernel of `jax.image.resize(x, shape)` given the kernel of `x`.

  Args:
    kernel: the input kernel, activations `(N, *spatial, C)`.
    shape: the target shape, one entry per axis; `-1` keeps an axis. Batch
      and channel entries must keep their axes.
    method: a `jax.image.resize` method.
    antialias: as for `jax.image.resize`.
    layer: name for error messages.

  Returns:
    The output kernel.

  Raises:
    ValueError: if `shape` resizes the batch or channel axis, or a method
      other than nearest resizes a kernel that keeps only spatial diagonals.
  """
  shape = tuple(int(s) for s in shape)
  out1 = resolve_resize_shape(shape, kernel.shape1, layer)
  out2 = resolve_resize_shape(shape, kernel.shape2, layer)
  if out1[0] != kernel.shape1[0] or out2[0] != kernel.shape2[0]:
    raise ValueError(
        f"{layer}: shape={shape} resizes the batch axis (inputs "
        f"{kernel.shape1}, {kernel.shape2}); set shape[0] = -1.")
  if out1[-1] != kernel.shape1[-1] or out2[-1] != kernel.shape2[-1]:
    raise ValueError(
        f"{layer}: shape={shape} resizes the channel axis, which is not "
        "defined in the infinite-width limit; set shape[-1] = -1.")
  if isinstance(method, str):
    method = jax.image.ResizeMethod.from_string(method)
  in_spatial, out_spatial = kernel.shape1[1:-1], out1[1:-1]
  if in_spatial == out_spatial:
    return kernel
  mats = [resize_matrix(n, m, method, antialias)
          for n, m in zip(in_spatial, out_spatial)]
  return _apply_axis_maps(kernel, mats, out_spatial, layer)


def normalize_index(idx: Any, shape: Sequence[int],
                    layer: str = "Index") -> tuple[Union[int, slice], ...]:
  """Expands `idx` (ints, slices, one `...`) to one entry per axis of `shape`.

  Args:
    idx: a basic NumPy index, e.g. `np.s_[:, 1:3, 0]`.
    shape: the shape it indexes.
    layer: name for error messages.

  Returns:
    A tuple of ints (in range, non-negative) and slices, one per axis.

  Raises:
    ValueError: for other index types, several ellipses, too many entries,
      or an integer out of range.
  """
  idx = idx if isinstance(idx, tuple) else (idx,)
  for i in idx:
    if not (i is Ellipsis or isinstance(i, (slice, int, np.integer))) or (
        isinstance(i, bool)):
      raise ValueError(
          f"{layer}: only ints, slices and `...` are supported, got {i!r} in "
          f"idx={idx!r}.")
  n_ellipsis = sum(i is Ellipsis for i in idx)
  if n_ellipsis > 1:
    raise ValueError(f"{layer}: idx={idx!r} has more than one `...`.")
  n_explicit = len(idx) - n_ellipsis
  if n_explicit > len(shape):
    raise ValueError(
        f"{layer}: idx={idx!r} has {n_explicit} entries but the inputs have "
        f"{len(shape)} axes {tuple(shape)}.")
  fill = (slice(None),) * (len(shape) - n_explicit)
  if n_ellipsis:
    pos = idx.index(Ellipsis)
    idx = idx[:pos] + fill + idx[pos + 1:]
  else:
    idx = idx + fill
  out = []
  for axis, (i, size) in enumerate(zip(idx, shape)):
    if isinstance(i, slice):
      out.append(i)
      continue
    i = int(i)
    if not -size <= i < size:
      raise ValueError(
          f"{layer}: index {i} is out of range for axis {axis} of size "
          f"{size}.")
    out.append(i % size)
  return tuple(out)


def index_kernel(kernel: Kernel, idx: Any, layer: str = "Index") -> Kernel:
  """The kernel of `x[idx]` given the kernel of `x`.

  `idx` may only select along spatial axes: the batch and channel entries
  must be `:`. An integer drops its spatial axis (both axes of the pair).

  Raises:
    ValueError: if `idx` touches the batch or channel axis, or selects no
      location.
  """
  idx1 = normalize_index(idx, kernel.shape1, layer)
  normalize_index(idx, kernel.shape2, layer)
  for axis, name in ((0, "batch"), (-1, "channel")):
    if idx1[axis] != slice(None):
      raise ValueError(
          f"{layer}: idx={idx!r} indexes the {name} axis; the kernel keeps "
          f"{name} axes whole, so use `:` there (index only spatial axes).")
  spatial = idx1[1:-1]
  sizes = kernel.shape1[1:-1]
  if all(i == slice(None) for i in spatial):
    return kernel
  out_sizes = [len(range(*i.indices(n))) if isinstance(i, slice) else None
               for i, n in zip(spatial, sizes)]
  if any(s == 0 for s in out_sizes):
    raise ValueError(
        f"{layer}: idx={idx!r} selects no location from inputs of shape "
        f"{kernel.shape1}.")
  diagonal = kernel.diagonal_spatial

  def indexed(cov: jax.Array, n_batch: int) -> jax.Array:
    index = [slice(None)] * n_batch
    for i in spatial:
      index += [i] if diagonal else [i, i]
    return cov[tuple(index)]

  kept = tuple(s for s in out_sizes if s is not None)
  return covariance.map_covariances(kernel, indexed).replace(
      shape1=(kernel.shape1[0],) + kept + (kernel.shape1[-1],),
      shape2=(kernel.shape2[0],) + kept + (kernel.shape2[-1],))
