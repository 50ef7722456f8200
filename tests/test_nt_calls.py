"""Neural Tangents' call forms of `ft.batch` and `ft.monte_carlo_kernel_fn`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import assert_mc_close

RNG = np.random.RandomState(0)
X1, X2 = RNG.randn(6, 3), RNG.randn(5, 3)


def rbf(x1, x2=None, get=None):
  x2 = x1 if x2 is None else x2
  return jnp.exp(-((x1[:, None] - x2[None]) ** 2).sum(-1))


def test_batch_size_zero_is_no_batching():
  # On one device (CI) NT's default batch_size=0 returns the function.
  assert len(jax.devices()) == 1
  assert ft.batch(rbf) is rbf
  assert ft.batch(rbf, 0, 0) is rbf            # nt.batch(f, 0, 0)
  assert ft.batch(rbf, 0, device_count=-1) is rbf


def test_device_count_positional_and_keyword():
  expected = rbf(X1, X2)
  for batched in (ft.batch(rbf, 4, 1), ft.batch(rbf, 4, 0, False),
                  ft.batch(rbf, 4, device_count=-1)):
    np.testing.assert_allclose(batched(X1, X2), expected, rtol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=-1), "batch_size"),
    (dict(batch_size=2, device_count=5), "exceeds"),
    (dict(batch_size=2, device_count=-2), "device_count"),
    (dict(batch_size=0, checkpoint_dir="/tmp/unused"), "positive"),
    (dict(batch_size=2, mesh=1, device_count=1), "both"),
])
def test_batch_argument_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ft.batch(rbf, **kwargs)


class _TwoBranches(nn.Module):
  axis: int

  @nn.compact
  def __call__(self, x):
    branches = [ftn.Dense(4)(x), ftn.Dense(4)(x)]
    return ftn.Dense(1)(ftn.FanInConcat(axis=self.axis)(branches))


@pytest.mark.parametrize("model", [
    _TwoBranches(axis=0),
    nn.Sequential([ftn.Dense(4), ftn.Index(np.s_[::2])]),
    nn.Sequential([ftn.Dense(4), ftn.ImageResize((3, -1), "linear")]),
    nn.Sequential([ftn.Dense(4), ftn.DotGeneral(
        lhs=np.ones(6), dimension_numbers=(((0,), (0,)), ((), ())))]),
], ids=["concat_batch", "index_batch", "resize_batch", "dot_over_batch"])
def test_batch_refuses_layers_that_mix_inputs(model):
  kernel_fn = ft.kernel_fn(model)
  kernel_fn(X1, None, "nngp")  # fine unbatched
  with pytest.raises(ValueError, match="combine.*inputs along the batch"):
    ft.batch(kernel_fn, 3)(X1, None, "nngp")
  # A model that does not mix inputs is tiled as before.
  plain = ft.kernel_fn(_TwoBranches(axis=-1))
  np.testing.assert_allclose(ft.batch(plain, 4)(X1, X2, "ntk"),
                             plain(X1, X2, "ntk"), rtol=1e-12)


# NT's stax network as a pair of functions: Dense(W_std=1.5, b_std=0.1) -
# Relu - Dense(2), NTK parameterization, written out by hand.
_WIDTH = 256


def _nt_init_fn(rng, input_shape):
  k1, k2, k3 = jax.random.split(rng, 3)
  params = (jax.random.normal(k1, (input_shape[-1], _WIDTH)),
            jax.random.normal(k2, (_WIDTH,)),
            jax.random.normal(k3, (_WIDTH, 2)))
  return input_shape[:-1] + (2,), params


def _nt_apply_fn(params, x, **kwargs):
  del kwargs
  w1, b1, w2 = params
  h = 1.5 * x @ w1 / np.sqrt(x.shape[-1]) + 0.1 * b1[None]
  return jax.nn.relu(h) @ w2 / np.sqrt(_WIDTH)


def _per_sample(generator, counts):
  """Per-network estimates from running means at consecutive counts."""
  sums = [n * np.asarray(k) for n, k in zip(counts, generator)]
  return np.stack([sums[0]] + [b - a for a, b in zip(sums, sums[1:])])


@pytest.mark.parametrize("form", ["positional", "keywords"])
def test_monte_carlo_accepts_nt_form(form):
  # One hidden layer: per-network estimates are unbiased at any width, so 5
  # standard errors of 24 networks (measured from them) is an honest bound.
  counts = list(range(1, 25))
  key = jax.random.PRNGKey(4)
  if form == "positional":   # nt.monte_carlo_kernel_fn(init, apply, key, n,
    kernel_fn = ft.monte_carlo_kernel_fn(  # batch_size, device_count, ...)
        _nt_init_fn, _nt_apply_fn, key, counts, 0, -1, True, (-1,))
  else:
    kernel_fn = ft.monte_carlo_kernel_fn(
        _nt_init_fn, _nt_apply_fn, key, counts, batch_size=0,
        device_count=-1, trace_axes=(-1,), implementation=1)
  samples = _per_sample(kernel_fn(X1, X2, "nngp"), counts)
  model = nn.Sequential([ftn.Dense(_WIDTH, W_std=1.5, b_std=0.1),
                         ftn.Relu(), ftn.Dense(2)])
  expected = ft.kernel_fn(model)(X1, X2, "nngp")
  assert_mc_close(samples, expected)


def test_monte_carlo_nt_form_ntk():
  counts = list(range(1, 25))
  kernel_fn = ft.monte_carlo_kernel_fn(_nt_init_fn, _nt_apply_fn,
                                       jax.random.PRNGKey(5), counts)
  samples = _per_sample(kernel_fn(X1, None, "ntk"), counts)
  model = nn.Sequential([ftn.Dense(_WIDTH, W_std=1.5, b_std=0.1),
                         ftn.Relu(), ftn.Dense(2)])
  assert_mc_close(samples, ft.kernel_fn(model)(X1, None, "ntk"))


def test_monte_carlo_argument_errors():
  model = nn.Dense(2)
  key = jax.random.PRNGKey(0)
  with pytest.raises(TypeError, match="both positionally and by keyword"):
    ft.monte_carlo_kernel_fn(model, key, 2, 4, batch_size=3)
  with pytest.raises(TypeError, match="n_samples"):
    ft.monte_carlo_kernel_fn(_nt_init_fn, _nt_apply_fn, key)
  with pytest.raises(ValueError, match="not both"):
    ft.monte_carlo_kernel_fn(model, key, 2, device_count=1,
                             mesh=jax.sharding.Mesh(np.array(jax.devices()),
                                                    ("d",)))
  with pytest.raises(TypeError, match="_j_rules"):
    ft.monte_carlo_kernel_fn(model, key, 2, _j_rules=True)
  # This library's positional order still works.
  a = ft.monte_carlo_kernel_fn(model, key, 2, 0, None, True, ())(X1)
  b = ft.monte_carlo_kernel_fn(model, key, 2, trace_axes=())(X1)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-12)


def test_dropout_keep_rate_and_mode():
  # NT's Dropout(0.8, mode='train') keeps units with probability 0.8.
  base = [ftn.Dense(4, b_std=0.1), ftn.Relu()]
  nt_style = nn.Sequential(base + [ftn.Dropout(keep_rate=0.8, mode="train"),
                                   ftn.Dense(1)])
  flax_style = nn.Sequential(base + [ftn.Dropout(rate=0.2,
                                                 deterministic=False),
                                     ftn.Dense(1)])
  np.testing.assert_allclose(ft.kernel_fn(nt_style)(X1, None, "ntk"),
                             ft.kernel_fn(flax_style)(X1, None, "ntk"),
                             rtol=1e-12)
  assert ftn.Dropout(keep_rate=0.8, mode="TEST").deterministic
  with pytest.raises(TypeError, match="DROPPING"):
    ftn.Dropout()
  with pytest.raises(ValueError, match="disagree"):
    ftn.Dropout(rate=0.8, keep_rate=0.8)
  with pytest.raises(ValueError, match="contradicts"):
    ftn.Dropout(rate=0.1, mode="train", deterministic=True)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    ftn.Dropout(keep_rate=0.0)
