"""Masks of padded entries (Neural Tangents' `mask_constant`): the arrays.

A mask is a boolean array with the rank of the activations `(N, *spatial, C)`
that is `True` at padding. Raw inputs get elementwise masks `(N, *spatial, C)`
(the entries equal to `mask_constant`); a layer that mixes channels leaves
`(N, *spatial, 1)`: a location is padding when all its channels were. The
conventions are Neural Tangents 0.6.5's:

- every layer reads masked entries of its inputs as zeros. The finite layers
  zero them (`zero_masked`); kernels keep zero covariances there (`remask`
  runs after every rule, see `remask_output`);
- layers that average or attend over locations skip masked ones (global
  average pooling, layer norm over spatial axes, attention: masked keys get
  no weight);
- each layer maps its input mask to its output mask with one function below,
  shared by the finite layer and the kernel rule.

Every function of a mask returns `None` for a `None` mask (nothing masked).

This module maps masks to masks (one function per kind of layer); what
involves a `Kernel` is in `masking`, which also re-exports these.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, TypeVar, overload

import jax
import jax.numpy as jnp

__all__ = [
    "Mask",
    "MaybeArray",
    "collapse_channels",
    "concat_masks",
    "flatten_mask",
    "from_mask_constant",
    "global_mask",
    "index_mask",
    "location_mask",
    "masked_mean",
    "resize_mask",
    "sum_masks",
    "transpose_window_mask",
    "window_mask",
    "zero_masked",
]

Mask = Optional[jax.Array]
MaybeArray = TypeVar("MaybeArray", bound=Optional[jax.Array])


# ------------------------------------------------------------------ inputs


def from_mask_constant(x: jax.Array, mask_constant: Any) -> Mask:
  """The mask of the entries of `x` equal to `mask_constant`.

  `None` masks nothing; `nan` masks NaN entries (which compare unequal to
  everything). Works under `jit` with a traced constant.
  """
  if mask_constant is None:
    return None
  x = jnp.asarray(x)
  constant = jnp.asarray(mask_constant)
  if not jnp.issubdtype(constant.dtype, jnp.number):
    raise TypeError(f"mask_constant must be a number, got {mask_constant!r}.")
  if constant.ndim != 0:
    raise ValueError("mask_constant must be a scalar, got an array of shape "
                     f"{constant.shape}.")
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.where(jnp.isnan(constant), jnp.isnan(x), x == constant)
  return x == constant


def zero_masked(x: MaybeArray, mask: Mask) -> MaybeArray:
  """`x` with masked entries replaced by zeros (`None` stays `None`)."""
  if mask is None or x is None:
    return x
  return jnp.where(mask, jnp.zeros((), x.dtype), x)


# ------------------------------------------------------- mask propagation


@overload
def collapse_channels(mask: None) -> None:
  ...


@overload
def collapse_channels(mask: jax.Array) -> jax.Array:
  ...


def collapse_channels(mask: Mask) -> Mask:
  """A location is padding iff all its channels are (after Dense, Conv)."""
  if mask is None:
    return None
  return jnp.all(mask, axis=-1, keepdims=True)


def location_mask(mask: Mask, layer: str) -> Mask:
  """`(N, *spatial)`: the mask of a layer that treats locations as units.

  Raises:
    NotImplementedError: for a mask that differs between channels (raw
      inputs fed straight into such a layer), as in Neural Tangents.
  """
  if mask is None:
    return None
  if mask.shape[-1] != 1:
    raise NotImplementedError(
        f"{layer} got a mask that differs between channels (shape "
        f"{mask.shape}), which is the mask of raw inputs; the infinite-width "
        "kernel supports masks of whole locations only. Put a Dense or Conv "
        "layer in front of it: it masks a location when all its channels "
        "are masked.")
  return mask[..., 0]


def window_mask(mask: Mask, window: Sequence[int], strides: Sequence[int],
                pads: Sequence[tuple[int, int]], circular: bool) -> Mask:
  """Output mask of a sliding window (convolution, pooling): its centre's.

  Output location `t` is padding iff the input location at the centre of
  its window, `s t - pad_low + (k - 1) // 2`, is (Neural Tangents' rule; a
  centre in the zero padding counts as unmasked). Channels are kept: apply
  `collapse_channels` first for a convolution.
  """
  if mask is None:
    return None
  widths = [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)]
  mask = jnp.pad(mask, widths, mode="wrap" if circular else "constant")
  index = [slice(None)]
  for axis, (k, s) in enumerate(zip(window, strides), start=1):
    out = (mask.shape[axis] - k) // s + 1  # the padded window count
    start = (k - 1) // 2
    index.append(slice(start, start + s * (out - 1) + 1, s))
  return mask[tuple(index) + (slice(None),)]


def transpose_window_mask(mask: Mask, window: Sequence[int],
                          strides: Sequence[int], padding: str) -> Mask:
  """Output mask of a transposed convolution (`'CIRCULAR'` as `'SAME'`).

  As Neural Tangents: an output location is padding iff some input
  location that reaches it through the filter is.
  """
  if mask is None:
    return None
  mask = collapse_channels(mask)
  n = len(window)
  spatial = "DHW"[-n:]
  ones = jnp.ones(tuple(window) + (1, 1), jnp.float32)
  hits = jax.lax.conv_transpose(
      mask.astype(jnp.float32), ones, tuple(strides),
      "SAME" if padding == "CIRCULAR" else padding,
      dimension_numbers=("N" + spatial + "C", spatial + "IO",
                         "N" + spatial + "C"))
  return hits > 0


def global_mask(mask: Mask, layer: str) -> Mask:
  """`(N, 1)` after global pooling: padding iff every location is."""
  loc = location_mask(mask, layer)
  if loc is None:
    return None
  return jnp.all(loc.reshape(loc.shape[0], -1), axis=1, keepdims=True)


def flatten_mask(mask: Mask, shape: Sequence[int]) -> Mask:
  """`(N, prod(shape[1:]))`: the mask follows its entries."""
  if mask is None:
    return None
  return jnp.broadcast_to(mask, tuple(shape)).reshape(shape[0], -1)


def sum_masks(masks: Sequence[Mask]) -> Mask:
  """Mask of a sum or product of branches: padding in every branch.

  `None` (a branch without a mask) is skipped, as in Neural Tangents.
  """
  present: list[jax.Array] = [m for m in masks if m is not None]
  if not present:
    return None
  return functools.reduce(jnp.logical_and, present)


def concat_masks(masks: Sequence[Mask], shapes: Sequence[Sequence[int]],
                 axis: int) -> Mask:
  """Mask of branches concatenated along `axis`; `None` is all unmasked.

  Along the channel axis, masks of whole locations stay whole-location
  masks: a location is padding iff it is in every branch (the channel
  average in the kernel already counts each branch's zeros). Otherwise each
  mask is broadcast to its branch's shape and concatenated.
  """
  if all(m is None for m in masks):
    return None
  ndim = len(shapes[0])
  axis %= ndim
  if axis == ndim - 1 and all(m is None or m.shape[-1] == 1 for m in masks):
    present: list[jax.Array] = [m for m in masks if m is not None]
    if len(present) < len(masks):
      return jnp.zeros(tuple(shapes[0][:-1]) + (1,), bool)
    return functools.reduce(jnp.logical_and, present)
  full = []
  for m, shape in zip(masks, shapes):
    target = tuple(shape)
    if axis != ndim - 1:
      target = target[:-1] + (1 if m is None else m.shape[-1],)
    full.append(jnp.zeros(target, bool) if m is None else
                jnp.broadcast_to(m, target))
  if axis != ndim - 1:
    width = max(m.shape[-1] for m in full)
    full = [jnp.broadcast_to(m, m.shape[:-1] + (width,)) for m in full]
  return jnp.concatenate(full, axis=axis)


def index_mask(mask: Mask, index: Any) -> Mask:
  """Mask after `x[index]` (an index that keeps the channel axis whole)."""
  if mask is None:
    return None
  return mask[index]


def resize_mask(mask: Mask, shape: Sequence[int], method: Any,
                antialias: bool) -> Mask:
  """Mask after `jax.image.resize`: padding iff made of padding only.

  As Neural Tangents, the unmasked indicator is resized and an output with
  any contribution from real entries is real.
  """
  if mask is None:
    return None
  shape = tuple(shape[:-1]) + (mask.shape[-1],)
  real = jax.image.resize(jnp.logical_not(mask).astype(jnp.float32), shape,
                          method=method, antialias=antialias)
  return real == 0


def masked_mean(x: jax.Array, mask: Mask, axes: Sequence[int],
                keepdims: bool = False) -> jax.Array:
  """Mean of `x` over `axes`, skipping masked entries (0 if all are)."""
  axes = tuple(axes)
  if mask is None:
    return jnp.mean(x, axis=axes, keepdims=keepdims)
  mask = jnp.broadcast_to(mask, x.shape)
  total = jnp.sum(jnp.where(mask, jnp.zeros((), x.dtype), x), axis=axes,
                  keepdims=keepdims)
  count = jnp.sum(~mask, axis=axes, keepdims=keepdims)
  return total / jnp.maximum(count, 1).astype(x.dtype)
