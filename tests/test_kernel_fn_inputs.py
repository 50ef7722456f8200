"""Inputs of kernel functions (issue 9, item 5; issue 10, item 9): NTTree
(tuple/list/dict) inputs get one kernel each, never a stacked array; finite
inputs never give NaN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn

RNG = np.random.RandomState(0)
A1, A2 = RNG.randn(4, 6), RNG.randn(3, 6)
B1, B2 = RNG.randn(4, 5, 2), RNG.randn(3, 5, 2)


class ImageAndVector(nn.Module):
  """Two inputs of different shapes, merged after their own layers."""

  @nn.compact
  def __call__(self, inputs):
    vector, image = inputs
    a = ftn.Dense(3, W_std=1.2, b_std=0.1)(vector)
    b = ftn.Dense(3, W_std=0.7)(ftn.Flatten()(ftn.Relu()(
        ftn.Conv(2, (2,))(image))))
    return ftn.Dense(1)(ftn.Erf()(a + b))


class DictInputs(nn.Module):
  @nn.compact
  def __call__(self, inputs):
    return ImageAndVector()((inputs["vector"], inputs["image"]))


class TwoArguments(nn.Module):
  @nn.compact
  def __call__(self, vector, image):
    return ImageAndVector()((vector, image))


@jax.jit
def _reference(x1, x2):
  """The same kernel computed branch by branch."""
  a = ft.kernel_fn(ftn.Dense(3, W_std=1.2, b_std=0.1))(x1[0], x2[0])
  b = ft.kernel_fn(nn.Sequential([ftn.Conv(2, (2,)), ftn.Relu(),
                                  ftn.Flatten(), ftn.Dense(3, W_std=0.7)]))(
                                      x1[1], x2[1])
  return ft.kernel_fn(nn.Sequential([ftn.Erf(), ftn.Dense(1)]))(a + b)


@pytest.mark.parametrize("model, pack", [
    (ImageAndVector(), lambda a, b: (a, b)),
    (ImageAndVector(), lambda a, b: [a, b]),
    (DictInputs(), lambda a, b: {"vector": a, "image": b}),
    (TwoArguments(), lambda a, b: (a, b)),
], ids=["tuple", "list", "dict", "two_arguments"])
def test_tree_inputs_get_one_kernel_each(model, pack):
  kernel_fn = jax.jit(ft.kernel_fn(model), static_argnames="get")
  kernel = kernel_fn(pack(A1, B1), pack(A2, B2))
  expected = _reference((A1, B1), (A2, B2))
  np.testing.assert_allclose(kernel.nngp, expected.nngp, rtol=1e-12)
  np.testing.assert_allclose(kernel.ntk, expected.ntk, rtol=1e-12)
  same = kernel_fn(pack(A1, B1), None, "nngp")
  np.testing.assert_allclose(same, _reference((A1, B1), (A1, B1)).nngp,
                             rtol=1e-12)


def test_tree_inputs_under_jit():
  jitted = jax.jit(ft.kernel_fn(ImageAndVector()), static_argnames="get")
  np.testing.assert_allclose(jitted((A1, B1), (A2, B2), "ntk"),
                             _reference((A1, B1), (A2, B2)).ntk, rtol=1e-12)


def test_tree_output_gives_kernels_of_each_input():
  # NT's `parallel`: a model returning one output per input.
  class Parallel(nn.Module):
    @nn.compact
    def __call__(self, inputs):
      return ftn.Dense(2)(inputs[0]), ftn.Relu()(ftn.Dense(2)(inputs[1]))

  nngp_a, nngp_b = ft.kernel_fn(Parallel())((A1, A1[:, :2]), None, "nngp")
  np.testing.assert_allclose(nngp_a, A1 @ A1.T / 6, rtol=1e-12)
  assert nngp_b.shape == (4, 4)


@pytest.mark.parametrize("x1, x2, error, message", [
    ((A1, B1), (A2,), ValueError, "same structure"),
    ((A1, B1), A2, ValueError, "same structure"),
    ((A1, "text"), None, TypeError, "must be an array"),
    ((A1, np.full((4, 5, 2), np.nan)), None, ValueError, r"x1\[1\]"),
], ids=["short", "not_a_tree", "not_an_array", "nan"])
def test_bad_tree_inputs(x1, x2, error, message):
  with pytest.raises(error, match=message):
    ft.kernel_fn(ImageAndVector())(x1, x2)


def test_tree_given_to_a_single_input_layer_is_refused_not_stacked():
  with pytest.raises(TypeError, match="takes one input"):
    ft.kernel_fn(ftn.Dense(2))((A1, A1))


def test_large_finite_inputs_give_the_exact_kernel_or_an_error():
  # float32 inputs of 1e18 over 64 channels: their squared norms (6.4e37)
  # are representable, their naive channel sums are close to overflowing.
  x = (RNG.randn(3, 64) * 1e18).astype(np.float32)
  reference = x.astype(np.float64)
  dense = ft.kernel_fn(ftn.Dense(4, W_std=1.5))(x, None, ("nngp", "cov1"))
  np.testing.assert_allclose(dense.nngp, 2.25 * reference @ reference.T / 64,
                             rtol=1e-5)
  # A ReLU's kernel multiplies two such variances (1e73 > float32's 3e38):
  # a clear error, never NaN.
  relu = nn.Sequential([ftn.Dense(4), ftn.Relu(), ftn.Dense(1)])
  with pytest.raises(FloatingPointError, match="overflowed float32"):
    ft.kernel_fn(relu)(x, None, "nngp")


def test_overflowing_inputs_raise_instead_of_nan():
  x = np.full((2, 4), 1e20, np.float32)   # squares overflow float32
  model = nn.Sequential([ftn.Dense(2), ftn.Relu(), ftn.Dense(1)])
  with pytest.raises(FloatingPointError, match="float32.*float64"):
    ft.kernel_fn(model)(x, None, "nngp")
  # Under jit values are unknown: documented to give inf/nan, not an error.
  out = jax.jit(ft.kernel_fn(model), static_argnames="get")(x, None, "nngp")
  assert not np.all(np.isfinite(out))
  # In float64 the same inputs are fine.
  assert np.all(np.isfinite(ft.kernel_fn(model)(x.astype(np.float64), None,
                                                "nngp")))


@pytest.mark.parametrize("dtype,scale", [(np.float32, 1e-30),
                                         (np.float32, 1e-20),
                                         (np.float64, 1e-160)])
def test_inputs_whose_squares_underflow_are_refused(dtype, scale):
  # The true NNGP (~scale**2) is not representable: zero would be a silently
  # wrong kernel. The same inputs rescaled, or in float64, are fine.
  x = (RNG.randn(3, 4) * scale).astype(dtype)
  x[1] = RNG.randn(4)  # Only example 0 and 2 are tiny.
  kernel_fn = ft.kernel_fn(ftn.Dense(2))
  with pytest.raises(FloatingPointError, match="example 0.*underflow"):
    kernel_fn(x, None, "nngp")
  tiny = (RNG.randn(3, 4) * scale).astype(dtype)
  k = kernel_fn(tiny / dtype(scale), None, "nngp")
  assert np.all(np.isfinite(k)) and np.all(np.diag(k) > 0)
  zeros = np.zeros((2, 4), dtype)  # Zero inputs are exact, not refused.
  np.testing.assert_array_equal(kernel_fn(zeros, None, "nngp"), 0.0)


def test_erf_ntk_at_large_variances_is_finite_and_right():
  # E[phi'(u) phi'(v)] for erf divides by sqrt((1+2v)^2 - 4c^2); written as
  # that product it cancels to 0 (an infinite NTK) once v ~ 1/eps.
  x = np.array([[3e3, -1e3, 2e3], [1e3, 2e3, -3e3]])
  kernel = ft.kernel_fn(nn.Sequential([ftn.Dense(2), ftn.Erf()]))(x)
  v = np.sum(x**2, -1) / 3
  c = x @ x.T / 3
  det = (1 + 2 * v[:, None]) * (1 + 2 * v[None]) - 4 * c**2
  np.testing.assert_allclose(kernel.ntk, c * 4 / np.pi / np.sqrt(det),
                             rtol=1e-6)
  for dtype in (np.float32, np.float64):
    big = ft.kernel_fn(nn.Sequential([ftn.Dense(2), ftn.Erf()]))(
        (x * 1e4).astype(dtype), None, "ntk")
    assert np.all(np.isfinite(big))


def test_inputs_are_not_modified_by_the_power_of_two_rescaling():
  x = jnp.asarray(RNG.randn(3, 4))
  kernel = ft.Kernel.from_inputs(x)
  np.testing.assert_allclose(kernel.cov1, np.sum(np.asarray(x) ** 2, -1) / 4,
                             rtol=1e-14)
