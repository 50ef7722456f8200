"""Standard parameterization width scales `s`, `do_stabilize`, and NT's enums
with case-insensitive strings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import LayerRuleTest
from testing import MonteCarloCase
from testing import RaisesCase

RNG = np.random.RandomState(2)
X1, X2 = RNG.randn(3, 5), RNG.randn(2, 5)
IMAGES1, IMAGES2 = RNG.randn(2, 4, 3), RNG.randn(2, 4, 3)


def test_dense_s_closed_form():
  # One standard layer on raw inputs: nngp = W_std^2 K + b_std^2 whatever
  # s; ntk = (C / s_in) K + 1 (weights' and bias's gradients), K = x x^T / C.
  gram = X1 @ X2.T / X1.shape[1]
  for s in ((1, 1), (2, 3), (5, 1)):
    layer = ftn.Dense(4, W_std=1.3, b_std=0.2, parameterization="standard",
                      s=s)
    k = ft.kernel_fn(layer)(X1, X2)
    np.testing.assert_allclose(k.nngp, 1.3**2 * gram + 0.2**2, rtol=1e-12)
    np.testing.assert_allclose(k.ntk, X1.shape[1] / s[0] * gram + 1,
                               rtol=1e-12)
    assert k.shape1 == (3, 4 * s[1])
    variables = layer.init(jax.random.key(0), X1)
    assert variables["params"]["kernel"].shape == (5, 4 * s[1])


_STD = dict(parameterization="standard")
WIDTH_SCALE_ERRORS = [
    ("dense_ntk", ftn.Dense(2, s=(2, 1)),
     "applies only to parameterization='standard'"),
    ("conv_ntk", ftn.Conv(2, (2,), s=(1, 2)), "applies only"),
    ("zero", ftn.Dense(2, s=(0, 1), **_STD), "positive"),
    ("float", ftn.Dense(2, s=(1.5, 1), **_STD), "integers"),
    ("scalar", ftn.Dense(2, s=3, **_STD), "two positive"),
    ("unknown", ftn.Dense(2, parameterization="mup"), "not one of"),
]


class TestWidthScales(LayerRuleTest):
  # One nonlinearity with linear layers above it: per-network estimates are
  # unbiased at any width; 5 standard errors of 32 networks.
  monte_carlo_cases = [
      MonteCarloCase("dense", lambda: nn.Sequential([
          ftn.Dense(64, W_std=1.3, b_std=0.2, s=(1, 4), **_STD), ftn.Relu(),
          ftn.Dense(2, W_std=0.9, b_std=0.1, s=(4, 1), **_STD)]), X1, X2, 32,
                     seed=7, impl="rbg"),
      MonteCarloCase("conv", lambda: nn.Sequential([
          ftn.Conv(32, (2,), padding="SAME", W_std=1.2, b_std=0.1, s=(1, 2),
                   **_STD), ftn.Relu(),
          ftn.ConvTranspose(16, (2,), strides=(2,), padding="SAME", s=(2, 2),
                            **_STD),
          ftn.ConvLocal(16, (3,), padding="VALID", b_std=0.2, s=(2, 3),
                        **_STD),
          ftn.GlobalAvgPool(), ftn.Dense(2, s=(3, 1), **_STD)]),
                     IMAGES1, IMAGES2, 32, seed=7, impl="rbg")]
  raises_cases = [
      RaisesCase(f"{name}_{where}", call, match)
      for name, layer, match in WIDTH_SCALE_ERRORS
      for where, call in (
          ("kernel_fn", lambda layer=layer: ft.kernel_fn(layer)(IMAGES1)),
          ("init", lambda layer=layer: layer.init(jax.random.key(0),
                                                  IMAGES1)))]


@pytest.mark.parametrize("layer", [ftn.Relu, lambda **kw: ftn.ABRelu(
    -0.4, 1.3, **kw), lambda **kw: ftn.LeakyRelu(0.1, **kw), ftn.Abs])
def test_do_stabilize(layer):
  def model(stabilize):
    # No biases: the kernel is then positively homogeneous in the inputs.
    return nn.Sequential([ftn.Dense(4, W_std=1.5),
                          layer(do_stabilize=stabilize), ftn.Dense(3),
                          layer(do_stabilize=stabilize), ftn.Dense(1)])

  k = ft.kernel_fn(model(False))(X1, X2)
  stable = ft.kernel_fn(model(True))(X1, X2)
  np.testing.assert_allclose(stable.nngp, k.nngp, rtol=1e-13)
  np.testing.assert_allclose(stable.ntk, k.ntk, rtol=1e-13)
  # Inputs of size 1e80 have variances 1e160 whose products overflow
  # float64 inside the arc-cosine kernel; rescaled, the kernel is exactly
  # 1e160 times that of the unscaled inputs (positive homogeneity).
  big = ft.kernel_fn(model(True))(1e80 * X1, 1e80 * X2)
  np.testing.assert_allclose(big.nngp / 1e160, k.nngp, rtol=1e-12)
  with pytest.raises(FloatingPointError, match="NaN or infinite"):
    ft.kernel_fn(model(False))(1e80 * X1, 1e80 * X2, "nngp")


def test_case_insensitive_options():
  x = IMAGES1
  upper = ft.kernel_fn(nn.Sequential([ftn.Conv(3, (2,), padding="SAME"),
                                      ftn.Relu(),
                                      ftn.AvgPool((2,), padding="CIRCULAR"),
                                      ftn.GlobalAvgPool()]))(x, None, "nngp")
  for padding, pool in (("same", "circular"),
                        (ftn.Padding.SAME, ftn.Padding("Circular"))):
    other = ft.kernel_fn(nn.Sequential([
        ftn.Conv(3, (2,), padding=padding), ftn.Relu(),
        ftn.AvgPool((2,), padding=pool), ftn.GlobalAvgPool()]))(x, None,
                                                                "nngp")
    np.testing.assert_allclose(other, upper, rtol=1e-14)
  std = ft.kernel_fn(ftn.Dense(2, parameterization="STANDARD"))(X1, None,
                                                                 "ntk")
  np.testing.assert_allclose(std, ft.kernel_fn(ftn.Dense(
      2, parameterization="standard"))(X1, None, "ntk"), rtol=1e-14)

  def attention(mechanism):
    return nn.Sequential([ftn.Dense(4), ftn.GlobalSelfAttention(
        4, 4, 4, 2, attention_mechanism=mechanism), ftn.GlobalAvgPool()])

  want = ft.kernel_fn(attention("SOFTMAX"))(x, None, "nngp")
  for mechanism in ("softmax", ftn.AttentionMechanism.SOFTMAX):
    np.testing.assert_allclose(ft.kernel_fn(attention(mechanism))(
        x, None, "nngp"), want, rtol=1e-14)
    variables = attention(mechanism).init(jax.random.key(0), x)
    np.testing.assert_allclose(
        attention(mechanism).apply(variables, x),
        attention("SOFTMAX").apply(variables, x), rtol=1e-14)
  assert ftn.Aggregate(implementation="sparse").implementation is (
      ftn.AggregateImplementation.SPARSE)
  layer = ftn.GlobalSelfAttention(2, 2, 2, 1, attention_mechanism="relu",
                                  pos_emb_type="none")
  assert layer.pos_emb_type is ftn.PositionalEmbedding.NONE


def test_enums():
  logits = jnp.array([[-1.0, 2.0, 0.5]])
  for member, fn in ((ftn.AttentionMechanism.SOFTMAX,
                      lambda z: jax.nn.softmax(z, axis=-1)),
                     (ftn.AttentionMechanism.IDENTITY, lambda z: z),
                     (ftn.AttentionMechanism.ABS, jnp.abs),
                     (ftn.AttentionMechanism.RELU, jax.nn.relu)):
    np.testing.assert_allclose(member.fn()(logits), fn(logits), rtol=1e-14)
  assert ftn.Padding("valid") is ftn.Padding.VALID == "VALID"
  assert [m.value for m in ftn.PositionalEmbedding] == ["NONE", "SUM",
                                                        "CONCAT"]
  assert [m.value for m in ftn.AggregateImplementation] == ["DENSE",
                                                            "SPARSE"]
  with pytest.raises(ValueError, match="attention_mechanism='tanh' is not"):
    ftn.GlobalSelfAttention(2, 2, 2, 1, attention_mechanism="tanh")
  with pytest.raises(ValueError, match="padding"):
    ft.kernel_fn(ftn.Conv(2, (2,), padding="full"))(IMAGES1)


class _ConcatThenRelu(nn.Module):
  """Channel concatenation of unequal branches (a mixture), then Relu."""
  stabilize: bool

  @nn.compact
  def __call__(self, x):
    y = ftn.FanInConcat()([ftn.Dense(3)(x), ftn.Dense(5, W_std=3.0)(x)])
    return ftn.Dense(1)(ftn.Relu(do_stabilize=self.stabilize)(y))


def test_do_stabilize_on_a_mixture():
  # After a channel concatenation each branch's units have their own
  # kernel; stabilizing must rescale each of them consistently.
  want = ft.kernel_fn(_ConcatThenRelu(False))(X1, X2)
  got = ft.kernel_fn(_ConcatThenRelu(True))(X1, X2)
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-13)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-13)
