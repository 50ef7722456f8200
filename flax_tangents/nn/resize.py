"""Layers that resample or select spatial locations: ImageResize and Index."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax

from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic import resize as resize_math
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import supports_masking

__all__ = ["ImageResize", "Index", "Slice"]


class _Slice:
  """NT's `stax.Slice`: `ftn.Slice[...]` returns the index it is given.

  The same as `numpy.s_`, for writing indices of `ftn.Index`.

  >>> from flax_tangents import nn as ftn
  >>> ftn.Slice[:, 1:3, ...]
  (slice(None, None, None), slice(1, 3, None), Ellipsis)
  """

  def __getitem__(self, idx: Any) -> Any:
    return idx


Slice = _Slice()


def _resize_rule(module: "ImageResize", kernel: Kernel,
                 **kwargs: Any) -> Kernel:
  del kwargs
  out = resize_math.resize_kernel(kernel, module.shape, method=module.method,
                                  antialias=module.antialias,
                                  layer=type(module).__name__)
  return masking.map_masks(out, kernel, module.output_mask)


@kernel_rule(_resize_rule)
class ImageResize(nn.Module):
  """Resizes spatial axes with `jax.image.resize` (NT's `ImageResize`).

  `shape` has one entry per axis of the input `(N, *spatial, C)`; `-1` keeps
  an axis as it is. The channel entry must be `-1` (or the current size):
  the infinite-width kernel cannot resize channels. Resizing the batch axis
  interpolates between inputs (`x1` and `x2` each to `shape[0]` inputs), as
  in NT; its kernel needs full batch covariances (found automatically)
  unless the method is `'nearest'`, and `ft.batch` refuses it.

  Resizing is linear along each spatial axis, so the kernel rule applies the
  interpolation matrix `M` of `jax.image.resize` as `M (x) M` to each pair
  of spatial axes of the covariances. Every method of `jax.image.resize`
  works (Neural Tangents supports only `'linear'` and `'nearest'`). Methods
  that mix locations (all but `'nearest'`, unless a size is kept) need full
  spatial covariances, which `ft.kernel_fn` then computes in every layer.

  Attributes:
    shape: target shape, one entry per input axis, `-1` to keep an axis.
    method: a `jax.image.ResizeMethod` or its name (`'nearest'`, `'linear'`,
      `'cubic'`, `'lanczos3'`, `'lanczos5'`, ...).
    antialias: use an antialiasing filter when downsampling.
    precision: precision of `jax.image.resize` in the finite pass.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> layer = ftn.ImageResize((-1, 4, 6, -1), 'linear')
  >>> layer.apply({}, jnp.ones((2, 2, 3, 5))).shape
  (2, 4, 6, 5)
  """

  shape: Sequence[int]
  method: Union[str, jax.image.ResizeMethod]
  antialias: bool = True
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  def output_mask(self, mask: jax.Array,
                  shape: Sequence[int]) -> Optional[jax.Array]:
    """Padding iff made of padding only (as NT)."""
    return mask_arrays.resize_mask(
        mask, resize_math.resolve_resize_shape(self.shape, shape,
                                               type(self).__name__),
        self.method, self.antialias)

  @supports_masking(output_mask)
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = resize_math.resolve_resize_shape(self.shape, x.shape,
                                             type(self).__name__)
    return jax.image.resize(x, shape, method=self.method,
                            antialias=self.antialias,
                            precision=self.precision)


def _index_rule(module: "Index", kernel: Kernel, **kwargs: Any) -> Kernel:
  del kwargs
  out = resize_math.index_kernel(kernel, module.idx, type(module).__name__)
  return masking.map_masks(out, kernel, module.output_mask)


@kernel_rule(_index_rule)
class Index(nn.Module):
  """Indexes spatial axes, `x[idx]` (NT's `Index`).

  `idx` is a basic NumPy index of ints, slices and at most one `...`, most
  easily written with `ftn.Slice` (NT's `stax.Slice`; the same as
  `numpy.s_`). The channel axis must
  be kept whole (`:`); an integer removes its spatial axis. A slice of the
  batch axis selects the same inputs of `x1` and of `x2` (as NT; an integer
  there is refused, as in NT, since every activation keeps a batch axis),
  and `ft.batch` refuses it. Only locations and inputs are selected, so the
  rule works on kernels with full or diagonal covariances alike.

  Attributes:
    idx: the index, e.g. `np.s_[:, 1:3, ::2]` or `np.s_[:, 0, ...]`.

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from flax_tangents import nn as ftn
  >>> ftn.Index(np.s_[:, 0, 1:3]).apply({}, jnp.ones((2, 4, 4, 3))).shape
  (2, 2, 3)
  """

  idx: Any

  def output_mask(self, mask: jax.Array,
                  shape: Sequence[int]) -> Optional[jax.Array]:
    """The mask is indexed like its entries."""
    return mask_arrays.index_mask(mask, resize_math.normalize_index(
        self.idx, shape, type(self).__name__))

  @supports_masking(output_mask)
  def __call__(self, x: jax.Array) -> jax.Array:
    return x[resize_math.normalize_index(self.idx, x.shape,
                                         type(self).__name__)]
