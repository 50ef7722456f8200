"""Pooling: Monte Carlo limits, closed forms, requirement pass, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from exact_utils import exact_ntk
from mc_utils import assert_mc_close, sample_kernels


def _inputs(shape, n1=2, n2=2, channels=2):
  k1, k2 = jax.random.split(jax.random.key(0))
  return (jax.random.normal(k1, (n1,) + shape + (channels,)),
          jax.random.normal(k2, (n2,) + shape + (channels,)))


def _kernel_fn(model):
  """`ft.kernel_fn(model)`, jitted: one compilation instead of many eager
  ones (the eager path is exercised by the other test files)."""
  return jax.jit(ft.kernel_fn(model), static_argnames="get")


# Exact: a convolution followed by pooling is linear in its parameters, so
# its tangent kernel is the same for every draw and equals the analytic
# kernel to float64 precision. This checks every pooling layer, padding,
# stride, normalization and dimension against the finite `apply`.
GEOMETRY = [
    (ftn.AvgPool((2, 2), strides=(2, 2)), (4, 4)),
    (ftn.AvgPool((3,), padding="SAME"), (5,)),
    (ftn.AvgPool((3,), padding="SAME", normalize_edges=True), (5,)),
    (ftn.AvgPool((2, 3), strides=(1, 2), padding="CIRCULAR"), (3, 4)),
    (ftn.AvgPool((2, 2, 2), padding="SAME", normalize_edges=True), (2, 3, 2)),
    (ftn.SumPool((2, 2, 2), padding="CIRCULAR"), (2, 3, 2)),
    (ftn.SumPool((3,), strides=(2,), padding="SAME"), (5,)),
    (ftn.SumPool((2, 2), strides=(2, 1)), (4, 3)),
]


@pytest.mark.parametrize("pool,shape", GEOMETRY)
def test_conv_then_pool_is_exact(pool, shape):
  x1, x2 = _inputs(shape)
  n = len(shape)
  model = nn.Sequential([ftn.Conv(3, (2,) * n, padding="SAME", W_std=1.3,
                                  b_std=0.2), pool])
  k = _kernel_fn(model)(x1, x2, ("nngp", "ntk"))
  np.testing.assert_allclose(k.ntk, exact_ntk(model, x1, x2), rtol=1e-10,
                             atol=1e-12)
  np.testing.assert_allclose(k.nngp, k.ntk, rtol=1e-12)


# Monte Carlo: Conv(64) -> Relu -> pools -> Conv -> global pool -> Dense has
# one nonlinearity and linear layers above it, so the single-network
# estimates are unbiased at any width; we accept 5 standard errors of the
# mean per entry (standard errors measured from the 32 samples; a false
# alarm per entry has probability ~6e-7). Pooling geometry is checked
# exactly above; this checks its composition with a nonlinearity.

# The "rbg" generator compiles several times faster than threefry inside
# `model.init`, which dominates the cost of sampling networks.
_MC_KEY = jax.random.key(1, impl="rbg")


def test_monte_carlo():
  x1, x2 = _inputs((4, 4))
  model = nn.Sequential([
      ftn.Conv(64, (2, 2), padding="SAME", W_std=1.3, b_std=0.2),
      ftn.Relu(), ftn.AvgPool((2, 2), padding="SAME", normalize_edges=True),
      ftn.SumPool((2, 2), strides=(2, 2)), ftn.Conv(8, (1, 1), b_std=0.1),
      ftn.GlobalAvgPool(), ftn.Dense(4)])
  nngp, ntk = sample_kernels(model, x1, x2, _MC_KEY, 32)
  expected = _kernel_fn(model)(x1, x2, ("nngp", "ntk"))
  assert_mc_close(nngp, expected.nngp)
  assert_mc_close(ntk, expected.ntk)


# Closed forms.

def test_global_pools_of_full_covariances():
  x1, x2 = _inputs((3, 4))
  conv = ftn.Conv(4, (2, 2), padding="SAME", b_std=0.1)
  before = _kernel_fn(conv)(x1, x2)
  avg = _kernel_fn(nn.Sequential([conv, ftn.GlobalAvgPool()]))(x1, x2)
  total = _kernel_fn(nn.Sequential([conv, ftn.GlobalSumPool()]))(x1, x2)
  np.testing.assert_allclose(avg.nngp, before.nngp.mean(axis=(2, 3, 4, 5)),
                             rtol=1e-12)
  np.testing.assert_allclose(total.ntk, before.ntk.sum(axis=(2, 3, 4, 5)),
                             rtol=1e-12)
  assert avg.shape1 == (2, 4)


def test_window_equal_to_image_is_global_pool():
  x1, x2 = _inputs((3, 4))
  conv = ftn.Conv(4, (2, 2), padding="SAME", b_std=0.1)
  windowed = _kernel_fn(nn.Sequential([conv, ftn.AvgPool((3, 4)),
                                        ftn.Flatten()]))(x1, x2)
  pooled = _kernel_fn(nn.Sequential([conv, ftn.GlobalAvgPool()]))(x1, x2)
  np.testing.assert_allclose(windowed.nngp, pooled.nngp, rtol=1e-12)
  np.testing.assert_allclose(windowed.ntk, pooled.ntk, rtol=1e-12)


@pytest.mark.parametrize("normalize_edges", [False, True])
def test_avg_pool_same_normalization(normalize_edges):
  # On a constant image the finite AvgPool gives 1 inside and, at the edges,
  # 1 (normalize_edges) or the fraction of real inputs in the window.
  layer = ftn.AvgPool((3,), padding="SAME", normalize_edges=normalize_edges)
  y = layer.apply({}, jnp.ones((1, 4, 1)))[0, :, 0]
  edge = 1.0 if normalize_edges else 2 / 3
  np.testing.assert_allclose(y, [edge, 1, 1, edge], rtol=1e-12)
  # The kernel of perfectly correlated locations scales the same way.
  k = ft.Kernel.from_inputs(jnp.ones((1, 4, 1)))
  pooled = ft.kernel_fn(layer)(k)
  np.testing.assert_allclose(pooled.nngp[0, 0], np.outer(y, y), rtol=1e-12)


def test_sum_pool_is_window_times_avg_pool():
  x1, x2 = _inputs((5, 5))
  conv = ftn.Conv(4, (2, 2), b_std=0.1)
  make = lambda pool: nn.Sequential([conv, ftn.Relu(), pool,
                                     ftn.GlobalAvgPool()])
  total = _kernel_fn(make(ftn.SumPool((2, 2), strides=(1, 2))))(x1, x2)
  avg = _kernel_fn(make(ftn.AvgPool((2, 2), strides=(1, 2))))(x1, x2)
  np.testing.assert_allclose(total.nngp, 16 * avg.nngp, rtol=1e-12)


# Requirement pass and errors.

def test_pooling_keeps_full_covariances_below():
  x1, x2 = _inputs((4, 4))
  model = nn.Sequential([ftn.Conv(4, (3, 3), padding="SAME"), ftn.Relu(),
                         ftn.AvgPool((2, 2)), ftn.Flatten(), ftn.Dense(1)])
  k = _kernel_fn(model)(x1, x2)
  assert not k.diagonal_spatial  # AvgPool mixes locations.


def test_pool_refuses_diagonal_kernel():
  x1, x2 = _inputs((4, 4))
  k = ft.Kernel.from_inputs(x1, x2, diagonal_spatial=True)
  with pytest.raises(ValueError, match="full spatial covariances"):
    ft.kernel_fn(ftn.AvgPool((2, 2)))(k)


def test_pool_window_rank_mismatch():
  x1, x2 = _inputs((4, 4))
  with pytest.raises(ValueError, match="window_shape"):
    ft.kernel_fn(ftn.SumPool((2,)))(x1, x2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtypes(dtype):
  x1, x2 = _inputs((4, 4))
  model = nn.Sequential([ftn.Conv(4, (2, 2), padding="SAME"), ftn.Relu(),
                         ftn.SumPool((2, 2), padding="CIRCULAR"),
                         ftn.GlobalAvgPool(), ftn.Dense(1)])
  nngp = _kernel_fn(model)(x1.astype(dtype), x2.astype(dtype), "nngp")
  assert nngp.dtype == dtype
