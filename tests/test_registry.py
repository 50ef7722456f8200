"""User kernel rules: the documented example is right, and a rule whose
output is inconsistent is named (issue 9, item 11)."""

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn

RNG = np.random.RandomState(0)
X1, X2 = RNG.randn(3, 4), RNG.randn(2, 4)
# Close to X1's first rows: correlations near 1, so a covariance scaled
# without its partner breaks the Cauchy-Schwarz bound.
NEAR = X1[:2] + 0.1 * X2


class Triple(nn.Module):
  def __call__(self, x):
    return 3 * x


def _scaled_rule(factor_nngp, factor_cov1, factor_cov2, reshape=False):
  def rule(module: Any, k: ft.Kernel, **kwargs: Any) -> ft.Kernel:
    del module, kwargs
    scale = lambda a, f: None if a is None else f * a
    out = k.replace(nngp=scale(k.nngp, factor_nngp),
                    ntk=scale(k.ntk, factor_nngp),
                    cov1=scale(k.cov1, factor_cov1),
                    cov2=scale(k.cov2, factor_cov2))
    return out.replace(nngp=out.nngp[:, :1]) if reshape else out
  return rule


def _model(rule):
  # A fresh class per rule: the registry is global.
  cls = type("Scaled", (Triple,), {})
  ft.register_kernel_rule(cls, rule)
  return nn.Sequential([ftn.Dense(3), cls(), ftn.Relu()])


def test_the_documented_rule_matches_the_finite_layer():
  kernel = ft.kernel_fn(_model(_scaled_rule(9, 9, 9)))(X1, X2)
  dense = ft.kernel_fn(nn.Sequential([ftn.Dense(3, W_std=3.0), ftn.Relu()]))(
      X1, X2)
  for field in ("nngp", "ntk", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(kernel, field), getattr(dense, field),
                               rtol=1e-12)


@pytest.mark.parametrize("rule, x2, message", [
    (_scaled_rule(9, 9, 9, reshape=True), X2, r"`nngp` has shape \(3, 1\)"),
    (_scaled_rule(9, 1, 1), None, "differs from the diagonal of `nngp`"),
    (_scaled_rule(9, 9, 1), NEAR, "Cauchy-Schwarz bound"),
    (_scaled_rule(9, 1, 9), NEAR, "Cauchy-Schwarz bound"),
], ids=["shape", "forgot_cov1", "forgot_cov2", "forgot_cov1_given_x2"])
def test_inconsistent_rule_output_is_named(rule, x2, message):
  with pytest.raises(ValueError, match=rf"kernel rule .*rule of Scaled.*"
                     rf"{message}"):
    ft.kernel_fn(_model(rule))(X1, x2)


def test_asymmetric_cov1_is_named():
  def skewed(module, k, **kwargs):
    del module, kwargs
    return k.replace(cov1=k.cov1 + np.triu(np.ones(k.cov1.shape), 1))

  cls = type("Skewed", (Triple,), {})
  ft.register_kernel_rule(cls, skewed)
  with pytest.raises(ValueError, match="`cov1` is not symmetric"):
    ft.kernel_fn(nn.Sequential([ftn.Dense(3), cls()]))(
        X1, X2, diagonal_batch=False)


def test_checks_do_not_break_jit():
  model = _model(_scaled_rule(9, 9, 9))
  jitted = jax.jit(ft.kernel_fn(model), static_argnames="get")
  np.testing.assert_allclose(jitted(X1, None, "nngp"),
                             ft.kernel_fn(model)(X1, None, "nngp"),
                             rtol=1e-12)


@pytest.mark.parametrize("diagonal_spatial", [True, False])
def test_cauchy_schwarz_check_on_spatial_kernels(diagonal_spatial):
  # Locations pair up as (s, t) in full spatial layouts: a right rule
  # passes in both layouts, one that forgets `cov2` fails in both.
  images1, images2 = RNG.randn(2, 5, 2), RNG.randn(2, 5, 2)
  near = images1 + 0.1 * images2

  def model(rule):
    cls = type("ScaledImage", (Triple,), {})
    ft.register_kernel_rule(cls, rule)
    return nn.Sequential([ftn.Conv(3, (2,), padding="SAME"), cls(),
                          ftn.Relu()])

  kwargs = {"diagonal_spatial": diagonal_spatial}
  right = ft.kernel_fn(model(_scaled_rule(9, 9, 9)))(images1, near, **kwargs)
  reference = jax.jit(ft.kernel_fn(nn.Sequential([
      ftn.Conv(3, (2,), padding="SAME", W_std=3.0), ftn.Relu()]), **kwargs))(
          images1, near)
  np.testing.assert_allclose(right.nngp, reference.nngp, rtol=1e-12)
  with pytest.raises(ValueError, match="Cauchy-Schwarz bound"):
    ft.kernel_fn(model(_scaled_rule(9, 9, 1)))(images1, near, **kwargs)
