"""Masking of custom layers (`ft.supports_masking`), constant shifts, and
lifted functions, which never keep a stale mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from masking_cases import Masked
from masking_cases import PAD
from masking_cases import padded

# ------------------------------- supports_masking, shifts, lifted functions ---


def _pair_pad(mask):
  """`(N, N, L, L)`: where either location of a covariance is padding."""
  pad = np.asarray(mask[..., 0])
  return pad[:, None, :, None] | pad[None, :, None, :]


@ft.kernel_rule(lambda module, k, **kwargs: k * 2.)
class _Double(nn.Module):
  """A custom layer: NT's `supports_masking` finite half, and a rule."""

  @ft.supports_masking()
  def __call__(self, x):
    return 2. * x


def test_supports_masking_decorator():
  x = padded([2, 4], 4, 3, 20)
  model = nn.Sequential([ftn.Dense(3), _Double()])
  variables = model.init(jax.random.key(0), x)
  y = model.apply(variables, ft.MaskedArray.from_mask_constant(x, PAD))
  dense = nn.Sequential([ftn.Dense(3)])
  plain = dense.apply(variables, ft.MaskedArray.from_mask_constant(x, PAD))
  assert isinstance(y, ft.MaskedArray)
  np.testing.assert_array_equal(y.unmask(), 2 * plain.unmask())
  k = ft.kernel_fn(model)(x, get="nngp", mask_constant=PAD)
  k_masks = ft.kernel_fn(model)(x, mask_constant=PAD)
  np.testing.assert_array_equal(y.mask, k_masks.mask1)
  np.testing.assert_allclose(
      k, 4 * ft.kernel_fn(ftn.Dense(3))(x, get="nngp", mask_constant=PAD))
  assert np.all(np.asarray(k)[_pair_pad(y.mask)] == 0)
  # Plain arrays pass through.
  np.testing.assert_array_equal(_Double().apply({}, x), 2 * x)


class _Shift(nn.Module):
  """`Dense(x) + c` written as plain JAX (a lifted elementwise function)."""

  @nn.compact
  def __call__(self, x):
    return ftn.Dense(3)(x) + 0.7


def test_constant_shift_keeps_padding_at_zero():
  # `x + c` moves padded entries to c, but later layers read them as zeros:
  # their covariances stay zero, elsewhere c**2 is added (NT's Kernel + c).
  x = padded([2, 4], 4, 3, 21)
  dense = ft.kernel_fn(ftn.Dense(3))(x, mask_constant=PAD)
  pad = _pair_pad(dense.mask1)
  expected = np.where(pad, 0., np.asarray(dense.nngp) + 0.49)
  for shifted in (dense + 0.7, ft.kernel_fn(_Shift())(x, mask_constant=PAD)):
    np.testing.assert_allclose(shifted.nngp, expected, rtol=1e-12)
    np.testing.assert_array_equal(shifted.mask1, dense.mask1)
  # The finite network: the mask stays, the padding reads as zeros.
  xm = ft.MaskedArray.from_mask_constant(x, PAD)
  shifted = (xm + 0.7) * 2. - 1.
  np.testing.assert_array_equal(shifted.mask, xm.mask)
  np.testing.assert_allclose(shifted.unmask(),
                             np.where(xm.mask, 0., (x + 0.7) * 2. - 1.))
  # After Flatten the shift reaches only entries real in both inputs.
  flat = ft.kernel_fn(nn.Sequential([ftn.Dense(3), ftn.Flatten()]))(
      x, mask_constant=PAD)
  real = ~np.asarray(flat.mask1)
  both = (real[:, None, :] & real[None, :, :]).mean(-1)
  np.testing.assert_allclose((flat + 0.7).nngp, flat.nngp + 0.49 * both,
                             rtol=1e-12)


class _Reverse(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.Dense(3)(x)[:, ::-1]


class _LiftedResidual(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = ftn.Dense(3)(x)
    return h + ftn.Dense(3)(jnp.tanh(h))


def test_lifted_functions_never_keep_stale_masks():
  x = padded([2, 4], 4, 3, 22)
  # Reversing locations in plain JAX would leave the mask behind: refused.
  with pytest.raises(ft.KernelRuleError, match="padding masks"):
    ft.kernel_fn(_Reverse())(x, mask_constant=PAD)
  k = ft.kernel_fn(_Reverse())(x)  # unmasked: lifted as usual
  np.testing.assert_allclose(
      k.nngp, ft.kernel_fn(ftn.Dense(3))(x).nngp[:, :, ::-1, ::-1])
  # A lifted residual sum keeps the mask (NT's FanInSum rule) and zeros.
  k = ft.kernel_fn(_LiftedResidual())(x, mask_constant=PAD)
  dense = ft.kernel_fn(ftn.Dense(3))(x, mask_constant=PAD)
  np.testing.assert_array_equal(k.mask1, dense.mask1)
  assert np.all(np.asarray(k.nngp)[_pair_pad(k.mask1)] == 0)


def test_monte_carlo_mask_constant_says_how():
  x = padded([2, 4], 4, 3, 23)
  model = nn.Sequential([ftn.Dense(4), ftn.GlobalAvgPool(), ftn.Dense(1)])
  mc = ft.monte_carlo_kernel_fn(model, jax.random.key(0), 2)
  with pytest.raises(TypeError, match="MaskedArray.from_mask_constant"):
    mc(x, None, "nngp", mask_constant=PAD)
  # The recipe from the message: zeros wherever padding is involved.
  masked = ft.monte_carlo_kernel_fn(
      Masked(nn.Sequential([ftn.Dense(4), ftn.Relu(), ftn.Dense(1)])),
      jax.random.key(0), 2)
  k = masked(x, None, "nngp")
  assert k.shape == (2, 2, 4, 4)
  assert np.all(np.asarray(k)[_pair_pad(np.asarray(x == PAD)[..., :1])] == 0)
