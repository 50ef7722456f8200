"""GlobalSelfAttention: closed forms, Monte Carlo, dtypes, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import DtypeCase
from testing import LayerRuleTest
from testing import MonteCarloCase
from testing import RaisesCase

X1 = np.random.RandomState(0).randn(3, 4, 6)
X2 = np.random.RandomState(1).randn(2, 4, 6)


def _input_covariances(x1, x2):
  """Per-input location covariances and the cross covariance (raw inputs)."""
  d = x1.shape[-1]
  c1 = np.einsum("asc,atc->ast", x1, x1) / d
  c2 = np.einsum("asc,atc->ast", x2, x2) / d
  c12 = np.einsum("asc,btc->abst", x1, x2) / d
  return c1, c2, c12


def test_forward_shapes_and_params():
  x = jnp.asarray(np.random.RandomState(2).randn(2, 3, 4, 5))  # 2-D tokens
  layer = ftn.GlobalSelfAttention(7, 3, 2, n_heads=4, b_std=0.1,
                                  linear_scaling=False)
  variables = layer.init(jax.random.key(0), x)
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes == {"key": (4, 5, 3), "query": (4, 5, 3),
                    "value": (4, 5, 2), "out": (8, 7), "bias": (7,)}
  assert layer.apply(variables, x).shape == (2, 3, 4, 7)


@pytest.mark.parametrize("mechanism", ["IDENTITY", "RELU", "ABS", "SOFTMAX"])
def test_linear_scaling_closed_form(mechanism):
  # On raw inputs: G_x = A(QK C_x) and nngp' = OV^2 G1 C12 G2^T + b^2;
  # the NTK is twice the weighted NNGP (values and outputs) + b^2.
  qk, ov, b = 0.7 * 1.3, 1.1 * 0.9, 0.2
  layer = ftn.GlobalSelfAttention(
      5, 4, 4, 2, W_query_std=0.7, W_key_std=1.3, W_value_std=1.1,
      W_out_std=0.9, b_std=b, attention_mechanism=mechanism)
  c1, c2, c12 = _input_covariances(X1, X2)
  fn = {"IDENTITY": lambda g: g, "RELU": lambda g: np.maximum(g, 0),
        "ABS": np.abs,
        "SOFTMAX": lambda g: np.exp(g) / np.exp(g).sum(-1, keepdims=True)}
  g1, g2 = fn[mechanism](qk * c1), fn[mechanism](qk * c2)
  weighted = np.einsum("asp,abpq,btq->abst", g1, c12, g2)
  k = ft.kernel_fn(layer)(X1, X2, ("nngp", "ntk"))
  np.testing.assert_allclose(k.nngp, ov**2 * weighted + b**2, rtol=1e-12)
  np.testing.assert_allclose(k.ntk, 2 * ov**2 * weighted + b**2, rtol=1e-12)


def test_softmax_of_constant_tokens_is_the_mean():
  # Identical tokens: uniform attention, so the layer is a dense map of the
  # (shared) token, nngp' = OV^2 nngp.
  x1 = np.repeat(X1[:, :1], 4, axis=1)
  x2 = np.repeat(X2[:, :1], 4, axis=1)
  layer = ftn.GlobalSelfAttention(5, 4, 4, 2, W_out_std=1.5)
  k = ft.kernel_fn(layer)(x1, x2, "nngp")
  np.testing.assert_allclose(k, 2.25 * _input_covariances(x1, x2)[2],
                             rtol=1e-12)


def test_sqrt_scaling_identity_closed_form():
  # A(G) = G Gaussian: nngp' = (QK OV)^2 <C12, C12> C12, summed over pairs.
  layer = ftn.GlobalSelfAttention(5, 4, 4, 2, linear_scaling=False,
                                  attention_mechanism="IDENTITY",
                                  W_key_std=1.2)
  c12 = _input_covariances(X1, X2)[2]
  k = ft.kernel_fn(layer)(X1, X2, ("nngp", "ntk"))
  dot = np.einsum("abst,abst->ab", c12, c12)[:, :, None, None]
  np.testing.assert_allclose(k.nngp, 1.44 * dot * c12, rtol=1e-12)
  # Raw inputs have zero NTK: four weight matrices give 4 dot * c12.
  np.testing.assert_allclose(k.ntk, 4 * 1.44 * dot * c12, rtol=1e-12)


def test_full_spatial_covariances_are_requested():
  # Flatten alone would store only spatial diagonals; attention below it
  # needs full location-location covariances, found by the requirement pass.
  model = nn.Sequential([ftn.Dense(8), ftn.GlobalSelfAttention(8, 4, 4, 2),
                         ftn.Relu(), ftn.Flatten(), ftn.Dense(2)])
  k = ft.kernel_fn(model)(X1, X2, "nngp")
  assert k.shape == (3, 2)


MODELS = {
    # Raw inputs: the input covariances are exact and only the key width
    # n_key biases the per-network kernels: the softmax weights concentrate
    # at rate n_key^-1/2, a smooth function of them is biased by O(1/n_key).
    # (RELU/ABS are kinked at 0, where the bias is O(n_key^-1/2); they are
    # checked by closed forms only.)
    "softmax_on_inputs": lambda n_out: ftn.GlobalSelfAttention(
        n_out, 128, 8, 8, b_std=0.2, W_value_std=1.3, W_key_std=1.5),
    # Square-root scaling: the weights are Gaussian; the moments used here
    # are exact at any width, so the estimates are (nearly) unbiased.
    "identity_sqrt_on_inputs": lambda n_out: ftn.GlobalSelfAttention(
        n_out, 128, 8, 8, linear_scaling=False,
        attention_mechanism="IDENTITY", W_query_std=0.8),
    # A Dense layer below: the NTK flowing into attention is non-zero, and
    # its width adds an O(1/width) bias of the input covariances.
    "softmax_after_dense": lambda n_out: nn.Sequential([
        ftn.Dense(128, b_std=0.1), ftn.GlobalSelfAttention(n_out, 128, 8, 8)]),
}


def _location_covariance(decay, size):
  """R of the embeddings on a 1-D sequence, written out (not the library's)."""
  if decay is None:
    return np.eye(size)
  d = np.abs(np.arange(size)[:, None] - np.arange(size)[None, :])
  return decay(d**2.0)


POSITIONAL = [  # (pos_emb_type, n_chan_pos_emb, val_pos_emb, decay)
    ("SUM", None, False, None),
    ("SUM", None, True, lambda d: np.exp(-d / 3)),
    ("CONCAT", None, False, lambda d: 1 / (1 + d)),
    ("CONCAT", 2, True, None),
]


@pytest.mark.parametrize("linear_scaling", [True, False],
                         ids=["linear", "sqrt_identity"])
@pytest.mark.parametrize("kind,n_emb,val,decay", POSITIONAL)
def test_positional_embeddings_closed_form(kind, n_emb, val, decay,
                                           linear_scaling):
  # On raw inputs (C = 6 channels, zero NTK): keys and queries see
  # E = w_x C_x + w_e R, with (w_x, w_e) = (1, W_e^2) for SUM and the
  # channel fractions (C, W_e^2 C_e) / (C + C_e) for CONCAT; values see E
  # with val_pos_emb, C_x otherwise; the embeddings' NTK is w_e R.
  qk, ov, b, w_e = 0.9, 1.2, 0.2, 0.8
  layer = ftn.GlobalSelfAttention(
      5, 4, 4, 2, linear_scaling=linear_scaling, W_query_std=0.9,
      W_out_std=1.2, b_std=b, W_pos_emb_std=w_e, pos_emb_type=kind,
      n_chan_pos_emb=n_emb, val_pos_emb=val, pos_emb_decay_fn=decay,
      attention_mechanism="SOFTMAX" if linear_scaling else "IDENTITY")
  c1, c2, c12 = _input_covariances(X1, X2)
  R = _location_covariance(decay, X1.shape[1])
  total = 6 + (0 if kind == "SUM" else n_emb or 6)
  w_x, w_e = (1.0, w_e**2) if kind == "SUM" else (6 / total,
                                                  w_e**2 * (total - 6) / total)
  e1, e2, e12 = (w_x * c + w_e * R for c in (c1, c2, c12))
  v12, theta_e = (e12 if val else c12), w_e * R + 0 * c12
  theta_v = theta_e if val else 0 * c12
  k = ft.kernel_fn(layer)(X1, X2, ("nngp", "ntk"))
  if linear_scaling:
    softmax = lambda g: np.exp(g) / np.exp(g).sum(-1, keepdims=True)
    g1, g2 = softmax(qk * e1), softmax(qk * e2)
    weigh = lambda c: np.einsum("asp,abpq,btq->abst", g1, c, g2)
    nngp = ov**2 * weigh(v12) + b**2
    ntk = ov**2 * (weigh(theta_v) + 2 * weigh(v12)) + b**2
  else:
    dot = lambda a, c: np.einsum("abst,abst->ab", a, c)[:, :, None, None]
    scale = (qk * ov)**2
    nngp = scale * dot(e12, v12) * e12 + b**2
    ntk = scale * ((dot(theta_e, v12) + dot(e12, theta_v)) * e12 +
                   dot(e12, v12) * (theta_e + 4 * e12)) + b**2
  np.testing.assert_allclose(k.nngp, nngp, rtol=1e-12)
  np.testing.assert_allclose(k.ntk, ntk, rtol=1e-12)


POSITIONAL_MC = {
    # Linear scaling: the embeddings' empirical covariance (C_e = 64
    # channels) enters the softmax weights, an O(1/C_e) bias.
    "concat_decay_values": lambda n_out: nn.Sequential([
        ftn.Dense(128, b_std=0.1), ftn.GlobalSelfAttention(
            n_out, 128, 8, 8, W_key_std=1.4, pos_emb_type="CONCAT",
            n_chan_pos_emb=64, val_pos_emb=True, W_pos_emb_std=1.2,
            pos_emb_decay_fn=lambda d: np.exp(-d / 2))]),
    # Square-root scaling: Gaussian attention weights, keys and queries
    # embedded but not the values.
    "sum_sqrt_identity": lambda n_out: nn.Sequential([
        ftn.Dense(128), ftn.GlobalSelfAttention(
            n_out, 128, 8, 8, linear_scaling=False,
            attention_mechanism="IDENTITY", pos_emb_type="SUM",
            W_pos_emb_std=0.9)]),
}


def _raises(name, call, match):
  return RaisesCase(name, call, match, ValueError)


def _kernel_of(**kwargs):
  """`kernel_fn` of an attention layer built inside the call (some options
  are refused by the constructor)."""
  return lambda: ft.kernel_fn(ftn.GlobalSelfAttention(4, 4, 4, 2, **kwargs))(
      X1)


_NOT_PSD = ftn.GlobalSelfAttention(4, 4, 4, 2, pos_emb_type="SUM",
                                   pos_emb_decay_fn=lambda d: 1.0 - d)


class TestGlobalSelfAttention(LayerRuleTest):
  # MODELS: NNGP from 64 networks with 256 output channels (forward passes
  # only); NTK from 32 networks with one output channel (Jacobians are the
  # cost). Tolerance: 5 standard errors measured from the samples, plus
  # 4/128 of the kernel's scale for the O(1/n_key) and O(1/width) biases
  # (n_key = width = 128). POSITIONAL_MC: finite layers (embeddings drawn
  # by model.init) converge to the kernel; NNGP: 32 networks, 256 outputs;
  # NTK: 16 networks, one output; 5 standard errors plus 4/64 of the scale
  # (widths 64 to 128).
  monte_carlo_cases = [
      MonteCarloCase(name, MODELS[name], X1, X2, 64, bias=4 / 128, seed=6,
                     nngp_readout=256, ntk_samples=32)
      for name in sorted(MODELS)] + [
          MonteCarloCase(f"positional_{name}", POSITIONAL_MC[name],
                         X1[:2, :, :3], X2[:, :, :3], 32, bias=4 / 64,
                         seed=8, nngp_readout=256, ntk_samples=16, jit=True)
          for name in sorted(POSITIONAL_MC)]
  dtype_cases = [DtypeCase("dense_attention_relu", nn.Sequential([
      ftn.Dense(8), ftn.GlobalSelfAttention(8, 4, 4, 2), ftn.Relu(),
      ftn.Flatten(), ftn.Dense(2)]), X1, X2, get=("ntk",), rtol64=1e-14,
                           jit=False)]
  raises_cases = [
      RaisesCase("sqrt_scaling_closed_form", _kernel_of(
          linear_scaling=False), "closed form", NotImplementedError),
      _raises("pos_emb_type", _kernel_of(pos_emb_type="SIN"),
              "pos_emb_type"),
      _raises("n_chan_pos_emb_sum", _kernel_of(
          pos_emb_type="SUM", n_chan_pos_emb=3), "n_chan_pos_emb"),
      _raises("not_psd_kernel", lambda: ft.kernel_fn(_NOT_PSD)(X1),
              "positive semi-definite"),
      _raises("not_psd_init", lambda: _NOT_PSD.init(jax.random.key(0), X1),
              "positive semi-definite"),
      _raises("attention_mechanism", _kernel_of(attention_mechanism="TANH"),
              "attention_mechanism"),
      _raises("spatial", lambda: ft.kernel_fn(ftn.GlobalSelfAttention(
          4, 4, 4, 2))(X1[:, 0]), "spatial"),
      _raises("n_chan_pos_emb_init", lambda: ftn.GlobalSelfAttention(
          4, 4, 4, 2, pos_emb_type="SUM", n_chan_pos_emb=2).init(
              jax.random.key(0), X1), "n_chan_pos_emb")]


@pytest.mark.parametrize("layer", [
    ftn.GlobalSelfAttention(8, 4, 4, 2, b_std=0.1),
    ftn.LayerNorm(axis=(1, 2)),
    ftn.Dropout(0.3, deterministic=False)], ids=["attention", "layernorm",
                                                  "dropout"])
def test_full_batch_covariances_agree(layer):
  # A kernel passed in with full batch covariances (cov1 of shape
  # (N, N, S, S')) gives the same nngp/ntk and the same cov1 diagonal.
  model = nn.Sequential([ftn.Dense(8, b_std=0.2), layer])
  out = {}
  for diagonal_batch in (True, False):
    k = ft.Kernel.from_inputs(X1, X2, diagonal_batch=diagonal_batch)
    out[diagonal_batch] = ft.kernel_fn(model)(k)
  np.testing.assert_allclose(out[False].nngp, out[True].nngp, rtol=1e-12)
  np.testing.assert_allclose(out[False].ntk, out[True].ntk, rtol=1e-12)
  cov1 = np.moveaxis(np.diagonal(out[False].cov1, axis1=0, axis2=1), -1, 0)
  np.testing.assert_allclose(cov1, out[True].cov1, rtol=1e-12)
