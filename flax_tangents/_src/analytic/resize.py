"""Covariances through resizing and indexing of spatial and batch axes.

Both layers act on each axis separately and linearly: output location `t`
is `sum_p M[t, p] x[p]`, with `M` the interpolation matrix of
`jax.image.resize` (obtained by resizing an identity basis, so it follows
JAX's conventions exactly, for every method) or a 0/1 selection matrix for
indexing. On the pair of axes `(S, S')` of a covariance this is `M (x) M`;
on the single axis of the diagonal layout it is exact only when every output
reads at most one input (then `M * M` maps variances), which holds for
nearest-neighbour resizing and for every index. The batch axis is treated
the same way (`M1` for `x1`, `M2` for `x2`): its pair is `(N1, N2)` in
`nngp`/`ntk` and `(N, N)` in `cov1`/`cov2` unless `diagonal_batch`.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import conv as conv_math
from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import requirements
from flax_tangents._src.analytic import spatial_maps
from flax_tangents._src.analytic.kernel import Kernel

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
  is_selection = all(_is_selection(m) for m in mats)
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


def _is_selection(m: np.ndarray) -> bool:
  return np.count_nonzero(m, axis=1).max(initial=0) <= 1


def map_batch_axis(kernel: Kernel, m1: np.ndarray, m2: np.ndarray,
                   layer: str) -> Kernel:
  """Applies `y = M1 x1`, `y = M2 x2` along the batch axis of every array.

  Such a layer mixes or selects inputs, so the kernel of a batch tile is not
  a tile of the kernel: it is recorded for `ft.batch`, which refuses it.

  Raises:
    ValueError: if an `M` mixes inputs and `cov1`/`cov2` keep only the
      batch diagonal (possible only for a `Kernel` passed in by hand).
  """
  requirements.record_batch_mixing(layer)
  selection = _is_selection(m1) and _is_selection(m2)
  if not selection:
    covariance.require_batch_covariances(kernel, layer)

  def own(cov: Optional[jax.Array], m: np.ndarray) -> Optional[jax.Array]:
    if cov is None:
      return None
    if kernel.diagonal_batch:
      return conv_math.fold_axes(cov, (0,), m * m)
    return conv_math.fold_axes(cov, (0, 1), m)

  def cross(cov: Optional[jax.Array]) -> Optional[jax.Array]:
    if cov is None:
      return None
    return conv_math.fold_axes(conv_math.fold_axes(cov, (0,), m1), (1,), m2)

  return kernel.replace(
      nngp=cross(kernel.nngp), ntk=cross(kernel.ntk),
      cov1=own(kernel.cov1, m1), cov2=own(kernel.cov2, m2),
      shape1=(m1.shape[0],) + tuple(kernel.shape1[1:]),
      shape2=(m2.shape[0],) + tuple(kernel.shape2[1:]))


def resize_kernel(kernel: Kernel, shape: Sequence[int], *, method: Method,
                  antialias: bool, layer: str = "ImageResize") -> Kernel:
  """The kernel of `jax.image.resize(x, shape)` given the kernel of `x`.

  Args:
    kernel: the input kernel, activations `(N, *spatial, C)`.
    shape: the target shape, one entry per axis; `-1` keeps an axis. The
      channel entry must keep its axis; resizing the batch axis (`x1` and
      `x2` to the same size) mixes inputs, as NT allows.
    method: a `jax.image.resize` method.
    antialias: as for `jax.image.resize`.
    layer: name for error messages.

  Returns:
    The output kernel.

  Raises:
    ValueError: if `shape` resizes the channel axis, or a method other than
      nearest resizes a kernel that keeps only spatial diagonals.
  """
  shape = tuple(int(s) for s in shape)
  out1 = resolve_resize_shape(shape, kernel.shape1, layer)
  out2 = resolve_resize_shape(shape, kernel.shape2, layer)
  if out1[-1] != kernel.shape1[-1] or out2[-1] != kernel.shape2[-1]:
    raise ValueError(
        f"{layer}: shape={shape} resizes the channel axis, which is not "
        "defined in the infinite-width limit; set shape[-1] = -1.")
  if isinstance(method, str):
    method = jax.image.ResizeMethod.from_string(method)
  if shape[0] != -1:
    # Even a resize to the current size makes outputs depend on how many
    # inputs are passed together.
    requirements.record_batch_mixing(layer)
  if shape[0] != -1 and (out1[0], out2[0]) != (kernel.shape1[0],
                                              kernel.shape2[0]):
    kernel = map_batch_axis(
        kernel, resize_matrix(kernel.shape1[0], out1[0], method, antialias),
        resize_matrix(kernel.shape2[0], out2[0], method, antialias), layer)
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


def _selection(index: Union[int, slice], size: int) -> np.ndarray:
  return np.eye(size)[index]


def index_kernel(kernel: Kernel, idx: Any, layer: str = "Index") -> Kernel:
  """The kernel of `x[idx]` given the kernel of `x`.

  `idx` selects along spatial axes and, with a slice, the batch axis (the
  same slice of `x1` and of `x2`, as NT); the channel entry must be `:`. An
  integer drops its spatial axis (both axes of the pair).

  Raises:
    ValueError: if `idx` indexes the channel axis, has an integer on the
      batch axis, or selects nothing.
  """
  idx1 = normalize_index(idx, kernel.shape1, layer)
  idx2 = normalize_index(idx, kernel.shape2, layer)
  if idx1[-1] != slice(None):
    raise ValueError(
        f"{layer}: idx={idx!r} indexes the channel axis; the kernel keeps "
        "the channel axis whole, so use `:` there.")
  if not isinstance(idx1[0], slice):
    raise ValueError(
        f"{layer}: idx={idx!r} has an integer on the batch axis, which would "
        "remove it; every activation keeps a batch axis, so use a slice "
        f"(e.g. {idx1[0]}:{idx1[0] + 1}).")
  if idx1[0] != slice(None):
    m1 = _selection(idx1[0], kernel.shape1[0])
    m2 = _selection(idx2[0], kernel.shape2[0])
    if not (len(m1) and len(m2)):
      raise ValueError(
          f"{layer}: idx={idx!r} selects no input from batches of sizes "
          f"{kernel.shape1[0]} and {kernel.shape2[0]}.")
    kernel = map_batch_axis(kernel, m1, m2, layer)
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
