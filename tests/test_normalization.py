"""LayerNorm (ftn and stock): forward, closed forms, Monte Carlo, errors."""

import flax.linen as nn
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
XS1 = np.random.RandomState(2).randn(2, 4, 3)
XS2 = np.random.RandomState(3).randn(2, 4, 3)


@pytest.mark.parametrize("axis", [-1, (1, 2)])
def test_forward_normalizes(axis):
  x = jnp.asarray(XS1) * 3.0 + 1.0
  y = ftn.LayerNorm(axis=axis).apply({}, x)
  np.testing.assert_allclose(jnp.mean(y, axis), 0.0, atol=1e-12)
  np.testing.assert_allclose(jnp.var(y, axis), 1.0, rtol=1e-10)


@pytest.mark.parametrize("x2", [None, X2], ids=["x2_none", "x2"])
def test_unit_diagonal(x2):
  # After LayerNorm over channels every activation has unit variance.
  model = nn.Sequential([ftn.Dense(8, W_std=2.0, b_std=0.5), ftn.LayerNorm()])
  k = ft.kernel_fn(model)(X1, x2)
  var1 = np.diagonal(k.cov1) if k.cov1.ndim == 2 else k.cov1
  np.testing.assert_allclose(var1, 1.0, rtol=1e-10)
  if x2 is None:
    np.testing.assert_allclose(np.diagonal(k.nngp), 1.0, rtol=1e-10)
  # Correlations are those of the Dense layer (normalization is a rescaling).
  dense = ft.kernel_fn(model.layers[0])(X1, x2)
  v1 = np.diagonal(dense.cov1) if dense.cov1.ndim == 2 else dense.cov1
  v2 = v1 if x2 is None else (np.diagonal(dense.cov2)
                              if dense.cov2.ndim == 2 else dense.cov2)
  np.testing.assert_allclose(k.nngp, dense.nngp / np.sqrt(np.outer(v1, v2)),
                             rtol=1e-10)
  np.testing.assert_allclose(k.ntk, dense.ntk / np.sqrt(np.outer(v1, v2)),
                             rtol=1e-10)


def test_spatial_axes_average_variances():
  # Normalizing over locations and channels divides by the mean variance.
  base = ftn.Dense(8, b_std=0.3)
  k = ft.kernel_fn(nn.Sequential([base, ftn.LayerNorm(axis=(1, 2))]),
                   )(XS1, XS2)
  kb = ft.kernel_fn(base)(XS1, XS2)
  var = lambda cov: np.einsum("ass->as" if cov.ndim == 3 else "aass->as",
                              cov).mean(1)
  v1, v2 = var(kb.cov1), var(kb.cov2)
  expected = kb.nngp / np.sqrt(v1[:, None, None, None] *
                               v2[None, :, None, None])
  np.testing.assert_allclose(k.nngp, expected, rtol=1e-10)
  np.testing.assert_allclose(var(k.cov1), 1.0, rtol=1e-10)


def test_stock_layer_norm_adds_scale_and_bias_gradients():
  # nn.LayerNorm = normalization * scale + bias, scale = 1 and bias = 0 at
  # init: same NNGP; the NTK gains E[y y'] (scale) and 1 (bias).
  ours = ft.kernel_fn(nn.Sequential([ftn.Dense(8, b_std=0.3),
                                     ftn.LayerNorm(eps=1e-6)]))(X1, X2)
  for use_scale, use_bias in [(True, True), (True, False), (False, True)]:
    stock = ft.kernel_fn(nn.Sequential([
        ftn.Dense(8, b_std=0.3),
        nn.LayerNorm(use_scale=use_scale, use_bias=use_bias)]))(X1, X2)
    np.testing.assert_allclose(stock.nngp, ours.nngp, rtol=1e-14)
    extra = use_scale * ours.nngp + use_bias * 1.0
    np.testing.assert_allclose(stock.ntk, ours.ntk + extra, rtol=1e-14)


MODELS = {
    # Golden-like FCN: LayerNorm keeps the output Gaussian, so Relu follows.
    "ftn": lambda w: nn.Sequential([
        ftn.Dense(w, b_std=0.3), ftn.LayerNorm(), ftn.Relu(),
        ftn.Dense(4)]),
    # The scale's gradient is random per channel, so stock LayerNorm must be
    # followed by an affine layer (see test_errors).
    "stock": lambda w: nn.Sequential([
        ftn.Dense(w, W_std=1.5, b_std=0.3), nn.LayerNorm(), ftn.Dense(4)]),
}


def test_stock_layer_norm_without_scale_allows_nonlinearity():
  ft.kernel_fn(nn.Sequential([ftn.Dense(4), nn.LayerNorm(use_scale=False),
                              ftn.Relu()]))(X1)


def _raises(name, layers, x, match, error=ValueError):
  model = nn.Sequential(layers) if isinstance(layers, list) else layers
  return RaisesCase(name, lambda: ft.kernel_fn(model)(x), match, error)


class TestLayerNorm(LayerRuleTest):
  # The empirical variance over `w` channels fluctuates by O(w^-1/2), which
  # biases the per-network kernels by O(1/w): allow 5 standard errors of 48
  # networks plus 4/w of the kernel's scale (w = 512). "spatial_axes":
  # normalizing over (locations, channels) of a Dense layer's output; the
  # readout keeps the locations, so the full (N1, N2, S, S') kernel is
  # compared.
  monte_carlo_cases = [
      MonteCarloCase(name, lambda name=name: MODELS[name](512), X1, X2, 48,
                     bias=4 / 512, seed=4, kwargs=dict(batch_size=16))
      for name in sorted(MODELS)] + [
          MonteCarloCase("spatial_axes", lambda: nn.Sequential([
              ftn.Dense(512, b_std=0.3), ftn.LayerNorm(axis=(1, 2)),
              ftn.Dense(3)]), XS1, XS2, 48, bias=4 / 512, seed=5,
                         kwargs=dict(batch_size=16))]
  dtype_cases = [DtypeCase("dense_norm_relu", nn.Sequential([
      ftn.Dense(8, b_std=0.3), ftn.LayerNorm(), ftn.Relu(), ftn.Dense(2)]),
                           X1, X2, get=("ntk",), rtol64=1e-14, jit=False)]
  raises_cases = [
      _raises("channel_axis", [ftn.Dense(4), ftn.LayerNorm(axis=1)], XS1,
              "channel axis"),
      _raises("non_gaussian", [ftn.Dense(4), ftn.Relu(), ftn.LayerNorm()],
              X1, "non-Gaussian"),
      _raises("raw_inputs", ftn.LayerNorm(), X1, "raw inputs"),
      # A nonlinearity right after a trainable scale would need E[f'f' u v].
      _raises("scale_then_nonlinearity", [ftn.Dense(4), nn.LayerNorm(),
                                          ftn.Relu()], X1, "not Gaussian"),
      _raises("scale_init", [ftn.Dense(4), nn.LayerNorm(
          scale_init=nn.initializers.zeros)], X1, "scale_init",
              NotImplementedError),
      _raises("feature_axes", [ftn.Dense(4), nn.LayerNorm(
          reduction_axes=(1, 2), feature_axes=(1, 2))], XS1, "feature_axes",
              NotImplementedError)]
