"""`ft.linearize` and `ft.taylor_expand` on plain functions and Flax models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from empirical_zoo import make_case


def _perturbed(params, key, scale=0.1):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
      for leaf, k in zip(leaves, keys)
  ])


def test_linearize_flax_matches_jvp_and_holds_other_collections():
  f, variables, x1, _, kwargs = make_case("cnn_batchnorm")
  f_lin = jax.jit(ft.linearize(f, variables), static_argnames="train")
  np.testing.assert_allclose(f_lin(variables, x1, **kwargs),
                             f(variables, x1, **kwargs), rtol=1e-12)

  new_params = _perturbed(variables["params"], jax.random.PRNGKey(1))
  new_variables = {**variables, "params": new_params}
  delta = jax.tree.map(jnp.subtract, new_params, variables["params"])
  at = lambda p: f({**variables, "params": p}, x1, **kwargs)  # noqa: E731
  primal, tangent = jax.jvp(at, (variables["params"],), (delta,))
  np.testing.assert_allclose(f_lin(new_variables, x1, **kwargs),
                             primal + tangent, rtol=1e-10, atol=1e-12)

  # Other collections are inputs: new statistics are used, not expanded.
  stats = jax.tree.map(lambda s: s * 1.5, variables["batch_stats"])
  with_stats = {**variables, "batch_stats": stats}
  np.testing.assert_allclose(f_lin(with_stats, x1, **kwargs),
                             f(with_stats, x1, **kwargs), rtol=1e-12)


def test_linearize_is_affine_and_composes_with_grad_and_vmap():
  f, variables, x1, _, _ = make_case("mlp")
  f_lin = jax.jit(ft.linearize(f, variables))
  p0 = variables["params"]
  d = jax.tree.map(jnp.subtract, _perturbed(p0, jax.random.PRNGKey(2)), p0)

  @jax.jit
  def at(t):
    p = jax.tree.map(lambda a, b: a + t * b, p0, d)
    return f_lin({"params": p}, x1)

  np.testing.assert_allclose(at(2.) - at(0.), 2 * (at(1.) - at(0.)),
                             rtol=1e-9, atol=1e-12)

  # grad of a linear model's squared loss is J^T (f_lin - y).
  loss = lambda v: 0.5 * jnp.sum(f_lin(v, x1)**2)  # noqa: E731
  grads = jax.jit(jax.grad(loss))(variables)["params"]
  _, pullback = jax.vjp(lambda p: f({"params": p}, x1), p0)
  (expected,) = pullback(f(variables, x1))
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)

  per_example = jax.jit(jax.vmap(lambda x: f_lin(variables, x[None])[0]))(x1)
  np.testing.assert_allclose(per_example, f(variables, x1), rtol=1e-12)


def test_taylor_expand_exact_for_polynomials():
  f = lambda p, x: p["a"]**3 * x + p["b"]**2  # noqa: E731
  p0 = {"a": jnp.array(1.5), "b": jnp.array(-0.5)}
  p1 = {"a": jnp.array(2.0), "b": jnp.array(0.25)}
  x = jnp.arange(3.)
  f1 = ft.taylor_expand(f, p0, 1)
  np.testing.assert_allclose(f1(p1, x), ft.linearize(f, p0)(p1, x),
                             rtol=1e-12)
  np.testing.assert_allclose(ft.taylor_expand(f, p0, 0)(p1, x), f(p0, x))
  np.testing.assert_allclose(ft.taylor_expand(f, p0, 3)(p1, x), f(p1, x),
                             rtol=1e-12)
  # Second order: exact in b, and a^3 expanded to second order.
  a0, da = 1.5, 0.5
  expected = (a0**3 + 3 * a0**2 * da + 3 * a0 * da**2) * x + 0.25**2
  np.testing.assert_allclose(ft.taylor_expand(f, p0, 2)(p1, x), expected,
                             rtol=1e-12)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_taylor_expand_flax_error_shrinks_with_degree(degree):
  f, variables, x1, _, _ = make_case("mlp")
  f_tayl = jax.jit(ft.taylor_expand(f, variables, degree))
  base = f(variables, x1)
  errors = []
  for scale in (0.02, 0.01):
    new = {**variables,
           "params": _perturbed(variables["params"], jax.random.PRNGKey(3),
                                scale)}
    errors.append(float(jnp.max(jnp.abs(f_tayl(new, x1) - f(new, x1)))))
  np.testing.assert_allclose(f_tayl(variables, x1), base, rtol=1e-12)
  # The remainder is O(scale^(degree + 1)): halving the step divides it by
  # about 2^(degree + 1).
  assert errors[0] / errors[1] > 2**(degree + 1) * 0.7


def test_taylor_expand_rejects_negative_degree():
  with pytest.raises(ValueError, match="degree"):
    ft.taylor_expand(lambda p, x: p * x, 1., -1)
