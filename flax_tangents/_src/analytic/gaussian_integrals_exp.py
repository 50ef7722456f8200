"""Gaussian expectations of exponential and trigonometric nonlinearities.

All of them follow from the moment generating (or characteristic) function of
a centred Gaussian pair `(u, v)` with covariance `Sigma`:
`E[exp(s u + t v)] = exp((s^2 var1 + 2 s t cov12 + t^2 var2) / 2)`, and, for
the Gaussian-shaped ones, `E[exp(-z^T A z)] = det(I + 2 A Sigma)^(-1/2)`.
Arguments are `(cov12, var1, var2)` as in `gaussian_integrals`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "exp_d_nngp",
    "exp_nngp",
    "exp_normalized_d_nngp",
    "exp_normalized_nngp",
    "gabor_d_nngp",
    "gabor_nngp",
    "gaussian_d_nngp",
    "gaussian_nngp",
    "rbf_d_nngp",
    "rbf_nngp",
    "sin_d_nngp",
    "sin_nngp",
]


def _sin_terms(cov12, var1, var2, b: float, c: float):
  """`(E[cos(b (u - v))], E[cos(b (u + v) + 2 c)])`.

  `u - v` and `u + v` are Gaussian with variances `var1 + var2 -+ 2 cov12`,
  and `E[cos(w + phase)] = cos(phase) exp(-Var(w) / 2)` for centred `w`.
  """
  half_sum = (var1 + var2) / 2
  difference_term = jnp.exp(b**2 * (cov12 - half_sum))
  # `math.cos` gives a Python float, which keeps float32 inputs float32.
  sum_term = math.cos(2 * c) * jnp.exp(-b**2 * (cov12 + half_sum))
  return difference_term, sum_term


def sin_nngp(cov12, var1, var2, a: float, b: float, c: float) -> jax.Array:
  """`E[phi(u) phi(v)]` for `phi(x) = a sin(b x + c)`.

  `sin(p) sin(q) = (cos(p - q) - cos(p + q)) / 2` gives
  `a^2 / 2 (exp(-b^2 (var1 + var2 - 2 cov12) / 2)
  - cos(2 c) exp(-b^2 (var1 + var2 + 2 cov12) / 2))`.
  """
  difference_term, sum_term = _sin_terms(cov12, var1, var2, b, c)
  return a**2 / 2 * (difference_term - sum_term)


def sin_d_nngp(cov12, var1, var2, a: float, b: float, c: float) -> jax.Array:
  """`E[phi'(u) phi'(v)]` for `phi(x) = a sin(b x + c)`.

  `phi' = a b cos(b x + c)`, and `cos(p) cos(q) = (cos(p - q) + cos(p + q))
  / 2`, so the two terms of `sin_nngp` add instead.
  """
  difference_term, sum_term = _sin_terms(cov12, var1, var2, b, c)
  return a**2 * b**2 / 2 * (difference_term + sum_term)


def rbf_nngp(cov12, var1, var2, gamma: float) -> jax.Array:
  """`exp(-gamma (var1 + var2 - 2 cov12))`, the squared-exponential kernel.

  It is `E[phi(u) phi(v)]` for `phi(x) = sqrt(2) sin(sqrt(2 gamma) x + pi/4)`
  (`sin_nngp` with `cos(2 c) = 0`), and equals `exp(-gamma |x - x'|^2 / d)`
  on inputs of dimension `d` after a `Dense` layer.
  """
  return jnp.exp(-gamma * (var1 + var2 - 2 * cov12))


def rbf_d_nngp(cov12, var1, var2, gamma: float) -> jax.Array:
  """`d rbf_nngp / d cov12 = 2 gamma rbf_nngp`."""
  return 2 * gamma * rbf_nngp(cov12, var1, var2, gamma)


def exp_nngp(cov12, var1, var2, a: float, b: float) -> jax.Array:
  """`E[phi(u) phi(v)] = a^2 exp(b^2 (var1 + var2 + 2 cov12) / 2)`.

  For `phi(x) = a exp(b x)`: `b (u + v)` has variance
  `b^2 (var1 + var2 + 2 cov12)`.
  """
  return a**2 * jnp.exp(b**2 * ((var1 + var2) / 2 + cov12))


def exp_d_nngp(cov12, var1, var2, a: float, b: float) -> jax.Array:
  """`E[phi'(u) phi'(v)] = b^2 exp_nngp`, since `phi' = b phi`."""
  return b**2 * exp_nngp(cov12, var1, var2, a, b)


def _gaussian_det(cov12, var1, var2, b: float):
  """`det(I - 2 b Sigma)`, which must be positive for the integral to exist."""
  return (1 - 2 * b * var1) * (1 - 2 * b * var2) - 4 * b**2 * cov12**2


def gaussian_nngp(cov12, var1, var2, a: float, b: float) -> jax.Array:
  """`E[phi(u) phi(v)] = a^2 / sqrt(det(I - 2 b Sigma))`.

  For `phi(x) = a exp(b x^2)` (finite when `b < 1 / (2 max(var))`).
  """
  return a**2 / jnp.sqrt(_gaussian_det(cov12, var1, var2, b))


def gaussian_d_nngp(cov12, var1, var2, a: float, b: float) -> jax.Array:
  """`d gaussian_nngp / d cov12 = 4 a^2 b^2 cov12 / det^(3/2)`."""
  det = _gaussian_det(cov12, var1, var2, b)
  return 4 * a**2 * b**2 * cov12 / det**1.5


# Floor of `var1 var2` before the square root, so zero-variance inputs give
# a zero (not NaN) correlation; the same floor as Neural Tangents uses.
_NORM_FLOOR = 1e-30


def _exp_normalized_terms(cov12, var1, var2, gamma: float, shift: float,
                          do_clip: bool):
  norm = jnp.sqrt(jnp.maximum(var1 * var2, _NORM_FLOOR))
  correlation = cov12 / norm
  if do_clip:
    correlation = jnp.clip(correlation, -1, 1)
  return norm, jnp.exp(gamma * (correlation + shift))


def exp_normalized_nngp(cov12, var1, var2, gamma: float, shift: float,
                        do_clip: bool) -> jax.Array:
  """`sqrt(var1 var2) exp(gamma (rho + shift))`, `rho` the correlation.

  The "Gaussian normalized kernel" of Shankar et al. (2020), defined by this
  map on covariances (it has no finite activation).
  """
  norm, exponential = _exp_normalized_terms(cov12, var1, var2, gamma, shift,
                                            do_clip)
  return norm * exponential


def exp_normalized_d_nngp(cov12, var1, var2, gamma: float, shift: float,
                          do_clip: bool) -> jax.Array:
  """`d exp_normalized_nngp / d cov12 = gamma exp(gamma (rho + shift))`."""
  _, exponential = _exp_normalized_terms(cov12, var1, var2, gamma, shift,
                                         do_clip)
  return gamma * exponential


def _gabor_terms(cov12, var1, var2):
  """Pieces of the Gabor integral.

  With `Sigma` the covariance and `t = (1, -+1)`,
  `E[exp(-u^2 - v^2) cos(t . (u, v))]
  = det(I + 2 Sigma)^(-1/2) exp(-t^T Sigma (I + 2 Sigma)^-1 t / 2)`,
  and `t^T Sigma adj(I + 2 Sigma) t = var1 + var2 + 4 Delta -+ 2 cov12`
  with `Delta = var1 var2 - cov12^2`.

  Returns:
    `(det, minus_exponent, plus_exponent)` where the exponents are the
    quadratic forms `var1 + var2 + 4 Delta -+ 2 cov12` (before `/(2 det)`).
  """
  var_sum = var1 + var2
  four_delta = 4 * (var1 * var2 - cov12**2)
  det = 1 + 2 * var_sum + four_delta
  return (det, var_sum + four_delta - 2 * cov12,
          var_sum + four_delta + 2 * cov12)


def gabor_nngp(cov12, var1, var2) -> jax.Array:
  """`E[phi(u) phi(v)]` for `phi(x) = exp(-x^2) sin(x)`.

  `sin(u) sin(v) = (cos(u - v) - cos(u + v)) / 2` and `_gabor_terms` give
  `(exp(-q_- / (2 det)) - exp(-q_+ / (2 det))) / (2 sqrt(det))`.
  """
  det, q_minus, q_plus = _gabor_terms(cov12, var1, var2)
  return (jnp.exp(-q_minus / (2 * det)) -
          jnp.exp(-q_plus / (2 * det))) / (2 * jnp.sqrt(det))


def gabor_d_nngp(cov12, var1, var2) -> jax.Array:
  """`d gabor_nngp / d cov12`, by the product and chain rules.

  `d det / d cov12 = -8 cov12`, `d q_-+ / d cov12 = -8 cov12 -+ 2`, so each
  exponent `g = -q / (2 det)` has
  `g' = -(q' det + 8 cov12 q) / (2 det^2)`, and
  `d (2 sqrt(det))^-1 / d cov12 = 2 cov12 det^(-3/2)`.
  """
  det, q_minus, q_plus = _gabor_terms(cov12, var1, var2)
  exp_minus = jnp.exp(-q_minus / (2 * det))
  exp_plus = jnp.exp(-q_plus / (2 * det))

  def exponent_slope(q, q_slope):
    return -(q_slope * det + 8 * cov12 * q) / (2 * det**2)

  slope_minus = exponent_slope(q_minus, -8 * cov12 - 2)
  slope_plus = exponent_slope(q_plus, -8 * cov12 + 2)
  return (2 * cov12 * (exp_minus - exp_plus) / det**1.5 +
          (exp_minus * slope_minus - exp_plus * slope_plus) /
          (2 * jnp.sqrt(det)))
