"""Analytic kernels agree with Neural Tangents 0.6.5 (float64, rtol 1e-6)."""

import jax
import numpy as np
import pytest

import flax_tangents as ft
from golden_models import build_model
from golden_models import load_cases
from golden_models import load_golden

CASES = load_cases()

# Golden cases whose layers or arguments are not built yet, each with the
# reason. They are strict xfails: the row must go when the case passes.
PENDING: dict[str, str] = {
}


# Deliberate layout differences from NT, mapped back before comparing.
LAYOUT_TO_NT = {
    # NT drops a contracted batch axis ((L, L) kernels); ftn.DotGeneral
    # keeps it with size 1 so that later layers still apply (see its doc).
    "dot_contract_batch_axis": lambda k: k[0, 0],
}


def _params(cases):
  for case in cases:
    marks = ()
    if case["name"] in PENDING:
      marks = pytest.mark.xfail(strict=True, reason=PENDING[case["name"]])
    yield pytest.param(case, id=case["name"], marks=marks)


@pytest.mark.parametrize("case", list(_params(CASES)))
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
  call_kwargs = {}
  if "mask_constant" in case:
    call_kwargs["mask_constant"] = case["mask_constant"]
  if "pattern1" in golden:
    call_kwargs["pattern"] = (golden["pattern1"], golden["pattern2"])
  nngp, ntk = kernel_fn(golden["x1"], golden.get("x2"), ("nngp", "ntk"),
                        **call_kwargs)
  assert nngp.dtype == np.float64
  to_nt = LAYOUT_TO_NT.get(case["name"], lambda k: k)
  nngp, ntk = to_nt(nngp), to_nt(ntk)
  np.testing.assert_allclose(nngp, golden["nngp"], rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(ntk, golden["ntk"], rtol=1e-6, atol=1e-12)
