"""`ft.Kernel`: a pytree with static layout fields."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft

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


def test_arithmetic_refused_with_hint():
  kernel = ft.Kernel.from_inputs(IMAGES1)
  with pytest.raises(TypeError, match="FanInProd"):
    kernel * 2
  with pytest.raises(TypeError, match="plain JAX function"):
    jnp.tanh(kernel)


def test_sum_of_kernels():
  kernel = ft.Kernel.from_inputs(IMAGES1, IMAGES2)
  independent = kernel.replace()  # another branch with equal covariances
  total = sum([kernel, independent])
  np.testing.assert_allclose(total.nngp, 2 * kernel.nngp)
  # The same kernel object twice is one activation added to itself: 2 y.
  np.testing.assert_allclose((kernel + kernel).nngp, 4 * kernel.nngp)


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
