"""ImageResize and Index: closed forms, layouts, Monte Carlo, dtypes, errors."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents._src.analytic import spatial_maps
from flax_tangents._src.analytic.covariance import spatial_diagonal
from testing import DtypeCase
from testing import LayerRuleTest
from testing import MonteCarloCase
from testing import RaisesCase
from testing import assert_trees_close
from testing import jit_kernel_fn as _kernel_fn
from testing import make_inputs

FIELDS = ("nngp", "cov1", "cov2")


def _inputs(spatial, n1=2, n2=3):
  return make_inputs(spatial, n1=n1, n2=n2)


def _assert_kernels_close(got, want):
  assert_trees_close(got, want, fields=FIELDS, rtol=1e-12, atol=1e-13)


def _full_and_diagonal_paths(fn):
  """`fn()` with dense maps, then with per-axis products (large images)."""
  fast = fn()
  saved = spatial_maps.MAX_FULL_SIZE, spatial_maps.MAX_DIAGONAL_SIZE
  spatial_maps.MAX_FULL_SIZE = spatial_maps.MAX_DIAGONAL_SIZE = 0
  try:
    slow = fn()
  finally:
    spatial_maps.MAX_FULL_SIZE, spatial_maps.MAX_DIAGONAL_SIZE = saved
  return fast, slow


# ImageResize: the kernel of resized inputs is the resized input kernel.

RESIZE_CASES = [
    # (spatial shape, target shape, method, antialias)
    ((5,), (-1, 8, -1), "linear", True),
    ((6,), (-1, 4, -1), "linear", True),
    ((6,), (-1, 4, -1), "linear", False),
    ((3, 4), (-1, 5, 2, -1), "bilinear", True),
    ((3, 4), (-1, 7, -1, -1), "nearest", True),
    ((4, 5), (2, 2, 9, 2), "nearest", False),  # batch/channel sizes kept
    ((4, 3), (-1, 6, 5, -1), "cubic", True),
    ((2, 3, 2), (-1, 3, 2, 4, -1), "trilinear", True),
]


@pytest.mark.parametrize("spatial,shape,method,antialias", RESIZE_CASES)
def test_resize_of_inputs(spatial, shape, method, antialias):
  x1, x2 = _inputs(spatial, n2=2)
  layer = ftn.ImageResize(shape, method, antialias=antialias)

  def run():
    return _kernel_fn(layer)(x1, x2)

  for got in _full_and_diagonal_paths(run):
    want = ft.Kernel.from_inputs(layer.apply({}, x1), layer.apply({}, x2))
    _assert_kernels_close(got, want)


def test_nearest_resize_keeps_spatial_diagonals():
  x1, x2 = _inputs((3, 4))
  layer = ftn.ImageResize((-1, 5, 2, -1), "nearest")
  diag = ft.Kernel.from_inputs(x1, x2, diagonal_spatial=True)
  for got in _full_and_diagonal_paths(lambda: _kernel_fn(layer)(diag)):
    want = ft.Kernel.from_inputs(layer.apply({}, x1), layer.apply({}, x2),
                                 diagonal_spatial=True)
    _assert_kernels_close(got, want)


def test_resize_after_conv_is_resize_of_covariances():
  # Linear and nearest interpolation are separable, so resizing every
  # spatial axis of the covariance array with `jax.image.resize` (what
  # Neural Tangents does) is the same as M (x) M on each pair.
  x1, x2 = _inputs((4, 3))
  conv = ftn.Conv(4, (2, 2), padding="SAME", W_std=1.3, b_std=0.2)
  conv2 = conv.clone()  # a reused instance would share weights
  before = _kernel_fn(nn.Sequential([conv, ftn.Relu(), conv2]))(x1, x2)
  for method in ("linear", "nearest"):
    layer = ftn.ImageResize((-1, 3, 6, -1), method)
    got = _kernel_fn(nn.Sequential([conv, ftn.Relu(), conv2, layer]))(x1,
                                                                       x2)
    assert got.shape1 == (2, 3, 6, 4) and got.shape2 == (3, 3, 6, 4)
    for field in ("nngp", "ntk", "cov1", "cov2"):
      cov = getattr(before, field)
      n_batch = cov.ndim - 4
      want = jax.image.resize(cov, cov.shape[:n_batch] + (3, 3, 6, 6),
                              method)
      np.testing.assert_allclose(getattr(got, field), want, rtol=1e-12,
                                 atol=1e-14)


def test_resize_then_flatten_needs_full_covariances():
  x1, x2 = _inputs((3, 3))
  conv = ftn.Conv(4, (2, 2), padding="SAME", b_std=0.1)
  conv2 = conv.clone()  # a reused instance would share weights
  resize = ftn.ImageResize((-1, 5, 4, -1), "linear")
  # Below a Flatten only spatial diagonals are needed, unless a layer mixes
  # locations: the linear resize does, so its input carries full ones.
  top = _kernel_fn(nn.Sequential([conv, ftn.Relu(), conv2, resize,
                                    ftn.Flatten(), ftn.Dense(1)]))(x1, x2)
  full = _kernel_fn(nn.Sequential([conv, ftn.Relu(), conv2, resize]))(x1,
                                                                       x2)
  mean_diag = spatial_diagonal(full.nngp, 2, 2, False).mean(axis=(2, 3))
  np.testing.assert_allclose(top.nngp, mean_diag, rtol=1e-12)
  # A kernel that only has spatial diagonals cannot go through it.
  diag = ft.Kernel.from_inputs(x1, x2, diagonal_spatial=True)
  with pytest.raises(ValueError, match="full spatial covariances"):
    _kernel_fn(resize)(diag)


def test_resize_to_same_shape_is_identity():
  x1, x2 = _inputs((3, 4))
  k = ft.Kernel.from_inputs(x1, x2, diagonal_spatial=True)
  got = _kernel_fn(ftn.ImageResize((-1, 3, 4, -1), "cubic"))(k)
  _assert_kernels_close(got, k)


# Index.

INDEX_CASES = [
    ((5,), np.s_[:, 1:4]),
    ((5,), np.s_[:, ::-2, :]),
    ((5,), np.s_[:, 2]),
    ((4, 5), np.s_[:, 1, 1:5:2]),
    ((4, 5), np.s_[:, -1, ...]),
    ((4, 5), np.s_[..., 3, :]),
    ((3, 2, 4), np.s_[:, :, 0, 1::2, :]),
]


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("spatial,idx", INDEX_CASES)
def test_index_of_inputs(spatial, idx, diagonal):
  x1, x2 = _inputs(spatial)
  layer = ftn.Index(idx)
  k = ft.Kernel.from_inputs(x1, x2, diagonal_spatial=diagonal)
  got = _kernel_fn(layer)(k)
  y1, y2 = layer.apply({}, x1), layer.apply({}, x2)
  assert y1.shape == x1[idx].shape
  want = ft.Kernel.from_inputs(y1, y2, diagonal_spatial=diagonal)
  _assert_kernels_close(got, want)


def test_index_after_conv():
  x1, x2 = _inputs((4, 5))
  conv = ftn.Conv(4, (2, 3), padding="CIRCULAR", b_std=0.1)
  conv2 = conv.clone()  # a reused instance would share weights
  before = _kernel_fn(nn.Sequential([conv, ftn.Relu(), conv2]))(x1, x2)
  layer = ftn.Index(np.s_[:, 1:3, 2])
  got = _kernel_fn(nn.Sequential([conv, ftn.Relu(), conv2, layer]))(x1, x2)
  assert got.shape1 == (2, 2, 4)
  for field in ("nngp", "ntk", "cov1", "cov2"):
    cov = getattr(before, field)
    want = cov[(slice(None),) * (cov.ndim - 4) + (slice(1, 3),) * 2 + (2, 2)]
    np.testing.assert_allclose(getattr(got, field), want, rtol=1e-12)
  # Index mixes no locations: a Flatten on top keeps the diagonal layout.
  flat = _kernel_fn(nn.Sequential([conv, ftn.Relu(), conv2, layer,
                                     ftn.Flatten(), ftn.Dense(1)]))(x1, x2)
  mean_diag = spatial_diagonal(got.nngp, 2, 1, False).mean(axis=2)
  np.testing.assert_allclose(flat.nngp, mean_diag, rtol=1e-12)


def test_index_keeps_diagonal_layout_in_kernel_fn():
  seen = []

  class Probe(nn.Module):
    def __call__(self, x):
      return x

  def probe_rule(module, kernel, **kwargs):
    del module, kwargs
    seen.append(kernel.diagonal_spatial)
    return kernel

  ft.register_kernel_rule(Probe, probe_rule)
  model = nn.Sequential([ftn.Conv(4, (2, 2)), ftn.Relu(),
                         ftn.Index(np.s_[:, ::2, 1:]),
                         ftn.ImageResize((-1, 4, -1, -1), "nearest"), Probe(),
                         ftn.Flatten(), ftn.Dense(1)])
  _kernel_fn(model)(*_inputs((4, 4)))
  assert seen[-1]


# Monte Carlo: Conv(128) -> Relu -> resize -> index -> Conv -> pool -> Dense
# has one nonlinearity and linear layers above it, so single-network
# estimates are unbiased at any width; we accept 5 standard errors of the
# mean per entry, measured from the samples (a false alarm per entry has
# probability ~6e-7).

# The "rbg" generator compiles several times faster than threefry inside
# `model.init`, which dominates the cost of sampling networks.
def _mc_model():
  return nn.Sequential([
      ftn.Conv(128, (2, 2), padding="SAME", W_std=1.3, b_std=0.2),
      ftn.Relu(), ftn.ImageResize((-1, 5, 4, -1), "linear"),
      ftn.Index(np.s_[:, 1:, ::-1]), ftn.Conv(8, (2, 2), b_std=0.1),
      ftn.GlobalAvgPool(), ftn.Dense(4)])


def _raises(name, layer, match):
  x1, x2 = _inputs((3, 4))
  return RaisesCase(name, lambda: _kernel_fn(layer)(x1, x2), match)


class TestShape(LayerRuleTest):
  monte_carlo_cases = [MonteCarloCase(
      "conv_resize_index", _mc_model, *_inputs((3, 3), n2=2), 32, seed=1,
      impl="rbg", jit=True)]
  dtype_cases = [DtypeCase("resize_index", nn.Sequential([
      ftn.Conv(4, (2, 2), padding="SAME", b_std=0.1), ftn.Relu(),
      ftn.ImageResize((-1, 6, 3, -1), "linear"), ftn.Index(np.s_[:, 1:, 0]),
      ftn.GlobalAvgPool(), ftn.Dense(1)]), *_inputs((3, 4)))]
  raises_cases = [_raises(f"resize_{match}", ftn.ImageResize(shape, "linear"),
                          match) for shape, match in [
                              ((-1, 5, -1), "entries"),
                              ((-1, 5, 5, 3), "channel"),
                              ((-1, 0, 5, -1), "positive")]] + [
      _raises(f"index_{i}_{match}", ftn.Index(idx), match)
      for i, (idx, match) in enumerate([
          (np.s_[0], "batch"),
          (np.s_[:, :, :, 1:], "channel"),
          (np.s_[..., 0], "channel"),
          (np.s_[:, 4], "out of range"),
          (np.s_[:, 3:1], "no location"),
          (np.s_[:, None], "only ints, slices"),
          (np.s_[:, [0, 1]], "only ints, slices"),
          (np.s_[..., 1, ...], "more than one"),
          (np.s_[:, 1, 1, 1, 1], "entries")])]
