"""Nonlinearities with closed-form Gaussian kernels: erf, GELU, exponentials.

Trigonometric ones are in `activations_trig`, polynomial ones in
`polynomial`, and quadrature-based ones in `numerical`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import gaussian_integrals as gi
from flax_tangents._src.analytic import gaussian_integrals_exp as gi_exp
from flax_tangents.nn.elementwise import ElementwiseBase

__all__ = [
    "Erf",
    "Exp",
    "ExpNormalized",
    "Gaussian",
    "Gelu",
    "Sigmoid_like",
    "Sign",
]


class Erf(ElementwiseBase):
  """`a * erf(b * x) + c`.

  Attributes:
    a: output scale.
    b: input scale.
    c: output shift.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
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


# Input scale of `Sigmoid_like`: `0.5 erf(x / s) + 0.5` with this `s` is the
# least-squares fit of the logistic sigmoid on [-5, 5] (Neural Tangents'
# choice, kept so that kernels agree).
_SIGMOID_LIKE_SCALE = 2.4020563531719796


class Sigmoid_like(ElementwiseBase):  # pylint: disable=invalid-name  (NT name)
  """A sigmoid made of erf: `0.5 * erf(x / 2.4020563531719796) + 0.5`.

  Close to the logistic sigmoid (the constant minimizes the squared error on
  `[-5, 5]`) and, unlike it, with a closed-form kernel (that of `Erf`).

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Sigmoid_like().apply({}, jnp.array([0.0]))
  Array([0.5], dtype=float...)
  """

  def activation(self, x: jax.Array) -> jax.Array:
    return 0.5 * jax.scipy.special.erf(x / _SIGMOID_LIKE_SCALE) + 0.5

  def kernel_fns(self):
    params = dict(a=0.5, b=1 / _SIGMOID_LIKE_SCALE, c=0.5)
    return (functools.partial(gi.erf_nngp, **params),
            functools.partial(gi.erf_d_nngp, **params))


class Gelu(ElementwiseBase):
  """The Gaussian error linear unit `x * Phi(x)`, `Phi` the normal CDF.

  The kernel is always that of the exact GELU; `approximate` only selects the
  tanh approximation in the finite forward pass (as `jax.nn.gelu` does).

  Attributes:
    approximate: use the tanh approximation in the finite network.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Gelu().apply({}, jnp.array([0.0, 10.0]))
  Array([ 0., 10.], dtype=float...)
  """

  approximate: bool = False

  def activation(self, x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=self.approximate)

  def kernel_fns(self):
    return gi.gelu_nngp, gi.gelu_d_nngp


class Sign(ElementwiseBase):
  """`sign(x)`, with the arcsine-law kernel `1 - 2 theta / pi`.

  Its derivative is zero almost everywhere, so (as for a finite network
  trained by gradient descent) layers below a `Sign` contribute nothing to
  the NTK.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Sign().apply({}, jnp.array([-2.0, 0.0, 3.0]))
  Array([-1.,  0.,  1.], dtype=float...)
  """

  def activation(self, x: jax.Array) -> jax.Array:
    return jnp.sign(x)

  def kernel_fns(self):
    return gi.sign_nngp, gi.sign_d_nngp


class Exp(ElementwiseBase):
  """`a * exp(b * x)`.

  Attributes:
    a: output scale.
    b: input scale.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Exp(a=2.0).apply({}, jnp.array([0.0]))
  Array([2.], dtype=float...)
  """

  a: float = 1.0
  b: float = 1.0

  def activation(self, x: jax.Array) -> jax.Array:
    return self.a * jnp.exp(self.b * x)

  def kernel_fns(self):
    params = dict(a=self.a, b=self.b)
    return (functools.partial(gi_exp.exp_nngp, **params),
            functools.partial(gi_exp.exp_d_nngp, **params))


class Gaussian(ElementwiseBase):
  """`a * exp(b * x**2)` (a bell for `b < 0`).

  The kernel is finite only where `1 - 2 b var > 0` for the input variances,
  so always for the default `b = -1`.

  Attributes:
    a: output scale.
    b: coefficient of `x**2` in the exponent.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.Gaussian().apply({}, jnp.array([0.0]))
  Array([1.], dtype=float...)
  """

  a: float = 1.0
  b: float = -1.0

  def activation(self, x: jax.Array) -> jax.Array:
    return self.a * jnp.exp(self.b * x**2)

  def kernel_fns(self):
    params = dict(a=self.a, b=self.b)
    return (functools.partial(gi_exp.gaussian_nngp, **params),
            functools.partial(gi_exp.gaussian_d_nngp, **params))


class ExpNormalized(ElementwiseBase):
  """The "Gaussian normalized kernel" of Shankar et al. (2020), infinite only.

  Maps the covariance to `sqrt(var1 var2) * exp(gamma * (rho + shift))`, with
  `rho = cov12 / sqrt(var1 var2)` the correlation; the NTK is multiplied by
  its derivative `gamma * exp(gamma * (rho + shift))`. It is defined by this
  kernel map alone: there is no finite activation, and calling the module on
  an array raises `NotImplementedError`.

  Attributes:
    gamma: coefficient of the correlation in the exponent.
    shift: added to the correlation before exponentiating.
    do_clip: clip the correlation to `[-1, 1]` (guards against round-off).

  >>> import jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> model = nn.Sequential([ftn.Dense(4), ftn.ExpNormalized(gamma=2.0)])
  >>> ft.kernel_fn(model)(jnp.array([[1., 0.], [0., 1.]]), get='nngp')
  Array([[0.5      , 0.0676676],
         [0.0676676, 0.5      ]], dtype=float...)
  """

  gamma: float = 1.0
  shift: float = -1.0
  do_clip: bool = False

  def activation(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError(
        "ExpNormalized is defined by its kernel map only and has no finite "
        "activation; use it with `ft.kernel_fn`.")

  def kernel_fns(self):
    params = dict(gamma=self.gamma, shift=self.shift, do_clip=self.do_clip)
    return (functools.partial(gi_exp.exp_normalized_nngp, **params),
            functools.partial(gi_exp.exp_normalized_d_nngp, **params))
