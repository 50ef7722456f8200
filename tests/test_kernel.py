"""`ft.Kernel`: a pytree with static layout fields."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn

RNG = np.random.RandomState(0)
IMAGES1 = RNG.randn(2, 3, 4, 5)
IMAGES2 = RNG.randn(3, 3, 4, 5)


def test_pytree_leaves_and_static_fields():
  kernel = ft.Kernel.from_inputs(IMAGES1, IMAGES2)
  leaves, treedef = jax.tree.flatten(kernel)
  assert len(leaves) == 4  # nngp, ntk, cov1, cov2; masks are None
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.shape1 == (2, 3, 4, 5) and rebuilt.is_input
  doubled = jax.jit(lambda k: jax.tree.map(lambda x: 2 * x, k))(kernel)
  np.testing.assert_allclose(doubled.nngp, 2 * kernel.nngp)
  assert doubled.diagonal_spatial == kernel.diagonal_spatial


@pytest.mark.parametrize("diagonal_spatial", [False, True])
@pytest.mark.parametrize("diagonal_batch", [False, True])
def test_from_inputs_layout(diagonal_spatial, diagonal_batch):
  kernel = ft.Kernel.from_inputs(IMAGES1, IMAGES2,
                                 diagonal_batch=diagonal_batch,
                                 diagonal_spatial=diagonal_spatial)
  spatial = (3, 4) if diagonal_spatial else (3, 3, 4, 4)
  assert kernel.nngp.shape == (2, 3) + spatial
  batch = (2,) if diagonal_batch else (2, 2)
  assert kernel.cov1.shape == batch + spatial
  # Entry (a, b, h, h', w, w') is the channel mean of x1[a,h,w] x2[b,h',w'].
  expected = np.einsum("ahwc,bHWc->abhHwW", IMAGES1, IMAGES2) / 5
  if diagonal_spatial:
    expected = np.einsum("abhhww->abhw", expected)
  np.testing.assert_allclose(kernel.nngp, expected, rtol=1e-12)


def test_transpose_and_reverse():
  kernel = ft.Kernel.from_inputs(IMAGES1, IMAGES2)
  swapped = ft.Kernel.from_inputs(np.swapaxes(IMAGES1, 1, 2),
                                  np.swapaxes(IMAGES2, 1, 2))
  transposed = kernel.transpose((1, 0))
  np.testing.assert_allclose(transposed.nngp, swapped.nngp, rtol=1e-12)
  np.testing.assert_allclose(transposed.cov1, swapped.cov1, rtol=1e-12)
  assert transposed.shape1 == (2, 4, 3, 5)
  reversed_ = kernel.reverse()
  assert reversed_.is_reversed
  np.testing.assert_allclose(reversed_.nngp, swapped.nngp, rtol=1e-12)
  with pytest.raises(ValueError, match="not a permutation"):
    kernel.transpose((0, 0))


def test_plain_functions_refused_with_hint():
  kernel = ft.Kernel.from_inputs(IMAGES1)
  with pytest.raises(TypeError, match="plain JAX function"):
    jnp.tanh(kernel)
  with pytest.raises(TypeError, match="ftn.Dense"):
    kernel @ np.ones((5, 5))


def test_sum_of_kernels_needs_centred_branches():
  # x + x of raw inputs would be 4 K, not 2 K: refused (as in NT), with
  # the fix in the message; centred (post-affine) branches add.
  kernel = ft.Kernel.from_inputs(IMAGES1, IMAGES2)
  with pytest.raises(ValueError, match="raw inputs.*affine layer"):
    sum([kernel, kernel])
  dense = ft.kernel_fn(ftn.Dense(3, W_std=1.3))
  a, b = dense(IMAGES1, IMAGES2), dense(IMAGES1, IMAGES2)
  np.testing.assert_allclose(sum([a, b]).nngp, 2 * a.nngp)
  np.testing.assert_allclose((a - b).ntk, 2 * a.ntk)  # -b has b's kernel


@pytest.mark.parametrize("c", [3.0, -0.5, np.float32(2.0), jnp.array(1.5)])
def test_scalar_arithmetic_is_the_scaled_network(c):
  # NT's meaning: the kernel of c * f(x) is c**2 times that of f(x).
  kernel = ft.kernel_fn(nn.Sequential([ftn.Dense(3, b_std=0.1), ftn.Relu()]))(
      IMAGES1, IMAGES2)
  scaled = ft.kernel_fn(nn.Sequential([ftn.Dense(3, b_std=0.1), ftn.Relu(),
                                       Scale(float(c))]))(IMAGES1, IMAGES2)
  left = [] if isinstance(c, jax.Array) else [c * kernel]
  for product in [kernel * c, kernel / (1 / c)] + left:
    for field in ("nngp", "ntk", "cov1", "cov2"):
      np.testing.assert_allclose(getattr(product, field),
                                 getattr(scaled, field), rtol=1e-6)
  assert -kernel is kernel


class Scale(nn.Module):
  """y = c x as a user writes it: the Kernel's own `*` gives the rule."""
  c: float

  def __call__(self, x):
    return self.c * x


def test_constant_shift_needs_a_centred_activation():
  # x + c for a centred Gaussian x: second moments gain c**2 (NTK unchanged);
  # after a nonlinearity the mean is unknown, so it is refused.
  dense = ft.kernel_fn(ftn.Dense(3))(IMAGES1, IMAGES2)
  shifted = dense + 2.0
  np.testing.assert_allclose(shifted.nngp, dense.nngp + 4.0)
  np.testing.assert_allclose(shifted.cov1, dense.cov1 + 4.0)
  np.testing.assert_allclose(shifted.ntk, dense.ntk)
  np.testing.assert_allclose((dense - 2.0).nngp, shifted.nngp)
  assert not shifted.is_gaussian
  with pytest.raises(ValueError, match="mean"):
    ft.Kernel.from_inputs(IMAGES1) + 1.0
  assert 0 + dense is dense


def test_astuple_and_slice():
  kernel = ft.kernel_fn(ftn.Dense(3))(IMAGES1[:, 0], None)
  assert kernel.astuple()[0] is kernel.nngp
  assert len(kernel.astuple()) == len(kernel.asdict())
  x = RNG.randn(5, 4)
  full = ft.kernel_fn(ftn.Dense(3, b_std=0.2))(x)
  part = full.slice(slice(1, 4), slice(0, 2))
  direct = ft.kernel_fn(ftn.Dense(3, b_std=0.2))(x[1:4], x[0:2])
  for field in ("nngp", "ntk", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(part, field), getattr(direct, field))
  assert not part.x1_is_x2 and part.shape1 == (3, 3)
  same = full.slice(slice(1, 3), slice(1, 3))
  assert same.x1_is_x2 and same.cov2 is None


def test_slice_of_full_batch_covariances():
  kernel = ft.Kernel.from_inputs(IMAGES2, diagonal_batch=False)
  part = kernel.slice(slice(0, 2), slice(1, 3))
  direct = ft.Kernel.from_inputs(IMAGES2[:2], IMAGES2[1:3],
                                 diagonal_batch=False)
  np.testing.assert_allclose(part.cov1, direct.cov1)
  np.testing.assert_allclose(part.cov2, direct.cov2)


@pytest.mark.parametrize("diagonal_spatial", [False, True])
@pytest.mark.parametrize("idx", [np.s_[:, 1], np.s_[1:3, :, 0:2],
                                 np.s_[..., 2, :], np.s_[::2, 0, ::-1]])
def test_getitem_is_the_kernel_of_indexed_inputs(idx, diagonal_spatial):
  kernel = ft.Kernel.from_inputs(IMAGES1, IMAGES2,
                                 diagonal_spatial=diagonal_spatial)
  indexed = kernel[idx]
  direct = ft.Kernel.from_inputs(IMAGES1[idx], IMAGES2[idx],
                                 diagonal_spatial=diagonal_spatial)
  assert indexed.shape1 == direct.shape1
  np.testing.assert_allclose(indexed.nngp, direct.nngp, rtol=1e-12)
  np.testing.assert_allclose(indexed.cov2, direct.cov2, rtol=1e-12)


@pytest.mark.parametrize("idx, message", [
    (np.s_[0], "integer on the batch axis"),
    (np.s_[..., 1], "channel axis"),
])
def test_getitem_refusals(idx, message):
  with pytest.raises(ValueError, match=message):
    ft.Kernel.from_inputs(IMAGES1)[idx]


def test_x1_is_x2_usable_under_tracing():
  # NT makes `x1_is_x2` an array leaf; here it is static when a Python bool
  # and a leaf when traced, so code written for NT's Kernel runs in jit.
  kernel = ft.Kernel.from_inputs(IMAGES1)
  assert kernel.x1_is_x2 is True
  assert ft.Kernel(**{**kernel.asdict(), "x1_is_x2": np.bool_(True)}
                   ).x1_is_x2 is True

  @jax.jit
  def traced(flag, k):
    k = k.replace(x1_is_x2=flag)
    return k, jnp.where(k.x1_is_x2, k.nngp, 0.0)

  out, values = traced(jnp.array(False), kernel)
  assert not bool(out.x1_is_x2)
  np.testing.assert_array_equal(values, 0.0)
  assert len(jax.tree.leaves(out)) == 4  # nngp, ntk, cov1 and x1_is_x2


@pytest.mark.parametrize("is_lhs", [True, False])
def test_dot_general_matches_transformed_inputs(is_lhs):
  # The kernel of inputs contracted with fixed arrays equals the kernel of
  # the contracted inputs, computed directly. As in NT, `is_lhs` says that
  # the fixed array is the left operand.
  other1 = RNG.randn(4, 2, 6)   # contracts the width axis (size 4)
  other2 = RNG.randn(4, 2, 6)
  numbers = (((0,), (2,)), ((), ())) if is_lhs else (((2,), (0,)), ((), ()))

  def transform(x, other):
    if is_lhs:   # (2, 6, N, H, C) -> (N, 2, 6, H, C): lax order, batch first
      return jnp.moveaxis(jax.lax.dot_general(other, x, numbers), 2, 0)
    # (N, H, C, 2, 6) -> (N, H, 2, 6, C)
    return jnp.moveaxis(jax.lax.dot_general(x, other, numbers), 2, -1)

  kernel = ft.Kernel.from_inputs(IMAGES1, IMAGES2).dot_general(
      other1, other2, is_lhs, numbers)
  direct = ft.Kernel.from_inputs(transform(IMAGES1, other1),
                                 transform(IMAGES2, other2))
  assert kernel.shape1 == direct.shape1 == (
      (2, 2, 6, 3, 5) if is_lhs else (2, 3, 2, 6, 5))
  np.testing.assert_allclose(kernel.nngp, direct.nngp, rtol=1e-10)
  np.testing.assert_allclose(kernel.cov1, direct.cov1, rtol=1e-10)
  np.testing.assert_allclose(kernel.cov2, direct.cov2, rtol=1e-10)


def test_dot_general_refuses_channel_contraction():
  with pytest.raises(ValueError, match="channel axis"):
    ft.Kernel.from_inputs(IMAGES1).dot_general(
        np.ones(5), None, False, (((3,), (0,)), ((), ())))
