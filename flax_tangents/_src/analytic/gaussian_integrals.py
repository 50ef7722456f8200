"""Closed-form Gaussian expectations used by elementwise kernel rules.

Every function here takes `(cov12, var1, var2)`: the covariance and variances
of a centred bivariate Gaussian `(u, v)`, broadcast against each other, and
returns an expectation such as `E[phi(u) phi(v)]` elementwise. They are
written once and shared by all activation rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "abrelu_d_nngp",
    "abrelu_nngp",
    "erf_d_nngp",
    "erf_nngp",
    "gelu_d_nngp",
    "gelu_nngp",
    "safe_sqrt",
    "sign_d_nngp",
    "sign_nngp",
]


@jax.custom_jvp
def safe_sqrt(x: jax.Array) -> jax.Array:
  """`sqrt(max(x, 0))` with a finite (zero) derivative where `x <= 0`.

  The custom derivative keeps the forward pass a single `sqrt` (this sits in
  the inner loop of every arc-cosine kernel) while `x = 0`, reached on the
  diagonal of `x1 == x2` kernels, has no infinite gradient.
  """
  return jnp.sqrt(jnp.maximum(x, 0))


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = safe_sqrt(x)
  positive = y > 0
  return y, jnp.where(positive, dx / (2 * jnp.where(positive, y, 1)), 0)


def _arc_cosine_terms(cov12, var1, var2):
  """`(sqrt(var1 var2 - cov12^2), theta)` with `cos(theta)` the correlation.

  Computed without dividing by the variances, so zero variances and exactly
  equal inputs (`theta = 0`) are handled, with finite gradients.
  """
  sin_term = safe_sqrt(var1 * var2 - cov12**2)
  theta = jnp.arctan2(sin_term, cov12)
  return sin_term, theta


def abrelu_nngp(cov12, var1, var2, a: float, b: float) -> jax.Array:
  """`E[phi(u) phi(v)]` for `phi(x) = a min(x, 0) + b max(x, 0)`.

  The arc-cosine kernel of degree 1 (Cho and Saul, 2009), generalized:
  `((a - b)^2 (sqrt(var1 var2 - cov12^2) - theta cov12)
  + pi (a^2 + b^2) cov12) / (2 pi)`.
  """
  sin_term, theta = _arc_cosine_terms(cov12, var1, var2)
  return ((a - b)**2 * (sin_term - theta * cov12) +
          np.pi * (a**2 + b**2) * cov12) / (2 * np.pi)


def abrelu_d_nngp(cov12, var1, var2, a: float, b: float) -> jax.Array:
  """`E[phi'(u) phi'(v)]` for the same `phi` (arc-cosine kernel of degree 0)."""
  _, theta = _arc_cosine_terms(cov12, var1, var2)
  return (np.pi * (a**2 + b**2) - (a - b)**2 * theta) / (2 * np.pi)


def _erf_scaled(cov12, var1, var2, b: float):
  return (1 + 2 * b**2 * var1) * (1 + 2 * b**2 * var2)


def erf_nngp(cov12, var1, var2, a: float, b: float, c: float) -> jax.Array:
  """`E[phi(u) phi(v)]` for `phi(x) = a erf(b x) + c` (Williams, 1997)."""
  prod = _erf_scaled(cov12, var1, var2, b)
  return a**2 * (2 / np.pi) * jnp.arcsin(
      2 * b**2 * cov12 / jnp.sqrt(prod)) + c**2


def erf_d_nngp(cov12, var1, var2, a: float, b: float, c: float) -> jax.Array:
  """`E[phi'(u) phi'(v)]` for `phi(x) = a erf(b x) + c`."""
  del c
  # (1 + 2b^2 v1)(1 + 2b^2 v2) - 4 b^4 c^2, expanded so that nothing cancels
  # at large variances (where the product form loses every digit); the
  # Gram determinant v1 v2 - c^2 is >= 0 up to rounding.
  gram = jnp.maximum(var1 * var2 - cov12**2, 0)
  det = 1 + 2 * b**2 * (var1 + var2) + 4 * b**4 * gram
  return a**2 * (4 * b**2 / np.pi) / jnp.sqrt(det)


def sign_nngp(cov12, var1, var2) -> jax.Array:
  """`E[sign(u) sign(v)] = 1 - 2 theta / pi` (the arcsine law).

  `theta` is the angle between `u` and `v`. Where either variance is zero
  that input is a.s. zero, and so is the expectation.
  """
  _, theta = _arc_cosine_terms(cov12, var1, var2)
  return jnp.where(var1 * var2 > 0, 1 - 2 * theta / np.pi, 0)


def sign_d_nngp(cov12, var1, var2) -> jax.Array:
  """Zero: `sign` has zero derivative almost everywhere.

  This is what gradient descent sees in a finite network (autodiff of `sign`
  is zero), so the NTK contribution of the layers below a `Sign` vanishes;
  the distributional derivative (a delta at 0) would not match it.
  """
  cov12, _, _ = jnp.broadcast_arrays(cov12, var1, var2)
  return jnp.zeros_like(cov12)


def _gelu_terms(cov12, var1, var2):
  """`(P, delta, theta)`: `P = (1 + var1)(1 + var2)`, `delta^2 = P - cov12^2`.

  `theta = arcsin(cov12 / sqrt(P))`. `delta > 0` for any valid covariance
  since `cov12^2 <= var1 var2 < P`, so nothing here needs a guard.
  """
  shifted_prod = (1 + var1) * (1 + var2)
  delta = jnp.sqrt(shifted_prod - cov12**2)
  return shifted_prod, delta, jnp.arctan2(cov12, delta)


def gelu_nngp(cov12, var1, var2) -> jax.Array:
  """`E[phi(u) phi(v)]` for the exact GELU `phi(x) = x Phi(x)`.

  Tsuchida et al. (2021): with `P = (1 + var1)(1 + var2)`,
  `delta = sqrt(P - cov12^2)`, `theta = arcsin(cov12 / sqrt(P))`,
  `cov12 / 4 + (cov12 theta + (cov12^2 + var1 var2 delta^2) / (P delta))
  / (2 pi)`. At `cov12 = 0` it factorizes into `E[u Phi(u)] E[v Phi(v)]`.
  """
  shifted_prod, delta, theta = _gelu_terms(cov12, var1, var2)
  ratio = (cov12**2 + var1 * var2 * delta**2) / (shifted_prod * delta)
  return cov12 / 4 + (cov12 * theta + ratio) / (2 * np.pi)


def gelu_d_nngp(cov12, var1, var2) -> jax.Array:
  """`E[phi'(u) phi'(v)]` for the exact GELU: `d gelu_nngp / d cov12`.

  Differentiating `gelu_nngp` term by term (`d theta / d cov12 = 1 / delta`,
  `d delta / d cov12 = -cov12 / delta`) gives
  `1/4 + (theta + cov12 / delta (1 + 1 / delta^2 + (1 - var1 var2) / P))
  / (2 pi)`.
  """
  shifted_prod, delta, theta = _gelu_terms(cov12, var1, var2)
  bracket = 1 + 1 / delta**2 + (1 - var1 * var2) / shifted_prod
  return 0.25 + (theta + cov12 / delta * bracket) / (2 * np.pi)
