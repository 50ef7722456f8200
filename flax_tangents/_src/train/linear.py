"""Linearization and the empirical NTK of a parameters-only function.

Both work on `f(params, x) -> (N, O)` where `params` is the pytree being
trained (the `'params'` collection of a Flax model, other collections bound).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
ParamsFn = Callable[[PyTree, jax.Array], jax.Array]


def _linearize_by_jvp(f: ParamsFn, params_0: PyTree) -> ParamsFn:
  """`f(p0, x) + J(p0, x) (p - p0)`, by one forward-mode product."""

  def f_lin(params: PyTree, x: jax.Array) -> jax.Array:
    delta = jax.tree_util.tree_map(jnp.subtract, params, params_0)
    out_0, tangent = jax.jvp(lambda p: f(p, x), (params_0,), (delta,))
    return out_0 + tangent

  return f_lin


def linearize(f: ParamsFn, params_0: PyTree) -> ParamsFn:
  """First-order Taylor expansion of `f` in its parameters around `params_0`.

  Uses `ft.linearize` where it is implemented, else an equivalent `jax.jvp`.

  Args:
    f: `f(params, x)`.
    params_0: the expansion point (the initial parameters).

  Returns:
    `f_lin(params, x)`, linear in `params`, equal to `f` at `params_0`.
  """
  try:
    from flax_tangents._src.empirical.linearize import linearize as ft_lin
    return ft_lin(f, params_0)
  except NotImplementedError:
    return _linearize_by_jvp(f, params_0)


def empirical_ntk(f: ParamsFn, params: PyTree, x1: jax.Array,
                  x2: jax.Array | None = None,
                  trace_outputs: bool = False) -> jax.Array:
  """Empirical NTK `J(x1) J(x2)^T` of `f(params, x) -> (N, O)`.

  Args:
    f: `f(params, x)` with outputs of shape `(N, O)`.
    params: the parameters at which the Jacobians are taken.
    x1: first inputs.
    x2: second inputs; `None` for `x1`.
    trace_outputs: `True` for the `(N1, N2)` kernel averaged over outputs
      (Neural Tangents' `trace_axes=(-1,)`), computed one output at a time so
      that only an `(N, n_params)` Jacobian is ever held; `False` for the full
      `(N1, N2, O, O)` kernel (`trace_axes=()`).

  Returns:
    The kernel, in Neural Tangents' zipped layout.
  """
  n_out = jax.eval_shape(lambda p: f(p, x1), params).shape[-1]

  def flat_jacobian(x, out_index=None):
    # Per-example gradients, vmapped: memory O(N * n_params), with no
    # (N x N x width) intermediates as a batched reverse pass would have.
    def one(xi):
      def fn(p):
        fx = f(p, xi[None])[0]
        return fx if out_index is None else fx[out_index]
      tree = jax.jacrev(fn)(params)
      lead = () if out_index is not None else (n_out,)
      return jnp.concatenate([leaf.reshape(lead + (-1,)) for leaf in
                              jax.tree_util.tree_leaves(tree)], axis=-1)
    return jax.vmap(one)(x)

  if trace_outputs:
    total = 0.
    for a in range(n_out):
      j1 = flat_jacobian(x1, a)
      j2 = j1 if x2 is None else flat_jacobian(x2, a)
      total = total + j1 @ j2.T
    return total / n_out
  j1 = flat_jacobian(x1)
  j2 = j1 if x2 is None else flat_jacobian(x2)
  return jnp.einsum("iap,jbp->ijab", j1, j2)
