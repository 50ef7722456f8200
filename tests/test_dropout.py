"""Dropout: forward pass, kernel in training mode, Monte Carlo, errors."""

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


def _net(dropout: nn.Module, width: int = 16) -> nn.Module:
  return nn.Sequential([ftn.Dense(width, b_std=0.2), ftn.Relu(), dropout,
                        ftn.Dense(3)])


def test_forward_is_flax_dropout():
  # `rate` is the probability of dropping, as in Flax: kept units are scaled
  # by 1 / (1 - rate).
  x = jnp.ones((4, 1000))
  y = ftn.Dropout(rate=0.3).apply({}, x, deterministic=False,
                                  rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.7, rtol=1e-6)
  assert abs(kept.mean() - 0.7) < 0.03  # 4000 Bernoulli(0.7): sd 0.007.
  np.testing.assert_array_equal(
      ftn.Dropout(0.3, deterministic=True).apply({}, x), x)


@pytest.mark.parametrize("x2", [None, X2], ids=["x2_none", "x2"])
def test_kernel_scales_only_self_covariances(x2):
  reference = ft.kernel_fn(_net(ftn.Identity()))(X1, x2)
  k = ft.kernel_fn(_net(ftn.Dropout(0.25, deterministic=False)))(X1, x2)
  keep = 0.75
  scale = np.eye(3) / keep + (1 - np.eye(3)) if x2 is None else 1.0
  for field in ("nngp", "ntk"):
    # The readout Dense maps dropout's (nngp, ntk) linearly (W_std = 1).
    before = getattr(reference, field)
    np.testing.assert_allclose(getattr(k, field), before * scale, rtol=1e-12)
  np.testing.assert_allclose(k.cov1, reference.cov1 / keep, rtol=1e-12)


@pytest.mark.parametrize("layer", [
    ftn.Dropout(0.0, deterministic=False), ftn.Dropout(0.4, deterministic=True),
    nn.Dropout(0.4, deterministic=True)])
def test_identity_cases(layer):
  # Rate 0 (nothing dropped) and deterministic mode are the identity.
  reference = ft.kernel_fn(_net(ftn.Identity()))(X1, X2, ("nngp", "ntk"))
  k = ft.kernel_fn(_net(layer))(X1, X2, ("nngp", "ntk"))
  np.testing.assert_allclose(k.nngp, reference.nngp, rtol=1e-14)
  np.testing.assert_allclose(k.ntk, reference.ntk, rtol=1e-14)


def test_deterministic_as_call_argument_and_stock():
  # `deterministic` given at call time (through `ft.kernel_fn`'s kwargs, to
  # the first layer of a Sequential) matches stock `nn.Dropout` as attribute.
  stock = ft.kernel_fn(_net(nn.Dropout(0.25, deterministic=False)))(
      X1, get="nngp")
  hidden = ft.kernel_fn(nn.Sequential([ftn.Dense(16, b_std=0.2),
                                       ftn.Relu()]))(X1)
  top = nn.Sequential([ftn.Dropout(0.25), ftn.Dense(3)])
  ours = ft.kernel_fn(top, deterministic=False)(hidden, get="nngp")
  np.testing.assert_allclose(ours, stock, rtol=1e-14)


def test_spatial_kernel_scales_location_diagonal():
  x = np.random.RandomState(2).randn(2, 4, 3)
  base = nn.Sequential([ftn.Dense(8), ftn.Relu()])
  k = ft.kernel_fn(base)(x)
  k = k.replace(diagonal_spatial=False)
  out = ft.kernel_fn(ftn.Dropout(0.5, deterministic=False))(k)
  # Same input and same location: doubled; everything else unchanged.
  mask = np.einsum("ab,st->abst", np.eye(2), np.eye(4)).astype(bool)
  np.testing.assert_allclose(out.nngp, np.where(mask, 2, 1) * k.nngp,
                             rtol=1e-14)
  shared = ft.kernel_fn(ftn.Dropout(0.5, broadcast_dims=(1,),
                                    deterministic=False))(k)
  # A mask shared along the locations doubles every location pair.
  mask_b = np.einsum("ab,st->abst", np.eye(2), np.ones((4, 4))).astype(bool)
  np.testing.assert_allclose(shared.nngp, np.where(mask_b, 2, 1) * k.nngp,
                             rtol=1e-14)


def _raises(name, model, match, error=ValueError):
  return RaisesCase(name, lambda: ft.kernel_fn(model)(X1), match, error)


class TestDropout(LayerRuleTest):
  # One hidden layer: per-network kernels are unbiased at any width (the
  # masks, weights and readout are independent), so only sampling error is
  # allowed: 5 standard errors measured from 48 networks of width 512.
  monte_carlo_cases = [MonteCarloCase(
      name, lambda: _net(ftn.Dropout(0.3, deterministic=False), width=512),
      X1, x2, 48, seed=3, kwargs=dict(batch_size=16, dropout=True))
                       for name, x2 in (("x2_none", None), ("x2", X2))]
  dtype_cases = [DtypeCase(
      "dropout", _net(ftn.Dropout(0.3, deterministic=False)), X1,
      get=("nngp",), rtol64=1e-14, jit=False, finite=False)]
  raises_cases = [
      _raises("raw_inputs", ftn.Dropout(0.3, deterministic=False),
              "raw inputs"),
      _raises("rate_one", _net(ftn.Dropout(1.0, deterministic=False)),
              "rate of 1"),
      _raises("broadcast_channels", _net(ftn.Dropout(
          0.3, broadcast_dims=(-1,), deterministic=False)), "batch or channel",
              NotImplementedError),
      # Neither attribute nor keyword argument.
      _raises("no_deterministic", _net(ftn.Dropout(0.3)), "deterministic")]
