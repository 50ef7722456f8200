"""The activation layers under test and their finite networks.

`CASES` is the table of every elementwise nonlinearity of `ftn`, with how
to check it; `TRIPLES` the `(cov12, var1, var2)` points its kernel maps
are checked at; `mc_network` the one-hidden-layer network whose finite
draws converge to the analytic kernel. The checks are in
`test_activations.py` (Monte Carlo, float32/float64, errors),
`test_activations_quadrature.py` (integrals of the finite activation) and
`test_activations_closed_form.py` (closed forms).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents import nn as ftn


@dataclasses.dataclass(frozen=True)
class Case:
  """An activation and how to check it.

  Attributes:
    name: test id.
    layer: the activation module.
    reference: how to integrate the finite activation: `'hermite'` (2-D
      Gauss-Hermite, for smooth functions), `'polar'` (exact for positively
      homogeneous functions with kinks or jumps at 0), or `None` when the
      layer has no finite activation.
    price: `d_nngp_fn` is the derivative of `nngp_fn` in `cov12`. False
      where the activation jumps (Sign, step): the derivative used for the
      NTK is the almost-everywhere one (zero), as autodiff of the finite
      network gives, not the distributional one.
    unit_variance: the kernel is exact only for unit-variance inputs.
    rtol: tolerance of check 1 (quadrature-based layers are approximate).
    mc_w_std: weight scale of the Monte Carlo network's first layer.
    mc_max_relative_se: largest Monte Carlo standard error accepted, relative
      to the kernel's scale (high powers have heavy-tailed estimates).
  """
  name: str
  layer: nn.Module
  reference: Optional[str] = "hermite"
  price: bool = True
  unit_variance: bool = False
  rtol: float = 1e-9
  mc_w_std: float = 0.8
  mc_max_relative_se: float = 0.1


def _tanh_derivative(x):
  return 1 - jnp.tanh(x)**2


CASES = [
    Case("gelu", ftn.Gelu()),
    Case("sigmoid_like", ftn.Sigmoid_like()),
    Case("erf", ftn.Erf(a=1.3, b=0.7, c=0.2)),
    Case("sin", ftn.Sin(a=1.1, b=0.9, c=0.3)),
    Case("cos", ftn.Cos(a=0.8, b=1.2, c=-0.4)),
    Case("rbf", ftn.Rbf(gamma=0.5)),
    Case("exp", ftn.Exp(a=0.7, b=0.6)),
    Case("gaussian", ftn.Gaussian()),
    Case("gaussian_wide", ftn.Gaussian(a=0.5, b=0.2), mc_w_std=0.5),
    Case("exp_normalized", ftn.ExpNormalized(gamma=1.5, shift=-0.5),
         reference=None),
    Case("gabor", ftn.Gabor()),
    Case("sign", ftn.Sign(), reference="polar", price=False),
    Case("relu", ftn.Relu(), reference="polar"),
    Case("abrelu", ftn.ABRelu(a=-0.3, b=1.4), reference="polar"),
    Case("monomial_0", ftn.Monomial(degree=0)),
    Case("monomial_1", ftn.Monomial(degree=1)),
    Case("monomial_2", ftn.Monomial(degree=2)),
    Case("monomial_3", ftn.Monomial(degree=3)),
    Case("monomial_5", ftn.Monomial(degree=5), mc_max_relative_se=0.25),
    Case("rectified_0", ftn.RectifiedMonomial(degree=0), reference="polar",
         price=False),
    Case("rectified_1", ftn.RectifiedMonomial(degree=1), reference="polar"),
    Case("rectified_2", ftn.RectifiedMonomial(degree=2), reference="polar"),
    Case("rectified_3", ftn.RectifiedMonomial(degree=3), reference="polar"),
    Case("rectified_4", ftn.RectifiedMonomial(degree=4), reference="polar",
         mc_max_relative_se=0.25),
    Case("polynomial", ftn.Polynomial(coef=(0.1, 1.0, 0.5))),
    Case("polynomial_4", ftn.Polynomial(coef=(0.3, -0.2, 0.0, 0.4, 0.1))),
    Case("hermite_0", ftn.Hermite(degree=0), unit_variance=True),
    Case("hermite_1", ftn.Hermite(degree=1), unit_variance=True),
    Case("hermite_3", ftn.Hermite(degree=3), unit_variance=True),
    Case("hermite_4", ftn.Hermite(degree=4), unit_variance=True,
         mc_max_relative_se=0.25),
    # tanh has no closed form; with 60 nodes per axis the quadrature error is
    # below 1e-6 on these variances (measured against 200 nodes).
    Case("numerical_tanh", ftn.ElementwiseNumerical(fn=jnp.tanh, deg=60),
         rtol=1e-6),
    Case("numerical_tanh_df", ftn.ElementwiseNumerical(
        fn=jnp.tanh, deg=60, df=_tanh_derivative), rtol=1e-6),
]

# (cov12, var1, var2): generic, negative, uncorrelated, nearly degenerate,
# and identical inputs (cov12 = var1 = var2, theta = 0).
TRIPLES = [(0.3, 0.5, 0.8), (-0.4, 1.0, 0.6), (0.0, 0.9, 0.4),
           (0.85, 1.2, 0.7), (0.7, 0.7, 0.7)]
UNIT_TRIPLES = [(0.3, 1.0, 1.0), (-0.6, 1.0, 1.0), (0.0, 1.0, 1.0),
                (1.0, 1.0, 1.0)]


def triples(case: Case) -> list[tuple[float, float, float]]:
  """The `(cov12, var1, var2)` points at which `case` is checked."""
  return UNIT_TRIPLES if case.unit_variance else TRIPLES


# The Monte Carlo network: hidden width, and the readout layer's scales.
MC_WIDTH = 1024
MC_READOUT = dict(W_std=1.1, b_std=0.1)


def mc_inputs(dtype=jnp.float64) -> jax.Array:
  """Three inputs of dimension 5, each of squared norm 5.

  >>> mc_inputs().shape
  (3, 5)
  """
  x = np.random.default_rng(0).normal(size=(3, 5))
  # Rows of squared norm d, so the first layer's variances are W_std^2 +
  # b_std^2 (exactly 1 for the Hermite cases, which need it).
  x *= np.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True)
  return jnp.asarray(x, dtype)


def mc_network(case: Case, param_dtype=jnp.float64) -> nn.Module:
  """Dense(`MC_WIDTH`) -> the activation -> Dense(2) (`MC_READOUT`)."""
  w_std, b_std = (1.0, None) if case.unit_variance else (case.mc_w_std, 0.2)
  return nn.Sequential([
      ftn.Dense(MC_WIDTH, W_std=w_std, b_std=b_std, param_dtype=param_dtype),
      case.layer,
      ftn.Dense(2, param_dtype=param_dtype, **MC_READOUT)])


def kernel_values(layer: nn.Module, cov12: float, var1: float,
                  var2: float) -> tuple[float, float]:
  """`(nngp_fn, d_nngp_fn)` of `layer` at one point, in float64.

  >>> kernel_values(ftn.Monomial(degree=1), 0.3, 0.5, 0.8)
  (0.3, 1.0)
  """
  nngp_fn, d_nngp_fn = layer.kernel_fns()
  args = [jnp.asarray(a, jnp.float64) for a in (cov12, var1, var2)]
  return float(nngp_fn(*args)), float(d_nngp_fn(*args))
