"""Aggregate (graphs): forward, closed forms, Monte Carlo, errors."""

from typing import Any

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
from testing import assert_mc_close
from testing import sample_kernels

RNG = np.random.RandomState(0)
X1, X2 = RNG.randn(3, 5, 4), RNG.randn(2, 5, 4)
P1 = (RNG.rand(3, 5, 5) < 0.4).astype(float)  # random directed graphs
P2 = (RNG.rand(2, 5, 5) < 0.4).astype(float)


class GraphNet(nn.Module):
  """Dense - Relu - Aggregate - Dense, the graph passed at call time."""
  width: int = 16
  to_dense: Any = None

  @nn.compact
  def __call__(self, x, pattern=None):
    x = ftn.Relu()(ftn.Dense(self.width, b_std=0.1)(x))
    aggregate = ftn.Aggregate(to_dense=self.to_dense)
    return ftn.Dense(3)(aggregate(x, pattern=pattern))


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


def _mc_case(name, x2):
  # One hidden layer and a linear, parameter-free aggregation: per-network
  # kernels are unbiased at any width; allow 5 standard errors of 48
  # networks (width 512). One forward pass takes both batches' graphs.
  pattern = P1 if x2 is None else np.concatenate([P1, P2])
  return MonteCarloCase(
      name, lambda: GraphNet(width=512), X1, x2, 48, seed=8,
      kwargs=dict(batch_size=16, joint=True, pattern=pattern),
      kernel_kwargs=dict(pattern=P1 if x2 is None else (P1, P2)))


def _raises(name, call, match, error=ValueError):
  return RaisesCase(name, call, match, error)


_KERNEL_FN = ft.kernel_fn(GraphNet())
_SPARSE = ftn.Aggregate(implementation="sparse")


class TestAggregate(LayerRuleTest):
  monte_carlo_cases = [_mc_case("x2_none", None), _mc_case("x2", X2)]
  # float32: relative to the kernel's scale (some entries are tiny sums).
  dtype_cases = [DtypeCase("graph_net", GraphNet(), X1, X2, get=("ntk",),
                           atol32_rel=1e-5, rtol64=1e-14, jit=False,
                           finite=False, kernel_kwargs=dict(pattern=(P1, P2)))]
  raises_cases = [
      _raises("one_graph_per_batch", lambda: _KERNEL_FN(X1, X2, pattern=P1),
              "one graph per batch"),
      _raises("one_pattern_none", lambda: _KERNEL_FN(
          X1, X2, pattern=(P1, None)), "exactly one", NotImplementedError),
      _raises("pattern_shape", lambda: _KERNEL_FN(
          X1, X2, pattern=(P1[:, :4, :4], P2)), "expected"),
      _raises("sparse_integer", lambda: _SPARSE.apply(
          {}, X1, pattern=P1[..., :2].astype(float)), "integer"),
      _raises("sparse_shape", lambda: _SPARSE.apply(
          {}, X1, pattern=np.zeros((3, 4, 2, 2), int)),
              r"\(batch, n_edges, K, 2\)"),
      _raises("sparse_past_end", lambda: _SPARSE.apply(
          {}, X1, pattern=np.full((3, 4, 2), 5)), "past the end"),
      _raises("to_dense_sparse", lambda: ftn.Aggregate(
          implementation="SPARSE", to_dense=lambda p: p), "`to_dense` applies"),
      _raises("implementation", lambda: ftn.Aggregate(implementation="COO"),
              "not one of"),
      _raises("aggregate_axis", lambda: ftn.Aggregate(
          aggregate_axis=-1).apply({}, X1, pattern=P1), "batch or channel")]


# SPARSE: edge lists give the DENSE results on the same graphs.

def _random_edges(n_graphs, sizes, n_edges, n_pad, seed):
  """Integer edge lists `(n_graphs, n_edges, K, 2)` with some padding edges
  (negative coordinates) and repeats, and the same graphs as dense tensors
  (built independently with `np.add.at`)."""
  rng = np.random.RandomState(seed)
  k = len(sizes)
  edges = np.stack([rng.randint(0, s, (n_graphs, n_edges, 2))
                    for s in sizes], axis=2)
  edges[:, 0] = edges[:, 1]                      # one repeated edge
  for g in range(n_graphs):
    pad = rng.choice(n_edges, n_pad, replace=False)
    edges[g, pad, rng.randint(k), rng.randint(2)] = -1
  dense = np.zeros((n_graphs,) + tuple(sizes) * 2)
  for g in range(n_graphs):
    for e in edges[g]:
      if (e >= 0).all():
        np.add.at(dense, (g,) + tuple(e[:, 0]) + tuple(e[:, 1]), 1.0)
  return edges, dense


@pytest.mark.parametrize("aggregate_axis,sizes,diagonal_batch", [
    (None, (5,), True), ((2,), (4,), False), ((1, 2), (3, 4), False)])
def test_sparse_equals_dense(aggregate_axis, sizes, diagonal_batch):
  # Padding edges have a negative tail or head coordinate; `_random_edges`
  # drops both kinds from the dense graph. NT is wrong for a negative tail
  # with a valid head: it reads the last vertex (JAX's negative indexing)
  # and sends it to the head; here such an edge is padding, as documented.
  spatial = (5,) if len(sizes) == 1 and aggregate_axis is None else (3, 4)
  x1 = RNG.randn(3, *spatial, 2)
  x2 = RNG.randn(2, *spatial, 2)
  e1, d1 = _random_edges(3, sizes, 9, 2, seed=1)
  e2, d2 = _random_edges(2, sizes, 9, 3, seed=2)

  def net(implementation):
    return nn.Sequential([ftn.Dense(4, b_std=0.1), ftn.Relu(),
                          ftn.Dense(4)]), ftn.Aggregate(
                              aggregate_axis, implementation)

  base, dense = net("DENSE")
  _, sparse = net("SPARSE")
  np.testing.assert_allclose(sparse.apply({}, x1, pattern=e1),
                             dense.apply({}, x1, pattern=d1), rtol=1e-12)
  k = ft.kernel_fn(base)(ft.Kernel.from_inputs(
      x1, x2, diagonal_batch=diagonal_batch))
  got = ft.kernel_fn(sparse)(k, pattern=(e1, e2))
  want = ft.kernel_fn(dense)(k, pattern=(d1, d2))
  for field in ("nngp", "ntk", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(got, field), getattr(want, field),
                               rtol=1e-12, atol=1e-14)


def test_sparse_monte_carlo_and_to_dense():
  # As test_monte_carlo, with edge lists; and DENSE with `to_dense` decoding
  # the same edge lists gives the same kernel.
  e1, d1 = _random_edges(3, (5,), 7, 1, seed=3)
  model = GraphNet(width=512)
  sparse = GraphNetSparse(width=512)
  nngp, ntk = sample_kernels(sparse, X1, None, jax.random.key(9), 48,
                             batch_size=16, pattern=e1)  # x2=None: joint
  k = ft.kernel_fn(sparse)(X1, None, ("nngp", "ntk"), pattern=e1)
  assert_mc_close(nngp, k.nngp)
  assert_mc_close(ntk, k.ntk)
  dense = ft.kernel_fn(model)(X1, None, ("nngp", "ntk"), pattern=d1)
  np.testing.assert_allclose(k.nngp, dense.nngp, rtol=1e-12)
  decode = lambda e: _random_edges_to_dense(e, 5)
  decoded = GraphNet(width=512, to_dense=decode)
  np.testing.assert_allclose(
      ft.kernel_fn(decoded)(X1, None, "ntk", pattern=e1), dense.ntk,
      rtol=1e-12)


def _random_edges_to_dense(edges, size):
  """A user's `to_dense`: edge list `(N, E, 1, 2)` -> adjacency `(N, V, V)`."""
  edges = jnp.asarray(edges)[:, :, 0]
  valid = jnp.all(edges >= 0, axis=-1).astype(float)
  n = jnp.arange(edges.shape[0])[:, None]
  return jnp.zeros((edges.shape[0], size, size)).at[
      n, edges[..., 0], edges[..., 1]].add(valid)


class GraphNetSparse(nn.Module):
  """GraphNet with an edge-list graph."""
  width: int = 16

  @nn.compact
  def __call__(self, x, pattern=None):
    x = ftn.Relu()(ftn.Dense(self.width, b_std=0.1)(x))
    aggregate = ftn.Aggregate(implementation=ftn.AggregateImplementation.SPARSE)
    return ftn.Dense(3)(aggregate(x, pattern=pattern))
