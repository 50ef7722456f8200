"""Oscillating nonlinearities: sine, cosine, the RBF dual activation, Gabor."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import gaussian_integrals_exp as gi_exp
from flax_tangents.nn.elementwise import ElementwiseBase

__all__ = ["Cos", "Gabor", "Rbf", "Sin"]


def _sinusoid_fns(a: float, b: float, phase: float):
  params = dict(a=a, b=b, c=phase)
  return (functools.partial(gi_exp.sin_nngp, **params),
          functools.partial(gi_exp.sin_d_nngp, **params))


class Sin(ElementwiseBase):
  """`a * sin(b * x + c)`.

  Attributes:
    a: output scale.
    b: input scale.
    c: input phase shift.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Sin(a=2.0).apply({}, jnp.array([0.0, jnp.pi / 2]))
  Array([0., 2.], dtype=float...)
  """

  a: float = 1.0
  b: float = 1.0
  c: float = 0.0

  def activation(self, x: jax.Array) -> jax.Array:
    return self.a * jnp.sin(self.b * x + self.c)

  def kernel_fns(self):
    return _sinusoid_fns(self.a, self.b, self.c)


class Cos(ElementwiseBase):
  """`a * cos(b * x + c)`, i.e. `Sin` with phase `c + pi / 2`.

  Attributes:
    a: output scale.
    b: input scale.
    c: input phase shift.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Cos().apply({}, jnp.array([0.0]))
  Array([1.], dtype=float...)
  """

  a: float = 1.0
  b: float = 1.0
  c: float = 0.0

  def activation(self, x: jax.Array) -> jax.Array:
    return self.a * jnp.cos(self.b * x + self.c)

  def kernel_fns(self):
    return _sinusoid_fns(self.a, self.b, self.c + math.pi / 2)


class Rbf(ElementwiseBase):
  """The dual activation of the squared-exponential (RBF) kernel.

  The finite activation is `sqrt(2) * sin(sqrt(2 * gamma) * x + pi / 4)`;
  its kernel is `exp(-gamma * (var1 + var2 - 2 * cov12))`, which after a
  `Dense` layer on inputs of dimension `d` is `exp(-gamma |x - x'|^2 / d)`.

  Attributes:
    gamma: inverse squared length scale, `gamma = 1 / (2 l^2)`.

  >>> import jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> model = nn.Sequential([ftn.Dense(4), ftn.Rbf(gamma=0.5)])
  >>> x = jnp.array([[1., 0.], [0., 1.]])  # |x - x'|^2 / d = 1
  >>> ft.kernel_fn(model)(x, get='nngp')
  Array([[1.        , 0.60653066],
         [0.60653066, 1.        ]], dtype=float...)
  """

  gamma: float = 1.0

  def activation(self, x: jax.Array) -> jax.Array:
    return math.sqrt(2) * jnp.sin(math.sqrt(2 * self.gamma) * x + math.pi / 4)

  def kernel_fns(self):
    return (functools.partial(gi_exp.rbf_nngp, gamma=self.gamma),
            functools.partial(gi_exp.rbf_d_nngp, gamma=self.gamma))


class Gabor(ElementwiseBase):
  """The Gabor function `exp(-x**2) * sin(x)`.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Gabor().apply({}, jnp.array([0.0]))
  Array([0.], dtype=float...)
  """

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.exp(-x**2) * jnp.sin(x)

  def kernel_fns(self):
    return gi_exp.gabor_nngp, gi_exp.gabor_d_nngp
