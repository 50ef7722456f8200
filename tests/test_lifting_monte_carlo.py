"""Lifted patterns against finite networks, the quadrature's warning, and
the location-copying operations (`jnp.stack`, `jnp.tile`, `jnp.repeat`).

The Monte Carlo model uses every structural pattern at once (a sum of a
non-centred and a fresh branch, a product of independent branches, scaling,
concatenation, transposition, flipping, padding, average pooling, slicing,
a mean over locations, flattening) on first-layer pre-activations only, so
its NNGP and NTK are unbiased at any width: the tolerance is statistical
alone.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents._src.analytic.lifting.activations import (
  LiftedQuadratureWarning,
)
from testing import assert_mc_close
from testing import exact_ntk
from testing import jit_kernel_fn
from testing import sample_kernels

RS = np.random.RandomState(7)
IMG1, IMG2 = RS.randn(2, 4, 3, 2), RS.randn(2, 4, 3, 2)
X1, X2 = RS.randn(3, 4), RS.randn(2, 4)


class Patterns(nn.Module):
  """One hidden (convolutional) layer, then only lifted plain functions."""
  width: int = 16
  readout: bool = True

  @nn.compact
  def __call__(self, x):
    conv = lambda size: nn.Conv(self.width, size, padding="SAME",
                                bias_init=nn.initializers.normal(0.3))
    a, b, c, d = conv((3, 3))(x), conv((3, 3))(x), conv((2, 2))(x), conv(
        (1, 1))(x)
    y = jnp.concatenate([
        nn.relu(a) + b,                      # non-centred + fresh branch
        jnp.sin(c) * d,                      # product of independent ones
        2.0 * nn.gelu(a, approximate=False)[:, ::-1],  # scaled, flipped
    ], axis=-1)
    y = jnp.transpose(y, (0, 2, 1, 3))       # (N, 3, 4, C)
    y = jnp.pad(y, ((0, 0), (1, 0), (0, 1), (0, 0)))  # (N, 4, 5, C)
    y = nn.avg_pool(y, (2, 2), strides=(1, 2))  # (N, 3, 2, C)
    y = y[:, 1:, :2].mean(axis=1)            # (N, 2, C)
    y = y.reshape((y.shape[0], -1))
    return nn.Dense(8)(y) if self.readout else y


def test_patterns_monte_carlo():
  k = jit_kernel_fn(Patterns())(IMG1, IMG2, get=("nngp", "ntk"))
  # NNGP: the readout's expectation taken exactly (its weights have variance
  # 1 / fan_in and its bias is zero), so that only the features are sampled:
  # y1 . y2 / fan_in per network, from forward passes.
  nngp, _ = sample_kernels(Patterns(width=64, readout=False), IMG1, IMG2,
                           jax.random.key(10), 64, ntk=None)
  assert_mc_close(nngp, np.asarray(k.nngp), n_se=5.0)
  _, ntk = sample_kernels(Patterns(), jnp.asarray(IMG1), jnp.asarray(IMG2),
                          jax.random.key(11), 32)
  assert_mc_close(ntk, np.asarray(k.ntk), n_se=5.0)


def _mlp(fn, w_std=1.0):
  return nn.Sequential([nn.Dense(8, kernel_init=nn.initializers.normal(
      w_std)), fn, nn.Dense(1)])


def test_written_x_sigmoid_x_is_silu():
  # `x * sigmoid(x)` as the user writes it: one elementwise function of one
  # pre-activation (quadrature), equal to a high-degree reference.
  lifted = _mlp(lambda h: h * nn.sigmoid(h))
  reference = _mlp(ftn.ElementwiseNumerical(fn=nn.silu, deg=100))
  kernels = lambda m: jit_kernel_fn(m)(X1, X2, get=("nngp", "ntk"))
  got, want = kernels(lifted), kernels(reference)
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=5e-6)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=5e-6)


def _quadrature_warnings(model):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ft.kernel_fn(model)(X1, X2, ("nngp", "ntk"))
    jax.effects_barrier()
  return [str(w.message) for w in caught
          if issubclass(w.category, LiftedQuadratureWarning)]


def test_quadrature_warns_beyond_its_stated_accuracy():
  # Pre-activation variances ~4 (stated accuracy holds): silent. Variances
  # ~400 (weights of std 10): the 64- and 48-node rules disagree by more
  # than 1e-4, and the warning names the function and the fix.
  assert not _quadrature_warnings(_mlp(nn.softplus))
  messages = _quadrature_warnings(_mlp(nn.softplus, w_std=10.0))
  assert messages, "no LiftedQuadratureWarning at large variances"
  assert "softplus (quadrature)" in messages[0]
  assert "ElementwiseNumerical" in messages[0]


@pytest.mark.parametrize("fn", [nn.relu, jnp.tanh])
def test_quadrature_warning_is_not_raised_for_closed_forms(fn):
  # ReLU is a closed form at any variance; tanh's quadrature corrects a
  # close closed form, and stays within its accuracy at these variances.
  assert not _quadrature_warnings(_mlp(fn, w_std=10.0 if fn is nn.relu
                                       else 1.0))


class Stacked(nn.Module):
  how: str

  @nn.compact
  def __call__(self, x):
    a, b = nn.Dense(6)(x), nn.Dense(6)(x)
    parts = [2.0 * a, b] if self.how != "non_gaussian" else [nn.relu(a), b]
    if self.how in ("stack", "non_gaussian"):
      y = jnp.stack(parts, axis=1)  # (N, 2, 6)
    elif self.how == "expand_concat":
      y = jnp.concatenate([p[:, None] for p in parts], axis=1)
    else:
      y = jnp.concatenate(parts, axis=-1)  # (N, 12)
    return nn.Dense(3)(y.reshape((y.shape[0], -1)))


@pytest.mark.parametrize("how", ["stack", "expand_concat"])
def test_stack_along_a_new_location_axis(how):
  # Flattened, two stacked locations of 6 channels are 12 units, as the
  # same values concatenated along channels.
  got = ft.kernel_fn(Stacked(how))(X1, X2, ("nngp", "ntk"))
  want = ft.kernel_fn(Stacked("channels"))(X1, X2, ("nngp", "ntk"))
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


def test_stack_of_correlated_values_is_refused():
  class Correlated(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(6)(x)
      return jnp.stack([h, nn.relu(h)], axis=1)

  with pytest.raises(ft.KernelRuleError, match=r"`stack`.*correlated"):
    ft.kernel_fn(Correlated())(X1, X2)
  # Uncorrelated, but a stacked ReLU output is not centred: the covariance
  # with its new neighbours is not tracked (as for FanInConcat).
  with pytest.raises(ft.KernelRuleError, match=r"`stack` at .*not a zero-"
                     r"mean Gaussian"):
    ft.kernel_fn(Stacked("non_gaussian"))(X1, X2)


@pytest.mark.parametrize("op", ["tile", "repeat"])
def test_tile_and_repeat_are_exact_for_a_linear_network(op):
  # Conv -> tile/repeat over locations -> flatten is linear in its
  # parameters: the finite network's tangent kernel is the analytic NTK.

  class Copies(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(3, (2, 2), kernel_init=nn.initializers.normal(1.0))(x)
      if op == "tile":
        return jnp.tile(h, (1, 2, 3, 1))
      return jnp.repeat(h, 2, axis=2)

  got = ft.kernel_fn(Copies())(IMG1, IMG2, "ntk")
  np.testing.assert_allclose(got, exact_ntk(Copies(), IMG1, IMG2),
                             rtol=1e-10, atol=1e-12)


def test_tile_of_channels_is_refused():
  class TiledChannels(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.tile(nn.Conv(3, (2, 2))(x), (1, 1, 1, 2))

  with pytest.raises(ft.KernelRuleError, match=r"`tile` at .*channel axis"):
    ft.kernel_fn(TiledChannels())(IMG1, IMG2)
