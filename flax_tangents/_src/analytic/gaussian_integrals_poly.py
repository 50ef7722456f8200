"""Gaussian expectations of polynomial and rectified-monomial nonlinearities.

Arguments are `(cov12, var1, var2)` as in `gaussian_integrals`. Polynomials
use the expansion of `E[phi(u) phi(v)]` in powers of the covariance (from
Price's theorem, `d^l/d cov12^l E[phi(u) phi(v)] = E[phi^(l)(u) phi^(l)(v)]`):

  `E[phi(u) phi(v)] = sum_l cov12^l / l! * E[phi^(l)(u)] E[phi^(l)(v)]`,

whose terms at `cov12 = 0` factorize over independent `u`, `v`. For a
polynomial the sum is finite and each `E[phi^(l)(u)]` is a polynomial in the
variance, so the kernel is a polynomial in `cov12, var1, var2`: no square
roots, exact at zero variance and at equal inputs.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "hermite_d_nngp",
    "hermite_nngp",
    "polynomial_d_nngp",
    "polynomial_nngp",
    "rectified_monomial_d_nngp",
    "rectified_monomial_nngp",
]


def _horner(coefficients: Sequence[float], x: jax.Array) -> jax.Array:
  """`sum_i coefficients[i] x^i`, with Python-float coefficients."""
  result = jnp.zeros_like(x)
  for coefficient in reversed(coefficients):
    result = result * x + coefficient
  return result


def _derivative_means(coef: Sequence[float], order: int,
                      var: jax.Array) -> jax.Array:
  """`E[p^(order)(u)]` for `u ~ N(0, var)`, `p(x) = sum_k coef[k] x^k`.

  `p^(l)(x) = sum_k coef[k] k! / (k - l)! x^(k - l)` and
  `E[u^(2i)] = (2i)! / (2^i i!) var^i` (odd moments vanish), so the mean is
  `sum_i coef[l + 2i] (l + 2i)! / (2^i i!) var^i`.
  """
  in_var = [
      float(coef[order + 2 * i]) * math.factorial(order + 2 * i) /
      (2**i * math.factorial(i))
      for i in range((len(coef) - 1 - order) // 2 + 1)
  ]
  return _horner(in_var, var)


def _covariance_series(coef: Sequence[float], cov12, var1, var2,
                       first_order: int) -> jax.Array:
  """`sum_{l >= first_order} cov12^(l - first_order) / (l - first_order)!
  E[p^(l)(u)] E[p^(l)(v)]`: the kernel (`first_order=0`) or its
  `first_order`-th derivative in `cov12`."""
  cov12, var1, var2 = jnp.broadcast_arrays(cov12, var1, var2)
  total = jnp.zeros_like(cov12)
  for order in range(len(coef) - 1, first_order - 1, -1):
    # Horner in cov12, highest order first.
    term = (_derivative_means(coef, order, var1) *
            _derivative_means(coef, order, var2)) / math.factorial(
                order - first_order)
    total = total * cov12 + term
  return total


def polynomial_nngp(cov12, var1, var2, coef: Sequence[float]) -> jax.Array:
  """`E[p(u) p(v)]` for `p(x) = coef[0] + coef[1] x + ... + coef[n] x^n`."""
  if not len(coef):
    return jnp.zeros_like(jnp.broadcast_arrays(cov12, var1, var2)[0])
  return _covariance_series(coef, cov12, var1, var2, 0)


def polynomial_d_nngp(cov12, var1, var2, coef: Sequence[float]) -> jax.Array:
  """`E[p'(u) p'(v)] = d polynomial_nngp / d cov12`."""
  if len(coef) < 2:
    return jnp.zeros_like(jnp.broadcast_arrays(cov12, var1, var2)[0])
  return _covariance_series(coef, cov12, var1, var2, 1)


def _rectified_series(cov12, var1, var2, degree: int) -> jax.Array:
  """`2 pi E[u_+^n v_+^n]` for `n = degree`, where `x_+^n = (x >= 0) x^n`.

  Cho and Saul's (2009) arc-cosine kernel `(var1 var2)^(n/2) J_n(theta)`.
  Scaling `J_n` by `(var1 var2)^(n/2)` turns its three-term recurrence
  `J_n = (2n - 1) cos(theta) J_(n-1) + (n - 1)^2 sin(theta)^2 J_(n-2)` into
  `L_n = (2n - 1) cov12 L_(n-1) + (n - 1)^2 Delta L_(n-2)`, with
  `Delta = var1 var2 - cov12^2`, `L_0 = pi - theta`,
  `L_1 = sqrt(Delta) + (pi - theta) cov12`: no division by `sin(theta)`, so
  equal inputs (`theta = 0`) are exact.
  """
  delta = var1 * var2 - cov12**2
  positive = delta > 0
  sin_term = jnp.where(positive, jnp.sqrt(jnp.where(positive, delta, 1)), 0)
  complement = np.pi - jnp.arctan2(sin_term, cov12)
  previous, current = complement, sin_term + complement * cov12
  if degree == 0:
    return previous
  for n in range(2, degree + 1):
    previous, current = current, ((2 * n - 1) * cov12 * current +
                                  (n - 1)**2 * delta * previous)
  return current


def rectified_monomial_nngp(cov12, var1, var2, degree: int) -> jax.Array:
  """`E[phi(u) phi(v)]` for `phi(x) = (x >= 0) x^degree`.

  At `var1 = var2 = cov12 = v` it is `(2n - 1)!! v^n / 2`.
  """
  cov12, var1, var2 = jnp.broadcast_arrays(cov12, var1, var2)
  return _rectified_series(cov12, var1, var2, degree) / (2 * np.pi)


def rectified_monomial_d_nngp(cov12, var1, var2, degree: int) -> jax.Array:
  """`E[phi'(u) phi'(v)]` for `phi(x) = (x >= 0) x^degree`.

  `phi' = degree (x >= 0) x^(degree - 1)`, so this is `degree^2` times the
  kernel of degree `degree - 1` (for `degree = 1`, the step function's).
  For `degree = 0` (a step) the derivative is zero almost everywhere, which
  is what autodiff of the finite network sees.
  """
  cov12, var1, var2 = jnp.broadcast_arrays(cov12, var1, var2)
  if degree == 0:
    return jnp.zeros_like(cov12)
  return degree**2 * rectified_monomial_nngp(cov12, var1, var2, degree - 1)


def hermite_nngp(cov12, var1, var2, degree: int) -> jax.Array:
  """`cov12^degree`: `E[h(u) h(v)]` for unit-variance inputs.

  `h = He_n / sqrt(n!)`, the normalized probabilists' Hermite polynomial, has
  `E[h(u) h(v)] = rho^n` for standard Gaussians with correlation `rho`
  (Mehler's formula). As in Neural Tangents the variances are taken to be 1,
  so `rho = cov12`; for other variances this is not `h`'s expectation.
  """
  cov12, _, _ = jnp.broadcast_arrays(cov12, var1, var2)
  return cov12**degree


def hermite_d_nngp(cov12, var1, var2, degree: int) -> jax.Array:
  """`degree cov12^(degree - 1)` (`h' = sqrt(n) h_(n-1)`), zero for degree 0.
  """
  cov12, _, _ = jnp.broadcast_arrays(cov12, var1, var2)
  if degree == 0:
    return jnp.zeros_like(cov12)
  return degree * cov12**(degree - 1)
