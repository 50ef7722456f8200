"""Each activation's kernel maps against integration of its own finite
activation (rows of `activation_cases.CASES`).

1. `nngp_fn` and `d_nngp_fn` against numerical integration (float64) of the
   layer's own finite `activation` and its autodiff derivative;
2. `d_nngp_fn` against autodiff of `nngp_fn` in `cov12` (Price's theorem);
then quadrature-based layers (`ElementwiseNumerical`) against closed forms.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from activation_cases import CASES
from activation_cases import TRIPLES
from activation_cases import kernel_values
from activation_cases import triples
from golden_models import load_golden
from testing import jit_kernel_fn


def _elementwise_derivative(fn):
  # The activation is elementwise, so the gradient of its sum is its
  # derivative at every point.
  return jax.grad(lambda x: jnp.sum(fn(x)))


# --- Reference integrators (float64, NumPy nodes) --------------------------


def _factor(cov12, var1, var2):
  """`(u, v) = (a z1, s z1 + t z2)` for independent standard `z1, z2`."""
  a = math.sqrt(var1)
  s = cov12 / a
  # The residual variance from `var1 var2 - cov12^2`, which is exactly zero
  # for identical inputs (`var2 - s^2` would leave round-off).
  t = math.sqrt(max(var1 * var2 - cov12**2, 0.0) / var1)
  return a, s, t


def _hermite_reference(f, g, cov12, var1, var2, deg=120):
  """2-D Gauss-Hermite: converges geometrically for smooth `f`, `g`."""
  nodes, weights = np.polynomial.hermite_e.hermegauss(deg)
  weights = weights / np.sqrt(2 * np.pi)
  a, s, t = _factor(cov12, var1, var2)
  z1, z2 = nodes[:, None], nodes[None, :]
  u, v = a * z1 + 0 * z2, s * z1 + t * z2
  values = np.asarray(f(jnp.asarray(u))) * np.asarray(g(jnp.asarray(v)))
  return float(np.sum(weights[:, None] * weights[None, :] * values))


def _polar_reference(f, g, cov12, var1, var2, n_angle=64, n_radius=40):
  """Polar coordinates in the `(z1, z2)` plane.

  For positively homogeneous `f`, `g` (kinks and jumps only at 0) the
  integrand is a polynomial in `t = r^2 / 2` along each ray (Gauss-Laguerre
  is exact) and smooth in the angle between the rays where `u` or `v`
  vanishes (Gauss-Legendre on each arc).
  """
  a, s, t = _factor(cov12, var1, var2)
  breaks = [np.pi / 2, 3 * np.pi / 2, np.arctan2(s, -t) % (2 * np.pi),
            np.arctan2(-s, t) % (2 * np.pi)]
  edges = np.unique(np.concatenate([[0.0, 2 * np.pi], breaks]))
  leg_x, leg_w = np.polynomial.legendre.leggauss(n_angle)
  angles, angle_weights = [], []
  for lo, hi in zip(edges[:-1], edges[1:]):
    if hi - lo < 1e-15:
      continue
    angles.append((hi - lo) / 2 * leg_x + (hi + lo) / 2)
    angle_weights.append((hi - lo) / 2 * leg_w)
  angles, angle_weights = np.concatenate(angles), np.concatenate(angle_weights)
  lag_t, lag_w = np.polynomial.laguerre.laggauss(n_radius)
  radius = np.sqrt(2 * lag_t)[:, None]
  z1, z2 = radius * np.cos(angles), radius * np.sin(angles)
  u, v = a * z1, s * z1 + t * z2
  values = np.asarray(f(jnp.asarray(u))) * np.asarray(g(jnp.asarray(v)))
  # Density exp(-r^2/2) / (2 pi) r dr dphi = exp(-t) dt dphi / (2 pi).
  return float(lag_w @ values @ angle_weights / (2 * np.pi))


def _reference(case, f, g, triple):
  integrate = (_hermite_reference if case.reference == "hermite" else
               _polar_reference)
  return integrate(f, g, *triple)


# --- 1. Kernels against integration of the finite activation ---------------


@pytest.mark.parametrize("case", [c for c in CASES if c.reference], ids=[
    c.name for c in CASES if c.reference])
def test_kernel_matches_integral_of_activation(case):
  nngp_fn, d_nngp_fn = case.layer.kernel_fns()
  act = lambda x: case.layer.apply({}, x)
  # Compiled once per grid shape and reused for every triple.
  act, d_act = jax.jit(act), jax.jit(_elementwise_derivative(act))
  for triple in triples(case):
    args = [jnp.asarray(x, jnp.float64) for x in triple]
    expected_nngp = _reference(case, act, act, triple)
    expected_d = _reference(case, d_act, d_act, triple)
    np.testing.assert_allclose(nngp_fn(*args), expected_nngp,
                               rtol=case.rtol, atol=1e-11, err_msg=str(triple))
    np.testing.assert_allclose(d_nngp_fn(*args), expected_d,
                               rtol=case.rtol, atol=1e-11, err_msg=str(triple))


# --- 2. Price's theorem ----------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.price],
                         ids=[c.name for c in CASES if c.price])
def test_d_nngp_is_derivative_of_nngp(case):
  nngp_fn, d_nngp_fn = case.layer.kernel_fns()
  # Away from cov12^2 = var1 var2, where square roots have infinite slope.
  points = [t for t in triples(case) if t[0]**2 < t[1] * t[2] - 1e-3]
  slope_fn = jax.jit(jax.grad(nngp_fn))
  for cov12, var1, var2 in points:
    args = [jnp.float64(a) for a in (cov12, var1, var2)]
    # Quadrature-based layers differentiate their own approximation.
    np.testing.assert_allclose(d_nngp_fn(*args), slope_fn(*args),
                               rtol=max(case.rtol, 1e-10), atol=1e-12)


def test_jump_activations_have_zero_ntk_factor():
  # Sign and the step function: autodiff of the finite network is zero, and
  # so is the factor the NTK is multiplied by (not the delta-function one).
  for layer in (ftn.Sign(), ftn.RectifiedMonomial(degree=0)):
    _, d_nngp_fn = layer.kernel_fns()
    np.testing.assert_array_equal(d_nngp_fn(jnp.array(0.3), 0.5, 0.8), 0.0)


# --- Quadrature-based layers ----------------------------------------------


def test_numerical_is_exact_for_polynomials():
  cube = ftn.ElementwiseNumerical(fn=lambda x: x**3, deg=4)
  for triple in TRIPLES:
    np.testing.assert_allclose(kernel_values(cube, *triple),
                               kernel_values(ftn.Monomial(degree=3), *triple),
                               rtol=1e-12)
  # Degenerate (zero-variance) first input.
  assert kernel_values(cube, 0.0, 0.0, 0.8) == (0.0, 0.0)


def test_fcn_monomials_agrees_with_quadrature():
  # Neural Tangents 0.6.5 returns NaN for this golden architecture (its
  # rectified-monomial kernel divides by sin(theta), zero on the batch
  # diagonal), so its numbers cannot check ours; the same network with every
  # nonlinearity integrated by Gauss-Hermite quadrature can. Polynomials are
  # integrated exactly; the kink of x_+^3 limits quadrature (relative error
  # 1.3e-5 at 100 nodes, 1.5e-6 at 300: converging to the closed form).
  golden = load_golden("fcn_monomials")

  def network(monomial, rectified, polynomial):
    return nn.Sequential([ftn.Dense(32, b_std=0.1), monomial, ftn.Dense(32),
                          rectified, ftn.Dense(32), polynomial, ftn.Dense(2)])

  closed_form = network(ftn.Monomial(degree=2), ftn.RectifiedMonomial(3),
                        ftn.Polynomial(coef=(0.1, 1.0, 0.5)))
  quadrature = network(
      ftn.ElementwiseNumerical(lambda x: x**2, deg=4),
      ftn.ElementwiseNumerical(lambda x: jnp.where(x >= 0, x**3, 0), deg=300),
      ftn.ElementwiseNumerical(lambda x: 0.1 + x + 0.5 * x**2, deg=4))
  expected = jit_kernel_fn(quadrature)(golden["x1"], golden["x2"],
                                       ("nngp", "ntk"))
  actual = ft.kernel_fn(closed_form)(golden["x1"], golden["x2"],
                                     ("nngp", "ntk"))
  for a, e in zip(actual, expected):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, e, rtol=5e-6)
