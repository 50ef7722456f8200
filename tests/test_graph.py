"""Aggregate (graphs): forward, closed forms, Monte Carlo, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from mc_utils import assert_mc_close
from mc_spatial_utils import sample_kernels

RNG = np.random.RandomState(0)
X1, X2 = RNG.randn(3, 5, 4), RNG.randn(2, 5, 4)
P1 = (RNG.rand(3, 5, 5) < 0.4).astype(float)  # random directed graphs
P2 = (RNG.rand(2, 5, 5) < 0.4).astype(float)


class GraphNet(nn.Module):
  """Dense - Relu - Aggregate - Dense, the graph passed at call time."""
  width: int = 16

  @nn.compact
  def __call__(self, x, pattern=None):
    x = ftn.Relu()(ftn.Dense(self.width, b_std=0.1)(x))
    return ftn.Dense(3)(ftn.Aggregate()(x, pattern=pattern))


def test_forward_sums_predecessors():
  y = ftn.Aggregate().apply({}, jnp.asarray(X1), pattern=P1)
  np.testing.assert_allclose(y, np.einsum("nic,nij->njc", X1, P1),
                             rtol=1e-12)
  np.testing.assert_array_equal(ftn.Aggregate().apply({}, X1), X1)


def test_closed_form_and_identity():
  base = ft.kernel_fn(nn.Sequential([ftn.Dense(8), ftn.Relu()]))
  k = base(X1, X2)
  out = ft.kernel_fn(ftn.Aggregate())(k, pattern=(P1, P2))
  np.testing.assert_allclose(
      out.nngp, np.einsum("aip,abij,bjq->abpq", P1, k.nngp, P2), rtol=1e-12)
  eye1, eye2 = np.broadcast_to(np.eye(5), P1.shape), np.broadcast_to(
      np.eye(5), P2.shape)
  same = ft.kernel_fn(ftn.Aggregate())(k, pattern=(eye1, eye2))
  np.testing.assert_allclose(same.nngp, k.nngp, rtol=1e-14)
  np.testing.assert_allclose(same.ntk, k.ntk, rtol=1e-14)


@pytest.mark.parametrize("x2", [None, X2], ids=["x2_none", "x2"])
def test_monte_carlo(x2):
  # One hidden layer and a linear, parameter-free aggregation: per-network
  # kernels are unbiased at any width; allow 5 standard errors of 48
  # networks (width 512).
  model = GraphNet(width=512)
  pattern = P1 if x2 is None else np.concatenate([P1, P2])
  nngp, ntk = sample_kernels(model, X1, x2, jax.random.key(8), 48,
                             batch_size=16, pattern=pattern)
  kernel_pattern = P1 if x2 is None else (P1, P2)
  k = ft.kernel_fn(model)(X1, x2, ("nngp", "ntk"), pattern=kernel_pattern)
  assert_mc_close(nngp, k.nngp)
  assert_mc_close(ntk, k.ntk)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtypes(dtype):
  kernel_fn = ft.kernel_fn(GraphNet())
  k = kernel_fn(jnp.asarray(X1, dtype), jnp.asarray(X2, dtype), "ntk",
                pattern=(jnp.asarray(P1, dtype), jnp.asarray(P2, dtype)))
  assert k.dtype == dtype
  k64 = kernel_fn(X1, X2, "ntk", pattern=(P1, P2))
  # float32: relative to the kernel's scale (some entries are tiny sums).
  tol = 1e-5 if dtype == jnp.float32 else 1e-14
  np.testing.assert_allclose(k, k64, rtol=tol, atol=tol * np.abs(k64).max())


def test_errors():
  kernel_fn = ft.kernel_fn(GraphNet())
  with pytest.raises(ValueError, match="one adjacency tensor per batch"):
    kernel_fn(X1, X2, pattern=P1)
  with pytest.raises(NotImplementedError, match="exactly one"):
    kernel_fn(X1, X2, pattern=(P1, None))
  with pytest.raises(ValueError, match="expected"):
    kernel_fn(X1, X2, pattern=(P1[:, :4, :4], P2))
  with pytest.raises(NotImplementedError, match="DENSE"):
    ftn.Aggregate(implementation="SPARSE").apply({}, X1, pattern=P1)
  with pytest.raises(ValueError, match="batch or channel"):
    ftn.Aggregate(aggregate_axis=-1).apply({}, X1, pattern=P1)
