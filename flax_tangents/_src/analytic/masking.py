"""Masks of padded entries (Neural Tangents' `mask_constant`), written once.

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
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, TypeVar, overload

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import mixtures
from flax_tangents.kernel import Kernel

__all__ = [
    "collapse_channels",
    "concat_masks",
    "flatten_mask",
    "from_mask_constant",
    "global_mask",
    "index_mask",
    "kernel_masks",
    "location_mask",
    "map_masks",
    "mask_kernel",
    "masked_mean",
    "pair_masks",
    "remask",
    "remask_shifted",
    "resize_mask",
    "sum_masks",
    "remask_output",
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
  return mixtures.with_parts(out, parts, kernel._assembly)  # pylint: disable=protected-access


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
