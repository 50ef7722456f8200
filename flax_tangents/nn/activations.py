"""Smooth nonlinearities with closed-form Gaussian kernels."""

from __future__ import annotations

import functools

import jax

from flax_tangents._src.analytic import gaussian_integrals as gi
from flax_tangents.nn.elementwise import ElementwiseBase

__all__ = ["Erf"]


class Erf(ElementwiseBase):
  """`a * erf(b * x) + c`.

  Attributes:
    a: output scale.
    b: input scale.
    c: output shift.

  >>>   >>> from flax_tangents import nn as ftn
  >>> ftn.Erf().apply({}, jnp.array([0.0]))
  Array([0.], dtype=float...)
  """

  a: float = 1.0
  b: float = 1.0
  c: float = 0.0

  def activation(self, x: jax.Array) -> jax.Array:
    return self.a * jax.scipy.special.erf(self.b * x) + self.c

  def kernel_fns(self):
    params = dict(a=self.a, b=self.b, c=self.c)
    return (functools.partial(gi.erf_nngp, **params),
            functools.partial(gi.erf_d_nngp, **params))
