"""Axes and output layout shared by every empirical-NTK implementation.

Every implementation (`jacobian_contraction`, `ntk_vector_products`,
`structured`) exposes

    ntk(f, params, x1, x2, kwargs1, kwargs2, *,
        trace_axes, diagonal_axes, vmap_axes) -> pytree of kernels

and lays out its result with the helpers here (NT's convention): for an output
leaf of shape `(A, B, C, ...)` the kernel has, axis by axis, nothing for a
traced axis, one axis for a diagonal axis and a pair `(A1, A2)` otherwise, in
the original order; e.g. `(N, O)` with `trace_axes=()` gives
`(N1, N2, O1, O2)`. Traced axes are averaged (divided by their size).
`contract` produces this layout from two arrays that share trailing
(parameter) axes; `trace_and_diagonal` from a full kernel laid out as
`(*out1_shape, *out2_shape)`. `canonicalize_axes` turns user axes (possibly
negative) into a sorted tuple of non-negative ints and checks them.
"""

from collections.abc import Sequence
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.typing import Axes
from flax_tangents._src.typing import PyTree

__all__ = [
    "Axes",
    "PyTree",
    "canonicalize_axes",
    "check_trace_and_diagonal",
    "contract",
    "kernel_shape",
    "trace_and_diagonal",
    "traced_size",
    "zip_axes",
]


def canonicalize_axes(axes: Axes, ndim: int, name: str = "axes") -> tuple[
    int, ...]:
  """Sorted, non-negative, de-duplicated axes of an `ndim`-dimensional array.

  Args:
    axes: an int or a sequence of ints, negative ones counting from the end.
    ndim: number of dimensions of the array the axes refer to.
    name: what the axes are called in error messages.

  Returns:
    A sorted tuple of distinct axes in `[0, ndim)`.

  Raises:
    ValueError: if an axis is out of range.

  >>> canonicalize_axes((-1, 0), 3)
  (0, 2)
  """
  axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  result = set()
  for axis in axes:
    if not -ndim <= int(axis) < ndim:
      raise ValueError(
          f"{name}={axes} does not fit an output with {ndim} dimensions: axis "
          f"{axis} is out of range. Give axes in [-{ndim}, {ndim}).")
    result.add(int(axis) % ndim)
  return tuple(sorted(result))


def check_trace_and_diagonal(
    trace_axes: Axes, diagonal_axes: Axes, shape1: Sequence[int],
    shape2: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Checks and canonicalizes `trace_axes`/`diagonal_axes` for two outputs.

  Args:
    trace_axes: axes averaged over.
    diagonal_axes: axes of which only the diagonal is kept.
    shape1: shape of one output leaf of `f(params, x1)`.
    shape2: shape of the same leaf of `f(params, x2)`.

  Returns:
    `(trace_axes, diagonal_axes)`, canonicalized.

  Raises:
    ValueError: if the two outputs have different ranks, an axis is both
      traced and diagonal, or the outputs differ in size along a traced or
      diagonal axis.

  >>> check_trace_and_diagonal((-1,), (), (4, 3), (2, 3))
  ((1,), ())
  """
  if len(shape1) != len(shape2):
    raise ValueError(
        f"f(params, x1) has an output of shape {tuple(shape1)} but "
        f"f(params, x2) has shape {tuple(shape2)}: they must have the same "
        "number of dimensions.")
  ndim = len(shape1)
  trace = canonicalize_axes(trace_axes, ndim, "trace_axes")
  diagonal = canonicalize_axes(diagonal_axes, ndim, "diagonal_axes")
  both = set(trace) & set(diagonal)
  if both:
    raise ValueError(
        f"axes {sorted(both)} are in both trace_axes={trace_axes} and "
        f"diagonal_axes={diagonal_axes}; an axis is either traced or "
        "diagonal.")
  for axis in trace + diagonal:
    if shape1[axis] != shape2[axis]:
      kind = "trace_axes" if axis in trace else "diagonal_axes"
      raise ValueError(
          f"outputs f(params, x1) of shape {tuple(shape1)} and f(params, x2) "
          f"of shape {tuple(shape2)} differ along axis {axis}, which is in "
          f"{kind}: paired axes must have the same size. Remove the axis "
          f"from {kind} or give inputs whose outputs agree on it.")
  return trace, diagonal


def kernel_shape(
    shape1: Sequence[int], shape2: Sequence[int], trace_axes: Axes,
    diagonal_axes: Axes
) -> tuple[int, ...]:
  """Shape of the NT-layout kernel between outputs of shapes `shape1/2`.

  >>> kernel_shape((4, 3), (2, 3), (), (1,))
  (4, 2, 3)
  """
  trace, diagonal = check_trace_and_diagonal(trace_axes, diagonal_axes,
                                             shape1, shape2)
  shape = ()
  for axis, (size1, size2) in enumerate(zip(shape1, shape2)):
    if axis in trace:
      continue
    shape += (size1,) if axis in diagonal else (size1, size2)
  return shape


def traced_size(shape: Sequence[int], trace_axes: Sequence[int]) -> int:
  """Number of elements along `trace_axes` (the divisor of a trace)."""
  return math.prod(shape[axis] for axis in trace_axes)


def zip_axes(x: jax.Array, start: int = 0, end: Optional[int] = None
             ) -> jax.Array:
  """Interleaves axes `[start:end]`: `(.., A, B, .., A', B')` to `(A, A', ..)`.

  Args:
    x: array whose axes `start:end` are two equally long groups.
    start: first axis of the first group.
    end: one past the last axis of the second group (default: `x.ndim`).

  Returns:
    `x` with the two groups interleaved.

  >>> zip_axes(jnp.zeros((1, 2, 3, 4))).shape
  (1, 3, 2, 4)
  """
  end = x.ndim if end is None else end
  half = (end - start) // 2
  order = list(range(start))
  for i in range(half):
    order += [start + i, start + half + i]
  order += list(range(end, x.ndim))
  return jnp.transpose(x, order)


def _diagonal_positions(trace: Sequence[int], diagonal: Sequence[int]
                        ) -> list[int]:
  """Where each diagonal axis lands in the NT layout of the kernel."""
  positions = []
  for d in diagonal:
    # Each earlier free axis contributes two kernel axes, each earlier
    # diagonal axis one, each earlier traced axis none.
    n_free = sum(1 for a in range(d) if a not in trace and a not in diagonal)
    n_diag = sum(1 for a in diagonal if a < d)
    positions.append(2 * n_free + n_diag)
  return positions


def contract(lhs: jax.Array, rhs: jax.Array, out_ndim: int,
             trace_axes: Sequence[int], diagonal_axes: Sequence[int],
             average: bool = True) -> jax.Array:
  """Contracts two arrays over trailing shared axes into the NT layout.

  `lhs` has shape `(*out1, *extra)` and `rhs` has shape `(*out2, *extra)`;
  `extra` axes (parameters, for a Jacobian) are summed over, the output axes
  are paired as described in the module docstring.

  Args:
    lhs: first array; its first `out_ndim` axes are output axes.
    rhs: second array, with the same number of dimensions.
    out_ndim: number of leading output axes.
    trace_axes: canonical output axes to trace (sum and, if `average`,
      divide by their size).
    diagonal_axes: canonical output axes to keep only the diagonal of.
    average: divide by the traced size, as NT does.

  Returns:
    The kernel in NT layout.

  >>> contract(jnp.ones((2, 3, 5)), jnp.ones((4, 3, 5)), 2, (1,), ()).shape
  (2, 4)
  """
  extra = tuple(range(out_ndim, lhs.ndim))
  contracting = tuple(trace_axes) + extra
  dims = ((contracting, contracting), (tuple(diagonal_axes),
                                       tuple(diagonal_axes)))
  product = jax.lax.dot_general(lhs, rhs, dims)
  n_diag = len(diagonal_axes)
  # dot_general gives (diag..., free1..., free2...): pair the free axes, then
  # move each diagonal axis to its place in output order.
  product = zip_axes(product, n_diag)
  product = jnp.moveaxis(product, tuple(range(n_diag)),
                         tuple(_diagonal_positions(trace_axes, diagonal_axes)))
  if average:
    product = product / traced_size(lhs.shape, trace_axes)
  return product


def trace_and_diagonal(kernel: jax.Array, trace_axes: Sequence[int],
                       diagonal_axes: Sequence[int]) -> jax.Array:
  """NT layout from a full kernel of shape `(*out1_shape, *out2_shape)`.

  Args:
    kernel: array with an even number of dimensions, the first half indexing
      the first output and the second half the second one.
    trace_axes: canonical output axes to average over.
    diagonal_axes: canonical output axes to keep only the diagonal of.

  Returns:
    The kernel in NT layout.

  >>> trace_and_diagonal(jnp.ones((2, 3, 4, 3)), (1,), ()).shape
  (2, 4)
  """
  out_ndim = kernel.ndim // 2
  size = traced_size(kernel.shape[:out_ndim], trace_axes)
  axes1 = list(range(out_ndim))
  axes2 = list(range(out_ndim, 2 * out_ndim))
  # Sum traced pairs and extract diagonal pairs with one einsum.
  letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
  spec1, spec2, out = [], [], []
  for axis in range(out_ndim):
    a = next(letters)
    if axis in trace_axes:
      spec1.append(a)
      spec2.append(a)
    elif axis in diagonal_axes:
      spec1.append(a)
      spec2.append(a)
      out.append(a)
    else:
      b = next(letters)
      spec1.append(a)
      spec2.append(b)
      out += [a, b]
  del axes1, axes2
  spec = f"{''.join(spec1)}{''.join(spec2)}->{''.join(out)}"
  return jnp.einsum(spec, kernel) / size
