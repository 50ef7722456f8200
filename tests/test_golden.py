"""Analytic kernels agree with Neural Tangents 0.6.5 (float64, rtol 1e-6)."""

import jax
import numpy as np
import pytest

import flax_tangents as ft
from golden_models import build_model, load_cases, load_golden

CASES = load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case(case):
  golden = load_golden(case["name"])
  if np.all(np.isnan(golden["nngp"])):
    pytest.skip(
        "NT 0.6.5 returned NaN for this case (its RectifiedMonomial kernel "
        "divides by sin(theta), zero on the batch diagonal); ours is checked "
        "against quadrature in test_activations.py::"
        "test_fcn_monomials_agrees_with_quadrature.")
  model = build_model(case)
  kernel_fn = jax.jit(ft.kernel_fn(model), static_argnames="get")
  nngp, ntk = kernel_fn(golden["x1"], golden.get("x2"), ("nngp", "ntk"))
  assert nngp.dtype == np.float64
  np.testing.assert_allclose(nngp, golden["nngp"], rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(ntk, golden["ntk"], rtol=1e-6, atol=1e-12)
