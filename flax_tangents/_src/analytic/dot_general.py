"""`lax.dot_general` with a constant operand: output layout and covariances.

The activations `x` have shape `(N, *spatial, C)`; the constant `other` is
the other operand. Each output axis of `lax.dot_general` is a dot batch
dimension (an axis of `x` paired with one of `other`), a free axis of `x`,
or a free axis of `other`. This library keeps every activation batch-first
and channels-last, so the output's batch axis (if `x`'s survives) is moved
first and its channel axis last, the other axes keeping lax's order.
Contracting `x`'s batch axis leaves a unit batch axis in its place (like
`keepdims`): the result is one new "example", `sum_n other[n] x[n]`, and
later layers apply to it as to any input.

Covariances follow by linearity: with `y = A x` (over the spatial and
batch axes that `other` touches), `cov(y1, y2) = A1 cov(x1, x2) A2^T`,
computed with one `einsum` per covariance array.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["DotAxis", "DotLayout", "apply_dot_general", "dot_layout",
           "dot_mask", "kernel_dot_general"]

_HIGHEST = jax.lax.Precision.HIGHEST
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class DotAxis:
  """One output axis: `kind` is 'batch', 'unit', 'channel', 'x' or 'other'.

  'batch': `x`'s batch axis (free, or a dot batch dimension with
  `other_axis`); 'unit': the unit axis left by contracting the batch axis;
  'x': a spatial axis of `x` (free, or paired with `other_axis` as a dot
  batch dimension); 'other': a free axis `other_axis` of `other`.
  """
  kind: str
  x_axis: Optional[int] = None
  other_axis: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class DotLayout:
  """Where every axis of `x` and `other` goes (see the module docstring)."""
  x_contract: tuple[int, ...]
  other_contract: tuple[int, ...]
  x_batch: tuple[int, ...]
  other_batch: tuple[int, ...]
  lax_axes: tuple[DotAxis, ...]   # lax.dot_general's output order
  out_axes: tuple[DotAxis, ...]   # this library's order (batch first)

  @property
  def contracts_batch(self) -> bool:
    return 0 in self.x_contract

  def contracts_spatial(self, n_x: int) -> bool:
    return any(0 < a < n_x - 1 for a in self.x_contract)

  def paired(self) -> dict[int, int]:
    """Axis of `other` -> the axis of `x` it is contracted or batched with."""
    return dict(zip(self.other_contract + self.other_batch,
                    self.x_contract + self.x_batch))


def _normalize(axes: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  out = []
  for a in axes:
    a = int(a)
    if not -ndim <= a < ndim:
      raise ValueError(f"DotGeneral: axis {a} of {what} is out of range for "
                       f"{ndim} dimensions.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"DotGeneral: repeated axes {tuple(axes)} of {what}.")
  return tuple(out)


def dot_layout(n_x: int, n_other: int, is_lhs: bool,
               dimension_numbers: Any) -> DotLayout:
  """The output layout of `dot_general` of activations `x` with `other`.

  Args:
    n_x: number of axes of the activations `(N, *spatial, C)`.
    n_other: number of axes of the constant.
    is_lhs: whether the constant is the left operand (NT's convention:
      `is_lhs=True` means `lax.dot_general(other, x, ...)`).
    dimension_numbers: `((lhs_contracting, rhs_contracting), (lhs_batch,
      rhs_batch))`.

  Returns:
    The `DotLayout`.

  Raises:
    ValueError: if the channel axis is contracted or batched, axes repeat
      or are out of range, or the contracting/batch lists differ in length.
  """
  try:
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  except (TypeError, ValueError):
    raise ValueError(
        f"DotGeneral: dimension_numbers={dimension_numbers!r} must be "
        "((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))."
    ) from None
  if is_lhs:
    o_c, x_c, o_b, x_b = lhs_c, rhs_c, lhs_b, rhs_b
  else:
    x_c, o_c, x_b, o_b = lhs_c, rhs_c, lhs_b, rhs_b
  x_c = _normalize(x_c, n_x, "the inputs")
  x_b = _normalize(x_b, n_x, "the inputs")
  o_c = _normalize(o_c, n_other, "the constant")
  o_b = _normalize(o_b, n_other, "the constant")
  if len(x_c) != len(o_c) or len(x_b) != len(o_b):
    raise ValueError(
        f"DotGeneral: dimension_numbers={dimension_numbers!r} pair "
        "different numbers of contracting or batch axes.")
  if set(x_c) & set(x_b) or set(o_c) & set(o_b):
    raise ValueError(f"DotGeneral: dimension_numbers={dimension_numbers!r} "
                     "use an axis both to contract and as a batch axis.")
  if n_x - 1 in x_c + x_b:
    raise ValueError(
        "DotGeneral: the channel axis (-1) of the inputs cannot be "
        "contracted or a dot batch dimension: it is the axis taken to "
        "infinite width. Contract spatial or batch axes only.")

  def x_axis(a: int, other_axis: Optional[int] = None) -> DotAxis:
    if a == 0:
      return DotAxis("batch", 0, other_axis)
    if a == n_x - 1:
      return DotAxis("channel", a)
    return DotAxis("x", a, other_axis)

  batch = [x_axis(xa, oa) for xa, oa in zip(x_b, o_b)]
  x_free = [x_axis(a) for a in range(n_x) if a not in x_c + x_b]
  o_free = [DotAxis("other", None, a) for a in range(n_other)
            if a not in o_c + o_b]
  lax_axes = tuple(batch + (o_free + x_free if is_lhs else x_free + o_free))
  middle = [a for a in lax_axes if a.kind not in ("batch", "channel")]
  head = [a for a in lax_axes if a.kind == "batch"] or [DotAxis("unit")]
  out_axes = tuple(head + middle + [DotAxis("channel", n_x - 1)])
  return DotLayout(x_c, o_c, x_b, o_b, lax_axes, out_axes)


def apply_dot_general(x: jax.Array, other: jax.Array, is_lhs: bool,
                      dimension_numbers: Any,
                      precision: Any = None) -> jax.Array:
  """`lax.dot_general` of `x` with `other`, in the batch-first layout.

  Raises:
    ValueError: as for `dot_layout`.
  """
  layout = dot_layout(x.ndim, other.ndim, is_lhs, dimension_numbers)
  other = other.astype(x.dtype)
  operands = (other, x) if is_lhs else (x, other)
  y = jax.lax.dot_general(*operands, dimension_numbers, precision)
  order = [layout.lax_axes.index(a) for a in layout.out_axes
           if a.kind != "unit"]
  y = jnp.transpose(y, order)
  return y[None] if layout.contracts_batch else y


def dot_mask(mask: Optional[jax.Array], shape: tuple[int, ...],
             other: jax.Array, is_lhs: bool,
             dimension_numbers: Any) -> Optional[jax.Array]:
  """The padding mask after `dot_general` (NT's rule).

  An output entry is padding iff no real (unmasked) input entry reaches it
  with a non-zero weight of `other`.
  """
  if mask is None:
    return None
  shape = tuple(shape[:-1]) + (mask.shape[-1],)
  real = jnp.logical_not(jnp.broadcast_to(mask, shape)).astype(jnp.float32)
  weights = (jnp.asarray(other) != 0).astype(jnp.float32)
  return apply_dot_general(real, weights, is_lhs, dimension_numbers) == 0


def _check_sizes(layout: DotLayout, shape: tuple[int, ...],
                 other: jax.Array) -> None:
  for o_axis, x_axis in layout.paired().items():
    if other.shape[o_axis] != shape[x_axis]:
      raise ValueError(
          f"DotGeneral: axis {o_axis} of the constant (shape {other.shape}) "
          f"has size {other.shape[o_axis]}, but axis {x_axis} of the inputs "
          f"(shape {shape}) has size {shape[x_axis]}.")


def _out_size(axis: DotAxis, shape: tuple[int, ...],
              other: jax.Array) -> int:
  if axis.kind == "unit":
    return 1
  if axis.kind == "other":
    assert axis.other_axis is not None, axis
    return other.shape[axis.other_axis]
  assert axis.x_axis is not None, axis
  return shape[axis.x_axis]


def _out_shape(layout: DotLayout, shape: tuple[int, ...],
               other: jax.Array) -> tuple[int, ...]:
  return tuple(_out_size(a, shape, other) for a in layout.out_axes)


def _contract(cov: Optional[jax.Array], n_batch: int, layout: DotLayout,
              n_x: int, diagonal_spatial: bool, other1: jax.Array,
              other2: jax.Array) -> Optional[jax.Array]:
  """`other1 . cov . other2` over the axes `other` touches, as an einsum."""
  if cov is None:
    return None
  letters = iter(_LETTERS)
  left = {0: next(letters)}
  right = {0: next(letters) if n_batch == 2 else left[0]}
  for a in range(1, n_x - 1):
    left[a] = next(letters)
    right[a] = left[a] if diagonal_spatial else next(letters)
  cov_spec = left[0] + (right[0] if n_batch == 2 else "") + "".join(
      left[a] + (right[a] if right[a] != left[a] else "")
      for a in range(1, n_x - 1))
  paired = layout.paired()
  free_left, free_right = {}, {}
  for o in range(other1.ndim):
    if o not in paired:
      free_left[o] = next(letters)
      free_right[o] = free_left[o] if diagonal_spatial else next(letters)
  spec1 = "".join(left[paired[o]] if o in paired else free_left[o]
                  for o in range(other1.ndim))
  spec2 = "".join(right[paired[o]] if o in paired else free_right[o]
                  for o in range(other2.ndim))
  out = ""
  for axis in layout.out_axes:
    if axis.kind == "batch":
      out += left[0] + (right[0] if n_batch == 2 else "")
    elif axis.kind == "x":
      a = axis.x_axis
      assert a is not None, axis
      out += left[a] + (right[a] if right[a] != left[a] else "")
    elif axis.kind == "other":
      o = axis.other_axis
      assert o is not None, axis
      out += free_left[o] + (free_right[o] if free_right[o] != free_left[o]
                             else "")
  result = jnp.einsum(f"{spec1},{cov_spec},{spec2}->{out}", other1, cov,
                      other2, precision=_HIGHEST)
  if layout.contracts_batch:
    result = result.reshape((1,) * n_batch + result.shape)
  return result


def kernel_dot_general(kernel: Kernel, other1: jax.Array, other2: jax.Array,
                       is_lhs: bool, dimension_numbers: Any) -> Kernel:
  """The kernel of `dot_general(x, other)` (see `Kernel.dot_general`)."""
  n_x = len(kernel.shape1)
  if other1.ndim != other2.ndim:
    raise ValueError(
        f"Kernel.dot_general: other1 and other2 have {other1.ndim} and "
        f"{other2.ndim} dimensions; they must have the same.")
  layout = dot_layout(n_x, other1.ndim, is_lhs, dimension_numbers)
  _check_sizes(layout, kernel.shape1, other1)
  _check_sizes(layout, kernel.shape2, other2)
  if layout.contracts_spatial(n_x) and kernel.diagonal_spatial:
    raise ValueError(
        "Kernel.dot_general contracts spatial axes, which needs full "
        "spatial covariances, but the kernel has `diagonal_spatial=True`.")
  if layout.contracts_batch and kernel.diagonal_batch and (
      kernel.cov1 is not None):
    raise ValueError(
        "Kernel.dot_general contracts the batch axis, which needs full "
        "batch covariances in cov1/cov2, but the kernel has "
        "`diagonal_batch=True`.")
  n_cov = 1 if kernel.diagonal_batch else 2
  assert kernel.nngp is not None, "every Kernel has an NNGP"
  dtype = kernel.nngp.dtype
  other1, other2 = other1.astype(dtype), other2.astype(dtype)
  contract = lambda cov, n_batch, o1, o2: _contract(
      cov, n_batch, layout, n_x, kernel.diagonal_spatial, o1, o2)
  return kernel.replace(
      nngp=contract(kernel.nngp, 2, other1, other2),
      ntk=contract(kernel.ntk, 2, other1, other2),
      cov1=contract(kernel.cov1, n_cov, other1, other1),
      cov2=contract(kernel.cov2, n_cov, other2, other2),
      shape1=_out_shape(layout, kernel.shape1, other1),
      shape2=_out_shape(layout, kernel.shape2, other2),
      mask1=dot_mask(kernel.mask1, kernel.shape1, other1, is_lhs,
                     dimension_numbers),
      mask2=dot_mask(kernel.mask2, kernel.shape2, other2, is_lhs,
                     dimension_numbers))
