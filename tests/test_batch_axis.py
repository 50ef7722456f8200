"""FanInConcat along spatial and batch axes; Index and ImageResize of the
batch axis: closed forms, Monte Carlo, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents._src.analytic import combinators
from testing import assert_mc_close
from testing import assert_trees_close
from testing import jit_kernel_fn
from testing import sample_kernels

RNG = np.random.RandomState(1)
X1, X2 = RNG.randn(4, 3, 5, 2), RNG.randn(3, 3, 5, 2)   # (N, H, W, C)
FIELDS = ("nngp", "cov1", "cov2")


@pytest.mark.parametrize("diagonal_batch", [True, False])
@pytest.mark.parametrize("diagonal_spatial", [True, False])
@pytest.mark.parametrize("idx", [np.s_[::2], np.s_[1:, :, ::-2],
                                 np.s_[-2:, 0]], ids=str)
def test_index_of_batch_is_index_of_inputs(idx, diagonal_batch,
                                           diagonal_spatial):
  # Inputs' kernels are channel-averaged second moments: selecting inputs
  # and then taking moments equals taking moments and then selecting.
  layout = dict(diagonal_batch=diagonal_batch,
                diagonal_spatial=diagonal_spatial)
  k = ft.Kernel.from_inputs(X1, X2, **layout)
  got = ft.kernel_fn(ftn.Index(idx))(k)
  assert_trees_close(got, ft.Kernel.from_inputs(X1[idx], X2[idx], **layout),
                     fields=FIELDS, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method,shape", [
    ("linear", (6, -1, -1, -1)), ("linear", (2, 4, -1, -1)),
    ("nearest", (5, -1, 3, -1)), ("cubic", (7, -1, -1, -1))])
def test_resize_of_batch_is_resize_of_inputs(method, shape):
  resize = ftn.ImageResize(shape, method)
  got = ft.kernel_fn(resize)(X1, X2)
  want = ft.Kernel.from_inputs(resize.apply({}, X1), resize.apply({}, X2),
                               diagonal_batch=got.diagonal_batch,
                               diagonal_spatial=got.diagonal_spatial)
  assert_trees_close(got, want, fields=FIELDS, rtol=1e-12, atol=1e-13)


def test_mixing_the_batch_needs_full_batch_covariances():
  # Linear resizing of the batch reads several inputs: cov1 must be full.
  # Nearest and Index only select, so batch diagonals suffice.
  for layer, diagonal_batch in ((ftn.ImageResize((6, -1), "linear"), False),
                                (ftn.ImageResize((6, -1), "nearest"), True),
                                (ftn.Index(np.s_[::2]), True)):
    model = nn.Sequential([ftn.Dense(3), layer, ftn.Relu(), ftn.Dense(1)])
    k = ft.kernel_fn(model)(X1[:, 0, 0], X2[:, 0, 0])
    assert k.diagonal_batch == diagonal_batch, layer


class _Concat(nn.Module):
  """Dense branches of one input, concatenated along `axis`."""
  axis: int
  same_branch: bool = False

  @nn.compact
  def __call__(self, x):
    a = ftn.Dense(4, W_std=1.3)(x)
    b = a if self.same_branch else ftn.Dense(4, W_std=0.7, b_std=0.2)(x)
    return ftn.FanInConcat(axis=self.axis)([a, b])


def _block(a, b, axes):
  """Block-diagonal concatenation of arrays `a`, `b` along the axis pair."""
  zeros = lambda u, v: np.zeros(
      [v.shape[i] if i == axes[1] else n for i, n in enumerate(u.shape)])
  top = np.concatenate([a, zeros(a, b)], axes[1])
  bottom = np.concatenate([zeros(b, a), b], axes[1])
  return np.concatenate([top, bottom], axes[0])


@pytest.mark.parametrize("axis", [0, 1, 2, -3])
def test_concat_is_block_matrix(axis):
  # Independent zero-mean branches: own kernels on the diagonal blocks,
  # zero across branches.
  k = ft.kernel_fn(nn.Sequential([_Concat(axis)]))(X1, X2)
  ka = ft.kernel_fn(ftn.Dense(4, W_std=1.3))(X1, X2)
  kb = ft.kernel_fn(ftn.Dense(4, W_std=0.7, b_std=0.2))(X1, X2)
  axis %= 4
  pair = (0, 1) if axis == 0 else (2 * axis, 2 * axis + 1)
  for field in ("nngp", "ntk"):
    np.testing.assert_allclose(
        getattr(k, field),
        _block(getattr(ka, field), getattr(kb, field), pair), rtol=1e-12)
  shape = list(X1.shape[:-1]) + [4]
  shape[axis] *= 2
  assert k.shape1 == tuple(shape)


@pytest.mark.parametrize("axis", [1, 2])
def test_concat_of_one_branch_with_itself(axis):
  # concat([y, y]) of a Gaussian y = Dense(x) is fully correlated across
  # the blocks; with W_std = 1 it is the kernel of concat([x, x]).
  model = nn.Sequential([_Concat(axis, same_branch=True)])
  k = ft.kernel_fn(model)(X1, X2)
  doubled = lambda x: np.concatenate([x, x], axis)
  want = ft.Kernel.from_inputs(doubled(X1), doubled(X2),
                               diagonal_batch=k.diagonal_batch)
  np.testing.assert_allclose(k.nngp, 1.3**2 * want.nngp, rtol=1e-12)


def test_concat_diagonal_layouts():
  # With only spatial/batch diagonals stored, the diagonal of the block
  # matrix is the concatenation of the branches' diagonals.
  for axis in (0, 2):
    model = nn.Sequential([_Concat(axis), ftn.Relu(), ftn.Flatten(),
                           ftn.Dense(1)])
    kernel_fn = jit_kernel_fn(model)
    k = kernel_fn(X1, X2)
    full = kernel_fn(ft.Kernel.from_inputs(
        X1, X2, diagonal_batch=False, diagonal_spatial=False))
    np.testing.assert_allclose(k.nngp, full.nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk, full.ntk, rtol=1e-12)


class _McNet(nn.Module):
  """Conv - Relu - concat(H) - concat(N) - Index(N) - resize(N) - GAP."""
  width: int = 128

  @nn.compact
  def __call__(self, x):
    conv = lambda: ftn.Conv(self.width, (2,), padding="SAME", b_std=0.1)
    y = ftn.Relu()(ftn.Conv(self.width, (2,), padding="SAME", W_std=1.4)(x))
    y = ftn.FanInConcat(axis=1)([conv()(y), conv()(y)])
    y = ftn.FanInConcat(axis=0)([conv()(y), conv()(y)])
    y = ftn.Index(np.s_[1::2, 1:])(y)
    y = ftn.ImageResize((4, -1, -1), "linear")(y)
    return ftn.Dense(2)(ftn.GlobalAvgPool()(y))


def test_monte_carlo():
  # One nonlinearity, linear layers above it: per-network estimates are
  # unbiased at any width; 5 standard errors of 24 networks. Their spread
  # comes mostly from the 2-unit readout, not the width: width 16 costs a
  # tenth of width 64's time (5 s, not 55).
  x1, x2 = RNG.randn(3, 4, 2), RNG.randn(2, 4, 2)
  model = _McNet(width=16)
  nngp, ntk = sample_kernels(model, x1, x2, jax.random.key(2, impl="rbg"),
                             24)
  expected = ft.kernel_fn(model)(x1, x2, ("nngp", "ntk"))
  assert expected.nngp.shape == nngp.shape[1:] == (4, 4)
  assert_mc_close(nngp, expected.nngp)
  assert_mc_close(ntk, expected.ntk)


def test_errors():
  x = X1[:, 0]
  relu_branches = lambda axis: nn.Sequential([_Concat(axis), ftn.Relu()])

  class NonGaussian(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = ftn.Dense(4)(x)
      return ftn.FanInConcat(axis=1)([ftn.Relu()(y), ftn.Dense(4)(y)])

  with pytest.raises(ValueError, match="not a zero-mean Gaussian"):
    ft.kernel_fn(NonGaussian())(x)
  with pytest.raises(ValueError, match="may differ only along axis 1"):
    combinators.fan_in_concat([ft.Kernel.from_inputs(x).replace(
        is_gaussian=True), ft.Kernel.from_inputs(x[:, :3, :1])], 1)
  with pytest.raises(ValueError, match="out of range"):
    ft.kernel_fn(relu_branches(5))(x)
  with pytest.raises(ValueError, match="integer on the batch axis"):
    ft.kernel_fn(ftn.Index(np.s_[0]))(x)
  with pytest.raises(ValueError, match="selects no input"):
    ft.kernel_fn(ftn.Index(np.s_[5:]))(x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtypes(dtype):
  x1, x2 = RNG.randn(3, 4, 2), RNG.randn(2, 4, 2)
  model = _McNet(width=4)
  k = ft.kernel_fn(model)(jnp.asarray(x1, dtype), jnp.asarray(x2, dtype),
                          "ntk")
  assert k.dtype == dtype
  np.testing.assert_allclose(k, ft.kernel_fn(model)(x1, x2, "ntk"),
                             rtol=1e-5 if dtype == jnp.float32 else 1e-13)


class _Repeated(nn.Module):
  """`y + y + z`, `concat([y, y])` or `y * y` of Dense branches."""
  how: str

  @nn.compact
  def __call__(self, x):
    y = ftn.Dense(4)(x)
    if self.how == "sum":
      return ftn.FanInSum()([y, ftn.Dense(4, W_std=0.5)(x), y])
    if self.how == "prod":
      return ftn.FanInProd()([y, y])
    return ftn.FanInConcat(axis=-1)([y, y])


def test_repeated_branches_are_correlated():
  # A repeated branch is the same random variable, not an independent copy:
  # concat([y, y]) along channels has y's kernel, and along a spatial axis
  # full cross-blocks (test_concat_of_one_branch_with_itself); sums and
  # products of a branch with itself are refused. NT is wrong here:
  # FanOut(2) >> parallel(Identity(), Identity()) >> FanInSum() gives 2 K,
  # the kernel of two independent copies, where 2 y has 4 K.
  x = X1[:, 0]
  base = ft.kernel_fn(ftn.Dense(4))(x, X2[:, 0])
  np.testing.assert_allclose(
      ft.kernel_fn(_Repeated("concat"))(x, X2[:, 0], "nngp"), base.nngp,
      rtol=1e-12)
  with pytest.raises(ValueError, match="both depend on"):
    ft.kernel_fn(_Repeated("sum"))(x)
  with pytest.raises(ValueError, match="multiplied by itself"):
    ft.kernel_fn(_Repeated("prod"))(x)
