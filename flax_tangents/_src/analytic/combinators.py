"""Kernels of merged branches: sums, concatenations and products."""

from __future__ import annotations

import functools
import operator
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import lineage
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import mixtures
from flax_tangents._src.analytic import requirements
from flax_tangents._src.analytic.kernel import Kernel

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


def _combine(kernels: Sequence[Kernel], field: str,
             fn) -> Optional[jax.Array]:
  values = [getattr(k, field) for k in kernels]
  return None if any(v is None for v in values) else fn(values)


def _summed_masks(kernels: Sequence[Kernel]) -> dict[str, Any]:
  """Masks of a sum or product: padding where every branch is."""
  return dict(mask1=mask_arrays.sum_masks([k.mask1 for k in kernels]),
              mask2=mask_arrays.sum_masks([k.mask2 for k in kernels]))


def fan_in_sum(kernels: Sequence[Kernel]) -> Kernel:
  """Kernel of the sum of branches.

  The kernel of a sum is the sum of kernels when the branches are
  uncorrelated: independent (see `lineage`: no affine layer feeds two
  branches' last Gaussian fields) and at most one with a non-zero mean. The
  residual `x + conv(relu(x))`, with `x` the output of an affine layer, is
  the typical case; `x + x`, `x + pool(x)` or `relu(h) + relu(g)` are not,
  and are refused (for `y + y` write `2 * y`). When a branch's sources are
  unknown, every branch must be a centred Gaussian (as in Neural Tangents)
  and distinct branches are assumed independent.

  Raises:
    ValueError: for correlated, repeated or non-centred branches, or
      branches of different shapes.
  """
  _check_branches(kernels, "FanInSum")
  if len(kernels) == 1:
    return kernels[0]
  lineage.check_sum(kernels, "FanInSum")
  if len({id(k) for k in kernels}) < len(kernels):  # Unknown sources.
    raise ValueError(
        "FanInSum: a branch is added to itself (`y + y` or `y - y`); it is "
        "fully correlated with itself, not an independent branch. Scale it "
        "instead (`2 * y`, e.g. `ftn.DotGeneral(lhs=2.)`).")
  add = lambda values: functools.reduce(operator.add, values)
  first = kernels[0]
  out = first.replace(
      nngp=_combine(kernels, "nngp", add), ntk=_combine(kernels, "ntk", add),
      cov1=_combine(kernels, "cov1", add), cov2=_combine(kernels, "cov2", add),
      is_gaussian=all(k.is_gaussian for k in kernels), is_input=False,
      **_summed_masks(kernels))
  out = lineage.with_sources(out, lineage.union(kernels))
  if not all(mixtures.identically_distributed(k) for k in kernels):
    out = mixtures.mark_mixed(out)  # e.g. inputs + Dense(inputs)
  return out


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
      is_gaussian=False, is_input=all(k.is_input for k in kernels),
      mask1=mask_arrays.concat_masks([k.mask1 for k in kernels],
                                 [k.shape1 for k in kernels], -1),
      mask2=mask_arrays.concat_masks([k.mask2 for k in kernels],
                                 [k.shape2 for k in kernels], -1))


def fan_in_concat(kernels: Sequence[Kernel], axis: int = -1) -> Kernel:
  """Kernel of branches concatenated along `axis`.

  Along the channel axis the result is the channel-weighted mean of the
  branch kernels (what the next affine layer needs); it keeps the branch
  kernels as parts of a mixture, so that a nonlinearity applied next acts on
  each branch's units with their own kernel (see `mixtures`).

  Along a spatial or the batch axis it is the block matrix of the branches'
  covariances along that axis (NT's block concatenation): diagonal blocks
  are the branches' own kernels, and off-diagonal blocks, the covariance
  between two branches, are zero: the branches must be independent
  zero-mean Gaussians, which every branch ending in its own affine layer
  (`Dense`, `Conv`, ...) is. A branch repeated as the same kernel object
  (`concat([y, y])`) gets its own kernel as the cross block.

  Raises:
    ValueError: for `axis` out of range, non-Gaussian branches concatenated
      along a non-channel axis (their nonzero means correlate the blocks),
      or branches whose shapes differ off the concatenation axis.
  """
  n_dims = len(kernels[0].shape1)
  if not -n_dims <= axis < n_dims:
    raise ValueError(f"FanInConcat: axis={axis} is out of range for "
                     f"{n_dims}-D activations.")
  axis %= n_dims
  if axis != n_dims - 1:
    return _block_concat(kernels, axis)
  _check_branches(kernels, "FanInConcat", same_channels=False)
  if len(kernels) == 1:
    return kernels[0]
  out = mixtures.with_parts(channel_average(kernels), tuple(kernels),
                            mixtures.CONCAT)
  return lineage.with_sources(out, lineage.union(kernels))


def _check_concat_shapes(kernels: Sequence[Kernel], axis: int) -> None:
  _check_branches(kernels[:1], "FanInConcat")
  first = kernels[0]
  drop = lambda shape: shape[:axis] + shape[axis + 1:]
  for i, k in enumerate(kernels):
    if (drop(k.shape1) != drop(first.shape1) or
        drop(k.shape2) != drop(first.shape2)):
      raise ValueError(
          f"FanInConcat(axis={axis}): branch {i} has activations of shape "
          f"{k.shape1} / {k.shape2}, branch 0 has {first.shape1} / "
          f"{first.shape2}; they may differ only along axis {axis}.")
    if (k.diagonal_batch, k.diagonal_spatial, k.cov2 is None) != (
        first.diagonal_batch, first.diagonal_spatial, first.cov2 is None):
      raise ValueError("FanInConcat: branches carry different kernel "
                       "layouts.")
    if not k.is_gaussian:
      raise ValueError(
          f"FanInConcat(axis={axis}): branch {i} is not a zero-mean "
          "Gaussian (it does not end in an affine layer such as Dense or "
          "Conv), so its covariance with the other branches is not zero "
          "and the concatenated kernel is unknown. End every branch with an "
          "affine layer, or concatenate along the channel axis (-1).")


def _block_concat(kernels: Sequence[Kernel], axis: int) -> Kernel:
  """Block concatenation along the batch (0) or a spatial axis.

  Blocks between different branches are zero, which needs them
  uncorrelated (the same kernel object repeated is its own block).
  """
  _check_concat_shapes(kernels, axis)
  distinct = list({id(k): k for k in kernels}.values())
  lineage.check_sum(distinct, f"FanInConcat(axis={axis})")
  if axis == 0:
    requirements.record_batch_mixing("FanInConcat(axis=0)")
  first = kernels[0]

  def concat(field: str) -> Optional[jax.Array]:
    values = [getattr(k, field) for k in kernels]
    if any(v is None for v in values):
      return None
    n_batch = 2 if field in ("nngp", "ntk") or not first.diagonal_batch else 1
    if axis == 0:
      pair = (0, 1) if n_batch == 2 else (0,)
    elif first.diagonal_spatial:
      pair = (n_batch + axis - 1,)
    else:
      pair = (n_batch + 2 * (axis - 1), n_batch + 2 * (axis - 1) + 1)
    if len(pair) == 1:
      # Only the diagonal of the block matrix is stored: the branches' own.
      return jnp.concatenate(values, axis=pair[0])
    rows = []
    for i, v_i in enumerate(values):
      row = []
      for j, v_j in enumerate(values):
        if i == j or kernels[i] is kernels[j]:
          row.append(v_i)
        else:
          shape = list(v_i.shape)
          shape[pair[1]] = v_j.shape[pair[1]]
          row.append(jnp.zeros(shape, v_i.dtype))
      rows.append(jnp.concatenate(row, axis=pair[1]))
    return jnp.concatenate(rows, axis=pair[0])

  def new_shape(shape_of) -> tuple[int, ...]:
    shape = list(shape_of(first))
    shape[axis] = sum(shape_of(k)[axis] for k in kernels)
    return tuple(shape)

  out = first.replace(
      nngp=concat("nngp"), ntk=concat("ntk"), cov1=concat("cov1"),
      cov2=concat("cov2"), shape1=new_shape(lambda k: k.shape1),
      shape2=new_shape(lambda k: k.shape2), is_gaussian=True,
      is_input=False,
      mask1=mask_arrays.concat_masks([k.mask1 for k in kernels],
                                 [k.shape1 for k in kernels], axis),
      mask2=mask_arrays.concat_masks([k.mask2 for k in kernels],
                                 [k.shape2 for k in kernels], axis))
  return lineage.with_sources(out, lineage.union(kernels))


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
  lineage.check_independent(kernels, "FanInProd")
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

  def product_rule_ntk() -> Optional[jax.Array]:
    if any(k.ntk is None for k in kernels):
      return None
    terms = []
    for i, k in enumerate(kernels):
      others = [o.nngp for j, o in enumerate(kernels) if j != i]
      product: Any = k.ntk  # Not None: checked above.
      for other in others:
        product = product * other
      terms.append(product)
    return functools.reduce(operator.add, terms)

  first = kernels[0]
  out = first.replace(
      nngp=_combine(kernels, "nngp", mul), ntk=product_rule_ntk(),
      cov1=_combine(kernels, "cov1", mul), cov2=_combine(kernels, "cov2", mul),
      is_gaussian=False, is_input=all(k.is_input for k in kernels),
      **_summed_masks(kernels))
  if uneven and not out.is_input:
    out = mixtures.mark_mixed(out)
  return lineage.with_sources(out, lineage.union(kernels))
