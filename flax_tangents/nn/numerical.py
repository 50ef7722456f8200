"""Any nonlinearity, with its kernel by Gauss-Hermite quadrature."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic.gaussian_quadrature import (
  gauss_hermite_expectation,
)
from flax_tangents.nn.elementwise import ElementwiseBase

__all__ = ["ElementwiseNumerical"]

ScalarFn = Callable[[jax.Array], jax.Array]


def _product_expectation(fn: ScalarFn, deg: int, cov12, var1, var2):
  return gauss_hermite_expectation(fn, fn, cov12, var1, var2, deg)


class ElementwiseNumerical(ElementwiseBase):
  """A nonlinearity whose kernel is computed by Gauss-Hermite quadrature.

  `E[fn(u) fn(v)]` and `E[fn'(u) fn'(v)]` are evaluated on a `deg x deg`
  grid of nodes (cost and memory grow as `deg**2` times the kernel's size).
  Polynomials of degree `< deg` are integrated exactly and smooth functions
  converge fast (`deg=25` is a good start); functions with kinks (ReLU,
  Abs) converge slowly, so prefer their closed-form layers.

  Attributes:
    fn: the scalar activation, applied elementwise.
    deg: number of quadrature nodes per dimension (at least 1).
    df: the derivative of `fn`; by default `jax.grad(fn)`, vectorized.

  >>> import jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> square = ftn.ElementwiseNumerical(fn=lambda x: x**2, deg=3)
  >>> model = nn.Sequential([ftn.Dense(4), square])
  >>> ft.kernel_fn(model)(jnp.array([[1., 1.]]), get='nngp')  # E[u^4] = 3
  Array([[3.]], dtype=float...)
  """

  fn: ScalarFn
  deg: int
  df: Optional[ScalarFn] = None

  def __post_init__(self):
    if not isinstance(self.deg, int) or self.deg < 1:
      raise ValueError(
          f"ElementwiseNumerical: `deg` must be a positive integer, got "
          f"{self.deg!r}.")
    super().__post_init__()

  def activation(self, x: jax.Array) -> jax.Array:
    return self.fn(x)

  def kernel_fns(self):
    derivative = self.df
    if derivative is None:
      derivative = jnp.vectorize(jax.grad(self.fn))
    return (functools.partial(_product_expectation, self.fn, self.deg),
            functools.partial(_product_expectation, derivative, self.deg))
