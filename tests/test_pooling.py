"""Pooling: Monte Carlo limits, closed forms, requirement pass, errors."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import DtypeCase
from testing import ExactCase
from testing import LayerRuleTest
from testing import MonteCarloCase
from testing import RaisesCase
from testing import jit_kernel_fn as _kernel_fn
from testing import make_inputs as _inputs

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


def _exact_case(i, pool, shape):
  model = nn.Sequential([ftn.Conv(3, (2,) * len(shape), padding="SAME",
                                  W_std=1.3, b_std=0.2), pool])
  return ExactCase(f"{i}-{type(pool).__name__}", model, *_inputs(shape))


# Monte Carlo: Conv(64) -> Relu -> pools -> Conv -> global pool -> Dense has
# one nonlinearity and linear layers above it, so the single-network
# estimates are unbiased at any width; we accept 5 standard errors of the
# mean per entry (standard errors measured from the 32 samples; a false
# alarm per entry has probability ~6e-7). Pooling geometry is checked
# exactly above; this checks its composition with a nonlinearity.

# The "rbg" generator compiles several times faster than threefry inside
# `model.init`, which dominates the cost of sampling networks.
def _mc_model():
  return nn.Sequential([
      ftn.Conv(64, (2, 2), padding="SAME", W_std=1.3, b_std=0.2),
      ftn.Relu(), ftn.AvgPool((2, 2), padding="SAME", normalize_edges=True),
      ftn.SumPool((2, 2), strides=(2, 2)), ftn.Conv(8, (1, 1), b_std=0.1),
      ftn.GlobalAvgPool(), ftn.Dense(4)])


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


def _refuse_diagonal():
  k = ft.Kernel.from_inputs(*_inputs((4, 4)), diagonal_spatial=True)
  return ft.kernel_fn(ftn.AvgPool((2, 2)))(k)


class TestPooling(LayerRuleTest):
  exact_cases = [_exact_case(i, *row) for i, row in enumerate(GEOMETRY)]
  monte_carlo_cases = [MonteCarloCase(
      "conv_relu_pools", _mc_model, *_inputs((4, 4)), 32, seed=1,
      impl="rbg", jit=True)]
  dtype_cases = [DtypeCase("sum_pool_circular", nn.Sequential([
      ftn.Conv(4, (2, 2), padding="SAME"), ftn.Relu(),
      ftn.SumPool((2, 2), padding="CIRCULAR"), ftn.GlobalAvgPool(),
      ftn.Dense(1)]), *_inputs((4, 4)), get=("nngp",))]
  raises_cases = [
      RaisesCase("refuses_diagonal_kernel", _refuse_diagonal,
                 "full spatial covariances"),
      RaisesCase("window_rank_mismatch", lambda: ft.kernel_fn(
          ftn.SumPool((2,)))(*_inputs((4, 4))), "window_shape")]
