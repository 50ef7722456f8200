"""`Kernel` methods: batch slicing, masking, indexing and NT's arithmetic.

This module installs them, with `masking.mask_kernel` and
`dot_general.kernel_dot_general`, as the `Operations` of
`flax_tangents/_src/analytic/kernel_operations.py` when it is imported.

Every method gives the kernel of a transformed activation `y = f(x)`:

- `k.slice(s1, s2)`: `x1[s1]`, `x2[s2]`;
- `k[idx]`: `x[idx]` (batch slices apply to both batches, as in NT);
- `k * c`, `c * k`, `k / c`: a constant factor, covariances times `c**2`;
  `-k` is `k`;
- `k + c`, `k - c`: a constant shift, adding `c**2`; exact only for centred
  activations, so refused after a nonlinearity (NT adds `c**2` always);
- `k1 + k2`, `k1 - k2`: the sum (or difference) of independent branches,
  i.e. `FanInSum`; `k1 * k2`: their product, i.e. `FanInProd`. `k + k` and
  `k - k` on one object are refused, with NT's reading (`k * 2 ** 0.5`) in
  the message.

All act on every unit alike, so they apply exactly to each part of a
mixture (see `mixtures` and `mixture_units`).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import combinators
from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import dot_general
from flax_tangents._src.analytic import kernel_operations
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic import mixture_units
from flax_tangents._src.analytic import resize
from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["add", "divide", "getitem", "multiply", "slice_batches",
           "transpose"]

_COV_FIELDS = ("nngp", "ntk", "cov1", "cov2")


def _check_slice(s: Any, name: str) -> None:
  if not isinstance(s, slice):
    raise TypeError(f"Kernel.slice: `{name}` must be a `slice`, got "
                    f"{type(s).__name__}; use `slice(start, stop)`.")


def _slice_one(kernel: Kernel, n1_slice: slice, n2_slice: slice) -> Kernel:
  same = kernel.cov2 is None and n1_slice == n2_slice
  full_batch = not kernel.diagonal_batch

  def own(cov, s):
    return cov[s, s] if full_batch else cov[s]

  cov2_source = kernel.cov1 if kernel.cov2 is None else kernel.cov2
  cov1 = own(kernel.cov1, n1_slice)
  cov2 = None if same else own(cov2_source, n2_slice)
  n1 = len(range(*n1_slice.indices(kernel.shape1[0])))
  n2 = len(range(*n2_slice.indices(kernel.shape2[0])))
  mask2_source = kernel.mask1 if kernel.mask2 is None else kernel.mask2
  assert kernel.nngp is not None, "every Kernel has an NNGP"
  return kernel.replace(
      nngp=kernel.nngp[n1_slice, n2_slice],
      ntk=None if kernel.ntk is None else kernel.ntk[n1_slice, n2_slice],
      cov1=cov1, cov2=cov2, x1_is_x2=kernel.x1_is_x2 if same else False,
      shape1=(n1,) + tuple(kernel.shape1[1:]),
      shape2=(n2,) + tuple(kernel.shape2[1:]),
      mask1=None if kernel.mask1 is None else kernel.mask1[n1_slice],
      mask2=(None if same or mask2_source is None
             else mask2_source[n2_slice]))


def slice_batches(kernel: Kernel, n1_slice: slice, n2_slice: slice
                  ) -> Kernel:
  """The kernel of `x1[n1_slice]` and `x2[n2_slice]`."""
  _check_slice(n1_slice, "n1_slice")
  _check_slice(n2_slice, "n2_slice")
  return mixture_units.map_units(
      kernel, lambda k: _slice_one(k, n1_slice, n2_slice))


def _getitem_one(kernel: Kernel, idx: Any) -> Kernel:
  layer = "Kernel[...]"
  full = resize.normalize_index(idx, kernel.shape1, layer)
  batch, channel = full[0], full[-1]
  if channel != slice(None):
    raise ValueError(
        f"{layer}: idx={idx!r} indexes the channel axis, which is infinite "
        "in the kernel; index only the batch and spatial axes.")
  if not isinstance(batch, slice):
    raise ValueError(
        f"{layer}: an integer on the batch axis would remove it, but a "
        "Kernel always keeps one; use a slice such as `i:i + 1`.")
  if batch != slice(None):
    kernel = _slice_one(kernel, batch, batch)
  rest = (slice(None),) + tuple(full[1:])
  out = resize.index_kernel(kernel, rest, layer)
  return masking.map_masks(
      out, kernel, lambda mask, shape: mask_arrays.index_mask(mask, rest))


def getitem(kernel: Kernel, idx: Any) -> Kernel:
  """The kernel of `x[idx]` (see `Kernel.__getitem__`)."""
  return mixture_units.map_units(kernel, lambda k: _getitem_one(k, idx))


def transpose(kernel: Kernel, axes: Optional[Sequence[int]]) -> Kernel:
  """The kernel with spatial axes permuted (see `Kernel.transpose`)."""
  n = kernel.spatial_ndim
  axes = tuple(range(n))[::-1] if axes is None else tuple(
      a % n for a in axes)
  if sorted(axes) != list(range(n)):
    raise ValueError(f"`axes`={axes} is not a permutation of {n} spatial "
                     "axes.")

  def permute(x, n_batch):
    if kernel.diagonal_spatial:
      perm = list(range(n_batch)) + [n_batch + a for a in axes]
    else:
      perm = list(range(n_batch))
      for a in axes:
        perm += [n_batch + 2 * a, n_batch + 2 * a + 1]
    return jnp.transpose(x, perm)

  def permute_shape(shape):
    return (shape[0],) + tuple(shape[1 + a] for a in axes) + (shape[-1],)

  def permute_mask(mask):
    if mask is None:
      return None
    return jnp.transpose(mask, (0,) + tuple(1 + a for a in axes) +
                         (mask.ndim - 1,))

  return covariance.map_covariances(kernel, permute).replace(
      shape1=permute_shape(kernel.shape1), shape2=permute_shape(kernel.shape2),
      mask1=permute_mask(kernel.mask1), mask2=permute_mask(kernel.mask2))


def _is_scalar(x: Any) -> bool:
  if isinstance(x, numbers.Number) and not isinstance(x, bool):
    return True
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) and (
      np.ndim(x) == 0)


def _is_zero(x: Any) -> bool:
  return isinstance(x, numbers.Number) and x == 0


def _scaled(kernel: Kernel, factor: Any) -> Kernel:
  def scale(k: Kernel) -> Kernel:
    return k.replace(**{f: None if getattr(k, f) is None else
                        getattr(k, f) * factor for f in _COV_FIELDS})
  return mixture_units.map_units(kernel, scale)


def multiply(kernel: Kernel, other: Any) -> Kernel:
  """`kernel * other`: a constant factor, or the product of two branches."""
  if isinstance(other, Kernel):
    return combinators.fan_in_prod([kernel, other])
  if not _is_scalar(other):
    raise TypeError(
        f"A Kernel can be multiplied by a scalar (covariances scale by its "
        f"square) or by another Kernel (FanInProd), not by "
        f"{type(other).__name__} of shape {np.shape(other)}. For a random "
        "linear map use `ftn.Dense`.")
  return _scaled(kernel, jnp.square(other))


def divide(kernel: Kernel, other: Any) -> Kernel:
  """`kernel / other` for a scalar `other`."""
  if not _is_scalar(other):
    raise TypeError(f"A Kernel can be divided by a scalar only, not by "
                    f"{type(other).__name__}.")
  return _scaled(kernel, 1 / jnp.square(other))


def _shifted(kernel: Kernel, square: Any) -> Kernel:
  if not kernel.is_gaussian:
    where = "raw inputs" if kernel.is_input else "a non-centred activation"
    raise ValueError(
        f"`Kernel + c` (or `- c`) on {where}: shifting by a constant adds "
        "`c**2` plus `2 c` times the mean, and the mean is known (zero) "
        "only right after an affine layer. Add the constant there (e.g. "
        "as the bias of the `Dense`/`Conv`: `b_std`), or after an affine "
        "layer.")
  return masking.remask_shifted(kernel.replace(
      nngp=kernel.nngp + square, cov1=kernel.cov1 + square,
      cov2=None if kernel.cov2 is None else kernel.cov2 + square,
      is_gaussian=False, is_input=False), "Kernel + c")


_SAME_KERNEL_ADVICE = (
    " `k + k` and `k - k` on one Kernel object are ambiguous: as one "
    "activation `y`, `y + y = 2 y` has the kernel `k * 2` and `y - y` is "
    "zero; for two independent branches that each have this kernel (Neural "
    "Tangents' reading), the sum or difference has covariances times 2: "
    "write `k * 2 ** 0.5`, or compute each branch's kernel with its own "
    "kernel function call and add those.")


def add(kernel: Kernel, other: Any) -> Kernel:
  """`kernel + other` (or `-`): a sum of branches, or a constant shift."""
  if isinstance(other, Kernel):
    if other is not kernel:
      return combinators.fan_in_sum([kernel, other])
    try:  # Always refused: a branch is correlated with itself.
      return combinators.fan_in_sum([kernel, other])
    except ValueError as error:
      advice = "" if kernel.is_input else _SAME_KERNEL_ADVICE
      raise ValueError(f"{error}{advice}") from None
  if _is_zero(other):
    return kernel  # lets `sum(kernels)` start from 0.
  if not _is_scalar(other):
    raise TypeError(
        f"A Kernel can be added to another Kernel (FanInSum) or to a "
        f"scalar constant, not to {type(other).__name__} of shape "
        f"{np.shape(other)}.")
  square = jnp.square(other)
  return mixture_units.map_units(kernel, lambda k: _shifted(k, square))


kernel_operations.install(kernel_operations.Operations(
    slice_batches=slice_batches, getitem=getitem, multiply=multiply,
    divide=divide, add=add, transpose=transpose, mask=masking.mask_kernel,
    dot_general=dot_general.kernel_dot_general))
