"""Randomly generated architectures against invariants that need no
reference library (issue 9: tests that keep "no silently wrong number").

`architecture_generator` draws small networks from the whole layer set,
seeded. Every valid network must give kernels that are finite, symmetric
and PSD, equal for `x2=None` and `x2=x1`, equal in float32 and float64 (to
float32's precision), and unchanged when a nonlinearity and `Flatten` are
swapped. A sample is checked against Monte Carlo estimates of wide finite
networks; networks whose parameters enter linearly against their exact
`J J^T`. Every invalid network must be refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from architecture_generator import linear_network
from architecture_generator import valid_network
from invalid_architectures import DEFECTS
from invalid_architectures import invalid_network
from testing import assert_mc_close
from testing import sample_kernels

# Sizes chosen for CI (about 3 s of compilation per valid network).
N_VALID = 24
N_LINEAR = 12
N_INVALID = len(DEFECTS)
WIDTH = 3  # The analytic kernel does not depend on it.
FIELDS = ("nngp", "ntk", "cov1", "cov2")
# Networks of the valid generator that Monte Carlo checks (cheap enough:
# no attention or dropout, at most two nonlinearities), the first few.
MC_SEEDS = [s for s in range(N_VALID)
            if valid_network(s).monte_carlo and not valid_network(s).dropout
            ][:3]


def _inputs(network, seed, n1=3, n2=2):
  rng = np.random.RandomState(seed)
  return (rng.randn(n1, *network.input_shape),
          rng.randn(n2, *network.input_shape))


def _scaled_error(a, b):
  return np.max(np.abs(np.asarray(a, np.float64) - b)) / max(
      np.max(np.abs(b)), 1e-30)


def _as_matrix(k, diagonal_spatial):
  """`(N, N, spatial...)` as matrices over (input, location) pairs."""
  k = np.asarray(k)
  if k.ndim == 2:
    return k[None]
  if diagonal_spatial:   # one (N, N) matrix per location
    return np.moveaxis(k.reshape(k.shape[:2] + (-1,)), -1, 0)
  n, spatial = k.shape[0], k.shape[2::2]
  order = [0] + [2 + 2 * i for i in range(len(spatial))] + [1] + [
      3 + 2 * i for i in range(len(spatial))]
  size = n * int(np.prod(spatial))
  return np.transpose(k, order).reshape(1, size, size)


@pytest.mark.parametrize("seed", range(N_VALID))
def test_valid_network_invariants(seed):
  network = valid_network(seed)
  kernel_fn = ft.kernel_fn(network.build(WIDTH))
  x1, x2 = _inputs(network, seed)
  where = f"seed {seed}: {network.description}"
  # One compilation for all the variants compared below.
  kernel, same, explicit, single = jax.jit(lambda a, b, a32, b32: (
      kernel_fn(a, b), kernel_fn(a), kernel_fn(a, a), kernel_fn(a32, b32)))(
          x1, x2, x1.astype(np.float32), x2.astype(np.float32))
  for field in FIELDS:
    assert np.all(np.isfinite(getattr(kernel, field))), where

  # x2=None is x2=x1 (training-mode dropout differs on the diagonal, by
  # design: one forward pass sees one mask).
  if not network.dropout:
    for field in ("nngp", "ntk", "cov1"):
      np.testing.assert_allclose(getattr(same, field),
                                 getattr(explicit, field), rtol=1e-10,
                                 atol=1e-12, err_msg=where)

  # Symmetric and PSD over (input, location) pairs.
  for field in ("nngp", "ntk"):
    for m in _as_matrix(getattr(same, field), same.diagonal_spatial):
      scale = max(np.max(np.abs(m)), 1e-30)
      np.testing.assert_allclose(m, m.T, atol=1e-10 * scale, err_msg=where)
      assert np.min(np.linalg.eigvalsh(m)) >= -1e-8 * scale, where

  # float32 inputs: the same kernel to float32's precision.
  for field in ("nngp", "ntk"):
    assert getattr(single, field).dtype == np.float32
    assert _scaled_error(getattr(single, field),
                         getattr(kernel, field)) < 2e-3, (where, field)

  # A nonlinearity right after Flatten acts per location: the same as
  # before Flatten.
  if network.swapped is not None:
    swapped = jax.jit(ft.kernel_fn(network.swapped.build(WIDTH)))(x1, x2)
    for field in FIELDS:
      np.testing.assert_allclose(getattr(swapped, field),
                                 getattr(kernel, field), rtol=1e-10,
                                 atol=1e-12, err_msg=where)


@pytest.mark.parametrize("seed", MC_SEEDS)
def test_valid_network_agrees_with_monte_carlo(seed):
  network = valid_network(seed)
  x1, x2 = _inputs(network, seed, n1=2, n2=2)
  expected = ft.kernel_fn(network.build(WIDTH))(x1, x2)
  nngp, ntk = sample_kernels(network.build(128), x1, x2,
                             jax.random.key(seed), 64, ntk="projected")
  # Finite-width bias is O(depth / width) beyond one hidden layer.
  bias = 0.0 if network.nonlinear_depth <= 1 else 0.05
  assert_mc_close(nngp, expected.nngp, n_se=5.0, bias=bias)
  assert_mc_close(ntk, expected.ntk, n_se=5.0, bias=bias)


@pytest.mark.parametrize("seed", range(N_LINEAR))
def test_linear_network_ntk_is_exactly_j_jt(seed):
  # Parameters enter linearly: J does not depend on them, so the NTK of
  # any finite network (any width) equals the limit, entry by entry.
  network = linear_network(seed)
  model = network.build(WIDTH)
  x1, x2 = _inputs(network, seed)
  params = model.init(jax.random.key(seed), x1[:1])["params"]
  f = lambda p, x: model.apply({"params": p}, x)
  j1, j2 = jax.jit(lambda p: (jax.jacobian(f)(p, x1),
                              jax.jacobian(f)(p, x2)))(params)
  out_ndim = f(params, x1).ndim
  spatial = out_ndim - 2

  def contract(a, b):
    a = a.reshape(a.shape[:out_ndim] + (-1,))
    b = b.reshape(b.shape[:out_ndim] + (-1,))
    letters = "defghijk"[:spatial]
    other = "DEFGHIJK"[:spatial]
    paired = "".join(l + o for l, o in zip(letters, other))
    return jnp.einsum(f"a{letters}cp,b{other}cp->ab{paired}", a, b) / (
        a.shape[out_ndim - 1])

  empirical = sum(contract(a, b) for a, b in
                  zip(jax.tree.leaves(j1), jax.tree.leaves(j2)))
  analytic = jax.jit(lambda a, b: ft.kernel_fn(model)(
      a, b, "ntk", diagonal_spatial=False))(x1, x2)
  np.testing.assert_allclose(
      empirical, analytic, rtol=1e-4, atol=1e-5 * np.max(np.abs(analytic)),
      err_msg=f"seed {seed}: {network.description}")


@pytest.mark.parametrize("seed", range(N_INVALID))
def test_invalid_network_is_refused(seed):
  network, call_kwargs, defect = invalid_network(seed)
  x1, x2 = _inputs(network, seed)
  with pytest.raises((ValueError, TypeError, NotImplementedError)) as info:
    ft.kernel_fn(network.build(WIDTH))(x1, x2, **call_kwargs)
  # The message names a cause, not an internal failure.
  assert not isinstance(info.value, (AttributeError, KeyError, IndexError)), (
      defect, info.value)
  assert len(str(info.value)) > 40, (defect, info.value)


def test_generators_cover_the_layer_set():
  # The valid networks use most of the layer set; every defect is drawn.
  names = set()
  for seed in range(N_VALID):
    names.update(n.split("[")[0] for n in valid_network(seed).description)
  expected = {"Dense", "nn.Dense", "Conv", "nn.Conv", "ConvLocal", "Relu",
              "Erf", "Flatten", "GlobalAvgPool", "AvgPool", "SumPool",
              "Residual", "Concat", "Product", "LayerNorm", "Dropout",
              "GlobalSelfAttention", "ImageResize", "Index"}
  assert expected <= names, expected - names
  assert {invalid_network(s)[2] for s in range(N_INVALID)} == {
      d[0] for d in DEFECTS}
  assert sum(valid_network(s).swapped is not None
             for s in range(N_VALID)) >= 2
  assert len(MC_SEEDS) == 3
