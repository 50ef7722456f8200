"""Dense layers: finite forward pass, closed forms and Monte Carlo limits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import DtypeCase
from testing import LayerRuleTest
from testing import MonteCarloCase
from testing import RaisesCase

X1 = np.random.RandomState(0).randn(3, 5)
X2 = np.random.RandomState(1).randn(2, 5)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("b_std", [None, 0.3])
def test_dense_closed_form(parameterization, b_std):
  # One Dense layer on the inputs: nngp = W^2 x.x'/d + b^2, and the NTK is
  # the nngp (NTK param.) or d * x.x'/d + [bias] (standard param.).
  w_std, d = 1.7, X1.shape[1]
  layer = ftn.Dense(4, W_std=w_std, b_std=b_std,
                    parameterization=parameterization)
  k = ft.kernel_fn(layer)(X1, X2, ("nngp", "ntk"))
  dot = X1 @ X2.T / d
  b2 = 0.0 if b_std is None else b_std**2
  np.testing.assert_allclose(k.nngp, w_std**2 * dot + b2, rtol=1e-12)
  if parameterization == "ntk":
    expected_ntk = w_std**2 * dot + b2
  else:
    expected_ntk = d * dot + (0.0 if b_std is None else 1.0)
  np.testing.assert_allclose(k.ntk, expected_ntk, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dense_forward_scaling(dtype):
  layer = ftn.Dense(3, W_std=2.0, b_std=0.5, param_dtype=dtype)
  x = jnp.asarray(X1, dtype)
  variables = layer.init(jax.random.key(0), x)
  w, b = variables["params"]["kernel"], variables["params"]["bias"]
  y = layer.apply(variables, x)
  assert y.dtype == dtype
  np.testing.assert_allclose(y, x @ w * 2.0 / np.sqrt(5) + 0.5 * b[None],
                             rtol=1e-5 if dtype == jnp.float32 else 1e-12)


MODELS = {
    "ntk_one_hidden": lambda: nn.Sequential([
        ftn.Dense(512, W_std=1.5, b_std=0.2), ftn.Relu(),
        ftn.Dense(4, W_std=1.2, b_std=0.1)]),
    "standard_one_hidden": lambda: nn.Sequential([
        ftn.Dense(512, W_std=1.5, b_std=0.2, parameterization="standard"),
        ftn.Erf(), ftn.Dense(4, b_std=0.1, parameterization="standard")]),
    "stock_dense": lambda: nn.Sequential([
        nn.Dense(512), ftn.Relu(), nn.Dense(4)]),
}


class TestDense(LayerRuleTest):
  # One hidden layer: the per-network NNGP and NTK are unbiased estimates of
  # the limit at any width, so only sampling error (5 standard errors,
  # measured from the 64 samples) is allowed. Two hidden layers ("deep"):
  # add the O(1/width) bias, a few / 1024 of the scale.
  monte_carlo_cases = [
      MonteCarloCase(name, MODELS[name], X1, X2, 64, seed=1)
      for name in sorted(MODELS)] + [
          MonteCarloCase("deep", lambda: nn.Sequential([
              ftn.Dense(1024, W_std=1.4, b_std=0.1), ftn.Relu(),
              ftn.Dense(1024, W_std=1.4), ftn.Relu(), ftn.Dense(2)]),
                         X1, X2, 32, bias=5 / 1024, seed=2)]
  dtype_cases = [
      DtypeCase("ntk", nn.Sequential([ftn.Dense(8, b_std=0.1), ftn.Relu(),
                                      ftn.Dense(2)]), X1, X2, jit=False)]
  raises_cases = [RaisesCase(
      "unknown_parameterization",
      lambda: ft.kernel_fn(ftn.Dense(3, parameterization="mup"))(X1),
      "parameterization")]
