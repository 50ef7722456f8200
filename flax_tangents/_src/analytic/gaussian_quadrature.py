"""Gauss-Hermite quadrature of bivariate Gaussian expectations.

For nonlinearities without a closed-form kernel: `E[f(u) g(v)]` for a centred
Gaussian pair with covariance `cov12` and variances `var1`, `var2`, computed
on a `deg x deg` product grid after writing the pair through independent
standard normals `z1`, `z2` (a Cholesky factorization):

  `u = sqrt(var1) z1`, `v = (cov12 / sqrt(var1)) z1
  + sqrt(var2 - cov12^2 / var1) z2`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["gauss_hermite_expectation", "standard_normal_rule"]


def standard_normal_rule(deg: int) -> tuple[np.ndarray, np.ndarray]:
  """Nodes and weights integrating polynomials of degree `< 2 deg` exactly
  against the standard normal density (the weights sum to one).

  Args:
    deg: number of nodes, at least 1.

  Returns:
    `(nodes, weights)`, float64 NumPy arrays of shape `(deg,)`.

  Raises:
    ValueError: if `deg < 1`.
  """
  if deg < 1:
    raise ValueError(f"`deg` must be a positive integer, got {deg}.")
  # Probabilists' Hermite rule: weight exp(-x^2 / 2), total mass sqrt(2 pi).
  nodes, weights = np.polynomial.hermite_e.hermegauss(deg)
  return nodes, weights / np.sqrt(2 * np.pi)


def gauss_hermite_expectation(f: Callable[[jax.Array], jax.Array],
                              g: Callable[[jax.Array], jax.Array],
                              cov12, var1, var2, deg: int) -> jax.Array:
  """`E[f(u) g(v)]` by `deg x deg` Gauss-Hermite quadrature.

  Exact when `f` and `g` are polynomials of degree `< deg`; for smooth
  functions the error decays quickly with `deg`; kinks (ReLU, Abs) converge
  slowly.

  Args:
    f: elementwise function applied to `u`.
    g: elementwise function applied to `v`.
    cov12: covariance of `(u, v)`.
    var1: variance of `u`.
    var2: variance of `v`.
    deg: nodes per dimension.

  Returns:
    The expectation, with the broadcast shape of the three arguments.
  """
  cov12, var1, var2 = jnp.broadcast_arrays(cov12, var1, var2)
  nodes, weights = standard_normal_rule(deg)
  dtype = cov12.dtype
  # Quadrature axes go last: (..., deg, 1) for z1 and (..., 1, deg) for z2,
  # with explicit leading ones (no implicit rank promotion).
  lead = (1,) * cov12.ndim
  z1 = jnp.asarray(nodes, dtype).reshape(lead + (deg, 1))
  z2 = jnp.asarray(nodes, dtype).reshape(lead + (1, deg))
  grid_weights = jnp.asarray(np.outer(weights, weights), dtype).reshape(
      lead + (deg, deg))

  cov12, var1, var2 = (x[..., None, None] for x in (cov12, var1, var2))
  has_var1 = var1 > 0
  std1 = jnp.sqrt(jnp.where(has_var1, var1, 1))
  # A zero-variance u is a.s. zero and then uncorrelated with v.
  slope = jnp.where(has_var1, cov12 / std1, 0)
  residual = jnp.where(has_var1, var2 - slope**2, var2)
  residual_std = jnp.sqrt(jnp.maximum(residual, 0))
  u = jnp.where(has_var1, std1, 0) * z1
  v = slope * z1 + residual_std * z2
  return jnp.sum(f(u) * g(v) * grid_weights, axis=(-2, -1))
