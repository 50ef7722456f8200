"""Tests of ft.monte_carlo_kernel_fn (8-device checks: test_batching.py)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn

RNG = np.random.RandomState(0)
X1 = RNG.randn(5, 3)
X2 = RNG.randn(4, 3)
KEY = jax.random.PRNGKey(0)


def small_model(width=32):
  return nn.Sequential([ftn.Dense(width, W_std=1.5, b_std=0.1), ftn.Relu(),
                        ftn.Dense(2)])


def test_converges_to_the_analytic_kernel():
  # Width 1024 and 64 samples of 8 outputs: the NNGP estimate averages 512
  # independent output products (relative error ~ 1/sqrt(512) ~ 4% per
  # entry, allowed 15%); the NTK concentrates with width (allowed 5%).
  model = nn.Sequential([ftn.Dense(1024, W_std=1.5, b_std=0.1), ftn.Relu(),
                         ftn.Dense(8, W_std=1.5, b_std=0.1)])
  exact = ft.kernel_fn(model)(X1, X2, ("nngp", "ntk"))
  estimate = ft.monte_carlo_kernel_fn(model, KEY, 64)(X1, X2)
  for name, rtol in (("nngp", 0.15), ("ntk", 0.05)):
    scale = np.abs(np.asarray(getattr(exact, name))).max()
    error = np.abs(np.asarray(getattr(estimate, name))
                   - np.asarray(getattr(exact, name))).max()
    assert error < rtol * scale, (name, error, scale)


def test_generator_yields_running_estimates():
  model = small_model()
  generator = ft.monte_carlo_kernel_fn(model, KEY, [4, 2, 6])(X1, None, "ntk")
  estimates = list(generator)
  assert len(estimates) == 3
  # Sample keys do not depend on the count asked for: the running estimate
  # after 2 samples is the 2-sample estimate.
  direct = ft.monte_carlo_kernel_fn(model, KEY, 2)(X1, None, "ntk")
  np.testing.assert_allclose(estimates[0], direct, rtol=1e-5, atol=1e-6)
  assert not np.allclose(estimates[0], estimates[2])


def test_paths_agree_and_batch_wraps_it():
  model = small_model()
  kernel_fn = ft.monte_carlo_kernel_fn(model, KEY, 3)
  want = kernel_fn(X1, X2, ("nngp", "ntk"))
  assert type(want).__name__ == "EmpiricalKernel"
  tiled = ft.monte_carlo_kernel_fn(model, KEY, 3, batch_size=2,
                                   store_on_device=False)(X1, X2,
                                                          ("nngp", "ntk"))
  scanned = jax.jit(kernel_fn, static_argnames="get")(X1, X2, ("nngp", "ntk"))
  batched = ft.batch(kernel_fn, 2)(X1, None, "nngp")
  for got in (tiled, scanned):
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched, kernel_fn(X1, None, "nngp"), rtol=1e-5,
                             atol=1e-6)


def test_trace_and_diagonal_axes():
  model = small_model()
  full = ft.monte_carlo_kernel_fn(model, KEY, 2, trace_axes=())(X1, None,
                                                                "nngp")
  diagonal = ft.monte_carlo_kernel_fn(model, KEY, 2, trace_axes=(),
                                      diagonal_axes=(-1,))(X1, None, "nngp")
  assert full.shape == (5, 5, 2, 2) and diagonal.shape == (5, 5, 2)
  np.testing.assert_allclose(np.einsum("ijkk->ijk", full), diagonal,
                             rtol=1e-5, atol=1e-6)


def test_dropout_rngs_differ_per_sample():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dense(16)(x)
      return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(x))

  kernel_fn = ft.monte_carlo_kernel_fn(Model(), KEY, 2)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  a = kernel_fn(X1, None, "nngp", train=True, rngs=rngs)
  b = kernel_fn(X1, None, "nngp", train=False)
  assert a.shape == b.shape == (5, 5)
  assert not np.allclose(a, b)


@pytest.mark.parametrize("n_samples", [0, -1, [], [1, 0], 1.5, "3"])
def test_bad_n_samples(n_samples):
  with pytest.raises((TypeError, ValueError), match="n_samples"):
    ft.monte_carlo_kernel_fn(small_model(), KEY, n_samples)
