"""Piecewise-linear nonlinearities: the ReLU family (arc-cosine kernels)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import gaussian_integrals as gi
from flax_tangents._src.analytic.elementwise import elementwise_kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents.kernel import Kernel
from flax_tangents.nn.elementwise import ElementwiseBase

__all__ = ["ABRelu", "Abs", "LeakyRelu", "Relu"]


def _arc_cosine_fns(a: float, b: float):
  return (functools.partial(gi.abrelu_nngp, a=a, b=b),
          functools.partial(gi.abrelu_d_nngp, a=a, b=b))


def _scale_covariances(kernel: Kernel, factor: jax.Array) -> Kernel:
  scale = lambda x: None if x is None else x * factor
  return kernel.replace(nngp=scale(kernel.nngp), cov1=scale(kernel.cov1),
                        cov2=scale(kernel.cov2))


def _relu_family_rule(module: ElementwiseBase, kernel: Kernel,
                      **kwargs: Any) -> Kernel:
  """The arc-cosine rule, optionally on covariances rescaled to O(1).

  The arc-cosine kernel is positively homogeneous of degree 1 in
  `(cov12, var1, var2)` and its derivative of degree 0, so dividing the
  covariances by `max |nngp|` and multiplying the result back changes
  nothing mathematically; it keeps very deep networks, whose covariances
  grow or shrink geometrically, inside the floating-point range (NT's
  `do_stabilize`).
  """
  del kwargs
  nngp_fn, d_nngp_fn = module.kernel_fns()
  layer = type(module).__name__
  if not module.do_stabilize:
    return elementwise_kernel(kernel, nngp_fn, d_nngp_fn, layer)
  factor = jnp.maximum(jnp.max(jnp.abs(kernel.nngp)), 1e-12)
  out = elementwise_kernel(_scale_covariances(kernel, 1 / factor), nngp_fn,
                           d_nngp_fn, layer)
  return _scale_covariances(out, factor)


@kernel_rule(_relu_family_rule)
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
    return _arc_cosine_fns(self.a, self.b)


@kernel_rule(_relu_family_rule)
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
    return _arc_cosine_fns(0.0, 1.0)


@kernel_rule(_relu_family_rule)
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
    return _arc_cosine_fns(self.alpha, 1.0)


@kernel_rule(_relu_family_rule)
class Abs(ElementwiseBase):
  """`|x|`.

  Attributes:
    do_stabilize: as for `ABRelu`.
  """

  do_stabilize: bool = False

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.abs(x)

  def kernel_fns(self):
    return _arc_cosine_fns(-1.0, 1.0)
