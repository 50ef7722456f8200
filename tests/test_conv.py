"""Convolutions: Monte Carlo limits, closed forms, layouts, dtypes, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents._src.analytic import conv as conv_math
from flax_tangents._src.analytic import pooling as pooling_math
from flax_tangents._src.analytic import spatial_maps
from flax_tangents._src.analytic.covariance import spatial_diagonal
from testing import DtypeCase
from testing import ExactCase
from testing import LayerRuleTest
from testing import MonteCarloCase
from testing import RaisesCase
from testing import jit_kernel_fn as _kernel_fn
from testing import make_inputs

SPATIAL = {1: (5,), 2: (4, 4), 3: (4, 4, 4)}


def _inputs(n_spatial, **kwargs):
  return make_inputs(SPATIAL[n_spatial], **kwargs)


def _window(n_spatial, k):
  return (k,) * n_spatial


# Exact: one convolution on the inputs is linear in its parameters, so its
# tangent kernel is the same for every draw and equals the analytic NTK to
# float64 precision (also the NNGP, for the NTK parameterization). This
# checks every layer, padding, stride and dimension against the finite
# `apply`, without sampling.
GEOMETRY = [
    # (layer class, n_spatial, padding, strides, parameterization)
    (ftn.Conv, 1, "VALID", 1, "ntk"),
    (ftn.Conv, 1, "SAME", 2, "standard"),
    (ftn.Conv, 1, "CIRCULAR", 2, "ntk"),
    (ftn.Conv, 2, "SAME", 2, "ntk"),
    (ftn.Conv, 2, "CIRCULAR", 1, "standard"),
    (ftn.Conv, 2, "VALID", 2, "ntk"),
    (ftn.Conv, 3, "SAME", 1, "ntk"),
    (ftn.Conv, 3, "CIRCULAR", 2, "ntk"),
    (ftn.ConvTranspose, 1, "SAME", 2, "ntk"),
    (ftn.ConvTranspose, 1, "CIRCULAR", 1, "standard"),
    (ftn.ConvTranspose, 2, "VALID", 1, "ntk"),
    (ftn.ConvTranspose, 2, "CIRCULAR", 2, "ntk"),
    (ftn.ConvTranspose, 3, "SAME", 2, "ntk"),
    (ftn.ConvLocal, 1, "SAME", 1, "ntk"),
    (ftn.ConvLocal, 2, "VALID", 1, "standard"),
    (ftn.ConvLocal, 2, "CIRCULAR", 2, "ntk"),
    (ftn.ConvLocal, 3, "VALID", 1, "ntk"),
]


def _exact_case(cls, n_spatial, padding, stride, param):
  x1, x2 = _inputs(n_spatial)
  if n_spatial == 3:  # keep the 3-D Jacobians small
    x1, x2 = x1[:, :3, :3, :3], x2[:, :3, :3, :3]
  model = cls(3, _window(n_spatial, 3 if cls is not ftn.ConvLocal else 2),
              strides=_window(n_spatial, stride), padding=padding, W_std=1.3,
              b_std=0.2, parameterization=param)
  name = f"{cls.__name__}-{n_spatial}-{padding}-{stride}-{param}"
  return ExactCase(name, model, x1, x2, nngp_is_ntk=param == "ntk")


# Monte Carlo. Each network has one nonlinearity; the layers above it are
# linear in independent weights, so single-network NNGP and NTK estimates
# are unbiased at any width and the only error is sampling noise. We accept
# 5 standard errors of the mean per entry, the standard error measured from
# the samples (a false alarm per entry has probability ~6e-7). The geometry
# of each layer is checked exactly above; these check the composition with
# a nonlinearity and both parameterizations, with every layer family.

# The "rbg" generator compiles several times faster than threefry inside
# `model.init`, which dominates the cost of sampling networks.

def _mc_model():
  return nn.Sequential([
      ftn.Conv(64, (3, 3), padding="SAME", W_std=1.3, b_std=0.2),
      ftn.Relu(),
      ftn.ConvTranspose(8, (2, 2), strides=(2, 2), padding="SAME",
                        b_std=0.1, parameterization="standard"),
      ftn.ConvLocal(8, (2, 2), W_std=1.1, b_std=0.1),
      ftn.GlobalAvgPool(), ftn.Dense(4, W_std=1.1)])


# Closed forms.

@pytest.mark.parametrize("param", ["ntk", "standard"])
def test_conv_on_1x1_image_is_dense(param):
  x = jax.random.normal(jax.random.key(0), (3, 1, 1, 5))
  conv = nn.Sequential([ftn.Conv(8, (3, 3), padding="SAME", W_std=1.5,
                                 b_std=0.2, parameterization=param),
                        ftn.Relu(), ftn.Flatten()])
  dense = nn.Sequential([ftn.Dense(8, W_std=1.5 / 3, b_std=0.2,
                                   parameterization=param),
                         ftn.Relu()])
  # SAME padding on a 1x1 image: 8 of 9 filter taps see zeros, so the
  # weight variance per real input is W_std^2 / 9; the standard NTK's
  # fan-in counts all 9 taps, hence the extra factor below.
  k_conv = _kernel_fn(conv)(x, get=("nngp", "ntk"))
  k_dense = _kernel_fn(dense)(x.reshape(3, 5), get=("nngp", "ntk"))
  np.testing.assert_allclose(k_conv.nngp, k_dense.nngp, rtol=1e-12)
  if param == "ntk":
    np.testing.assert_allclose(k_conv.ntk, k_dense.ntk, rtol=1e-12)


@pytest.mark.parametrize("n_spatial", [1, 3])
def test_kernel_size_one_is_dense_per_location(n_spatial):
  x1, x2 = _inputs(n_spatial, channels=3)
  conv = ftn.Conv(4, _window(n_spatial, 1), W_std=1.2, b_std=0.3)
  # A second instance: one reused instance would share its weights.
  k = _kernel_fn(nn.Sequential([conv, ftn.Relu(), conv.clone()]))(x1, x2)
  # Location by location, a 1x1 convolution is a dense layer.
  dense = nn.Sequential([ftn.Dense(4, W_std=1.2, b_std=0.3), ftn.Relu(),
                         ftn.Dense(4, W_std=1.2, b_std=0.3)])
  flat = lambda x: x.reshape(-1, x.shape[-1])
  kd = _kernel_fn(dense)(flat(x1), flat(x2))
  n_loc = int(np.prod(SPATIAL[n_spatial]))
  nngp = spatial_diagonal(k.nngp, 2, n_spatial, k.diagonal_spatial)
  # Pair (input a, location l) with (input b, the same location l).
  blocks = kd.nngp.reshape(2, n_loc, 2, n_loc)
  expected = np.einsum("albl->abl", blocks).reshape(nngp.shape)
  np.testing.assert_allclose(nngp, expected, rtol=1e-12)


@pytest.mark.parametrize("cls,n_spatial,padding", [
    (ftn.Conv, 1, "VALID"), (ftn.Conv, 2, "SAME"), (ftn.Conv, 3, "CIRCULAR"),
    (ftn.ConvTranspose, 1, "CIRCULAR"), (ftn.ConvTranspose, 2, "VALID"),
    (ftn.ConvTranspose, 3, "SAME"), (ftn.ConvLocal, 1, "SAME"),
    (ftn.ConvLocal, 2, "CIRCULAR"), (ftn.ConvLocal, 3, "VALID")])
def test_diagonal_mode_is_diagonal_of_full(cls, n_spatial, padding):
  x1, x2 = _inputs(n_spatial)
  layers = [cls(4, _window(n_spatial, 2), strides=_window(n_spatial, 2),
                padding=padding, b_std=0.1), ftn.Relu(),
            cls(4, _window(n_spatial, 2), padding=padding)]
  model = nn.Sequential(layers)
  full = _kernel_fn(model)(x1, x2)  # spatial output: full covariances
  assert not full.diagonal_spatial
  # The same model from a kernel that keeps only spatial diagonals.
  diag = _kernel_fn(model)(
      ft.Kernel.from_inputs(x1, x2, diagonal_spatial=True))
  assert diag.diagonal_spatial
  for field in ("nngp", "ntk", "cov1", "cov2"):
    n_batch = 2 if field in ("nngp", "ntk") else 1
    want = spatial_diagonal(getattr(full, field), n_batch, n_spatial, False)
    np.testing.assert_allclose(getattr(diag, field), want, rtol=1e-10,
                               atol=1e-14)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("padding,stride,window", [
    ("VALID", 3, 2), ("SAME", 2, 3), ("CIRCULAR", 1, 3), ("CIRCULAR", 3, 2)])
def test_matrix_maps_match_slices(diagonal, padding, stride, window):
  """The fast dense-matrix path equals the direct slicing path."""
  rng = np.random.default_rng(0)
  shape = (2, 3, 7, 5) if diagonal else (2, 3, 7, 7, 5, 5)
  cov = jnp.asarray(rng.normal(size=shape))
  pads, circular = conv_math.pad_config(padding, (7, 5), (window,) * 2,
                                        (stride,) * 2)
  geometry = dict(diagonal_spatial=diagonal, strides=(stride,) * 2)
  fns = [
      lambda: conv_math.conv_covariance(
          cov, 2, filter_shape=(window,) * 2, pads=pads, circular=circular,
          **geometry),
      lambda: pooling_math.pool_covariance(
          cov, 2, window_shape=(window,) * 2, pads=pads, circular=circular,
          normalize="edges", **geometry),
  ]
  if not (padding == "CIRCULAR" and window < stride):
    fns.append(lambda: conv_math.conv_transpose_covariance(
        cov, 2, filter_shape=(window,) * 2, padding=padding, **geometry))
  for fn in fns:
    fast = jax.jit(lambda: fn())()  # a new function: no shared trace
    saved = spatial_maps.MAX_FULL_SIZE, spatial_maps.MAX_DIAGONAL_SIZE
    spatial_maps.MAX_FULL_SIZE = spatial_maps.MAX_DIAGONAL_SIZE = 0
    try:
      slow = jax.jit(lambda: fn())()
    finally:
      spatial_maps.MAX_FULL_SIZE, spatial_maps.MAX_DIAGONAL_SIZE = saved
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)


# The requirement pass.

_SEEN = []


class _Recorder(nn.Module):
  """Identity that records the layout of the kernels passing through."""

  def __call__(self, x):
    return x


def _record_rule(module, kernel, **kwargs):
  del module, kwargs
  _SEEN.append((kernel.diagonal_spatial, kernel.nngp.ndim))
  return kernel


ft.register_kernel_rule(_Recorder, _record_rule)


@pytest.mark.parametrize("top,diagonal", [("flatten", True), ("gap", False)])
def test_requirement_pass(top, diagonal):
  _SEEN.clear()
  rec = _Recorder
  model = nn.Sequential([
      rec(), ftn.Conv(4, (3, 3), padding="SAME"), rec(), ftn.Relu(), rec(),
      ftn.Conv(4, (2, 2), strides=(2, 2)), rec(),
      ftn.Flatten() if top == "flatten" else ftn.GlobalAvgPool(),
      ftn.Dense(1)])
  x1, x2 = _inputs(2)
  _kernel_fn(model)(x1, x2, "nngp")
  real_pass = _SEEN[-4:]  # the first four come from the abstract pass
  assert [d for d, _ in real_pass] == [diagonal] * 4
  assert [n for _, n in real_pass] == [4 if diagonal else 6] * 4


# dtypes.

# Stock nn.Conv.

@pytest.mark.parametrize("padding,strides", [
    ("SAME", 2), ("VALID", 1), ("CIRCULAR", 2), (1, 1)])
def test_stock_conv_matches_standard_conv(padding, strides):
  x1, x2 = _inputs(2, channels=3)
  stock = nn.Sequential([nn.Conv(4, (3, 3), strides=strides, padding=padding),
                         ftn.Relu(), ftn.GlobalAvgPool(), nn.Dense(1)])
  k = _kernel_fn(stock)(x1, x2, ("nngp", "ntk"))
  # Flax wraps CIRCULAR inputs by ((k-1)//2, k//2) whatever the strides.
  pads, circular = (((1, 1), (1, 1)), padding == "CIRCULAR") if padding in (
      "CIRCULAR", 1) else conv_math.pad_config(padding, (4, 4), (3, 3),
                                                (strides,) * 2)
  kernel = ft.Kernel.from_inputs(x1, x2)
  ours = conv_math.conv_kernel(
      kernel, filter_shape=(3, 3), strides=(strides,) * 2, pads=pads,
      circular=circular, features=4, W_std=1.0, b_std=0.0,
      parameterization="standard", layer="test")
  rest = nn.Sequential([ftn.Relu(), ftn.GlobalAvgPool(),
                        ftn.Dense(1, b_std=0.0, parameterization="standard")])
  expected = _kernel_fn(rest)(ours, get=("nngp", "ntk"))
  np.testing.assert_allclose(k.nngp, expected.nngp, rtol=1e-12)
  np.testing.assert_allclose(k.ntk, expected.ntk, rtol=1e-12)
  # And the finite stock layer runs with the same geometry.
  variables = jax.eval_shape(stock.init, jax.random.key(0), x1)
  assert jax.eval_shape(stock.apply, variables, x1).shape == (2, 1)


class _TwoBranches(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.Conv(4, (3, 3), padding="SAME")(x) + ftn.Conv(
        4, (3, 3), padding="VALID")(x)


def _raises(name, model, match, error=ValueError):
  x1, x2 = _inputs(2)
  return RaisesCase(name, lambda: ft.kernel_fn(model)(x1, x2), match, error)


class TestConv(LayerRuleTest):
  exact_cases = [_exact_case(*row) for row in GEOMETRY]
  monte_carlo_cases = [MonteCarloCase(
      "conv_relu_transpose_local", _mc_model, *_inputs(2), 32, seed=1,
      impl="rbg", jit=True)]
  dtype_cases = [DtypeCase("conv_pool_transpose", nn.Sequential([
      ftn.Conv(4, (3, 3), padding="CIRCULAR", b_std=0.1), ftn.Relu(),
      ftn.AvgPool((2, 2)), ftn.ConvTranspose(4, (2, 2), strides=(2, 2)),
      ftn.GlobalAvgPool(), ftn.Dense(1)]), *_inputs(2))]
  raises_cases = [
      *(_raises(f"stock_{next(iter(o))}", nn.Conv(4, (3, 3), **o), "nn.Conv",
                NotImplementedError)
        for o in (dict(kernel_dilation=2), dict(input_dilation=2),
                  dict(feature_group_count=2), dict(padding="REFLECT"))),
      # Lifting traces the model, where JAX itself rejects the sum.
      _raises("mismatched_branch_shapes", _TwoBranches(), "shape",
              (TypeError, ValueError)),
      _raises("kernel_size", ftn.Conv(4, (3,)), "kernel_size"),
      _raises("padding", ftn.Conv(4, (3, 3), padding="FULL"), "padding"),
      _raises("too_large", ftn.Conv(4, (5, 5)), "does not fit"),
  ]
