"""Convolutions as image patches times a matrix, for fast per-example gradients.

Per-example gradients of a convolution with respect to its filter are what
XLA:CPU handles worst: under `jax.vmap` (over examples, or over the output
basis of a Jacobian) the filter gradient becomes a grouped convolution,
which current XLA:CPU runs about 4x slower than the same FLOPs as a matrix
product (and 4x slower than XLA:CPU did in JAX 0.4, on which Neural Tangents
0.6.5 was measured). Written as `patches(x) @ w` instead (im2col), the same
gradient is a batched matrix product of the patches with the output
cotangent, and the input gradient a matrix product followed by a few padded
additions.

`patches` extracts the patches with slices (no arithmetic: the public
`lax.conv_general_dilated_patches` is itself a convolution with an identity
filter, as costly as the convolution it serves), `conv` is
`lax.conv_general_dilated` computed that way, `filter_gradient` the filter
gradient, and `with_patch_gradients(f)` evaluates `f` with every ungrouped
convolution (outside loop bodies) given that filter gradient (a
`jax.custom_vjp`; the forward pass and the input gradient stay
convolutions). The results agree with the convolution's own derivatives to
float rounding (the sums run in another order).
"""

from collections.abc import Callable, Sequence
import itertools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.empirical.structured import evaluation
from flax_tangents._src.empirical.structured import ir

__all__ = ["conv", "filter_gradient", "patches", "with_patch_gradients"]


def _canonical_padding(padding, in_spatial, filter_spatial, strides,
                       lhs_dilation, rhs_dilation):
  if not isinstance(padding, str):
    return [tuple(p) for p in padding]
  dilated_in = [(n - 1) * d + 1 for n, d in zip(in_spatial, lhs_dilation)]
  dilated_k = [(k - 1) * d + 1 for k, d in zip(filter_spatial, rhs_dilation)]
  return lax.padtype_to_pads(dilated_in, dilated_k, strides, padding)


def patches(lhs: jax.Array, filter_spatial: Sequence[int],
            window_strides: Sequence[int], padding: Any,
            lhs_dilation: Sequence[int], rhs_dilation: Sequence[int],
            lhs_spec: Sequence[int]) -> jax.Array:
  """The patches a convolution multiplies with its filter.

  Args:
    lhs: the convolution's input.
    filter_spatial: spatial sizes of the filter.
    window_strides: as for `lax.conv_general_dilated`.
    padding: pairs `(low, high)` per spatial axis, or `'SAME'`/`'VALID'`.
    lhs_dilation: input dilation (transposed convolutions).
    rhs_dilation: filter dilation.
    lhs_spec: `(batch axis, feature axis, spatial axes...)` of `lhs`.

  Returns:
    `(batch, *out_spatial, in_features, *filter_spatial)`.

  >>> x = jnp.arange(16.).reshape(1, 4, 4, 1)
  >>> p = patches(x, (3, 3), (1, 1), 'VALID', (1, 1), (1, 1), (0, 3, 1, 2))
  >>> p.shape, float(p[0, 0, 0, 0, 1, 2])
  ((1, 2, 2, 1, 3, 3), 6.0)
  """
  n_spatial = len(filter_spatial)
  x = jnp.transpose(lhs, tuple(lhs_spec))  # (N, C, *spatial)
  in_spatial = x.shape[2:]
  pads = _canonical_padding(padding, in_spatial, filter_spatial,
                            window_strides, lhs_dilation, rhs_dilation)
  config = [(0, 0, 0), (0, 0, 0)] + [
      (lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dilation)]
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  padded = x.shape[2:]
  out_spatial = [
      (p - (k - 1) * d - 1) // s + 1
      for p, k, d, s in zip(padded, filter_spatial, rhs_dilation,
                            window_strides)
  ]
  slices = []
  for offsets in itertools.product(*[range(k) for k in filter_spatial]):
    start = [0, 0] + [o * d for o, d in zip(offsets, rhs_dilation)]
    limit = [x.shape[0], x.shape[1]] + [
        st + (n - 1) * s + 1
        for st, n, s in zip(start[2:], out_spatial, window_strides)]
    slices.append(lax.slice(x, start, limit, [1, 1] + list(window_strides)))
  stacked = jnp.stack(slices, axis=2)  # (N, C, K, *out_spatial)
  stacked = stacked.reshape(stacked.shape[:2] + tuple(filter_spatial) +
                            tuple(out_spatial))
  # (N, *out_spatial, C, *filter_spatial).
  order = ((0,) + tuple(range(2 + n_spatial, 2 + 2 * n_spatial)) + (1,) +
           tuple(range(2, 2 + n_spatial)))
  return jnp.transpose(stacked, order)


def conv(lhs: jax.Array, rhs: jax.Array, *, window_strides, padding,
         lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count=1,
         batch_group_count=1, precision=None, preferred_element_type=None,
         **unused) -> jax.Array:
  """`lax.conv_general_dilated` (ungrouped) as patches times the filter."""
  del unused
  if feature_group_count != 1 or batch_group_count != 1:
    raise ValueError("im2col.conv handles ungrouped convolutions only.")
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n_spatial = len(lhs_spec) - 2
  filter_spatial = [rhs.shape[a] for a in rhs_spec[2:]]
  p = patches(lhs, filter_spatial, window_strides, padding, lhs_dilation,
              rhs_dilation, lhs_spec)
  w = jnp.transpose(rhs, (rhs_spec[1],) + tuple(rhs_spec[2:]) +
                    (rhs_spec[0],))  # (C_in, *filter_spatial, C_out)
  contract = tuple(range(1 + n_spatial, 2 + 2 * n_spatial))
  out = lax.dot_general(p, w, ((contract, tuple(range(1 + n_spatial))),
                               ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
  # `out` is (N, *out_spatial, C_out): put its axes where out_spec says.
  current = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
  return jnp.transpose(out, tuple(int(a) for a in np.argsort(current)))


def filter_gradient(lhs: jax.Array, cotangent: jax.Array, rhs_shape,
                    params: dict[str, Any]) -> jax.Array:
  """`d <conv(lhs, w), cotangent> / d w`: patches times the cotangent."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  n_spatial = len(lhs_spec) - 2
  filter_spatial = [rhs_shape[a] for a in rhs_spec[2:]]
  p = patches(lhs, filter_spatial, params["window_strides"],
              params["padding"], params["lhs_dilation"],
              params["rhs_dilation"], lhs_spec)  # (N, *out, C_in, *K)
  g = jnp.transpose(cotangent, (out_spec[0],) + tuple(out_spec[2:]) +
                    (out_spec[1],))  # (N, *out, C_out)
  summed = tuple(range(1 + n_spatial))
  w = lax.dot_general(p, g, ((summed, summed), ((), ())),
                      precision=params.get("precision"),
                      preferred_element_type=params.get(
                          "preferred_element_type"))
  # `w` is (C_in, *K, C_out): put its axes where rhs_spec says.
  current = (rhs_spec[1],) + tuple(rhs_spec[2:]) + (rhs_spec[0],)
  perm = tuple(int(a) for a in np.argsort(current))
  return jnp.transpose(w, perm).astype(cotangent.dtype)


def _conv_with_patch_gradient(eqn: ir.Equation, lhs, rhs):
  """The convolution, whose filter gradient is computed from patches."""
  p = eqn.params
  primitive = eqn.primitive
  bind_params = primitive.get_bind_params(p)
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return primitive.bind(lhs, rhs, **bind_params)

  @jax.custom_vjp
  def convolve(l, r):
    return primitive.bind(l, r, **bind_params)

  def forward(l, r):
    return convolve(l, r), (l, r)

  def backward(residuals, g):
    l, r = residuals
    # The input gradient stays a (transposed) convolution: under vmap its
    # batch folds into the convolution's batch.
    _, pullback = jax.vjp(lambda l_: primitive.bind(l_, r, **bind_params), l)
    (l_cotangent,) = pullback(g)
    return l_cotangent, filter_gradient(l, g, r.shape, p)

  convolve.defvjp(forward, backward)
  return convolve(lhs, rhs)


def _has_conv(program: ir.FlatProgram) -> bool:
  return any(e.name == "conv_general_dilated" and
             e.params["feature_group_count"] == 1 and
             e.params["batch_group_count"] == 1 for e in program.equations)


def with_patch_gradients(f: Callable[..., Any]) -> Callable[..., Any]:
  """`f(params, x, **kwargs)` whose convolutions' filter gradients use patches.

  For reverse mode only (`jax.vjp`, `jax.jacrev`): the convolutions become
  `jax.custom_vjp` functions, which forward mode cannot differentiate.
  `f` is traced on each call (under the caller's transformations, once per
  compilation); when it has no ungrouped convolution outside loop bodies,
  `f` itself runs.
  """

  def fast(params, x, **kwargs):
    structs = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf),
                                          jnp.result_type(leaf)), (params, x))
    program, out_tree = ir.flatten(lambda p, v: f(p, v, **kwargs), *structs)
    if not _has_conv(program):
      return f(params, x, **kwargs)
    env = evaluation.evaluate(program, jax.tree.leaves((params, x)), {},
                              overrides={"conv_general_dilated":
                                         _conv_with_patch_gradient})
    return jax.tree.unflatten(
        out_tree, [evaluation.read_atom(env, a) for a in program.outputs])

  return fast
