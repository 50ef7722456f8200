"""Unmodified Flax models: Flax's example MLP and MNIST CNN, and stock
modules (BatchNorm in inference mode, attention) inside them."""

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import assert_mc_close
from testing import assert_trees_close
from testing import jit_kernel_fn
from testing import sample_kernels

RS = np.random.RandomState(0)
X1, X2 = RS.randn(3, 5), RS.randn(2, 5)
# MNIST-shaped images, smaller (8 x 8) to keep the full spatial covariances
# of the pooling layers cheap; the model code is unchanged.
IMG1, IMG2 = RS.rand(2, 8, 8, 1), RS.rand(3, 8, 8, 1)


class MLP(nn.Module):
  """The MLP of Flax's documentation, written as Flax users write it."""
  features: Sequence[int]

  @nn.compact
  def __call__(self, x):
    for feat in self.features[:-1]:
      x = nn.relu(nn.Dense(feat)(x))
    x = nn.Dense(self.features[-1])(x)
    return x


class CNN(nn.Module):
  """Flax's MNIST example CNN, with `nn.avg_pool` for pooling."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


def _cnn_with_ftn_layers():
  return nn.Sequential([
      nn.Conv(32, (3, 3)), ftn.Relu(), ftn.AvgPool((2, 2), (2, 2)),
      nn.Conv(64, (3, 3)), ftn.Relu(), ftn.AvgPool((2, 2), (2, 2)),
      ftn.Flatten(), nn.Dense(256), ftn.Relu(), nn.Dense(10)])


def test_mlp_unchanged():
  model = MLP((64, 64, 3))
  reference = nn.Sequential([nn.Dense(64), ftn.Relu(), nn.Dense(64),
                             ftn.Relu(), nn.Dense(3)])
  get = ("nngp", "ntk")
  assert_trees_close(ft.kernel_fn(model)(X1, X2, get),
               ft.kernel_fn(reference)(X1, X2, get))


def test_mnist_cnn_unchanged():
  got = jit_kernel_fn(CNN())(IMG1, IMG2, get=("nngp", "ntk"))
  want = jit_kernel_fn(_cnn_with_ftn_layers())(IMG1, IMG2,
                                               get=("nngp", "ntk"))
  assert_trees_close(got, want)
  assert got.nngp.shape == (2, 3)


def test_mnist_cnn_monte_carlo():
  # Widths 32, 64 and 256 as in the example: a few percent of finite-width
  # bias is expected, so the tolerance includes 10% of the kernel's scale.
  nngp = ft.kernel_fn(CNN())(IMG1, IMG2, "nngp")
  samples, _ = sample_kernels(CNN(), IMG1, IMG2, jax.random.key(0), 64,
                              ntk=None)
  assert_mc_close(samples, np.asarray(nngp), n_se=5.0, bias=0.1)


# ------------------------------------------------------------ BatchNorm


class ConvBN(nn.Module):
  train: bool = False
  scale_init: object = nn.initializers.ones
  bias_init: object = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not self.train, epsilon=0.1,
                     scale_init=self.scale_init,
                     bias_init=self.bias_init)(x)
    return nn.Dense(2)(x.reshape((x.shape[0], -1)))


def test_batch_norm_inference_is_an_affine_map():
  # Statistics at initialization: mean 0, variance 1. Output: x / sqrt(1.1)
  # scaled by 2, plus a N(0, 0.3^2) bias; scale and bias add their
  # gradients (the normalized activations, and 1) to the NTK.
  model = ConvBN(scale_init=nn.initializers.constant(2.0),
                 bias_init=nn.initializers.normal(0.3))
  got = ft.kernel_fn(model)(IMG1, IMG2, ("nngp", "ntk"))
  conv = ft.kernel_fn(nn.Conv(6, (3, 3)))(IMG1, IMG2)
  normalized = conv.nngp / 1.1
  bn_nngp = 4 * normalized + 0.09
  bn_ntk = 4 * conv.ntk / 1.1 + normalized + 1
  flat = ftn.Flatten()
  head = ft.kernel_fn(nn.Sequential([flat, nn.Dense(2)]))
  want = head(conv.replace(nngp=bn_nngp, ntk=bn_ntk,
                           cov1=4 * conv.cov1 / 1.1 + 0.09,
                           cov2=4 * conv.cov2 / 1.1 + 0.09),
              get=("nngp", "ntk"))
  assert_trees_close(got, want)


def test_batch_norm_inference_monte_carlo():
  model = ConvBN(bias_init=nn.initializers.normal(0.3))
  nngp = ft.kernel_fn(model)(IMG1, IMG2, "nngp")
  samples, _ = sample_kernels(model, IMG1, IMG2, jax.random.key(2), 256,
                              ntk=None)
  assert_mc_close(samples, np.asarray(nngp), n_se=5.0)


def test_conv_batch_norm_relu_nngp_and_its_ntk_refusal():
  class ConvBNRelu(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(6, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=True)(x)
      x = nn.relu(x)  # the NTK of a trained BatchNorm scale is refused here
      return nn.Dense(2)(x.reshape((x.shape[0], -1)))

  nngp = ft.kernel_fn(ConvBNRelu())(IMG1, IMG2, "nngp")
  reference = nn.Sequential([nn.Conv(6, (3, 3)), ftn.Relu(), ftn.Flatten(),
                             nn.Dense(2)])
  expected = ft.kernel_fn(reference)(IMG1 / np.sqrt(1 + 1e-5),
                                     IMG2 / np.sqrt(1 + 1e-5), "nngp")
  # relu is positively homogeneous: scaling its input by s scales the NNGP
  # of the next layer by s^2, which the scaled inputs above reproduce.
  np.testing.assert_allclose(nngp, expected, rtol=1e-10)
  with pytest.raises(ft.KernelRuleError, match="trainable scale"):
    ft.kernel_fn(ConvBNRelu())(IMG1, IMG2, ("nngp", "ntk"))


def test_batch_norm_training_mode_is_refused():
  with pytest.raises(NotImplementedError, match="training mode.*mixes"):
    ft.kernel_fn(ConvBN(train=True))(IMG1, IMG2)


def test_stock_attention_is_refused_with_the_reason():
  class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(8)(x.reshape((x.shape[0], 8, 8)))
      return nn.MultiHeadDotProductAttention(num_heads=2, name="mha")(h)

  with pytest.raises(ft.KernelRuleError,
                     match=r"nn.MultiHeadDotProductAttention \(module 'mha'"
                     r".*logits stay random.*GlobalSelfAttention"):
    ft.kernel_fn(Attention())(IMG1, IMG2)


def test_readme_section_runs():
  import os
  import re
  readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
  with open(readme) as f:
    text = f.read()
  section = text.split("## Kernels of unmodified Flax models")[1]
  block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["nngp"].shape == namespace["ntk"].shape == (3, 2)
