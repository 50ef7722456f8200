"""Closed forms of the activations' kernel maps, checked against
independent derivations (arcsine law, Isserlis, Mehler, lognormal moments)
and against each other."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from activation_cases import kernel_values
from activation_cases import mc_inputs


def test_rbf_is_squared_exponential_of_inputs():
  x = mc_inputs()
  model = nn.Sequential([ftn.Dense(8), ftn.Rbf(gamma=0.7)])
  squared_distances = np.sum((x[:, None] - x[None]) ** 2, -1) / x.shape[1]
  np.testing.assert_allclose(ft.kernel_fn(model)(x, get="nngp"),
                             np.exp(-0.7 * squared_distances), rtol=1e-12)


def test_sigmoid_like_is_erf_and_close_to_sigmoid():
  x = jnp.linspace(-5, 5, 101)
  assert np.max(np.abs(ftn.Sigmoid_like().apply({}, x) -
                       jax.nn.sigmoid(x))) < 0.02
  same = ftn.Erf(a=0.5, b=1 / 2.4020563531719796, c=0.5)
  assert (kernel_values(ftn.Sigmoid_like(), 0.3, 0.5, 0.8) ==
          kernel_values(same, 0.3, 0.5, 0.8))


def test_cos_is_shifted_sin():
  cos, sin = ftn.Cos(a=0.8, b=1.2, c=-0.4), ftn.Sin(a=0.8, b=1.2,
                                                    c=-0.4 + np.pi / 2)
  np.testing.assert_allclose(kernel_values(cos, 0.3, 0.5, 0.8),
                             kernel_values(sin, 0.3, 0.5, 0.8), rtol=1e-14)


def test_gelu_factorizes_when_uncorrelated():
  # E[u Phi(u)] = var E[phi_N(u)] = var / sqrt(2 pi (1 + var)) (Stein).
  var1, var2 = 0.5, 1.7
  expected = var1 * var2 / (2 * np.pi * np.sqrt((1 + var1) * (1 + var2)))
  np.testing.assert_allclose(kernel_values(ftn.Gelu(), 0.0, var1, var2)[0],
                             expected, rtol=1e-14)


def test_gelu_approximate_only_changes_finite_pass():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_allclose(ftn.Gelu(approximate=True).apply({}, x),
                             jax.nn.gelu(x, approximate=True))
  assert (ftn.Gelu(approximate=True).kernel_fns() ==
          ftn.Gelu().kernel_fns())


def test_sign_is_arcsine_law():
  cov12, var1, var2 = 0.3, 0.5, 0.8
  expected = 2 / np.pi * np.arcsin(cov12 / np.sqrt(var1 * var2))
  np.testing.assert_allclose(kernel_values(ftn.Sign(), cov12, var1, var2)[0],
                             expected, rtol=1e-14)
  assert kernel_values(ftn.Sign(), 0.0, 0.0, 0.8) == (0.0, 0.0)  # sign(0) = 0


def test_monomials_by_isserlis():
  c, v1, v2 = 0.3, 0.5, 0.8
  p = v1 * v2
  np.testing.assert_allclose(kernel_values(ftn.Monomial(degree=2), c, v1, v2),
                             (2 * c**2 + p, 4 * c), rtol=1e-14)
  np.testing.assert_allclose(kernel_values(ftn.Monomial(degree=3), c, v1, v2),
                             (6 * c**3 + 9 * c * p, 9 * (2 * c**2 + p)),
                             rtol=1e-14)
  np.testing.assert_allclose(
      kernel_values(ftn.Monomial(degree=4), c, v1, v2),
      kernel_values(ftn.Polynomial(coef=(0, 0, 0, 0, 1.0)), c, v1, v2),
      rtol=1e-14)


def test_rectified_monomials_are_arc_cosine_kernels():
  c, v1, v2 = 0.3, 0.5, 0.8
  theta = np.arccos(c / np.sqrt(v1 * v2))
  np.testing.assert_allclose(
      kernel_values(ftn.RectifiedMonomial(degree=1), c, v1, v2),
      kernel_values(ftn.Relu(), c, v1, v2), rtol=1e-14)
  np.testing.assert_allclose(
      kernel_values(ftn.RectifiedMonomial(degree=0), c, v1, v2)[0],
      (np.pi - theta) / (2 * np.pi), rtol=1e-14)
  for n in range(5):  # diagonal: E[u_+^(2n)] = (2n - 1)!! v^n / 2
    double_factorial = np.prod(np.arange(2 * n - 1, 0, -2))
    np.testing.assert_allclose(
        kernel_values(ftn.RectifiedMonomial(degree=n), 0.7, 0.7, 0.7)[0],
        double_factorial * 0.7**n / 2, rtol=1e-13)


def test_hermite_is_mehler_and_matches_polynomial_at_unit_variance():
  # He_3 = x^3 - 3x, normalized by sqrt(3!).
  coef = np.array([0, -3.0, 0, 1.0]) / np.sqrt(6)
  for c in (0.3, -0.6, 1.0):
    nngp, d = kernel_values(ftn.Hermite(degree=3), c, 1.0, 1.0)
    np.testing.assert_allclose((nngp, d), (c**3, 3 * c**2), rtol=1e-14)
    np.testing.assert_allclose(
        (nngp, d), kernel_values(ftn.Polynomial(coef=tuple(coef)), c, 1.0, 1.0),
        rtol=1e-13, atol=1e-15)


def test_exponential_moments():
  c, v1, v2, a, b = 0.3, 0.5, 0.8, 0.7, 0.6
  lognormal = a**2 * np.exp(b**2 * (v1 + v2 + 2 * c) / 2)
  np.testing.assert_allclose(kernel_values(ftn.Exp(a=a, b=b), c, v1, v2),
                             (lognormal, b**2 * lognormal), rtol=1e-14)
  # Uncorrelated: product of E[a exp(b u^2)] = a / sqrt(1 - 2 b var).
  a, b = 0.5, 0.2
  expected = a**2 / np.sqrt((1 - 2 * b * v1) * (1 - 2 * b * v2))
  np.testing.assert_allclose(kernel_values(ftn.Gaussian(a=a, b=b), 0.0, v1, v2),
                             (expected, 0.0), rtol=1e-14)


def test_exp_normalized_kernel_map():
  c, v1, v2 = 0.3, 0.5, 0.8
  norm = np.sqrt(v1 * v2)
  exponential = np.exp(1.5 * (c / norm - 0.5))
  layer = ftn.ExpNormalized(gamma=1.5, shift=-0.5)
  np.testing.assert_allclose(kernel_values(layer, c, v1, v2),
                             (norm * exponential, 1.5 * exponential),
                             rtol=1e-14)
  # Round-off can push the correlation past 1; do_clip caps it.
  clipped = ftn.ExpNormalized(gamma=1.5, shift=-0.5, do_clip=True)
  assert kernel_values(clipped, 0.41, 0.4, 0.4)[0] == pytest.approx(
      0.4 * np.exp(0.75))
  with pytest.raises(NotImplementedError, match="no finite activation"):
    layer.apply({}, jnp.ones(2))
