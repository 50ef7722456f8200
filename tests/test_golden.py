"""Analytic kernels agree with Neural Tangents 0.6.5 (float64, rtol 1e-6)."""

import jax
import numpy as np
import pytest

import flax_tangents as ft
from golden_models import build_model, load_cases, load_golden

CASES = load_cases()

# Golden cases whose layers or arguments are not built yet, each with the
# reason. They are strict xfails: the row must go when the case passes.
PENDING: dict[str, str] = {
    "index_batch_slice_spatial":
        "Index on the batch axis and the golden builder's idx form (issue 10.4)",
    "index_int_drops_axis":
        "the golden builder's Index idx form (issue 10)",
    "aggregate_1d_dense":
        "Aggregate pattern pairs from golden2 (issue 10.5)",
    "aggregate_1d_sparse":
        "Aggregate(implementation='SPARSE') (issue 10.5)",
    "aggregate_2d_axis2_dense":
        "Aggregate pattern pairs from golden2 (issue 10.5)",
    "aggregate_2d_axis2_sparse":
        "Aggregate(implementation='SPARSE') (issue 10.5)",
    "dot_rhs_contract_spatial":
        "DotGeneral layer (issue 10.3)",
    "dot_lhs_scalar":
        "DotGeneral layer (issue 10.3)",
    "dot_rhs_batch_dim_spatial":
        "DotGeneral with batch dimensions (issue 10.3)",
    "dot_contract_batch_axis":
        "DotGeneral contracting the batch axis (issue 10.3)",
    "concat_spatial_axis":
        "FanInConcat along a spatial axis (issue 10.4)",
    "concat_batch_axis":
        "FanInConcat along the batch axis (issue 10.4)",
    "prod_dense":
        "the golden builder's Prod composite (issue 10)",
    "prod_conv_three":
        "the golden builder's Prod composite (issue 10)",
    "elementwise_erf":
        "the golden builder's Elementwise fn names (issue 10)",
    "elementwise_numerical_tanh":
        "the golden builder's ElementwiseNumerical fn names (issue 10)",
    "elementwise_numerical_tanh_conv":
        "the golden builder's ElementwiseNumerical fn names (issue 10)",
    "dense_standard_s23":
        "s=(s_in, s_out) for standard parameterization (issue 10.6)",
    "conv_standard_s23":
        "s=(s_in, s_out) for standard parameterization (issue 10.6)",
    "relu_stabilize":
        "do_stabilize on the ReLU family (issue 10.6)",
    "relu_stabilize_conv_x2none":
        "do_stabilize on the ReLU family (issue 10.6)",
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
  np.testing.assert_allclose(nngp, golden["nngp"], rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(ntk, golden["ntk"], rtol=1e-6, atol=1e-12)
