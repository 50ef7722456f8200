"""Masks of padded entries (Neural Tangents' `mask_constant`): kernels.

The conventions of masks, and the functions of masks alone, are written once
in `mask_arrays` (re-exported here); this module holds those of kernels:
the covariance masks of a layout, masking a kernel, and re-applying masks
after every rule.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import mixtures
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.mask_arrays import Mask
from flax_tangents._src.analytic.mask_arrays import location_mask
from flax_tangents._src.analytic.mask_arrays import zero_masked

__all__ = [
    "kernel_masks",
    "map_masks",
    "mask_kernel",
    "pair_masks",
    "remask",
    "remask_shifted",
    "remask_output",
]


# --------------------------------------------------------- kernel masks


def kernel_masks(kernel: Kernel) -> tuple[Mask, Mask]:
  """`(mask1, mask2)` of a kernel; `mask2` is `mask1` when `x1` is `x2`."""
  mask2 = kernel.mask1 if kernel.cov2 is None else kernel.mask2
  return kernel.mask1, mask2


def _outer(loc_a: jax.Array, loc_b: jax.Array, *, batch_pair: bool,
           diagonal_spatial: bool) -> jax.Array:
  """`loc_a | loc_b` laid out as a covariance (see `covariance`)."""
  n_spatial = loc_a.ndim - 1
  shape_a = [loc_a.shape[0]] + ([1] if batch_pair else [])
  shape_b = [1, loc_b.shape[0]] if batch_pair else [loc_b.shape[0]]
  for i in range(n_spatial):
    size = loc_a.shape[1 + i]
    if diagonal_spatial:
      shape_a.append(size)
      shape_b.append(size)
    else:
      shape_a += [size, 1]
      shape_b += [1, size]
  return loc_a.reshape(shape_a) | loc_b.reshape(shape_b)


def pair_masks(kernel: Kernel, mask1: Mask, mask2: Mask, layer: str
               ) -> tuple[Mask, Mask, Mask]:
  """Masks of `cov1`, `nngp`/`ntk` and `cov2`: where either entry is masked.

  Args:
    kernel: gives the layout (`diagonal_batch`, `diagonal_spatial`).
    mask1, mask2: masks of whole locations `(N, *spatial, 1)`; `None` is
      all unmasked, `mask2=None` with `x1_is_x2` means `mask1`.
    layer: name for error messages.

  Returns:
    `(mask11, mask12, mask22)`, each broadcastable to its covariance, or
    all `None` when both masks are.
  """
  if kernel.cov2 is None:
    mask2 = mask1
  if mask1 is None and mask2 is None:
    return None, None, None

  def locations(mask: Mask, shape: tuple[int, ...]) -> jax.Array:
    loc = location_mask(mask, layer)
    return jnp.zeros(shape[:-1], bool) if loc is None else loc

  loc1, loc2 = locations(mask1, kernel.shape1), locations(mask2,
                                                          kernel.shape2)
  ds = kernel.diagonal_spatial
  full_batch = not kernel.diagonal_batch
  mask11 = _outer(loc1, loc1, batch_pair=full_batch, diagonal_spatial=ds)
  mask22 = _outer(loc2, loc2, batch_pair=full_batch, diagonal_spatial=ds)
  mask12 = _outer(loc1, loc2, batch_pair=True, diagonal_spatial=ds)
  return mask11, mask12, mask22


def mask_kernel(kernel: Kernel, mask1: Mask, mask2: Mask,
                layer: str = "Kernel.mask") -> Kernel:
  """Zeroes covariances of masked entries and stores the masks.

  Raises:
    NotImplementedError: for masks that differ between channels.
  """
  mask11, mask12, mask22 = pair_masks(kernel, mask1, mask2, layer)
  out = kernel.replace(mask1=mask1,
                       mask2=None if kernel.cov2 is None else mask2)
  if mask12 is None:
    return out
  return out.replace(nngp=zero_masked(kernel.nngp, mask12),
                     ntk=zero_masked(kernel.ntk, mask12),
                     cov1=zero_masked(kernel.cov1, mask11),
                     cov2=zero_masked(kernel.cov2, mask22))


def map_masks(kernel_out: Kernel, kernel_in: Kernel,
              fn: Callable[[jax.Array, tuple[int, ...]], Mask]) -> Kernel:
  """`kernel_out` with the masks `fn(mask, input_shape)` of `kernel_in`'s."""
  mask1, mask2 = kernel_in.mask1, kernel_in.mask2
  return kernel_out.replace(
      mask1=None if mask1 is None else fn(mask1, kernel_in.shape1),
      mask2=None if mask2 is None else fn(mask2, kernel_in.shape2))


def _check_mask_shape(mask: Mask, shape: tuple[int, ...], layer: str) -> None:
  if mask is None:
    return
  fits = (mask.ndim == len(shape) and
          tuple(mask.shape[:-1]) == tuple(shape[:-1]) and
          mask.shape[-1] in (1, shape[-1]))
  if not fits:
    raise NotImplementedError(
        f"{layer} changed the activations' shape to {tuple(shape)} but its "
        f"kernel rule left a padding mask of shape {tuple(mask.shape)}: the "
        "rule does not propagate masks (`mask_constant`, `Kernel.mask1`). "
        "Compute this kernel without masking, or give the rule a mask "
        "(`kernel.replace(mask1=..., mask2=...)`, see "
        "`flax_tangents._src.analytic.masking`).")


def remask(kernel: Kernel, layer: str) -> Kernel:
  """Restores zero covariances at masked locations after a rule.

  Checks that the masks fit the kernel's activations; masks that differ
  between channels (raw inputs, `Flatten`) are left alone, since the kernel
  already averages each channel's zeros. `ft.kernel_fn` runs it after every
  rule (see `remask_output`), so no rule needs to remask by itself.

  Raises:
    NotImplementedError: for masks whose shape does not fit (a rule that
      changed the shape without mapping the masks).
  """
  if kernel.mask1 is None and kernel.mask2 is None:
    return kernel
  _check_mask_shape(kernel.mask1, kernel.shape1, layer)
  _check_mask_shape(kernel.mask2, kernel.shape2, layer)
  mask1, mask2 = kernel.mask1, kernel.mask2
  if any(m is not None and m.shape[-1] != 1 for m in (mask1, mask2)):
    return kernel
  out = mask_kernel(kernel, mask1, mask2, layer)
  parts = mixtures.parts_of(kernel)
  if parts is None:
    return out
  # A mixture's parts are the kernels of its branches, remasked by their own
  # rules: keep them (`replace` drops them).
  assembly = kernel._assembly  # pylint: disable=protected-access
  assert assembly is not None, "a mixture has an assembly"
  return mixtures.with_parts(out, parts, assembly)


def remask_shifted(kernel: Kernel, layer: str) -> Kernel:
  """Zero covariances at padding again after a constant shift (`k + c`).

  `x + c` moves padded entries to `c`, but every later layer reads them as
  zeros, so their covariances must stay zero. Masks that differ between
  channels (after `Flatten`) cannot be honoured: the kernel averages over
  channels, and the shift's share, `c**2` times the fraction of entries real
  in both inputs, is not representable there.

  Raises:
    NotImplementedError: for masks that differ between channels.
  """
  masks = (kernel.mask1, kernel.mask2)
  if all(m is None for m in masks):
    return kernel
  if any(m is not None and m.shape[-1] != 1 for m in masks):
    raise NotImplementedError(
        f"{layer}: the kernel carries a padding mask that differs between "
        "channels (after `Flatten` or on raw inputs), where a constant shift "
        "would also move the padded entries. Shift before `Flatten`, after "
        "an affine layer, or compute the kernel without masking.")
  return remask(kernel, layer)


def remask_output(output: Any, layer: str) -> Any:
  """`remask` of every kernel a rule returned (run after each rule)."""
  return jax.tree.map(
      lambda k: remask(k, layer) if isinstance(k, Kernel) else k, output,
      is_leaf=lambda k: isinstance(k, Kernel))
