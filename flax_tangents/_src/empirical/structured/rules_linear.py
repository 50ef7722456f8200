"""Structure rules for `dot_general` and `conv_general_dilated`.

For `y = x @ w` the Jacobian `dy/dw` is `x` times an identity along the
output features: the output keeps `w`'s free labels and `x` becomes a dense
factor whose contracted axes carry `w`'s contracted labels. This is what
makes wide fully-connected layers cheap: the NTK term becomes
`(x1 x2^T) * (C1 C2^T)` instead of a product of two width-squared
Jacobians.

For a convolution, the filter's Jacobian is the image patches (im2col) times
an identity along the output channels; the input's Jacobian (a learned
input) is the convolution's linear map for one example, batch-diagonal.
"""

import math

import jax
import jax.numpy as jnp

from flax_tangents._src.empirical import im2col
from flax_tangents._src.empirical.structured import structure

__all__ = ["RULES"]


def _dot_general(ctx):
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = ctx.params[
      "dimension_numbers"]
  lhs, rhs = ctx.equation.inputs
  if ctx.position == 1:
    w_contract, w_batch, other_contract, other_batch = (
        rhs_contract, rhs_batch, lhs_contract, lhs_batch)
    other = lhs
  else:
    w_contract, w_batch, other_contract, other_batch = (
        lhs_contract, lhs_batch, rhs_contract, rhs_batch)
    other = rhs
  w_ndim, other_shape = len(ctx.in_shape), ctx.shape(other)
  w_free = [a for a in range(w_ndim) if a not in w_contract + w_batch]
  other_free = [
      a for a in range(len(other_shape))
      if a not in other_contract + other_batch
  ]
  batch_labels = tuple(ctx.in_labels[a] for a in w_batch)
  w_free_labels = tuple(ctx.in_labels[a] for a in w_free)
  other_free_labels = tuple(ctx.labels.new(other_shape[a]) for a in other_free)
  # Output axes: batch, then lhs free, then rhs free.
  if ctx.position == 1:
    out_labels = batch_labels + other_free_labels + w_free_labels
  else:
    out_labels = batch_labels + w_free_labels + other_free_labels

  # Batch, contracted and free axes are all of the other operand's axes.
  factor_labels: dict[int, int] = {}
  for i, a in enumerate(other_batch):
    factor_labels[a] = batch_labels[i]
  for i, a in enumerate(other_contract):
    factor_labels[a] = ctx.in_labels[w_contract[i]]
  for a, label in zip(other_free, other_free_labels):
    factor_labels[a] = label
  factor = structure.DenseFactor(
      tuple(factor_labels[a] for a in range(len(other_shape))),
      lambda read: read(other))
  return structure.RuleResult(out_labels, (factor,))


def _conv_filter(ctx):
  """`d conv(x, w) / dw`: patches of `x`, identity on output channels."""
  p = ctx.params
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return None
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  lhs = ctx.equation.inputs[0]
  w_shape, out_shape = ctx.in_shape, ctx.out_shape
  spatial_w = [w_shape[a] for a in rhs_spec[2:]]
  out_labels = list(ctx.labels.new_for(out_shape))
  out_labels[out_spec[1]] = ctx.in_labels[rhs_spec[0]]
  # Patches are (batch, *out_spatial, in_channel, *filter_spatial).
  factor_labels = ((out_labels[out_spec[0]],) +
                   tuple(out_labels[a] for a in out_spec[2:]) +
                   (ctx.in_labels[rhs_spec[1]],) +
                   tuple(ctx.in_labels[a] for a in rhs_spec[2:]))

  def patches(read):
    # Slices of the input, no arithmetic (see `im2col`).
    return im2col.patches(read(lhs), spatial_w, p["window_strides"],
                          p["padding"], p["lhs_dilation"], p["rhs_dilation"],
                          lhs_spec)

  return structure.RuleResult(
      tuple(out_labels), (structure.DenseFactor(factor_labels, patches),))


def _conv_input(ctx):
  """`d conv(w, k) / dw` for a parameter image `w`: dense per example."""
  p = ctx.params
  if p["batch_group_count"] != 1:
    return None
  lhs_spec, _, out_spec = p["dimension_numbers"]
  rhs = ctx.equation.inputs[1]
  w_shape, out_shape = ctx.in_shape, ctx.out_shape
  batch_in, batch_out = lhs_spec[0], out_spec[0]
  out_labels = list(ctx.labels.new_for(out_shape))
  out_labels[batch_out] = ctx.in_labels[batch_in]
  example_in = tuple(s for a, s in enumerate(w_shape) if a != batch_in)
  out_rest = [a for a in range(len(out_shape)) if a != batch_out]
  in_rest = [a for a in range(len(w_shape)) if a != batch_in]
  factor_labels = (tuple(out_labels[a] for a in out_rest) +
                   tuple(ctx.in_labels[a] for a in in_rest))
  primitive, params = ctx.equation.primitive, ctx.equation.params

  def jacobian(read):
    kernel = read(rhs)

    def one_example(z):
      y = primitive.bind(jnp.expand_dims(z, batch_in), kernel, **params)
      return jnp.squeeze(y, batch_out)

    zero = jnp.zeros(example_in, ctx.program.dtype(ctx.operand))
    n_in, n_out = math.prod(example_in), math.prod(
        out_shape) // out_shape[batch_out]
    jac = jax.jacfwd if n_in <= n_out else jax.jacrev
    return jac(one_example)(zero)

  return structure.RuleResult(
      tuple(out_labels), (structure.DenseFactor(factor_labels, jacobian),))


def _conv_general_dilated(ctx):
  return _conv_filter(ctx) if ctx.position == 1 else _conv_input(ctx)


RULES: dict[str, structure.Rule] = {
    "dot_general": _dot_general,
    "conv_general_dilated": _conv_general_dilated,
}
