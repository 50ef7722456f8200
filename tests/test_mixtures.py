"""Nonlinearities after Flatten or a channel concatenation (issue 9, item 1).

Units of `Flatten`'s output (locations x channels) and of a channel
concatenation (branches) are Gaussian per part but not alike. A
nonlinearity then acts on each part with its own kernel: exactly the
reordered network (nonlinearity before `Flatten` / before the concat), and
what finite networks do (Monte Carlo). Where the parts are lost, refused.
"""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import assert_mc_close
from testing import assert_trees_close
from testing import sample_kernels

RNG = np.random.RandomState(0)
SEQ1, SEQ2 = RNG.randn(3, 5, 2), RNG.randn(2, 5, 2)
VEC1, VEC2 = RNG.randn(3, 4), RNG.randn(2, 4)
FIELDS = ("nngp", "ntk", "cov1", "cov2")


assert_kernels_equal = functools.partial(assert_trees_close, fields=FIELDS,
                                         rtol=1e-12, atol=1e-14)


def conv():
  return ftn.Conv(4, (2,), padding="SAME", W_std=1.3, b_std=0.2)


@pytest.mark.parametrize("activations", [
    [ftn.Erf()], [ftn.Relu()], [ftn.Gelu()], [ftn.Abs(), ftn.Dropout(0.5, deterministic=False)]],
    ids=["erf", "relu", "gelu", "abs_dropout"])
@pytest.mark.parametrize("diagonal_spatial", [None, False])
def test_flatten_then_nonlinearity_is_the_reordered_network(
    activations, diagonal_spatial):
  after = nn.Sequential([conv(), ftn.Flatten(), *activations, ftn.Dense(2)])
  before = nn.Sequential([conv(), *activations, ftn.Flatten(), ftn.Dense(2)])
  kwargs = {} if diagonal_spatial is None else {
      "diagonal_spatial": diagonal_spatial}
  jitted = lambda m: jax.jit(ft.kernel_fn(m, **kwargs))
  a, b = jitted(after)(SEQ1, SEQ2), jitted(before)(SEQ1, SEQ2)
  assert_kernels_equal(a, b)
  assert a.diagonal_spatial == (diagonal_spatial is None)  # still cheap


class Concat(nn.Module):
  """The issue's example: two branches of different kernels, concatenated,
  then a nonlinearity (or, reordered, the nonlinearity on each branch)."""
  widths: tuple[int, int] = (2, 3)
  nonlinearity_first: bool = False

  @nn.compact
  def __call__(self, x):
    u = ftn.Dense(self.widths[0], b_std=0.5)(x)
    v = ftn.Dense(self.widths[1], W_std=2.5)(x)
    if self.nonlinearity_first:
      h = ftn.FanInConcat()([ftn.Erf()(u), ftn.Erf()(v)])
    else:
      h = ftn.Erf()(ftn.FanInConcat()([u, v]))
    return ftn.Dense(1)(h)


def test_concat_then_nonlinearity_is_the_reordered_network():
  a = ft.kernel_fn(Concat())(VEC1, VEC2)
  b = ft.kernel_fn(Concat(nonlinearity_first=True))(VEC1, VEC2)
  assert_kernels_equal(a, b)
  # The width-averaged kernel (what was computed before) is far off.
  u = ft.kernel_fn(ftn.Dense(2, b_std=0.5))(VEC1, VEC2)
  v = ft.kernel_fn(ftn.Dense(3, W_std=2.5))(VEC1, VEC2)
  averaged = ft.kernel_fn(nn.Sequential([ftn.Erf(), ftn.Dense(1)]))(
      u.replace(nngp=0.4 * u.nngp + 0.6 * v.nngp,
                cov1=0.4 * u.cov1 + 0.6 * v.cov1,
                cov2=0.4 * u.cov2 + 0.6 * v.cov2))
  assert np.max(np.abs(averaged.nngp / a.nngp - 1)) > 0.05


def test_concat_then_nonlinearity_agrees_with_monte_carlo():
  model = Concat(widths=(256, 384))
  expected = ft.kernel_fn(model)(VEC1, VEC2)
  nngp, ntk = sample_kernels(model, VEC1, VEC2, jax.random.key(0), 300,
                             ntk="projected")
  # One hidden layer of each branch: the estimates are unbiased.
  assert_mc_close(nngp, expected.nngp, n_se=5.0)
  assert_mc_close(ntk, expected.ntk, n_se=5.0)


class Nested(nn.Module):
  """A concatenation of a flattened CNN branch and a dense branch."""
  relu_first: bool = False

  @nn.compact
  def __call__(self, x):
    images = ftn.Conv(3, (2,), W_std=1.1)(x)
    vectors = ftn.Dense(4, b_std=0.3)(ftn.Flatten()(x))
    if self.relu_first:
      h = ftn.FanInConcat()([ftn.Flatten()(ftn.Relu()(images)),
                             ftn.Relu()(vectors)])
    else:
      h = ftn.Relu()(ftn.FanInConcat()([ftn.Flatten()(images), vectors]))
    return ftn.Dense(1)(ftn.Erf()(ftn.Dense(3)(h)))


def test_nested_mixture_under_jit():
  exact = jax.jit(ft.kernel_fn(Nested()), static_argnames="get")
  reordered = ft.kernel_fn(Nested(relu_first=True))
  assert_kernels_equal(exact(SEQ1, SEQ2), reordered(SEQ1, SEQ2))


def test_composition_keeps_the_parts():
  # A kernel returned after Flatten still knows its parts.
  flat = ft.kernel_fn(nn.Sequential([conv(), ftn.Flatten()]))(SEQ1, SEQ2)
  assert not flat.is_gaussian
  composed = ft.kernel_fn(nn.Sequential([ftn.Erf(), ftn.Dense(1)]))(flat)
  direct = ft.kernel_fn(nn.Sequential([conv(), ftn.Erf(), ftn.Flatten(),
                                       ftn.Dense(1)]))(SEQ1, SEQ2)
  assert_kernels_equal(composed, direct)


class PoolAfterConcat(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = ftn.FanInConcat()([conv()(x), ftn.Conv(2, (3,), padding="SAME")(x)])
    return ftn.Erf()(ftn.AvgPool((2,))(h))


class LayerNormAfterFlatten(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.Relu()(ftn.LayerNorm()(ftn.Flatten()(conv()(x))))


@pytest.mark.parametrize("model", [PoolAfterConcat(), LayerNormAfterFlatten()],
                         ids=["pool_after_concat", "layer_norm_after_flatten"])
def test_nonlinearity_after_parts_are_mixed_is_refused(model):
  with pytest.raises(ValueError, match="units of different distributions"):
    ft.kernel_fn(model)(SEQ1, SEQ2)


def test_affine_layer_after_a_mixed_layer_is_fine():
  # The average is exact for the next affine layer, whatever came between.
  class Pooled(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = ftn.FanInConcat()([ftn.Relu()(conv()(x)), conv()(x)])
      return ftn.Dense(1)(ftn.GlobalAvgPool()(h))

  kernel = ft.kernel_fn(Pooled())(SEQ1, SEQ2)
  relu = ft.kernel_fn(nn.Sequential([conv(), ftn.Relu(), ftn.GlobalAvgPool(),
                                     ftn.Dense(1)]))(SEQ1, SEQ2)
  linear = ft.kernel_fn(nn.Sequential([conv(), ftn.GlobalAvgPool(),
                                       ftn.Dense(1)]))(SEQ1, SEQ2)
  np.testing.assert_allclose(kernel.nngp, (relu.nngp + linear.nngp) / 2,
                             rtol=1e-12)
