"""Gauss-Hermite expectations over kernels of any size.

The same rule as `gaussian_quadrature.gauss_hermite_expectation` (the pair
`(u, v)` written through independent standard normals `z1`, `z2`), but the
`z1` nodes are visited one at a time in a loop, so memory grows as `deg`
times the kernel instead of `deg**2` times: lifted nonlinearities of
convolutional kernels with full spatial covariances stay affordable.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic.gaussian_quadrature import standard_normal_rule

__all__ = ["difference", "expectation"]

Fn = Callable[[jax.Array], jax.Array]


def _pair_sum(terms: Callable[[jax.Array, jax.Array], jax.Array], cov12,
              var1, var2, deg: int) -> jax.Array:
  """`sum_ij w_i w_j terms(u_i, v_ij)` for the pair's quadrature nodes."""
  cov12, var1, var2 = jnp.broadcast_arrays(cov12, var1, var2)
  dtype = cov12.dtype
  nodes, weights = standard_normal_rule(deg)
  nodes, weights = jnp.asarray(nodes, dtype), jnp.asarray(weights, dtype)
  has_var1 = var1 > 0
  std1 = jnp.sqrt(jnp.where(has_var1, var1, 1))
  # A zero-variance u is a.s. zero and then uncorrelated with v.
  slope = jnp.where(has_var1, cov12 / std1, 0)
  residual_std = jnp.sqrt(jnp.maximum(
      jnp.where(has_var1, var2 - slope**2, var2), 0))
  std1 = jnp.where(has_var1, std1, 0)
  z2 = nodes.reshape((1,) * cov12.ndim + (deg,))
  w2 = weights.reshape(z2.shape)

  def one_node(total, node_weight):
    z1, w1 = node_weight
    u = std1 * z1
    v = (slope * z1)[..., None] + residual_std[..., None] * z2
    inner = jnp.sum(terms(u[..., None], v) * w2, axis=-1)
    return total + w1 * inner, None

  total, _ = jax.lax.scan(one_node, jnp.zeros_like(cov12), (nodes, weights))
  return total


def expectation(f: Fn, g: Fn, cov12, var1, var2, *, deg: int) -> jax.Array:
  """`E[f(u) g(v)]` for a centred Gaussian pair, on `deg x deg` nodes.

  Exact for polynomials of degree `< 2 deg` in each variable.
  """
  return _pair_sum(lambda u, v: f(u) * g(v), cov12, var1, var2, deg)


def difference(f: Fn, r: Fn, cov12, var1, var2, deg: int) -> jax.Array:
  """`E[f(u) f(v)] - E[r(u) r(v)]` on the same nodes (a control variate)."""
  return _pair_sum(lambda u, v: f(u) * f(v) - r(u) * r(v), cov12, var1,
                   var2, deg)
