"""Keyword arguments of a kernel function are never silently dropped
(issue 9, item 4): they reach the layer that uses them or raise."""

from typing import Any

import flax.linen as nn
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents._src.analytic import covariance

RNG = np.random.RandomState(0)
X1, X2 = RNG.randn(4, 6), RNG.randn(3, 6)
SEQ1, SEQ2 = RNG.randn(3, 5, 2), RNG.randn(2, 5, 2)


class Net(nn.Module):
  """A user module with its own call argument, wired explicitly."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = ftn.Relu()(ftn.Dense(8, b_std=0.1)(x))
    return ftn.Dense(1)(ftn.Dropout(0.3, deterministic=not train)(h))


@pytest.mark.parametrize("model", [
    nn.Sequential([ftn.Dense(2)]), ftn.Dense(2), Net()],
    ids=["sequential", "ruled_module", "user_module"])
def test_unknown_keyword_raises_naming_it(model):
  with pytest.raises(TypeError, match="'foo'"):
    ft.kernel_fn(model)(X1, None, "nngp", foo=1)


def test_keyword_for_a_later_layer_of_sequential_reaches_it():
  # Flax passes call arguments to the first layer only; the kernel
  # function offers them to every layer whose rule names them, as NT does.
  def model(deterministic):
    return nn.Sequential([ftn.Dense(8, b_std=0.1), ftn.Relu(),
                          ftn.Dropout(0.3, deterministic=deterministic),
                          ftn.Dense(1)])

  offered = ft.kernel_fn(model(None))(X1, None, deterministic=False)
  explicit = ft.kernel_fn(model(False))(X1, None)
  deterministic = ft.kernel_fn(model(True))(X1, None)
  np.testing.assert_allclose(offered.nngp, explicit.nngp, rtol=1e-12)
  assert not np.allclose(offered.nngp, deterministic.nngp)
  # The same through `ft.kernel_fn(model, **apply_kwargs)`.
  bound = ft.kernel_fn(model(None), deterministic=False)(X1, None)
  np.testing.assert_allclose(bound.ntk, explicit.ntk, rtol=1e-12)


def test_keyword_named_by_the_model_goes_to_its_call():
  train = ft.kernel_fn(Net())(X1, None, train=True)
  default = ft.kernel_fn(Net())(X1, None)
  assert not np.allclose(train.nngp, default.nngp)  # dropout active


def test_pattern_reaches_an_aggregate_inside_sequential():
  pattern = RNG.rand(3, 5, 5)
  seq = nn.Sequential([ftn.Conv(3, (2,), padding="SAME"), ftn.Relu(),
                       ftn.Aggregate(), ftn.Dense(2)])

  class Explicit(nn.Module):
    @nn.compact
    def __call__(self, x, pattern):
      h = ftn.Relu()(ftn.Conv(3, (2,), padding="SAME")(x))
      return ftn.Dense(2)(ftn.Aggregate()(h, pattern=pattern))

  offered = ft.kernel_fn(seq)(SEQ1, None, pattern=pattern)
  explicit = ft.kernel_fn(Explicit())(SEQ1, None, pattern=pattern)
  np.testing.assert_allclose(offered.ntk, explicit.ntk, rtol=1e-12)


def test_call_a_finite_layer_would_refuse_is_refused():
  class Wrong(nn.Module):
    @nn.compact
    def __call__(self, x):
      return ftn.Dense(2)(x, train=True)

  with pytest.raises(TypeError, match="does not accept"):
    ft.kernel_fn(Wrong())(X1)


def test_diagonal_arguments_take_effect():
  flat = nn.Sequential([ftn.Conv(3, (2,)), ftn.Relu(), ftn.Flatten(),
                        ftn.Dense(1)])
  cheap = ft.kernel_fn(flat)(SEQ1, SEQ2)
  full = ft.kernel_fn(flat)(SEQ1, SEQ2, diagonal_spatial=False,
                            diagonal_batch=False)
  assert cheap.diagonal_spatial and cheap.diagonal_batch
  assert not full.diagonal_spatial and not full.diagonal_batch
  assert full.cov1.shape == (3, 3)
  np.testing.assert_allclose(full.nngp, cheap.nngp, rtol=1e-12)
  np.testing.assert_allclose(np.diagonal(full.cov1), cheap.cov1, rtol=1e-12)
  # Spatial outputs: diagonal_spatial=True keeps only location variances.
  conv = nn.Sequential([ftn.Conv(3, (2,)), ftn.Erf()])
  diagonal = ft.kernel_fn(conv)(SEQ1, SEQ2, "nngp", diagonal_spatial=True)
  whole = ft.kernel_fn(conv)(SEQ1, SEQ2, "nngp")
  np.testing.assert_allclose(diagonal, np.einsum("abss->abs", whole),
                             rtol=1e-12)


def _needs_full_batch(module: Any, kernel: ft.Kernel, **kwargs: Any):
  del module, kwargs
  covariance.require_batch_covariances(kernel, "BatchMixer")
  return kernel


@ft.kernel_rule(_needs_full_batch)
class BatchMixer(nn.Module):
  def __call__(self, x):
    return x


@pytest.mark.parametrize("model, kwargs, message", [
    (nn.Sequential([ftn.Conv(3, (2,)), ftn.GlobalAvgPool()]),
     dict(diagonal_spatial=True), "GlobalAvgPool need covariances between"),
    (nn.Sequential([ftn.Dense(3), BatchMixer()]), dict(diagonal_batch=True),
     "BatchMixer need covariances between different inputs"),
    (ftn.Dense(3), dict(diagonal_batch="yes"), "True, False or None"),
], ids=["spatial", "batch", "type"])
def test_diagonal_arguments_a_layer_cannot_use_raise(model, kwargs, message):
  x1, x2 = (SEQ1, SEQ2) if "diagonal_spatial" in kwargs else (X1, X2)
  with pytest.raises((ValueError, TypeError), match=message):
    ft.kernel_fn(model)(x1, x2, **kwargs)


def test_diagonal_argument_with_a_kernel_input():
  kernel = ft.Kernel.from_inputs(SEQ1, diagonal_spatial=True)
  with pytest.raises(ValueError, match="layout is fixed"):
    ft.kernel_fn(ftn.Dense(2))(kernel, diagonal_spatial=False)
  same = ft.kernel_fn(ftn.Dense(2))(kernel, diagonal_spatial=True)
  assert same.diagonal_spatial
