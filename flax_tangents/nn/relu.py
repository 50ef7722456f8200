"""Piecewise-linear nonlinearities: the ReLU family (arc-cosine kernels)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import gaussian_integrals as gi
from flax_tangents._src.analytic.elementwise import GaussianExpectation
from flax_tangents.nn.elementwise import ElementwiseBase

__all__ = ["ABRelu", "Abs", "LeakyRelu", "Relu"]


def _rescaled(fn: GaussianExpectation, degree: int) -> GaussianExpectation:
  """`fn` evaluated on arguments divided by their largest magnitude.

  The arc-cosine kernel is positively homogeneous of degree 1 in
  `(cov12, var1, var2)` and its derivative of degree 0, so
  `s**degree * fn(cov12 / s, var1 / s, var2 / s)` is `fn` itself; with `s`
  the largest variance it keeps very deep networks, whose covariances grow
  or shrink geometrically, inside the floating-point range (NT's
  `do_stabilize`, which divides by `max |nngp|`).
  """

  def stable_fn(cov12, var1, var2):
    scale = jnp.maximum(jnp.maximum(jnp.max(var1), jnp.max(var2)),
                        jnp.max(jnp.abs(cov12)))
    scale = jnp.maximum(scale, jnp.finfo(jnp.result_type(cov12)).tiny)
    out = fn(cov12 / scale, var1 / scale, var2 / scale)
    return out * scale if degree == 1 else out

  return stable_fn


def _arc_cosine_fns(a: float, b: float, do_stabilize: bool = False):
  nngp_fn = functools.partial(gi.abrelu_nngp, a=a, b=b)
  d_nngp_fn = functools.partial(gi.abrelu_d_nngp, a=a, b=b)
  if not do_stabilize:
    return nngp_fn, d_nngp_fn
  return _rescaled(nngp_fn, 1), _rescaled(d_nngp_fn, 0)


class ABRelu(ElementwiseBase):
  """`a * min(x, 0) + b * max(x, 0)`, with its arc-cosine kernel.

  Attributes:
    a: slope for negative inputs.
    b: slope for positive inputs.
    do_stabilize: compute the kernel on covariances divided by their
      largest magnitude, then scale back (as NT): the same result, safe from
      overflow and underflow in very deep networks. The finite layer is
      unaffected.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.ABRelu(a=-0.5, b=2.0).apply({}, jnp.array([-2.0, 3.0]))
  Array([1., 6.], dtype=float...)
  """

  a: float
  b: float
  do_stabilize: bool = False

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.where(x > 0, self.b * x, self.a * x)

  def kernel_fns(self):
    return _arc_cosine_fns(self.a, self.b, self.do_stabilize)


class Relu(ElementwiseBase):
  """`max(x, 0)`.

  Attributes:
    do_stabilize: as for `ABRelu`.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Relu().apply({}, jnp.array([-1.0, 2.0]))
  Array([0., 2.], dtype=float...)
  """

  do_stabilize: bool = False

  def activation(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)

  def kernel_fns(self):
    return _arc_cosine_fns(0.0, 1.0, self.do_stabilize)


class LeakyRelu(ElementwiseBase):
  """`x` for positive inputs, `alpha * x` otherwise.

  Attributes:
    alpha: slope for negative inputs.
    do_stabilize: as for `ABRelu`.
  """

  alpha: float
  do_stabilize: bool = False

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.where(x > 0, x, self.alpha * x)

  def kernel_fns(self):
    return _arc_cosine_fns(self.alpha, 1.0, self.do_stabilize)


class Abs(ElementwiseBase):
  """`|x|`.

  Attributes:
    do_stabilize: as for `ABRelu`.
  """

  do_stabilize: bool = False

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.abs(x)

  def kernel_fns(self):
    return _arc_cosine_fns(-1.0, 1.0, self.do_stabilize)
