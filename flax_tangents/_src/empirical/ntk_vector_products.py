"""NTK_VECTOR_PRODUCTS: the NTK column by column, without Jacobians.

A column of the NTK is `J(x1) J(x2)^T e` for a basis vector `e` of the
`f(x2)` output space: one vector-Jacobian product through `f(params, x2)`
followed by one Jacobian-vector product through `f(params, x1)`. All columns
are computed at once under `jax.vmap`. No Jacobian is contracted, so this is
cheap when a forward pass costs about as much as the parameter count (dense
layers) and outputs are many.

With `vmap_axes`, each VJP is taken through one `x2` example (its outputs'
basis pulled back to parameter space) and each JVP through the whole `x1`
batch at once: examples are independent, so the batch's Jacobian rows are the
per-example ones, and neither product is repeated for every pair of examples.
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp

from flax_tangents._src.empirical import layout
from flax_tangents._src.empirical import example_axes

__all__ = ["ntk"]


def _full_kernel(f1: Callable[[layout.PyTree], layout.PyTree],
                 f2: Callable[[layout.PyTree], layout.PyTree],
                 params: layout.PyTree) -> layout.PyTree:
  """`J1 J2^T` of shape `(*out1_leaf.shape, *out2_leaf.shape)` per leaf.

  Only matching output leaves are paired (as in NT, cross-covariances between
  different outputs of `f` are not computed).
  """
  out1 = jax.eval_shape(f1, params)
  out2 = jax.eval_shape(f2, params)
  leaves2, tree2 = jax.tree.flatten(out2)
  leaves1 = tree2.flatten_up_to(out1)
  _, pullback = jax.vjp(f2, params)
  kernels = []
  for i, (leaf1, leaf2) in enumerate(zip(leaves1, leaves2)):

    def column(cotangent, i=i, leaf2=leaf2):
      # A cotangent on output leaf `i` only, zero on the others.
      cotangents = [
          jnp.zeros(leaf.shape, leaf.dtype) for leaf in leaves2
      ]
      cotangents[i] = cotangent.reshape(leaf2.shape)
      (tangent,) = pullback(jax.tree.unflatten(tree2, cotangents))
      _, out_tangent = jax.jvp(f1, (params,), (tangent,))
      return tree2.flatten_up_to(out_tangent)[i]

    basis = jnp.eye(leaf2.size, dtype=leaf2.dtype)
    columns = jax.vmap(column)(basis)  # (out2.size, *out1.shape)
    columns = columns.reshape(leaf2.shape + leaf1.shape)
    n2 = len(leaf2.shape)
    kernels.append(jnp.moveaxis(columns, tuple(range(n2)),
                                tuple(range(columns.ndim - n2,
                                            columns.ndim))))
  return jax.tree.unflatten(tree2, kernels)


def ntk(f: Callable[..., layout.PyTree], params: layout.PyTree,
        x1: layout.PyTree, x2: Optional[layout.PyTree],
        kwargs1: Mapping[str, Any], kwargs2: Mapping[str, Any], *,
        trace_axes: layout.Axes, diagonal_axes: layout.Axes,
        vmap_axes: example_axes.VmapAxes) -> layout.PyTree:
  """Empirical NTK from NTK-vector products.

  Args:
    f: `f(params, x, **kwargs)` returning a pytree of arrays.
    params: the pytree differentiated.
    x1: first inputs.
    x2: second inputs, or None for `x1`.
    kwargs1: keyword arguments of the `x1` evaluation.
    kwargs2: keyword arguments of the `x2` evaluation.
    trace_axes: output axes to average over (possibly negative).
    diagonal_axes: output axes to keep the diagonal of (possibly negative).
    vmap_axes: None or the canonical `(in_axes, out_axes, kwargs_axes)`.

  Returns:
    A pytree like `f`'s output of kernels in NT layout.

  >>> k = ntk(lambda p, x: x @ p, jnp.ones((2, 3)), jnp.ones((4, 2)), None,
  ...         {}, {}, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None)
  >>> k.shape
  (4, 4)
  """
  fx1 = jax.eval_shape(lambda p: f(p, x1, **kwargs1), params)
  fx2 = fx1 if x2 is None else jax.eval_shape(
      lambda p: f(p, x2, **kwargs2), params)
  # Check before the (possibly long) computation.
  jax.tree.map(
      lambda a, b: layout.check_trace_and_diagonal(
          trace_axes, diagonal_axes, a.shape, b.shape), fx1, fx2)
  x2_ = x1 if x2 is None else x2

  if vmap_axes is None:
    full = _full_kernel(lambda p: f(p, x1, **kwargs1),
                        lambda p: f(p, x2_, **kwargs2), params)
  else:
    # Examples are independent, so `f(params, x1)` on the whole batch has the
    # same Jacobian rows as one example at a time: pull back a basis of one
    # `x2` example's outputs (a per-example VJP, cheap) and push each result
    # forward through the whole `x1` batch at once (one batched JVP instead
    # of one per pair of examples, and the VJP is not repeated for every
    # `x1` example).
    mapped2, fixed2 = example_axes.split_vmapped_kwargs(kwargs2, vmap_axes)
    example2, (x_axes, kw_axes), out_axes = example_axes.per_example_fn(
        f, vmap_axes, fixed2)

    def against_example(x2_j, mapped2_j):
      return _full_kernel(lambda p: f(p, x1, **kwargs1),
                          lambda p: example2(p, x2_j, mapped2_j), params)

    # Per `x2` example: (*out1, *out2_example). Inserting the x2 batch axis
    # at `out1.ndim + out_axes` gives (*out1, *out2).
    ndims = jax.tree.map(lambda s: s.ndim, fx1)
    full = jax.vmap(against_example, in_axes=(x_axes, kw_axes),
                    out_axes=jax.tree.map(lambda a, n: a + n, out_axes,
                                          ndims))(x2_, mapped2)

  def in_nt_layout(kernel, out1, out2):
    trace, diagonal = layout.check_trace_and_diagonal(
        trace_axes, diagonal_axes, out1.shape, out2.shape)
    return layout.trace_and_diagonal(kernel, trace, diagonal)

  return jax.tree.map(in_nt_layout, full, fx1, fx2)
