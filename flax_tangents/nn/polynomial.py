"""Polynomial nonlinearities: monomials, polynomials, Hermite polynomials,
and rectified monomials (the arc-cosine kernels of higher degree)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import gaussian_integrals_poly as gi_poly
from flax_tangents.nn.elementwise import ElementwiseBase

__all__ = ["Hermite", "Monomial", "Polynomial", "RectifiedMonomial"]


def _check_degree(layer: str, degree: int) -> None:
  if not isinstance(degree, int) or isinstance(degree, bool) or degree < 0:
    raise ValueError(
        f"{layer}: `degree` must be a non-negative integer, got {degree!r}.")


def _polynomial_fns(coef: Sequence[float]):
  coef = tuple(float(c) for c in coef)
  return (functools.partial(gi_poly.polynomial_nngp, coef=coef),
          functools.partial(gi_poly.polynomial_d_nngp, coef=coef))


class Polynomial(ElementwiseBase):
  """`coef[0] + coef[1] * x + ... + coef[n] * x**n`.

  Coefficients are in increasing order of degree, as in
  `numpy.polynomial.Polynomial`. The kernel is exact for any variances (a
  polynomial in the covariance and the variances).

  Attributes:
    coef: the coefficients, constant term first.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Polynomial(coef=(1.0, 0.0, 2.0)).apply({}, jnp.array([3.0]))
  Array([19.], dtype=float...)
  """

  coef: Sequence[float]

  def activation(self, x: jax.Array) -> jax.Array:
    result = jnp.zeros_like(x)
    for coefficient in reversed(tuple(self.coef)):  # Horner
      result = result * x + coefficient
    return result

  def kernel_fns(self):
    return _polynomial_fns(self.coef)


class Monomial(ElementwiseBase):
  """`x**degree`.

  Neural Tangents allows degrees 0 to 5; any non-negative degree works here
  (the kernel is a polynomial, given by Isserlis' theorem).

  Attributes:
    degree: a non-negative integer.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Monomial(degree=3).apply({}, jnp.array([2.0]))
  Array([8.], dtype=float...)
  """

  degree: int

  def __post_init__(self):
    _check_degree("Monomial", self.degree)
    super().__post_init__()

  def activation(self, x: jax.Array) -> jax.Array:
    return x**self.degree

  def kernel_fns(self):
    return _polynomial_fns((0.0,) * self.degree + (1.0,))


class RectifiedMonomial(ElementwiseBase):
  """`x**degree` for `x >= 0`, zero otherwise.

  The kernel is Cho and Saul's arc-cosine kernel of order `degree` (degree
  1 is `Relu`; degree 0 a step function, whose NTK contribution is zero).

  Attributes:
    degree: a non-negative integer.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.RectifiedMonomial(degree=2).apply({}, jnp.array([-1.0, 3.0]))
  Array([0., 9.], dtype=float...)
  """

  degree: int

  def __post_init__(self):
    _check_degree("RectifiedMonomial", self.degree)
    super().__post_init__()

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.where(x >= 0, x**self.degree, 0)

  def kernel_fns(self):
    return (functools.partial(gi_poly.rectified_monomial_nngp,
                              degree=self.degree),
            functools.partial(gi_poly.rectified_monomial_d_nngp,
                              degree=self.degree))


class Hermite(ElementwiseBase):
  """The normalized Hermite polynomial `He_degree(x) / sqrt(degree!)`.

  As in Neural Tangents, inputs are assumed to have unit variance
  (`var1 = var2 = 1`, e.g. a `Dense` layer with `W_std=1` and no bias on
  inputs with `|x|^2 = d`); the kernel is then `cov12**degree` (Mehler's
  formula), and this is the kernel used whatever the variances are. For
  other variances it is not the finite network's limit; use
  `Polynomial` with the Hermite coefficients for the exact kernel.

  Attributes:
    degree: a non-negative integer.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> h2 = ftn.Hermite(degree=2).apply({}, jnp.array([1.0, 3.0]))
  >>> h2 * jnp.sqrt(2.0)  # He_2(x) = x^2 - 1
  Array([0., 8.], dtype=float...)
  """

  degree: int

  def __post_init__(self):
    _check_degree("Hermite", self.degree)
    super().__post_init__()

  def activation(self, x: jax.Array) -> jax.Array:
    # Three-term recurrence of h_k = He_k / sqrt(k!):
    # h_(k+1) = (x h_k - sqrt(k) h_(k-1)) / sqrt(k + 1).
    previous, current = jnp.zeros_like(x), jnp.ones_like(x)
    for k in range(self.degree):
      previous, current = current, (x * current -
                                    math.sqrt(k) * previous) / math.sqrt(k + 1)
    return current

  def kernel_fns(self):
    return (functools.partial(gi_poly.hermite_nngp, degree=self.degree),
            functools.partial(gi_poly.hermite_d_nngp, degree=self.degree))
