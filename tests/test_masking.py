"""Masking (NT's `mask_constant`): invariances, closed forms, Monte Carlo.

Golden agreement with Neural Tangents is in test_golden.py (cases mask_*).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents._src.analytic import mask_arrays  # the shared mask maps
from masking_cases import Masked
from masking_cases import PAD
from masking_cases import padded
from testing import assert_mc_close
from testing import jit_kernel_fn
from testing import sample_kernels


class _Residual(nn.Module):
  @nn.compact
  def __call__(self, x):  # x: the output of an affine layer (Gaussian)
    return x + ftn.Conv(6, (2,), padding="SAME", W_std=0.8)(ftn.Relu()(x))


def _sequence_model(pos_emb_decay_fn=lambda d: np.exp(-d / 2)):
  """The layers that mask, in a model for variable-length sequences."""
  return nn.Sequential([
      ftn.Conv(6, (3,), padding="SAME", W_std=1.2, b_std=0.3), _Residual(),
      ftn.Relu(),
      ftn.GlobalSelfAttention(6, 4, 4, 2, b_std=0.2, pos_emb_type="SUM",
                              val_pos_emb=True,
                              pos_emb_decay_fn=pos_emb_decay_fn),
      # Erf(0) != 0: padded outputs are nonzero and must stay masked.
      ftn.LayerNorm(axis=(1, 2)), ftn.Erf(c=0.5),
      ftn.AvgPool((3,), padding="SAME"), ftn.GlobalAvgPool(),
      ftn.Dense(2, b_std=0.1)])


def test_padding_is_the_same_as_truncation():
  # Sequences of equal length 4 padded to 6 give the kernel of the 4-long
  # sequences without padding: convolutions and pooling see zeros past the
  # end either way, attention, layer norm and global pooling skip the
  # padding, and the embeddings' covariance on the first 4 locations is the
  # same. Sequences of lengths up to 4 give the same kernel padded to 4 or
  # to 6.
  kernel_fn = jit_kernel_fn(_sequence_model())
  get = ("nngp", "ntk")
  x1, x2 = padded([4] * 2, 6, 3, seed=0), padded([4] * 3, 6, 3, seed=1)
  masked = kernel_fn(x1, x2, get, mask_constant=PAD)
  plain = kernel_fn(x1[:, :4], x2[:, :4], get, mask_constant=PAD)
  np.testing.assert_allclose(masked.nngp, plain.nngp, rtol=1e-11)
  np.testing.assert_allclose(masked.ntk, plain.ntk, rtol=1e-11)
  x1, x2 = padded([4, 1, 3], 6, 3, seed=2), padded([2, 4], 6, 3, seed=3)
  long = kernel_fn(x1, x2, get, mask_constant=PAD)
  short = kernel_fn(x1[:, :4], x2[:, :4], get, mask_constant=PAD)
  np.testing.assert_allclose(long.nngp, short.nngp, rtol=1e-11)
  np.testing.assert_allclose(long.ntk, short.ntk, rtol=1e-11)


def test_finite_network_padding_is_the_same_as_truncation():
  # The finite layers with ft.MaskedArray inputs, on the same parameters:
  # the padded sequence gives the output of the truncated one. (One-hot
  # embeddings, whose parameters restrict to the first 4 locations.)
  model = _sequence_model(pos_emb_decay_fn=None)
  x = padded([4, 4], 6, 3, seed=4)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  apply = jax.jit(model.apply)
  y = apply(variables, ft.MaskedArray.from_mask_constant(x, PAD))
  assert isinstance(y, ft.MaskedArray) and not np.any(y.mask)

  def truncate(path, leaf):
    return leaf[:4] if "pos_emb" in jax.tree_util.keystr(path) else leaf

  short = jax.tree_util.tree_map_with_path(truncate, variables)
  np.testing.assert_allclose(y.masked_value, apply(short, x[:, :4]),
                             rtol=1e-12)


def test_mask_constant_nan_masked_arrays_and_kernel_masks_agree():
  model = nn.Sequential([ftn.Dense(4, b_std=0.1),
                         ftn.GlobalSelfAttention(4, 2, 2, 2),
                         ftn.Relu(), ftn.GlobalAvgPool(), ftn.Dense(1)])
  kernel_fn = jit_kernel_fn(model)
  x1, x2 = padded([5, 2, 4], 5, 3, 5), padded([3, 1], 5, 3, 6)
  expected = kernel_fn(x1, x2, "ntk", mask_constant=PAD)
  nan = lambda x: np.where(x == PAD, np.nan, x)
  np.testing.assert_allclose(
      kernel_fn(nan(x1), nan(x2), "ntk", mask_constant=np.nan), expected,
      rtol=1e-13)
  masked = lambda x: ft.MaskedArray.from_mask_constant(x, PAD)
  np.testing.assert_allclose(kernel_fn(masked(x1), masked(x2), "ntk"),
                             expected, rtol=1e-12)
  # A Kernel with masks set by hand (Kernel.mask1/mask2 are honoured).
  zeroed = lambda x: np.where(x == PAD, 0.0, x)
  k = ft.Kernel.from_inputs(zeroed(x1), zeroed(x2), diagonal_batch=False)
  k = k.replace(mask1=jnp.asarray(x1 == PAD), mask2=jnp.asarray(x2 == PAD))
  np.testing.assert_allclose(kernel_fn(k, get="ntk"), expected, rtol=1e-12)


def test_gradients_are_finite_and_zero_at_padding():
  # Padded entries read as zeros (zero variance below the nonlinearity):
  # the kernel is differentiable, and padding does not influence it.
  model = nn.Sequential([ftn.Conv(4, (2,), padding="SAME"), ftn.Relu(),
                         ftn.GlobalAvgPool(), ftn.Dense(1)])
  kernel_fn = ft.kernel_fn(model)
  x = padded([3, 1], 4, 2, 15)
  grad = jax.jit(jax.grad(lambda x: kernel_fn(x, None, "ntk",
                                              mask_constant=PAD).sum()))(x)
  assert np.all(np.isfinite(grad))
  assert np.all(grad[x == PAD] == 0) and np.any(grad[x != PAD] != 0)


def test_global_average_pool_closed_form():
  # Dense then GlobalAvgPool: the mean of W^2 x1.x2 / C + b^2 over pairs of
  # unpadded locations; a sequence that is all padding gives zeros.
  x1, x2 = padded([4, 1, 0], 4, 3, 7), padded([2, 3], 4, 3, 8)
  model = nn.Sequential([ftn.Dense(5, W_std=1.3, b_std=0.4),
                         ftn.GlobalAvgPool()])
  k = jit_kernel_fn(model)(x1, x2, ("nngp", "ntk"), mask_constant=PAD)
  expected = np.zeros((3, 2))
  for i, a in enumerate(x1):
    for j, b in enumerate(x2):
      a, b = a[a[:, 0] != PAD], b[b[:, 0] != PAD]
      if len(a) and len(b):
        expected[i, j] = 1.69 * np.mean(a @ b.T / 3) + 0.16
  np.testing.assert_allclose(k.nngp, expected, rtol=1e-12)
  np.testing.assert_allclose(k.ntk, expected, rtol=1e-12)


def test_masked_softmax_attention_closed_form():
  # On raw inputs: softmax over unpadded keys, G = softmax(QK C_x), nngp' =
  # OV^2 G1 C12 G2^T + b^2 at unpadded queries and 0 at padded ones.
  x1, x2 = padded([3, 1], 4, 5, 9), padded([4, 2], 4, 5, 10)
  qk, ov, b = 1.1 * 0.8, 1.2, 0.3
  layer = ftn.GlobalSelfAttention(3, 2, 2, 2, W_key_std=1.1, W_query_std=0.8,
                                  W_out_std=1.2, b_std=b)
  k = jit_kernel_fn(layer)(x1, x2, None, mask_constant=PAD)
  z1, z2 = np.where(x1 == PAD, 0, x1), np.where(x2 == PAD, 0, x2)
  pad1, pad2 = x1[..., 0] == PAD, x2[..., 0] == PAD

  def weights(z, pad):
    logits = np.where(pad[:, None, :], -np.inf,
                      qk * np.einsum("asc,atc->ast", z, z) / 5)
    g = np.exp(logits - logits.max(-1, keepdims=True))
    return g / g.sum(-1, keepdims=True)

  c12 = np.einsum("asc,btc->abst", z1, z2) / 5
  weighted = np.einsum("asp,abpq,btq->abst", weights(z1, pad1), c12,
                       weights(z2, pad2))
  keep = ~(pad1[:, None, :, None] | pad2[None, :, None, :])
  np.testing.assert_allclose(k.nngp, keep * (ov**2 * weighted + b**2),
                             rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(k.ntk, keep * (2 * ov**2 * weighted + b**2),
                             rtol=1e-12, atol=1e-15)
  assert k.mask1.shape == (2, 4, 1)


def _mc_model(n_out):
  """Conv, pooling and attention (with embeddings) over padded sequences."""
  return nn.Sequential([
      ftn.Conv(128, (3,), padding="SAME", b_std=0.3), ftn.Relu(),
      ftn.AvgPool((2,), padding="SAME"), ftn.Dense(128, b_std=0.2),
      ftn.GlobalSelfAttention(n_out, 128, 8, 4, W_key_std=1.5,
                              pos_emb_type="CONCAT", n_chan_pos_emb=64,
                              pos_emb_decay_fn=lambda d: np.exp(-d))])


def test_monte_carlo():
  # Finite networks from model.init on MaskedArray inputs converge to the
  # masked kernel (outputs at padded locations are zeros on both sides).
  # NNGP: 32 networks, 256 outputs; NTK: 16 networks, one output.
  # Tolerance: 5 standard errors plus 4/128 of the scale for the
  # O(1/width) bias (widths and n_key 128).
  x1, x2 = padded([4, 2], 4, 3, 11), padded([3, 1], 4, 3, 12)
  nngp, _ = sample_kernels(Masked(_mc_model(256)), x1, x2,
                           jax.random.key(1), 32, joint=True, batch_size=32,
                           ntk=None)
  _, ntk = sample_kernels(Masked(_mc_model(1)), x1, x2, jax.random.key(2),
                          16, joint=True, batch_size=16)
  k = jit_kernel_fn(_mc_model(1))(x1, x2, ("nngp", "ntk"), mask_constant=PAD)
  assert_mc_close(nngp, k.nngp, bias=4 / 128)
  assert_mc_close(ntk, k.ntk, bias=4 / 128)


LAYERS = [
    ftn.Dense(3), ftn.Conv(3, (2, 2), strides=(2, 1)),
    ftn.Conv(3, (3, 2), padding="CIRCULAR"), ftn.ConvLocal(3, (2, 2)),
    ftn.ConvTranspose(3, (2, 2), strides=(2, 2), padding="SAME"),
    ftn.AvgPool((2, 2), padding="SAME"), ftn.SumPool((3, 1), strides=(2, 1)),
    ftn.GlobalSumPool(), ftn.Flatten(), ftn.Relu(), ftn.LayerNorm(axis=(1, 3)),
    ftn.GlobalSelfAttention(3, 2, 2, 2), ftn.ImageResize((-1, 6, 2, -1),
                                                         "linear"),
    ftn.Index(np.s_[:, 1:, 0]), ftn.Aggregate(),
    ftn.Dropout(0.5, deterministic=True),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: type(l).__name__)
def test_finite_and_kernel_masks_agree(layer):
  # Each layer maps masks of whole locations the same way in the finite
  # network and in the kernel, and zeroes the kernel at padding.
  x = np.random.RandomState(13).randn(2, 4, 3, 2)
  x[0, 2:] = PAD
  x[1, :, 2] = PAD
  model = nn.Sequential([ftn.Dense(2), layer])

  @jax.jit
  def finite_and_kernel(x):
    xm = ft.MaskedArray.from_mask_constant(x, PAD)
    y = model.apply(model.init(jax.random.key(0), x), xm)
    return y, ft.kernel_fn(model)(x, mask_constant=PAD)

  y, k = finite_and_kernel(x)
  np.testing.assert_array_equal(y.mask, k.mask1)
  assert y.mask.shape[:-1] == y.masked_value.shape[:-1]
  if y.mask.shape[-1] == 1:
    # nngp vanishes wherever either location is padding.
    pad = np.asarray(y.mask[..., 0])
    n, spatial = pad.shape[0], pad.shape[1:]
    if k.diagonal_spatial:
      pairs = pad[:, None] | pad[None, :]
    else:
      shape = lambda first: [n, 1] if first else [1, n]
      a = pad.reshape(shape(True) + [d for s in spatial for d in (s, 1)])
      b = pad.reshape(shape(False) + [d for s in spatial for d in (1, s)])
      pairs = a | b
    pairs = np.broadcast_to(pairs, k.nngp.shape)
    assert np.any(pairs) == np.any(pad)
    assert np.all(np.asarray(k.nngp)[pairs] == 0)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_window_mask_is_the_centre_of_the_window(padding):
  # Neural Tangents' rule, written out: output t reads the input mask at
  # s t - pad_low + (k - 1) // 2.
  rng = np.random.RandomState(16)
  for size in (5, 6):
    for k in range(1, 4):
      for s in range(1, 4):
        mask = rng.rand(2, size, 1) < 0.5
        (lo, hi), = jax.lax.padtype_to_pads((size,), (k,), (s,), padding)
        out = (size + lo + hi - k) // s + 1
        expected = mask[:, [s * t - lo + (k - 1) // 2 for t in range(out)]]
        got = mask_arrays.window_mask(jnp.asarray(mask), (k,), (s,),
                                      ((lo, hi),), False)
        np.testing.assert_array_equal(got, expected)


def test_kernel_mask_and_transpose():
  k = ft.Kernel.from_inputs(np.ones((2, 3, 2, 4)), diagonal_batch=False)
  mask = np.zeros((2, 3, 2, 1), bool)
  mask[1, 2, 1] = True
  masked = k.mask(mask, None)
  assert np.all(masked.nngp[1, :, 2, :, 1, :] == 0)
  assert np.all(masked.cov1[:, 1, :, 2, :, 1] == 0)
  assert masked.nngp.sum() == k.nngp.sum() - (2 * 2 * 6 - 1) * 1.0
  moved = masked.transpose((1, 0))
  assert moved.mask1.shape == (2, 2, 3, 1) and moved.mask1[1, 1, 2, 0]
  indexed = masked[1:, 1:, 1]          # Kernel indexing moves masks too
  np.testing.assert_array_equal(indexed.mask1[..., 0], [[False, True]])


def test_errors():
  x = padded([2, 3], 4, 3, 14)
  with pytest.raises(NotImplementedError, match="differs between channels"):
    ft.kernel_fn(ftn.GlobalAvgPool())(x, mask_constant=PAD)

  # A rule that changes the shape without mapping the masks is refused.
  @ft.kernel_rule(lambda module, k, **kw: k.replace(
      nngp=k.nngp[..., :2, :2], cov1=k.cov1[..., :2, :2],
      ntk=None if k.ntk is None else k.ntk[..., :2, :2],
      shape1=(2, 2, 5), shape2=(2, 2, 5)))
  class FirstTwo(nn.Module):
    def __call__(self, x):
      return x[:, :2]

  model = nn.Sequential([ftn.Dense(5), FirstTwo()])
  with pytest.raises(NotImplementedError, match="does not propagate masks"):
    ft.kernel_fn(model)(x, mask_constant=PAD)
  kernel = ft.Kernel.from_inputs(x)
  with pytest.raises(ValueError, match="mask_constant"):
    ft.kernel_fn(ftn.Dense(2))(kernel, mask_constant=PAD)
  xm = ft.MaskedArray.from_mask_constant(x, PAD)
  with pytest.raises(ValueError, match="not both"):
    ft.kernel_fn(ftn.Dense(2))(xm, mask_constant=PAD)
  with pytest.raises(TypeError, match="masking support"):
    nn.Dense(2).init(jax.random.key(0), xm)
  with pytest.raises(NotImplementedError, match="differs between channels"):
    kernel.mask(x == PAD, None)
