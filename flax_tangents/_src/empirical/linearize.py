"""Taylor expansions of a network in its parameters (`linearize`, ...).

Both expand `f(params, x, **kwargs)` around fixed parameters `params_0`:
`f_lin(p, x) = f(params_0, x) + J(x) (p - params_0)` and its higher-order
analogues. For Flax variables only the `'params'` collection is expanded;
the other collections of the variables passed to `f_lin` (e.g.
`batch_stats`) are used as given, like inputs.
"""

from collections.abc import Callable
import math
from typing import Any

import jax
import jax.numpy as jnp

from flax_tangents._src import nnx_adapter
from flax_tangents._src.empirical import arguments
from flax_tangents._src.typing import ApplyFn
from flax_tangents._src.typing import PyTree

__all__ = ["linearize", "taylor_expand"]


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _add_tangent(primal: PyTree, tangent: PyTree) -> PyTree:
  """`primal + tangent`, leaving non-float outputs (no tangent) unchanged."""
  return jax.tree.map(lambda y, t: y + t if _is_float(y) else y, primal,
                      tangent)


def _expansion_terms(g: Callable[[jax.Array], PyTree], t: jax.Array,
                     degree: int) -> list[PyTree]:
  """`[g(t), g'(t), ..., g^(degree)(t)]` by nested forward-mode passes.

  Each level pushes one more unit tangent in `t` through the previous level,
  which returns all lower derivatives at once, so nothing is recomputed.
  """

  def derivatives(order: int) -> Callable[[jax.Array], list[PyTree]]:
    if order == 0:
      return lambda s: [g(s)]
    lower = derivatives(order - 1)

    def with_next(s):
      values, tangents = jax.jvp(lower, (s,), (jnp.ones_like(s),))
      return values + [tangents[-1]]

    return with_next

  return derivatives(degree)(t)


def taylor_expand(f: ApplyFn, params: PyTree, degree: int) -> ApplyFn:
  """Returns `f`'s Taylor expansion of order `degree` in its parameters.

  `f_tayl(p, x) = sum_k (1/k!) d^k/ds^k f(params + s (p - params), x)` at
  `s = 0`, for `k = 0..degree`.

  Args:
    f: `f(params, x, **kwargs)` returning a pytree of arrays, e.g. a Flax
      `model.apply`, or an `nnx.Module` (as in `linearize`).
    params: the expansion point: Flax variables (only `'params'` is
      expanded) or any parameter pytree; for an `nnx.Module`, None (its
      current state), a module or an `nnx.State` of parameters.
    degree: the order of the expansion (0 gives `f(params, ...)`).

  Returns:
    `f_tayl(p, x, **kwargs)` with the signature of `f`, composable with
    `jax.jit`, `jax.grad` and `jax.vmap`.

  Raises:
    ValueError: if `degree` is negative.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> f = lambda p, x: jnp.exp(p * x)
  >>> f2 = ft.taylor_expand(f, 0., 2)
  >>> f2(1., 1.)  # 1 + 1 + 1/2
  Array(2.5, dtype=float...)
  """
  if not isinstance(degree, int) or degree < 0:
    raise ValueError(f"degree={degree!r}: give a non-negative int.")
  if nnx_adapter.is_module(f):
    return nnx_adapter.expansion_of(
        f, params, lambda g, v: taylor_expand(g, v, degree))
  flax_variables = arguments.is_flax_variables(params)
  params_0 = arguments.params_of(params)

  def f_tayl(p: PyTree, *args, **kwargs) -> PyTree:
    new_params = p["params"] if flax_variables else p

    def along(s):
      # params_0 + s (p - params_0) on float leaves; s takes each leaf's dtype.
      point = jax.tree.map(
          lambda a, b: a + s.astype(jnp.result_type(a)) * (b - a)
          if _is_float(a) else a, params_0, new_params)
      variables = arguments.with_params(p, point) if flax_variables else point
      return f(variables, *args, **kwargs)

    s0 = jnp.zeros((), jnp.result_type(float))
    terms = _expansion_terms(along, s0, degree)
    result = terms[0]
    for k, term in enumerate(terms[1:], start=1):
      scale = 1 / math.factorial(k)
      result = jax.tree.map(
          lambda y, t, scale=scale: y + (t * scale).astype(jnp.result_type(y))
          if _is_float(y) else y, result, term)
    return result

  return f_tayl


def linearize(f: ApplyFn, params: PyTree = None) -> ApplyFn:
  """Returns `f`'s first-order Taylor expansion in its parameters.

  `f_lin(p, x) = f(params, x) + J(x) (p - params)` with `J` the Jacobian of
  `f` at `params`, computed as one forward-mode product per call.

  For an `nnx.Module` `f`, `params` is optional (default: the module's
  state now, a snapshot that later in-place training does not move) and
  only its `nnx.Param` variables are expanded; `p` is then an `nnx.State` of
  parameters (e.g. `nnx.state(model, nnx.Param)`) or a module of the same
  structure (its other state and its mode, such as `eval()`, are used).

  Args:
    f: `f(params, x, **kwargs)` returning a pytree of arrays, e.g. a Flax
      `model.apply`.
    params: the expansion point: Flax variables (only `'params'` is
      linearized; other collections of the variables given to `f_lin` are
      used as they are) or any parameter pytree.

  Returns:
    `f_lin(p, x, **kwargs)` with the signature of `f`, composable with
    `jax.jit`, `jax.grad` and `jax.vmap`.

  Raises:
    TypeError: if `params` is None and `f` is not an `nnx.Module`.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import flax_tangents as ft
  >>> model = nn.Dense(2)
  >>> x = jnp.ones((3, 4))
  >>> variables = model.init(jax.random.PRNGKey(0), x)
  >>> f_lin = ft.linearize(model.apply, variables)
  >>> f_lin(variables, x).shape
  (3, 2)
  """
  if nnx_adapter.is_module(f):
    return nnx_adapter.expansion_of(f, params, linearize)
  if params is None:
    raise TypeError("linearize(f, params) needs the expansion point `params` "
                    "(optional only for an nnx.Module `f`).")
  flax_variables = arguments.is_flax_variables(params)
  params_0 = arguments.params_of(params)

  def f_lin(p: PyTree, *args, **kwargs) -> PyTree:
    new_params = p["params"] if flax_variables else p
    delta = jax.tree.map(lambda a, b: a - b, new_params, params_0)

    def at(q):
      variables = arguments.with_params(p, q) if flax_variables else q
      return f(variables, *args, **kwargs)

    primal, tangent = jax.jvp(at, (params_0,), (delta,))
    return _add_tangent(primal, tangent)

  return f_lin
