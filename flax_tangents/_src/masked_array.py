"""`MaskedArray`: activations with padding, for the finite layers.

The finite counterpart of `ft.kernel_fn(...)(x1, x2, mask_constant=c)`:
`model.apply(variables, ft.MaskedArray.from_mask_constant(x, c))` runs every
`flax_tangents.nn` layer with Neural Tangents' masking semantics (see
`_src/analytic/masking.py`) and returns a `MaskedArray`.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import mask_arrays

__all__ = ["MaskedArray", "MaybeMasked", "split", "supports_masking",
           "unmask_fn"]


@dataclasses.dataclass(frozen=True)
class MaskedArray:
  """An array and the mask of its padding entries (NT's `MaskedArray`).

  Layers of `flax_tangents.nn` accept a `MaskedArray` wherever they accept
  an array: they read masked entries as zeros, skip masked locations where
  Neural Tangents does (global average pooling, attention keys, layer norm)
  and return a `MaskedArray` with the mask of their outputs. The infinite
  width limit of this finite network is `ft.kernel_fn(model)(x1, x2,
  mask_constant=c)`. It is a pytree (both fields are leaves).

  Attributes:
    masked_value: the activations `(N, *spatial, C)`; entries under the mask
      are meaningless (layers zero them before use).
    mask: boolean, broadcastable to `masked_value`, `True` at padding; or
      `None` (nothing masked).

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> x = jnp.array([[[1.], [2.], [-9.]]])           # length 2, padded to 3
  >>> xm = ft.MaskedArray.from_mask_constant(x, -9.)
  >>> ftn.GlobalAvgPool().apply({}, xm).masked_value   # mean of 1 and 2
  Array([[1.5]], dtype=float...)
  >>> ft.kernel_fn(ftn.GlobalAvgPool())(x, get='nngp', mask_constant=-9.)
  Array([[2.25]], dtype=float...)
  """

  masked_value: jax.Array
  mask: Optional[jax.Array]

  @classmethod
  def from_mask_constant(cls, x: jax.typing.ArrayLike,
                         mask_constant: Any) -> "MaskedArray":
    """Masks the entries of `x` equal to `mask_constant` (NaN: NaNs).

    Args:
      x: the inputs.
      mask_constant: the padding value; `None` masks nothing.

    Returns:
      `MaskedArray(x with masked entries zeroed, mask)`.
    """
    x = jnp.asarray(x)
    mask = mask_arrays.from_mask_constant(x, mask_constant)
    return cls(mask_arrays.zero_masked(x, mask), mask)

  def unmask(self) -> jax.Array:
    """The values with masked entries zeroed."""
    return mask_arrays.zero_masked(self.masked_value, self.mask)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.masked_value.shape)

  @property
  def ndim(self) -> int:
    return self.masked_value.ndim

  @property
  def dtype(self) -> Any:
    return self.masked_value.dtype

  def __add__(self, other: Any) -> "MaskedArray":
    # A residual sum `x + y`, as NT's FanInSum: each branch is zeroed under
    # its own mask and a location stays padding if it is in every branch.
    # `x + c` keeps the mask: padding is read as zeros by every later layer
    # (as the kernel's `Kernel + c`, which keeps zero covariances there).
    if not _is_operand(other):
      return NotImplemented
    a, mask_a, _ = split(self)
    b, mask_b, _ = split(other)
    return MaskedArray(a + b, mask_arrays.sum_masks([mask_a, mask_b]))

  __radd__ = __add__

  def __sub__(self, other: Any) -> "MaskedArray":
    if not _is_operand(other):
      return NotImplemented
    return self + (-other)

  def __rsub__(self, other: Any) -> "MaskedArray":
    return (-self) + other

  def __neg__(self) -> "MaskedArray":
    return MaskedArray(-self.masked_value, self.mask)

  def __mul__(self, other: Any) -> "MaskedArray":
    # `x * c`, or NT's FanInProd `x * y` (padding where every factor is).
    if not _is_operand(other):
      return NotImplemented
    a, mask_a, _ = split(self)
    b, mask_b, _ = split(other)
    return MaskedArray(a * b, mask_arrays.sum_masks([mask_a, mask_b]))

  __rmul__ = __mul__

  def __truediv__(self, other: Any) -> "MaskedArray":
    if not _is_scalar(other):
      return NotImplemented
    return MaskedArray(self.masked_value / other, self.mask)

  def __jax_array__(self):
    raise TypeError(
        "A flax_tangents MaskedArray reached a function or layer without "
        "masking support (only `flax_tangents.nn` layers and `+` handle "
        "masks). Apply the mask first with `.unmask()`, or use the matching "
        "`flax_tangents.nn` layer.")

  __array__ = __jax_array__


jax.tree_util.register_dataclass(
    MaskedArray, data_fields=["masked_value", "mask"], meta_fields=[])


def _is_scalar(x: Any) -> bool:
  """Whether `x` is a number or a 0-d array (a `MaskedArray` divisor)."""
  return isinstance(x, numbers.Number) or jnp.ndim(x) == 0


def _is_operand(x: Any) -> bool:
  """Whether `x` combines with a `MaskedArray` (a number or an array)."""
  return (isinstance(x, (MaskedArray, numbers.Number)) or hasattr(x, "shape")
          ) and not isinstance(x, bool)


# What a layer returns: an array, or a `MaskedArray` for masked inputs.
MaybeMasked = Union[jax.Array, MaskedArray]


def split(x: Any) -> tuple[Any, Optional[jax.Array], bool]:
  """`(values with padding zeroed, mask, whether x was a MaskedArray)`."""
  if isinstance(x, MaskedArray):
    return mask_arrays.zero_masked(x.masked_value, x.mask), x.mask, True
  return x, None, False


def supports_masking(
    out_mask: Optional[Callable[[Any, jax.Array, tuple[int, ...]],
                                Optional[jax.Array]]] = None):
  """Makes a finite layer accept `ft.MaskedArray` (NT's `supports_masking`).

  Decorates a Linen layer's `__call__(self, x, ...)`: the wrapped call zeroes
  the padding of `x`, runs on the plain array and returns a `MaskedArray`
  whose mask is `out_mask(self, mask, x.shape)` (the input mask when
  `out_mask` is `None`: the layer keeps every location in place). Plain
  arrays pass through unchanged. This is the finite half of NT's decorator;
  the kernel half needs nothing: `ft.kernel_fn` zeroes covariances at padding
  after every rule, and a rule that moves locations maps `kernel.mask1` /
  `kernel.mask2` itself (`kernel.replace(mask1=..., mask2=...)`; a rule that
  changes the shape without doing so is refused).

  Args:
    out_mask: `out_mask(module, mask, input_shape) -> mask` of the outputs,
      or `None` for layers that keep the input's mask (NT's `mask_fn`).

  Returns:
    A decorator for `__call__`.

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> class Scale(nn.Module):          # y = 2 x, location by location
  ...   @ft.supports_masking()
  ...   def __call__(self, x):
  ...     return 2 * x
  >>> x = jnp.array([[[1.], [2.], [-9.]]])   # the last location is padding
  >>> y = Scale().apply({}, ft.MaskedArray.from_mask_constant(x, -9.))
  >>> y.unmask()[0, :, 0]
  Array([2., 4., 0.], dtype=float...)
  >>> y.mask[0, :, 0]
  Array([False, False,  True], dtype=bool)
  """

  def decorate(call):
    @functools.wraps(call)
    def wrapped(self, x, *args, **kwargs):
      value, mask, was_masked = split(x)
      y = call(self, value, *args, **kwargs)
      if not was_masked:
        return y
      if mask is not None and out_mask is not None:
        mask = out_mask(self, mask, tuple(value.shape))
      return MaskedArray(y, mask)
    return wrapped

  return decorate


def unmask_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` with every `MaskedArray` it returns replaced by its unmasked values.

  NT's `unmask_fn`: e.g. the empirical kernels of a network on padded
  inputs, whose outputs at padding are zeros.

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> model = nn.Sequential([ftn.Dense(8), ftn.Relu(), ftn.Dense(1)])
  >>> x = jnp.array([[[1.], [2.], [-9.]]])           # padding: -9
  >>> f = ft.unmask_fn(lambda params, x: model.apply(
  ...     params, ft.MaskedArray.from_mask_constant(x, -9.)))
  >>> params = model.init(jax.random.key(0), x)
  >>> ntk = ft.empirical_ntk_fn(f)(x, None, params)   # (1, 1, 3, 3)
  >>> float(ntk[0, 0, 2, 2]), float(ntk[0, 0, 0, 2])  # padding: no gradient
  (0.0, 0.0)
  """

  @functools.wraps(fn)
  def unmasked(*args: Any, **kwargs: Any) -> Any:
    out = fn(*args, **kwargs)
    return jax.tree.map(
        lambda y: y.unmask() if isinstance(y, MaskedArray) else y, out,
        is_leaf=lambda y: isinstance(y, MaskedArray))

  return unmasked
