"""Every elementwise nonlinearity, checked the same way.

For each activation in `CASES`:
1. `nngp_fn` and `d_nngp_fn` against numerical integration (float64) of the
   layer's own finite `activation` and its autodiff derivative;
2. `d_nngp_fn` against autodiff of `nngp_fn` in `cov12` (Price's theorem);
3. Monte Carlo: finite networks from `model.init` converge to
   `ft.kernel_fn`'s NNGP and NTK;
4. float32 inputs give float32 kernels that agree with float64.
Then closed forms, and the errors for non-Gaussian inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import DtypeCase
from testing import LayerRuleTest
from testing import assert_mc_close


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
IDS = [c.name for c in CASES]

# (cov12, var1, var2): generic, negative, uncorrelated, nearly degenerate,
# and identical inputs (cov12 = var1 = var2, theta = 0).
TRIPLES = [(0.3, 0.5, 0.8), (-0.4, 1.0, 0.6), (0.0, 0.9, 0.4),
           (0.85, 1.2, 0.7), (0.7, 0.7, 0.7)]
UNIT_TRIPLES = [(0.3, 1.0, 1.0), (-0.6, 1.0, 1.0), (0.0, 1.0, 1.0),
                (1.0, 1.0, 1.0)]


def _triples(case: Case):
  return UNIT_TRIPLES if case.unit_variance else TRIPLES


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
  for triple in _triples(case):
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
  triples = [t for t in _triples(case) if t[0]**2 < t[1] * t[2] - 1e-3]
  slope_fn = jax.jit(jax.grad(nngp_fn))
  for cov12, var1, var2 in triples:
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


# --- 3. Monte Carlo convergence of finite networks -------------------------

MC_WIDTH = 1024
MC_NETWORKS = 32
MC_STANDARD_ERRORS = 6.0
MC_READOUT = dict(W_std=1.1, b_std=0.1)


def _mc_inputs(dtype=jnp.float64):
  x = np.random.default_rng(0).normal(size=(3, 5))
  # Rows of squared norm d, so the first layer's variances are W_std^2 +
  # b_std^2 (exactly 1 for the Hermite cases, which need it).
  x *= np.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True)
  return jnp.asarray(x, dtype)


def _mc_network(case: Case, param_dtype=jnp.float64) -> nn.Module:
  w_std, b_std = (1.0, None) if case.unit_variance else (case.mc_w_std, 0.2)
  return nn.Sequential([
      ftn.Dense(MC_WIDTH, W_std=w_std, b_std=b_std, param_dtype=param_dtype),
      case.layer,
      ftn.Dense(2, param_dtype=param_dtype, **MC_READOUT)])


@functools.lru_cache(maxsize=None)
def _mc_parameters(with_bias: bool):
  """Parameters of `MC_NETWORKS` networks, drawn by `model.init`.

  Activations have no parameters, so every case's network has the same
  parameter tree: it is drawn once (one compilation) and shared.
  """
  template = _mc_network(Case("template", ftn.Relu(),
                              unit_variance=not with_bias))
  keys = jax.random.split(jax.random.key(1), MC_NETWORKS)
  init = lambda k: template.init(k, _mc_inputs())["params"]
  return jax.jit(jax.vmap(init))(keys)


def _sample_kernels(network: nn.Module, params, x):
  """Per-network NNGP of the activation layer and NTK of the network."""

  def one_network(p):
    # The activation layer's own channels: `(1/width) sum_i a_i(x) a_i(x')`
    # is unbiased for its NNGP, as the pre-activations are exactly Gaussian.
    _, state = network.apply({"params": p}, x, capture_intermediates=True)
    features = state["intermediates"]["layers_1"]["__call__"][0]
    nngp = features @ features.T / features.shape[-1]
    # Empirical NTK: Jacobian contraction, traced over the two outputs.
    jacobian = jax.jacobian(lambda q: network.apply({"params": q}, x))(p)
    ntk = sum(
        jnp.einsum("ajp,bjp->ab", j.reshape(j.shape[:2] + (-1,)),
                   j.reshape(j.shape[:2] + (-1,)))
        for j in jax.tree.leaves(jacobian)) / 2
    return nngp, ntk

  return jax.jit(jax.vmap(one_network))(params)


def _assert_mc_close(samples, expected, max_relative_se):
  """`assert_mc_close` within `MC_STANDARD_ERRORS` standard errors.

  With one hidden layer both estimates are unbiased at any width (the
  pre-activations are exactly Gaussian given the input, and the readout
  weights are independent of them), so only sampling error remains. Its
  standard error is measured from the 32 networks, each averaging 1024
  channels (so per-network estimates are close to Gaussian); 6 standard
  errors bound a Student-t(31) deviation with probability ~1e-6 per entry,
  so the ~1000 entries checked here fail by chance with probability ~1e-3
  (and the seeds are fixed). A vacuity guard requires the standard error to
  be under `max_relative_se` of the kernel's scale.
  """
  assert_mc_close(samples, expected, n_se=MC_STANDARD_ERRORS, rel_floor=1e-10,
                  atol=1e-12, max_relative_se=max_relative_se)


@pytest.mark.parametrize("case", [c for c in CASES if c.reference],
                         ids=[c.name for c in CASES if c.reference])
def test_monte_carlo_converges_to_kernel(case):
  network = _mc_network(case)
  x = _mc_inputs()
  params = _mc_parameters(not case.unit_variance)
  assert (jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(network.init, jax.random.key(0), x)["params"]))
  nngp_samples, ntk_samples = _sample_kernels(network, params, x)
  nngp, ntk = ft.kernel_fn(network)(x, None, ("nngp", "ntk"))
  # The readout maps the activation layer's NNGP k to W^2 k + b^2.
  hidden_nngp = (nngp - MC_READOUT["b_std"]**2) / MC_READOUT["W_std"]**2
  _assert_mc_close(nngp_samples, hidden_nngp, case.mc_max_relative_se)
  _assert_mc_close(ntk_samples, ntk, case.mc_max_relative_se)


# --- 4. float32 and float64 ------------------------------------------------


def _dtype_case(case: Case) -> DtypeCase:
  # Eager: cheaper than compiling twice. The network's parameters are
  # float64 (param_dtype), so only the kernel's dtype follows the inputs.
  x2 = _mc_inputs()[::-1] * 0.9 if not case.unit_variance else None
  return DtypeCase(case.name, _mc_network(case), _mc_inputs(), x2,
                   rtol32=2e-4, atol32=1e-5, jit=False, finite=False)


class TestActivations(LayerRuleTest):
  dtype_cases = [_dtype_case(c) for c in CASES]


# --- Closed forms -----------------------------------------------------------


def _eval(layer, cov12, var1, var2):
  nngp_fn, d_nngp_fn = layer.kernel_fns()
  args = [jnp.asarray(a, jnp.float64) for a in (cov12, var1, var2)]
  return float(nngp_fn(*args)), float(d_nngp_fn(*args))


def test_rbf_is_squared_exponential_of_inputs():
  x = _mc_inputs()
  model = nn.Sequential([ftn.Dense(8), ftn.Rbf(gamma=0.7)])
  squared_distances = np.sum((x[:, None] - x[None]) ** 2, -1) / x.shape[1]
  np.testing.assert_allclose(ft.kernel_fn(model)(x, get="nngp"),
                             np.exp(-0.7 * squared_distances), rtol=1e-12)


def test_sigmoid_like_is_erf_and_close_to_sigmoid():
  x = jnp.linspace(-5, 5, 101)
  assert np.max(np.abs(ftn.Sigmoid_like().apply({}, x) -
                       jax.nn.sigmoid(x))) < 0.02
  same = ftn.Erf(a=0.5, b=1 / 2.4020563531719796, c=0.5)
  assert _eval(ftn.Sigmoid_like(), 0.3, 0.5, 0.8) == _eval(same, 0.3, 0.5,
                                                           0.8)


def test_cos_is_shifted_sin():
  cos, sin = ftn.Cos(a=0.8, b=1.2, c=-0.4), ftn.Sin(a=0.8, b=1.2,
                                                    c=-0.4 + np.pi / 2)
  np.testing.assert_allclose(_eval(cos, 0.3, 0.5, 0.8),
                             _eval(sin, 0.3, 0.5, 0.8), rtol=1e-14)


def test_gelu_factorizes_when_uncorrelated():
  # E[u Phi(u)] = var E[phi_N(u)] = var / sqrt(2 pi (1 + var)) (Stein).
  var1, var2 = 0.5, 1.7
  expected = var1 * var2 / (2 * np.pi * np.sqrt((1 + var1) * (1 + var2)))
  np.testing.assert_allclose(_eval(ftn.Gelu(), 0.0, var1, var2)[0], expected,
                             rtol=1e-14)


def test_gelu_approximate_only_changes_finite_pass():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_allclose(ftn.Gelu(approximate=True).apply({}, x),
                             jax.nn.gelu(x, approximate=True))
  assert (ftn.Gelu(approximate=True).kernel_fns() ==
          ftn.Gelu().kernel_fns())


def test_sign_is_arcsine_law():
  cov12, var1, var2 = 0.3, 0.5, 0.8
  expected = 2 / np.pi * np.arcsin(cov12 / np.sqrt(var1 * var2))
  np.testing.assert_allclose(_eval(ftn.Sign(), cov12, var1, var2)[0],
                             expected, rtol=1e-14)
  assert _eval(ftn.Sign(), 0.0, 0.0, 0.8) == (0.0, 0.0)  # sign(0) = 0


def test_monomials_by_isserlis():
  c, v1, v2 = 0.3, 0.5, 0.8
  p = v1 * v2
  np.testing.assert_allclose(_eval(ftn.Monomial(degree=2), c, v1, v2),
                             (2 * c**2 + p, 4 * c), rtol=1e-14)
  np.testing.assert_allclose(_eval(ftn.Monomial(degree=3), c, v1, v2),
                             (6 * c**3 + 9 * c * p, 9 * (2 * c**2 + p)),
                             rtol=1e-14)
  np.testing.assert_allclose(
      _eval(ftn.Monomial(degree=4), c, v1, v2),
      _eval(ftn.Polynomial(coef=(0, 0, 0, 0, 1.0)), c, v1, v2), rtol=1e-14)


def test_rectified_monomials_are_arc_cosine_kernels():
  c, v1, v2 = 0.3, 0.5, 0.8
  theta = np.arccos(c / np.sqrt(v1 * v2))
  np.testing.assert_allclose(_eval(ftn.RectifiedMonomial(degree=1), c, v1, v2),
                             _eval(ftn.Relu(), c, v1, v2), rtol=1e-14)
  np.testing.assert_allclose(
      _eval(ftn.RectifiedMonomial(degree=0), c, v1, v2)[0],
      (np.pi - theta) / (2 * np.pi), rtol=1e-14)
  for n in range(5):  # diagonal: E[u_+^(2n)] = (2n - 1)!! v^n / 2
    double_factorial = np.prod(np.arange(2 * n - 1, 0, -2))
    np.testing.assert_allclose(
        _eval(ftn.RectifiedMonomial(degree=n), 0.7, 0.7, 0.7)[0],
        double_factorial * 0.7**n / 2, rtol=1e-13)


def test_hermite_is_mehler_and_matches_polynomial_at_unit_variance():
  # He_3 = x^3 - 3x, normalized by sqrt(3!).
  coef = np.array([0, -3.0, 0, 1.0]) / np.sqrt(6)
  for c in (0.3, -0.6, 1.0):
    nngp, d = _eval(ftn.Hermite(degree=3), c, 1.0, 1.0)
    np.testing.assert_allclose((nngp, d), (c**3, 3 * c**2), rtol=1e-14)
    np.testing.assert_allclose(
        (nngp, d), _eval(ftn.Polynomial(coef=tuple(coef)), c, 1.0, 1.0),
        rtol=1e-13, atol=1e-15)


def test_exponential_moments():
  c, v1, v2, a, b = 0.3, 0.5, 0.8, 0.7, 0.6
  lognormal = a**2 * np.exp(b**2 * (v1 + v2 + 2 * c) / 2)
  np.testing.assert_allclose(_eval(ftn.Exp(a=a, b=b), c, v1, v2),
                             (lognormal, b**2 * lognormal), rtol=1e-14)
  # Uncorrelated: product of E[a exp(b u^2)] = a / sqrt(1 - 2 b var).
  a, b = 0.5, 0.2
  expected = a**2 / np.sqrt((1 - 2 * b * v1) * (1 - 2 * b * v2))
  np.testing.assert_allclose(_eval(ftn.Gaussian(a=a, b=b), 0.0, v1, v2),
                             (expected, 0.0), rtol=1e-14)


def test_exp_normalized_kernel_map():
  c, v1, v2 = 0.3, 0.5, 0.8
  norm = np.sqrt(v1 * v2)
  exponential = np.exp(1.5 * (c / norm - 0.5))
  layer = ftn.ExpNormalized(gamma=1.5, shift=-0.5)
  np.testing.assert_allclose(_eval(layer, c, v1, v2),
                             (norm * exponential, 1.5 * exponential),
                             rtol=1e-14)
  # Round-off can push the correlation past 1; do_clip caps it.
  clipped = ftn.ExpNormalized(gamma=1.5, shift=-0.5, do_clip=True)
  assert _eval(clipped, 0.41, 0.4, 0.4)[0] == pytest.approx(0.4 * np.exp(
      0.75))
  with pytest.raises(NotImplementedError, match="no finite activation"):
    layer.apply({}, jnp.ones(2))


def test_numerical_is_exact_for_polynomials():
  cube = ftn.ElementwiseNumerical(fn=lambda x: x**3, deg=4)
  for triple in TRIPLES:
    np.testing.assert_allclose(_eval(cube, *triple),
                               _eval(ftn.Monomial(degree=3), *triple),
                               rtol=1e-12)
  # Degenerate (zero-variance) first input.
  assert _eval(cube, 0.0, 0.0, 0.8) == (0.0, 0.0)


# --- Errors ----------------------------------------------------------------


@pytest.mark.parametrize("layer", [ftn.Gelu(), ftn.Sin(), ftn.Monomial(2),
                                   ftn.ElementwiseNumerical(jnp.tanh, 5)],
                         ids=["gelu", "sin", "monomial", "numerical"])
def test_non_gaussian_inputs_raise(layer):
  x = _mc_inputs()
  after_nonlinearity = nn.Sequential([ftn.Dense(4), ftn.Relu(), layer])
  with pytest.raises(ValueError, match="not Gaussian"):
    ft.kernel_fn(after_nonlinearity)(x)
  with pytest.raises(ValueError, match="raw inputs"):
    ft.kernel_fn(layer)(x)


def test_invalid_arguments_raise():
  for make in (lambda: ftn.Monomial(degree=-1),
               lambda: ftn.RectifiedMonomial(degree=1.5),
               lambda: ftn.Hermite(degree=-2),
               lambda: ftn.ElementwiseNumerical(jnp.tanh, deg=0)):
    with pytest.raises(ValueError, match="must be a"):
      make()


def test_fcn_monomials_agrees_with_quadrature():
  # Neural Tangents 0.6.5 returns NaN for this golden architecture (its
  # rectified-monomial kernel divides by sin(theta), zero on the batch
  # diagonal), so its numbers cannot check ours; the same network with every
  # nonlinearity integrated by Gauss-Hermite quadrature can. Polynomials are
  # integrated exactly; the kink of x_+^3 limits quadrature (relative error
  # 1.3e-5 at 100 nodes, 1.5e-6 at 300: converging to the closed form).
  from golden_models import load_golden  # pylint: disable=import-outside-toplevel
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
  expected = jax.jit(ft.kernel_fn(quadrature), static_argnames="get")(
      golden["x1"], golden["x2"], ("nngp", "ntk"))
  actual = ft.kernel_fn(closed_form)(golden["x1"], golden["x2"],
                                     ("nngp", "ntk"))
  for a, e in zip(actual, expected):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, e, rtol=5e-6)
