"""Piecewise-linear nonlinearities: the ReLU family (arc-cosine kernels)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import gaussian_integrals as gi
from flax_tangents.nn.elementwise import ElementwiseBase

__all__ = ["ABRelu", "Abs", "LeakyRelu", "Relu"]


def _arc_cosine_fns(a: float, b: float):
  return (functools.partial(gi.abrelu_nngp, a=a, b=b),
          functools.partial(gi.abrelu_d_nngp, a=a, b=b))


class ABRelu(ElementwiseBase):
  """`a * min(x, 0) + b * max(x, 0)`, with its arc-cosine kernel.

  Attributes:
    a: slope for negative inputs.
    b: slope for positive inputs.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.ABRelu(a=-0.5, b=2.0).apply({}, jnp.array([-2.0, 3.0]))
  Array([1., 6.], dtype=float...)
  """

  a: float
  b: float

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.where(x > 0, self.b * x, self.a * x)

  def kernel_fns(self):
    return _arc_cosine_fns(self.a, self.b)


class Relu(ElementwiseBase):
  """`max(x, 0)`.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Relu().apply({}, jnp.array([-1.0, 2.0]))
  Array([0., 2.], dtype=float...)
  """

  def activation(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)

  def kernel_fns(self):
    return _arc_cosine_fns(0.0, 1.0)


class LeakyRelu(ElementwiseBase):
  """`x` for positive inputs, `alpha * x` otherwise.

  Attributes:
    alpha: slope for negative inputs.
  """

  alpha: float

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.where(x > 0, x, self.alpha * x)

  def kernel_fns(self):
    return _arc_cosine_fns(self.alpha, 1.0)


class Abs(ElementwiseBase):
  """`|x|`."""

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.abs(x)

  def kernel_fns(self):
    return _arc_cosine_fns(-1.0, 1.0)
