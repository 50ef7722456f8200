"""Inputs of an analytic kernel function: one array, or a pytree of arrays.

A model whose `__call__` takes a tuple, list or dict of arrays (NT's NTTree
inputs, e.g. a model of an image and a label vector) gets one input kernel
per array, in the same structure; its `__call__` then combines them as it
combines arrays. Arrays are never stacked.

What is checked, and when:

- Always (shapes are static, so also under `jit`): the structure of `x2`
  matches that of `x1`; each leaf is an array of at least two dimensions;
  paired leaves differ only in batch size.
- Only when values are known (an eager call; not under `jit`, `grad` or
  `vmap`, where inputs are tracers): inputs are finite, and the kernel
  returned is finite. Finite inputs whose squares overflow the dtype
  (float32 values of 1e20) raise an error naming the fix. The input
  kernel itself is computed with a power-of-two rescaling, so it is
  correct whenever its own values are representable; under `jit` an
  overflow shows up as `inf`/`nan` in the output instead of an error.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.masked_array import MaskedArray

__all__ = [
    "check_finite_inputs",
    "check_finite_output",
    "input_leaves",
    "masked_inputs",
    "with_masks",
    "is_tree",
]

_TREE_TYPES = (tuple, list, dict)
# What to do when a kernel's entries do not fit the inputs' dtype.
_PRECISION_FIXES = (
    "Rescale the inputs (e.g. standardize them), or compute in float64 "
    "(`jax.config.update('jax_enable_x64', True)` and float64 inputs).")


def is_tree(x: Any) -> bool:
  """Whether `x` is a container of inputs rather than one array."""
  return isinstance(x, _TREE_TYPES)


def _as_array(x: Any, where: str) -> jax.Array:
  if isinstance(x, Kernel):
    raise TypeError(f"{where} is a Kernel inside a container of inputs; pass "
                    "either arrays or one Kernel.")
  if not hasattr(x, "shape") and not isinstance(x, (int, float, np.number)):
    raise TypeError(f"{where} must be an array, got {type(x).__name__}.")
  return jnp.asarray(x)


def input_leaves(x1: Any, x2: Any) -> tuple[Any, Any]:
  """`x1` and `x2` with array leaves, after checking their structures match.

  Args:
    x1: an array, or a tuple/list/dict (nested) of arrays.
    x2: `None`, or the same structure as `x1`.

  Returns:
    `(x1, x2)` with leaves converted by `jnp.asarray`; `x2` is `None`, or a
    pytree of the same structure.

  Raises:
    TypeError: if a leaf is not an array.
    ValueError: if the structures of `x1` and `x2` differ.
  """
  leaves1, tree1 = jax.tree.flatten(x1)
  leaves1 = [_as_array(x, f"x1 leaf {i}") for i, x in enumerate(leaves1)]
  if not leaves1:
    raise ValueError("x1 holds no arrays.")
  x1 = jax.tree.unflatten(tree1, leaves1)
  if x2 is None:
    return x1, None
  leaves2, tree2 = jax.tree.flatten(x2)
  if tree1 != tree2:
    raise ValueError(
        f"x1 and x2 must have the same structure (one array per model "
        f"input); got {tree1} and {tree2}.")
  leaves2 = [_as_array(x, f"x2 leaf {i}") for i, x in enumerate(leaves2)]
  return x1, jax.tree.unflatten(tree2, leaves2)


def _concrete(x: jax.Array) -> Optional[np.ndarray]:
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None  # Under a transformation: values are unknown here.


def check_finite_inputs(x1: Any, x2: Any) -> None:
  """Refuses NaN or infinite inputs when their values are known, and
  inputs so small that their squares underflow the dtype.

  Raises:
    ValueError: naming the input that is not finite.
    FloatingPointError: naming the example whose covariances underflow.
  """
  for name, tree in (("x1", x1), ("x2", x2)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      values = _concrete(leaf)
      where = name + jax.tree_util.keystr(path)
      if values is not None and not np.all(np.isfinite(values)):
        raise ValueError(
            f"{where} contains NaN or infinite values; kernels of such "
            "inputs are meaningless. Clean or impute the inputs first.")
      if values is not None:
        _check_squares_representable(values, where)


def _check_squares_representable(values: np.ndarray, where: str) -> None:
  """Refuses an example whose covariances underflow to zero (or subnormals).

  A kernel holds products of inputs: an example whose largest magnitude
  `a` is nonzero but has `a**2` below the dtype's smallest normal number
  would get covariances of zero (or a few bits) in place of its true ones.

  Raises:
    FloatingPointError: naming the example, the dtype and the fixes.
  """
  dtype = np.dtype(values.dtype)
  if not np.issubdtype(dtype, np.floating) or not values.size:
    return
  magnitudes = np.abs(values.astype(np.float64)).reshape(
      values.shape[:1] + (-1,) if values.ndim else (1, 1)).max(axis=1)
  tiny = float(np.finfo(dtype).tiny)
  small = np.flatnonzero((magnitudes > 0) & (magnitudes**2 < tiny))
  if small.size:
    i = int(small[0])
    raise FloatingPointError(
        f"{where}: example {i} has entries of magnitude at most "
        f"{magnitudes[i]:.3g}, whose squares underflow {dtype.name} (smallest "
        f"normal {tiny:.3g}): the covariances the kernel holds would be zero "
        "or a few bits. " + _PRECISION_FIXES)


def _largest_magnitude(tree: Any) -> float:
  largest = 0.0
  for leaf in jax.tree.leaves(tree):
    values = _concrete(leaf)
    if values is not None and values.size:
      largest = max(largest, float(np.max(np.abs(values))))
  return largest


def check_finite_output(output: Any, x1: Any, x2: Any) -> None:
  """Refuses to return a kernel with NaN or infinite values (eager only).

  The inputs were checked finite, so a non-finite kernel means an overflow
  (or an invalid operation after one) in the input's dtype.

  Raises:
    FloatingPointError: naming the field, the dtype and the fixes.
  """
  def arrays(x):
    if isinstance(x, Kernel):
      return [(f, getattr(x, f)) for f in ("nngp", "ntk", "cov1", "cov2")
              if getattr(x, f) is not None]
    return [("", x)] if hasattr(x, "dtype") else []

  for leaf in jax.tree.leaves(output, is_leaf=lambda x: isinstance(x, Kernel)):
    for field, array in arrays(leaf):
      if not jnp.issubdtype(jnp.result_type(array), jnp.inexact):
        continue
      values = _concrete(array)
      if values is None or np.all(np.isfinite(values)):
        continue
      dtype = np.dtype(values.dtype)
      largest = max(_largest_magnitude(x1), _largest_magnitude(x2))
      raise FloatingPointError(
          f"The kernel{' field ' + repr(field) if field else ''} has NaN or "
          f"infinite entries although the inputs are finite: a covariance "
          f"overflowed {dtype.name} (largest representable "
          f"{np.finfo(dtype).max:.3g}; largest input magnitude "
          f"{largest:.3g}, whose square is what the kernel holds). " +
          _PRECISION_FIXES)


def masked_inputs(x: Any, mask_constant: Any
                  ) -> tuple[Any, list[Optional[jax.Array]]]:
  """Inputs with padding zeroed, and the masks of their array leaves.

  Padding is given by `mask_constant` (entries equal to it) or by
  `ft.MaskedArray` leaves; masks come in the order of `jax.tree.leaves`.
  """
  if x is None:
    return None, []
  leaves, tree = jax.tree.flatten(
      x, is_leaf=lambda a: isinstance(a, MaskedArray))
  values, masks = [], []
  for leaf in leaves:
    value: Any  # An array, or a Kernel passed through.
    if isinstance(leaf, MaskedArray):
      if mask_constant is not None:
        raise ValueError("Pass either MaskedArray inputs or mask_constant, "
                         "not both.")
      value = jnp.asarray(leaf.masked_value)
      mask = None if leaf.mask is None else jnp.broadcast_to(
          jnp.asarray(leaf.mask, bool), value.shape)
    elif mask_constant is None or isinstance(leaf, Kernel):
      value, mask = leaf, None
    else:
      value = jnp.asarray(leaf)
      mask = mask_arrays.from_mask_constant(value, mask_constant)
    values.append(mask_arrays.zero_masked(value, mask))
    masks.append(mask)
  return jax.tree.unflatten(tree, values), masks


def with_masks(kernels: Any, masks1: list[Optional[jax.Array]],
               masks2: list[Optional[jax.Array]]) -> Any:
  """Input kernels with their masks (in the order of the inputs' leaves)."""
  if not any(m is not None for m in masks1 + masks2):
    return kernels
  leaves, tree = jax.tree.flatten(
      kernels, is_leaf=lambda k: isinstance(k, Kernel))
  masks2 = masks2 or [None] * len(leaves)
  leaves = [k.replace(mask1=m1, mask2=m2)
            for k, m1, m2 in zip(leaves, masks1, masks2)]
  return jax.tree.unflatten(tree, leaves)
