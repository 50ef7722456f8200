"""Stock nn.Dense / Conv / ConvLocal / ConvTranspose with their initializers.

Each stock layer's kernel uses the exact entry variance of its `kernel_init`
and `bias_init`. Checked three ways: a closed form written from the
initializer's documented formula, the exact tangent kernel of the finite
layer (linear in its parameters), and Monte Carlo over `model.init`.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from testing import assert_mc_close
from testing import exact_ntk
from testing import sample_kernels

init = nn.initializers
X1 = np.random.RandomState(0).randn(3, 5)
X2 = np.random.RandomState(1).randn(2, 5)
FEATURES = 7
FAN_IN, FAN_OUT = 5, FEATURES

# (kernel_init, variance for a (FAN_IN, FAN_OUT) matrix from its formula).
KERNEL_INITS = {
    "lecun_normal": (init.lecun_normal(), 1 / FAN_IN),
    "he_normal": (init.he_normal(), 2 / FAN_IN),
    "kaiming_uniform": (init.kaiming_uniform(), 2 / FAN_IN),
    "glorot_normal": (init.glorot_normal(), 2 / (FAN_IN + FAN_OUT)),
    "xavier_uniform": (init.xavier_uniform(), 2 / (FAN_IN + FAN_OUT)),
    "vs_fan_out_truncated": (
        init.variance_scaling(4.0, "fan_out", "truncated_normal"),
        4.0 / FAN_OUT),
    "vs_fan_geo_avg": (init.variance_scaling(0.5, "fan_geo_avg", "normal"),
                       0.5 / math.sqrt(FAN_IN * FAN_OUT)),
    "normal": (init.normal(1.0), 1.0),
    "truncated_normal": (init.truncated_normal(0.5), None),  # below
    "zeros": (init.zeros, 0.0),
    "partitioned_he": (nn.with_partitioning(init.he_normal(), (None, "m")),
                       2 / FAN_IN),
}
# Variance of a standard normal truncated to (-2, 2), from scipy.
_TN = pytest.importorskip("scipy.stats").truncnorm(-2, 2).var()
KERNEL_INITS["truncated_normal"] = (init.truncated_normal(0.5), 0.25 * _TN)

BIAS_INITS = {
    "zeros": (init.zeros_init(), 0.0),
    "normal": (init.normal(0.3), 0.09),
    "constant_zero": (init.constant(0.0), 0.0),
}


@pytest.mark.parametrize("name", sorted(KERNEL_INITS))
def test_dense_kernel_init_closed_form(name):
  kernel_init, variance = KERNEL_INITS[name]
  bias_init, b_var = BIAS_INITS["normal"]
  layer = nn.Dense(FEATURES, kernel_init=kernel_init, bias_init=bias_init)
  k = ft.kernel_fn(layer)(X1, X2, ("nngp", "ntk"))
  np.testing.assert_allclose(k.nngp, variance * X1 @ X2.T + b_var,
                             rtol=1e-12, atol=1e-15)
  # Standard parameterization: the tangent kernel is x . x' + 1 whatever the
  # variances (the gradient in the weights is the input).
  np.testing.assert_allclose(k.ntk, X1 @ X2.T + 1, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(BIAS_INITS))
def test_dense_bias_init_closed_form(name):
  bias_init, b_var = BIAS_INITS[name]
  layer = nn.Dense(FEATURES, bias_init=bias_init)
  k = ft.kernel_fn(layer)(X1, X2, "nngp")
  np.testing.assert_allclose(k, X1 @ X2.T / FAN_IN + b_var, rtol=1e-12)


def _sampled_variances(model, x, n_samples=64):
  """Mean squared kernel and bias entries over draws of `model.init`, with
  the standard errors of those means."""
  def one(k):
    params = model.init(k, x)["params"]
    return {name: jnp.mean(jnp.square(p)) for name, p in params.items()}

  keys = jax.random.split(jax.random.key(5, impl="rbg"), n_samples)
  draws = jax.jit(jax.vmap(one))(keys)
  return {name: (float(np.mean(v)), float(np.std(v) / np.sqrt(len(v))))
          for name, v in draws.items()}


IMAGES1 = np.random.RandomState(2).randn(2, 4, 4, 3)
IMAGES2 = np.random.RandomState(3).randn(2, 4, 4, 3)

STOCK_LAYERS = {
    "dense_he_normal_bias": lambda: nn.Dense(
        6, kernel_init=init.he_normal(), bias_init=init.normal(0.5)),
    "conv_fan_out_uniform": lambda: nn.Conv(
        6, (3, 3), padding="SAME",
        kernel_init=init.variance_scaling(3.0, "fan_out", "uniform"),
        bias_init=init.truncated_normal(0.4)),
    "conv_glorot_strided": lambda: nn.Conv(
        6, (2, 3), strides=2, padding="VALID",
        kernel_init=init.glorot_normal()),
    "conv_local_normal": lambda: nn.ConvLocal(
        6, (3, 3), padding="SAME", kernel_init=init.normal(0.2),
        bias_init=init.normal(0.5)),
    "conv_local_lecun": lambda: nn.ConvLocal(6, (2, 2), padding="VALID"),
    "conv_transpose_he": lambda: nn.ConvTranspose(
        6, (3, 3), strides=(2, 2), padding="SAME",
        kernel_init=init.he_uniform(), bias_init=init.normal(0.5)),
    "conv_transpose_transposed_kernel": lambda: nn.ConvTranspose(
        6, (2, 3), padding="VALID", transpose_kernel=True,
        kernel_init=init.variance_scaling(2.0, "fan_in", "normal")),
}


def _inputs(name):
  return (X1, X2) if name.startswith("dense") else (IMAGES1, IMAGES2)


@pytest.mark.parametrize("name", sorted(STOCK_LAYERS))
def test_stock_layer_exact_ntk(name):
  # One layer is linear in its parameters: its tangent kernel is the same for
  # every draw and equals the analytic NTK.
  layer = STOCK_LAYERS[name]()
  x1, x2 = _inputs(name)
  k = ft.kernel_fn(layer)(x1, x2, "ntk")
  np.testing.assert_allclose(k, exact_ntk(layer, x1, x2), rtol=1e-10,
                             atol=1e-12)


@pytest.mark.parametrize("name", sorted(STOCK_LAYERS))
def test_stock_layer_nngp_uses_sampled_variances(name):
  # For one standard-parameterized layer, nngp = Var(w) (ntk - [bias]) +
  # Var(b): the exact NTK above fixes the geometry, and the entry variances
  # of parameters drawn by `model.init` fix the scale (Monte Carlo).
  layer = STOCK_LAYERS[name]()
  x1, x2 = _inputs(name)
  k = ft.kernel_fn(layer)(x1, x2, ("nngp", "ntk"))
  sampled = _sampled_variances(layer, jnp.asarray(x1))
  w_var, w_se = sampled["kernel"]
  b_var, b_se = sampled.get("bias", (0.0, 0.0))
  # The bias gradient is 1 where the bias is shared: everywhere, except for
  # ConvLocal's per-location biases (on the spatial diagonal only).
  bias_mask = np.ones_like(np.asarray(k.ntk))
  if isinstance(layer, nn.ConvLocal):
    s1, s2 = k.ntk.shape[2], k.ntk.shape[4]
    bias_mask = np.broadcast_to(
        np.einsum("ab,cd->abcd", np.eye(s1), np.eye(s2)), k.ntk.shape)
  if "bias" not in sampled:
    bias_mask = 0 * bias_mask
  weight_part = np.asarray(k.ntk) - bias_mask
  expected = w_var * weight_part + b_var * bias_mask
  tolerance = 5 * (w_se * np.abs(weight_part) + b_se) + 1e-12
  assert np.all(np.abs(np.asarray(k.nngp) - expected) <= tolerance), (
      np.abs(np.asarray(k.nngp) - expected).max(), tolerance.max())


class Net(nn.Module):
  kernel_init: object = init.lecun_normal()
  bias_init: object = init.zeros

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4, kernel_init=self.kernel_init,
                     bias_init=self.bias_init, name="readout")
    return dense(x)  # the readout line


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_init=init.orthogonal()), r"kernel_init=orthogonal\(\).*"
     r"dependent entries"),
    (dict(kernel_init=lambda key, shape, dtype=None: jnp.ones(shape)),
     r"kernel_init=.*<lambda>.*not one of the recognized"),
    (dict(kernel_init=init.ones), r"kernel_init=ones.*mean 1"),
    (dict(kernel_init=init.uniform(0.1)), r"uniform\(0.1\).*mean is not 0"),
    (dict(bias_init=init.constant(0.1)),
     r"bias_init=constant\(0.1\).*deterministic shift"),
    (dict(kernel_init=init.truncated_normal(1.0, lower=-1.0, upper=2.0)),
     r"bounds are not symmetric"),
    (dict(kernel_init=init.delta_orthogonal()), r"delta_orthogonal"),
], ids=["orthogonal", "lambda", "ones", "uniform", "constant_bias",
        "asymmetric_truncation", "delta_orthogonal"])
def test_unknown_or_uncentred_initializers_are_refused(kwargs, message):
  with pytest.raises(ft.KernelRuleError) as info:
    ft.kernel_fn(Net(**kwargs))(X1, X2)
  text = str(info.value)
  assert "stock nn.Dense (module 'readout')" in text
  # Called inside a lifted module: the line of the call is named.
  with open(__file__) as source:
    line = next(i + 1 for i, s in enumerate(source) if "# the readout line" in s)
  assert f"called at {__file__}:{line}:" in text, text
  assert __import__("re").search(message, text), text


def test_complex_parameters_are_refused():
  with pytest.raises(ft.KernelRuleError, match="complex parameters"):
    ft.kernel_fn(nn.Dense(3, param_dtype=jnp.complex64))(X1)


def test_standard_parameterization_sequence_matches_monte_carlo():
  # Two stock layers with He initialization around a ReLU (from ftn) agree
  # with sampled finite networks.
  from flax_tangents import nn as ftn
  model = nn.Sequential([
      nn.Dense(256, kernel_init=init.he_normal(), bias_init=init.normal(0.1)),
      ftn.Relu(),
      nn.Dense(1, kernel_init=init.variance_scaling(1.5, "fan_in", "uniform"),
               bias_init=init.normal(0.2))])
  k = ft.kernel_fn(model)(X1, X2, ("nngp", "ntk"))
  nngp, _ = sample_kernels(model, jnp.asarray(X1), jnp.asarray(X2),
                           jax.random.key(4), 256)
  assert_mc_close(nngp, np.asarray(k.nngp), n_se=5.0, bias=0.02)
