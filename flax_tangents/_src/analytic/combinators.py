"""Kernels of merged branches: sums, concatenations and products."""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import jax

from flax_tangents._src.analytic import mixtures
from flax_tangents.kernel import Kernel

__all__ = ["channel_average", "fan_in_concat", "fan_in_prod", "fan_in_sum"]


def _check_branches(kernels: Sequence[Kernel], layer: str,
                    same_channels: bool = True) -> None:
  if not kernels:
    raise ValueError(f"{layer} needs at least one branch.")
  if not all(isinstance(k, Kernel) for k in kernels):
    raise TypeError(f"{layer} got a mix of kernels and arrays; every branch "
                    "must be computed the same way.")
  first = kernels[0]
  for i, k in enumerate(kernels[1:], start=1):
    end = None if same_channels else -1
    if (k.shape1[:end] != first.shape1[:end] or
        k.shape2[:end] != first.shape2[:end]):
      raise ValueError(
          f"{layer}: branch {i} has activations of shape {k.shape1} / "
          f"{k.shape2}, branch 0 has {first.shape1} / {first.shape2}. "
          "Branches must have the same shape (except channels for "
          "FanInConcat along the channel axis); check their strides, "
          "padding and features.")
    if (k.diagonal_batch, k.diagonal_spatial, k.cov2 is None) != (
        first.diagonal_batch, first.diagonal_spatial, first.cov2 is None):
      raise ValueError(f"{layer}: branches carry different kernel layouts.")


def _combine(kernels: Sequence[Kernel], field: str, fn) -> jax.Array:
  values = [getattr(k, field) for k in kernels]
  return None if any(v is None for v in values) else fn(values)


def fan_in_sum(kernels: Sequence[Kernel]) -> Kernel:
  """Kernel of the sum of branches.

  The kernel of a sum is the sum of kernels when the branches are
  uncorrelated: true for centred Gaussian branches that do not share their
  last affine layer, as in the residual `x + conv(relu(x))` with `x` the
  output of an affine layer. A branch after a nonlinearity has a non-zero
  mean whose products the kernel cannot carry, so (as in Neural Tangents)
  every branch must be Gaussian.

  Raises:
    ValueError: for a non-Gaussian branch, or branches of different shapes.
  """
  _check_branches(kernels, "FanInSum")
  if len(kernels) == 1:
    return kernels[0]
  for i, k in enumerate(kernels):
    if not k.is_gaussian:
      raise ValueError(_not_centred_message(k, i, "FanInSum"))
  add = lambda values: functools.reduce(operator.add, values)
  first = kernels[0]
  return first.replace(
      nngp=_combine(kernels, "nngp", add), ntk=_combine(kernels, "ntk", add),
      cov1=_combine(kernels, "cov1", add), cov2=_combine(kernels, "cov2", add),
      is_gaussian=True, is_input=False)


def _not_centred_message(kernel: Kernel, index: int, layer: str) -> str:
  what = ("the raw inputs" if kernel.is_input else
          "not a centred Gaussian (the output of a nonlinearity, or of "
          "Flatten/FanInConcat/a layer fed by one)")
  return (
      f"{layer}: branch {index} is {what}. The kernel of a sum is the sum "
      "of kernels only for uncorrelated, centred (zero-mean) branches; a "
      "branch with a non-zero mean adds products of means that the kernel "
      "does not carry. End every branch with an affine layer "
      "(`Dense`/`Conv`), e.g. write `x + Dense(relu(x))` with `x` itself "
      "the output of an affine layer, or merge with `FanInConcat`.")


def channel_average(kernels: Sequence[Kernel]) -> Kernel:
  """The channel-weighted mean of branch kernels (no parts)."""
  channels = [k.shape1[-1] for k in kernels]
  total = sum(channels)

  def weighted(values):
    return functools.reduce(
        operator.add, [v * (c / total) for v, c in zip(values, channels)])

  first = kernels[0]
  return first.replace(
      nngp=_combine(kernels, "nngp", weighted),
      ntk=_combine(kernels, "ntk", weighted),
      cov1=_combine(kernels, "cov1", weighted),
      cov2=_combine(kernels, "cov2", weighted),
      shape1=first.shape1[:-1] + (total,), shape2=first.shape2[:-1] + (total,),
      is_gaussian=False, is_input=all(k.is_input for k in kernels))


def fan_in_concat(kernels: Sequence[Kernel], axis: int = -1) -> Kernel:
  """Kernel of branches concatenated along the channel axis.

  The result is the channel-weighted mean of the branch kernels (what the
  next affine layer needs); it keeps the branch kernels as parts of a
  mixture, so that a nonlinearity applied next acts on each branch's units
  with their own kernel (see `mixtures`).

  Raises:
    NotImplementedError: for concatenation along a non-channel axis.
  """
  n_dims = len(kernels[0].shape1)
  if axis % n_dims != n_dims - 1:
    raise NotImplementedError(
        f"FanInConcat along axis {axis} of {n_dims}-D activations: only the "
        "channel axis (-1) is supported in the infinite-width limit. "
        "Concatenate along channels, or merge with FanInSum.")
  _check_branches(kernels, "FanInConcat", same_channels=False)
  if len(kernels) == 1:
    return kernels[0]
  return mixtures.with_parts(channel_average(kernels), tuple(kernels),
                             mixtures.CONCAT)


def fan_in_prod(kernels: Sequence[Kernel]) -> Kernel:
  """Kernel of the elementwise product of independent branches.

  NNGPs multiply; the NTK follows the product rule,
  `ntk = sum_i ntk_i prod_{j != i} nngp_j`. The product is not Gaussian.
  The channel average of a product is the product of channel averages only
  if all but one branch have identically distributed channels, so at most
  one branch may be raw inputs or a mixture (after Flatten/FanInConcat).

  Raises:
    ValueError: for two such branches, or a branch multiplied by itself.
  """
  _check_branches(kernels, "FanInProd")
  if len({id(k) for k in kernels}) < len(kernels):
    raise ValueError(
        "FanInProd: a branch is multiplied by itself; its square needs "
        "fourth moments, not its kernel. Multiply independent branches "
        "(each ending in its own affine layer).")
  uneven = [i for i, k in enumerate(kernels)
            if not mixtures.identically_distributed(k)]
  if len(uneven) > 1:
    raise ValueError(
        f"FanInProd: branches {uneven} do not have identically distributed "
        "channels (raw inputs, or a mixture after Flatten/FanInConcat), so "
        "the channel average of their product is not the product of their "
        "kernels. Put an affine layer (`Dense`/`Conv`) on all but one of "
        "them.")
  mul = lambda values: functools.reduce(operator.mul, values)

  def product_rule_ntk() -> jax.Array:
    if any(k.ntk is None for k in kernels):
      return None
    terms = []
    for i, k in enumerate(kernels):
      others = [o.nngp for j, o in enumerate(kernels) if j != i]
      terms.append(functools.reduce(operator.mul, others, k.ntk))
    return functools.reduce(operator.add, terms)

  first = kernels[0]
  out = first.replace(
      nngp=_combine(kernels, "nngp", mul), ntk=product_rule_ntk(),
      cov1=_combine(kernels, "cov1", mul), cov2=_combine(kernels, "cov2", mul),
      is_gaussian=False, is_input=all(k.is_input for k in kernels))
  if uneven and not out.is_input:
    out = mixtures.mark_mixed(out)
  return out
