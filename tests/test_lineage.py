"""Sums and products of branches are exact or refused (issue 9, item 1's
audit): correlated branches (`x + x`, `x + pool(x)`, a module used twice)
and two non-centred branches would give plausible wrong numbers.

A user module's `+` is lifted (its jaxpr interpreted: `h + h` is `2 h`,
exact); `ftn.FanInSum` and `Kernel` arithmetic keep NT's strict rule, with
each branch's sources (`lineage`) checked.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import assert_mc_close
from testing import sample_kernels

RNG = np.random.RandomState(0)
X1, X2 = RNG.randn(3, 4), RNG.randn(2, 4)
SEQ1, SEQ2 = RNG.randn(3, 5, 2), RNG.randn(2, 5, 2)


class Twice(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = ftn.Dense(3, b_std=0.1)(x)
    return h + h


class TwiceFanIn(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = ftn.Dense(3)(x)
    return ftn.FanInSum()([h, h])


class PlusPool(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = ftn.Conv(3, (2,), padding="SAME")(x)
    return h + ftn.AvgPool((2,), padding="SAME")(h)


class PlusPoolFanIn(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = ftn.Conv(3, (2,), padding="SAME")(x)
    return ftn.FanInSum()([h, ftn.AvgPool((2,), padding="SAME")(h)])


class SharedModule(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = ftn.Dense(3)
    return dense(x) + ftn.Relu()(dense(x))


class SharedWeights(nn.Module):
  """A module applied to two inputs: its outputs share the weights."""

  @nn.compact
  def __call__(self, x):
    dense = ftn.Dense(3)
    return dense(x) + dense(ftn.Relu()(ftn.Dense(4)(x)))


class TwoReluBranches(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.Relu()(ftn.Dense(3)(x)) + ftn.Relu()(ftn.Dense(3)(x))


class TwoReluBranchesFanIn(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.FanInSum()([ftn.Relu()(ftn.Dense(3)(x)),
                           ftn.Relu()(ftn.Dense(3)(x))])


class ProductWithItsNonlinearity(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = ftn.Dense(3)(x)
    return ftn.FanInProd()([h, ftn.Relu()(h)])


_LIFTED_SUM = "the two summands may be correlated or not centred"
_TIED = r"'Dense_0' \(Dense\) is called more than once"


@pytest.mark.parametrize("model, x, error, message", [
    (TwiceFanIn(), X1, ValueError,
     r"FanInSum: branches 0 and 1 both depend on 'Dense_0'"),
    (PlusPool(), SEQ1, ft.KernelRuleError, _LIFTED_SUM),
    (PlusPoolFanIn(), SEQ1, ValueError, r"both depend on 'Conv_0'"),
    (SharedModule(), X1, ft.KernelRuleError, _TIED),
    (SharedWeights(), X1, ft.KernelRuleError, _TIED),
    (TwoReluBranches(), X1, ft.KernelRuleError, _LIFTED_SUM),
    (TwoReluBranchesFanIn(), X1, ValueError,
     r"branch 0 is not a centred.*branch 1"),
    (ProductWithItsNonlinearity(), X1, ValueError,
     r"FanInProd: branches 0 and 1 both depend on 'Dense_0'"),
], ids=["x_plus_x_fan_in", "x_plus_pool", "x_plus_pool_fan_in",
        "shared_module", "shared_weights", "two_relu_branches",
        "two_relu_branches_fan_in", "product_with_own_relu"])
def test_correlated_branches_are_refused(model, x, error, message):
  with pytest.raises(error, match=message):
    ft.kernel_fn(model)(x)


def test_lifted_sum_of_a_branch_with_itself_is_exact():
  # `h + h` in a user module is `2 h`: the Dense with twice the W_std and
  # b_std, in every field (the NTK too: each gradient doubles).
  kernel = ft.kernel_fn(Twice())(X1, X2)
  doubled = ft.kernel_fn(ftn.Dense(3, W_std=2.0, b_std=0.2))(X1, X2)
  for field in ("nngp", "ntk", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(kernel, field), getattr(doubled, field),
                               rtol=1e-12)


class InputPlusDense(nn.Module):
  """Raw inputs plus an affine branch: independent, one centred."""

  @nn.compact
  def __call__(self, x):
    return x + ftn.Dense(4, W_std=1.3, b_std=0.2)(x)


class ReluPlusDense(nn.Module):
  """A nonlinearity's output plus an independent affine branch."""
  width: int = 3

  @nn.compact
  def __call__(self, x):
    h = ftn.Relu()(ftn.Dense(self.width, W_std=1.4, b_std=0.3)(x))
    return ftn.Dense(self.width)(h + ftn.Dense(self.width, W_std=0.8)(x))


def test_inputs_plus_an_affine_branch_is_exact():
  kernel = ft.kernel_fn(InputPlusDense())(X1, X2)
  dot = X1 @ X2.T / 4
  np.testing.assert_allclose(kernel.nngp, dot + 1.69 * dot + 0.04,
                             rtol=1e-12)
  assert not kernel.is_gaussian
  # Gaussian, but not centred (its mean is the input): no closed form.
  with pytest.raises(ValueError, match="Relu is applied to .*sum with the "
                     "raw inputs.*not centred"):
    ft.kernel_fn(nn.Sequential([InputPlusDense(), ftn.Relu()]))(X1, X2)


def test_one_non_centred_branch_agrees_with_monte_carlo():
  expected = ft.kernel_fn(ReluPlusDense())(X1, X2)
  nngp, ntk = sample_kernels(ReluPlusDense(256), X1, X2, jax.random.key(1),
                             128, ntk="projected")
  # Two hidden layers: an O(1/width) bias on top of the sampling error.
  assert_mc_close(nngp, expected.nngp, n_se=5.0, bias=0.03)
  assert_mc_close(ntk, expected.ntk, n_se=5.0, bias=0.03)


def test_independent_factors_multiply():
  class ReluProduct(nn.Module):
    @nn.compact
    def __call__(self, x):
      return ftn.FanInProd()([ftn.Relu()(ftn.Dense(3)(x)),
                              ftn.Erf()(ftn.Dense(3, b_std=0.5)(x))])

  kernel = ft.kernel_fn(ReluProduct())(X1, X2)
  a = ft.kernel_fn(nn.Sequential([ftn.Dense(3), ftn.Relu()]))(X1, X2)
  b = ft.kernel_fn(nn.Sequential([ftn.Dense(3, b_std=0.5), ftn.Erf()]))(
      X1, X2)
  np.testing.assert_allclose(kernel.nngp, a.nngp * b.nngp, rtol=1e-12)


def test_composition_keeps_branches_apart():
  # The input kernel of the second model comes from the first: a residual
  # over it starts with a fresh affine layer of its own.
  first = nn.Sequential([ftn.Dense(3, W_std=1.2), ftn.Relu(), ftn.Dense(3)])

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + ftn.Dense(3)(ftn.Relu()(x))

  composed = ft.kernel_fn(Block())(ft.kernel_fn(first)(X1, X2))
  direct = ft.kernel_fn(nn.Sequential([first, Block()]))(X1, X2)
  np.testing.assert_allclose(composed.ntk, direct.ntk, rtol=1e-12)
  with pytest.raises(ValueError, match="both depend on 'Dense_0'"):
    ft.kernel_fn(TwiceFanIn())(ft.kernel_fn(first)(X1, X2))


def test_unknown_sources_fall_back_to_nt_semantics():
  # Kernels that went through `jit` as arguments have unknown sources:
  # distinct centred branches are then assumed independent, as in Neural
  # Tangents.
  dense = jax.jit(ft.kernel_fn(ftn.Dense(3)))
  a, b = dense(X1, X2), dense(X1, X2)
  total = jax.jit(lambda k1, k2: k1 - k2)(a, b)
  np.testing.assert_allclose(total.nngp, 2 * a.nngp)
  np.testing.assert_allclose(total.ntk, 2 * a.ntk)
  with pytest.raises(ValueError, match="not a centred"):
    relu = ft.kernel_fn(nn.Sequential([ftn.Dense(3), ftn.Relu()]))
    jax.jit(lambda k1, k2: k1 + k2)(relu(X1, X2), relu(X1, X2))


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_one_kernel_minus_itself_is_refused_with_nt_reading(jitted):
  # NT users write `k - k` for two independent branches of one kernel:
  # ambiguous on one object (`y - y` is zero), so refused, and the message
  # gives NT's reading; that reading, written as advised, is exact.
  k = ft.kernel_fn(ftn.Dense(3, b_std=0.3))(X1, X2)
  difference = (lambda a: a - a)
  with pytest.raises(ValueError, match=r"`k \* 2 \*\* 0.5`"):
    (jax.jit(difference) if jitted else difference)(k)
  other = ft.kernel_fn(ftn.Dense(3, b_std=0.3))(X1, X2)
  for advised in (k * 2 ** 0.5, k - other):
    for field in ("nngp", "ntk", "cov1", "cov2"):
      np.testing.assert_allclose(getattr(advised, field),
                                 2 * getattr(k, field), rtol=1e-12)
