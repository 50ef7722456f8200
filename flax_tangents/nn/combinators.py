"""Layers that merge parallel branches: sum, concatenation, product."""

from __future__ import annotations

import functools
import operator
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import combinators
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import MaskedArray
from flax_tangents._src.masked_array import split

__all__ = ["FanInConcat", "FanInProd", "FanInSum"]


def _merge(branches: Sequence[Any], merge_values, merge_masks) -> Any:
  """Merges branches; with `MaskedArray`s, zeroes each one's padding first."""
  values, masks, masked = zip(*map(split, branches))
  merged = merge_values(list(values))
  if not any(masked):
    return merged
  return MaskedArray(merged, merge_masks(list(masks)))


@kernel_rule(lambda module, kernels, **kw: combinators.fan_in_sum(kernels))
class FanInSum(nn.Module):
  """Sums a list of branches (a residual connection, for instance).

  On kernels the branches are taken to be uncorrelated, which holds when all
  but one of them start with a fresh affine layer; `a + b` on two kernels
  does the same.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.FanInSum().apply({}, [jnp.ones(2), jnp.ones(2)])
  Array([2., 2.], dtype=float...)
  """

  def __call__(self, branches: Sequence[jax.Array]) -> jax.Array:
    return _merge(branches, functools.partial(functools.reduce, operator.add),
                  mask_arrays.sum_masks)


def _concat_rule(module: "FanInConcat", kernels: Sequence[Kernel],
                 **kwargs: Any) -> Kernel:
  del kwargs
  return combinators.fan_in_concat(kernels, module.axis)


@kernel_rule(_concat_rule)
class FanInConcat(nn.Module):
  """Concatenates a list of branches along `axis` (channels by default).

  Along the channel axis the kernel is the channel-weighted mean of the
  branches' kernels. Along the batch axis or a spatial axis it is NT's
  block concatenation: the branches' kernels on the diagonal blocks and
  zero between branches, which needs every branch to end in its own affine
  layer (independent zero-mean Gaussians; others raise `ValueError`).
  Concatenating along the batch axis puts branch `i`'s copy of input `n` at
  row `i * N + n`, for `x1` and `x2` alike (`ft.batch` refuses such
  models: tiles of the batch would not be independent).

  Attributes:
    axis: the concatenation axis of the `(N, *spatial, C)` activations.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.FanInConcat().apply({}, [jnp.ones((2, 3)), jnp.ones((2, 1))]).shape
  (2, 4)
  """

  axis: int = -1

  def __call__(self, branches: Sequence[jax.Array]) -> jax.Array:
    n_dims = jnp.ndim(split(branches[0])[0])
    if not -n_dims <= self.axis < n_dims:
      raise ValueError(f"FanInConcat: axis={self.axis} is out of range for "
                       f"{n_dims}-D inputs; use an axis in [-{n_dims}, "
                       f"{n_dims}).")
    return _merge(
        branches, lambda values: jnp.concatenate(values, axis=self.axis),
        lambda masks: mask_arrays.concat_masks(
            masks, [jnp.shape(v) for v, _, _ in map(split, branches)],
            self.axis))


@kernel_rule(lambda module, kernels, **kw: combinators.fan_in_prod(kernels))
class FanInProd(nn.Module):
  """Multiplies a list of branches elementwise.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.FanInProd().apply({}, [2 * jnp.ones(2), 3 * jnp.ones(2)])
  Array([6., 6.], dtype=float...)
  """

  def __call__(self, branches: Sequence[jax.Array]) -> jax.Array:
    return _merge(branches, functools.partial(functools.reduce, operator.mul),
                  mask_arrays.sum_masks)
