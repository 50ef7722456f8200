"""DotGeneral and Kernel.dot_general: closed forms, Monte Carlo, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents._src.analytic.dot_general import apply_dot_general
from testing import DtypeCase
from testing import LayerRuleTest
from testing import MonteCarloCase
from testing import RaisesCase

RNG = np.random.RandomState(0)
X1 = RNG.randn(3, 4, 5, 2)   # (N, H, W, C)
X2 = RNG.randn(3, 4, 5, 2)
X2_OTHER_N = RNG.randn(2, 4, 5, 2)

# (name, constant shape, is_lhs, dimension_numbers, whether x2 may have
# another batch size). Axes of the inputs count in (N, H, W, C).
CASES = [
    ("scalar", (), True, (((), ()), ((), ())), True),
    ("contract_w", (5,), False, (((2,), (0,)), ((), ())), True),
    ("contract_h_lhs_free", (2, 4), True, (((1,), (1,)), ((), ())), True),
    ("contract_hw", (4, 5, 3), False, (((1, 2), (0, 1)), ((), ())), True),
    ("batch_dim_h", (4, 5), False, (((2,), (1,)), ((1,), (0,))), True),
    ("batch_dim_hw_lhs", (4, 5), True, (((), ()), ((1, 0), (2, 1))), True),
    ("outer_product", (2,), False, (((), ()), ((), ())), True),
    ("batch_dim_n", (3, 4), False, (((), ()), ((0, 1), (0, 1))), False),
    ("contract_n", (3,), True, (((0,), (0,)), ((), ())), False),
    ("contract_n_and_w", (5, 3), False, (((0, 2), (1, 0)), ((), ())), False),
]


def _case_params(diagonal_cases=False):
  params = []
  for name, shape, is_lhs, numbers, ragged in CASES:
    contracts_spatial = any(
        0 < a < 3 for a in numbers[0][0 if not is_lhs else 1])
    if diagonal_cases and contracts_spatial:
      continue
    params.append(pytest.param(shape, is_lhs, numbers, ragged, id=name))
  return params


@pytest.mark.parametrize("shape,is_lhs,numbers,ragged", _case_params())
def test_kernel_equals_kernel_of_transformed_inputs(shape, is_lhs, numbers,
                                                    ragged):
  # The input kernel is a channel-averaged second moment, so mapping it must
  # equal the second moment of the mapped inputs (full layouts).
  other = RNG.randn(*shape)
  x2 = X2_OTHER_N if ragged else X2
  kernel = ft.Kernel.from_inputs(X1, x2, diagonal_batch=False)
  mapped = kernel.dot_general(other, other, is_lhs, numbers)
  y1, y2 = (apply_dot_general(jnp.asarray(x), jnp.asarray(other), is_lhs,
                              numbers) for x in (X1, x2))
  direct = ft.Kernel.from_inputs(y1, y2, diagonal_batch=False)
  assert mapped.shape1 == direct.shape1 and mapped.shape2 == direct.shape2
  for field in ("nngp", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(mapped, field),
                               getattr(direct, field), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("shape,is_lhs,numbers,ragged",
                         _case_params(diagonal_cases=True))
def test_diagonal_layouts(shape, is_lhs, numbers, ragged):
  # Without spatial contraction the diagonal layouts map exactly too.
  other = RNG.randn(*shape)
  x2 = X2_OTHER_N if ragged else X2
  contracts_batch = 0 in numbers[0][1 if is_lhs else 0]
  layout = dict(diagonal_spatial=True, diagonal_batch=not contracts_batch)
  mapped = ft.Kernel.from_inputs(X1, x2, **layout).dot_general(
      other, None, is_lhs, numbers)
  y1, y2 = (apply_dot_general(jnp.asarray(x), jnp.asarray(other), is_lhs,
                              numbers) for x in (X1, x2))
  direct = ft.Kernel.from_inputs(y1, y2, **layout)
  for field in ("nngp", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(mapped, field),
                               getattr(direct, field), rtol=1e-12,
                               atol=1e-12)


def test_layer_matches_lax_and_moves_axes():
  rhs = RNG.randn(4, 5)
  layer = ftn.DotGeneral(rhs=rhs, dimension_numbers=(((2,), (1,)),
                                                     ((1,), (0,))))
  y = layer.apply({}, X1)
  lax_y = jax.lax.dot_general(X1, rhs, (((2,), (1,)), ((1,), (0,))))
  assert lax_y.shape == (4, 3, 2)        # lax: (H, N, C)
  np.testing.assert_allclose(y, np.swapaxes(lax_y, 0, 1), rtol=1e-12)
  summed = ftn.DotGeneral(lhs=np.ones(3), dimension_numbers=(
      ((0,), (0,)), ((), ()))).apply({}, X1)
  np.testing.assert_allclose(summed, X1.sum(0, keepdims=True), rtol=1e-12)
  np.testing.assert_array_equal(ftn.DotGeneral().apply({}, X1), X1)


class _Net(nn.Module):
  """Conv - Relu - DotGeneral - Dense - GlobalAvgPool - Dense (1-D)."""
  dot: nn.Module
  width: int = 256

  @nn.compact
  def __call__(self, x):
    x = ftn.Relu()(ftn.Conv(self.width, (2,), padding="SAME", W_std=1.3,
                            b_std=0.2)(x))
    x = self.dot(x)
    return ftn.Dense(2)(ftn.GlobalAvgPool()(ftn.Dense(self.width)(x)))


MC_X1, MC_X2 = RNG.randn(3, 4, 2), RNG.randn(3, 4, 2)
MC_LAYERS = {
    "mix_positions": ftn.DotGeneral(
        rhs=RNG.randn(4, 3), dimension_numbers=(((1,), (0,)), ((), ()))),
    "per_example_weights": ftn.DotGeneral(
        rhs=RNG.randn(3, 4), dimension_numbers=(((), ()), ((0, 1), (0, 1)))),
    "sum_over_batch": ftn.DotGeneral(
        lhs=RNG.randn(3), dimension_numbers=(((0,), (0,)), ((), ()))),
}


def test_kernel_fn_layouts_and_jit():
  # Contracting the batch axis asks for full batch covariances below the
  # layer; mixing positions for full spatial ones; the result is jit-able.
  seen = []
  model = _Net(MC_LAYERS["sum_over_batch"], width=4)
  kernel_fn = ft.kernel_fn(model)
  k = kernel_fn(MC_X1)
  assert k.nngp.shape == (1, 1) and not k.diagonal_batch
  jitted = jax.jit(kernel_fn, static_argnames="get")(MC_X1, None, "nngp")
  np.testing.assert_allclose(jitted, k.nngp, rtol=1e-12)
  for name, layer in MC_LAYERS.items():
    inner = ft.kernel_fn(nn.Sequential([ftn.Conv(4, (2,), padding="SAME"),
                                        ftn.Relu(),
                                        layer, ftn.Flatten()]))
    seen.append((name, inner(MC_X1).diagonal_spatial))
  assert dict(seen) == {"mix_positions": False, "per_example_weights": True,
                        "sum_over_batch": True}


def test_spatial_contraction_refuses_diagonal_kernel():
  k = ft.Kernel.from_inputs(X1, diagonal_spatial=True)
  with pytest.raises(ValueError, match="diagonal_spatial"):
    k.dot_general(np.ones(5), None, False, (((2,), (0,)), ((), ())))
  k = ft.Kernel.from_inputs(X1, diagonal_batch=True)
  with pytest.raises(ValueError, match="diagonal_batch"):
    k.dot_general(np.ones(3), None, True, (((0,), (0,)), ((), ())))


class TestDotGeneral(LayerRuleTest):
  # One nonlinearity with linear layers above it: per-network estimates are
  # unbiased at any width; 5 standard errors of 32 networks (width 128).
  monte_carlo_cases = [
      MonteCarloCase(name, functools.partial(_Net, layer, width=128), MC_X1,
                     MC_X2, n_samples=32, seed=3, impl="rbg")
      for name, layer in MC_LAYERS.items()
  ]
  dtype_cases = [
      DtypeCase("mix_positions", _Net(MC_LAYERS["mix_positions"], width=4),
                MC_X1, get=("ntk",)),
  ]
  raises_cases = [
      RaisesCase(match, functools.partial(ft.kernel_fn(layer), X1), match)
      for layer, match in [
          (ftn.DotGeneral(lhs=1.0, rhs=2.0), "at most one"),
          (ftn.DotGeneral(rhs=np.ones(2),
                          dimension_numbers=(((3,), (0,)), ((), ()))),
           "channel axis"),
          (ftn.DotGeneral(rhs=np.ones(3),
                          dimension_numbers=(((2,), (0,)), ((), ()))),
           "has size 3"),
          (ftn.DotGeneral(rhs=np.ones(5),
                          dimension_numbers=(((2,), ()), ((), ()))),
           "different numbers"),
      ]
  ]


def test_masks_follow_nt_rule():
  # Padding (entries equal to -9) is read as zeros; an output position is
  # padding iff no real position reaches it with a non-zero weight. The
  # kernel's masks equal the finite layer's, and its covariances those of
  # the zeroed inputs.
  pad = -9.0
  x = RNG.randn(3, 4, 2)
  x[0, 2:] = pad
  x[1, 1] = pad
  rhs = np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
  model = nn.Sequential([ftn.Conv(3, (1,)), ftn.DotGeneral(
      rhs=rhs, dimension_numbers=(((1,), (0,)), ((), ())))])
  k = ft.kernel_fn(model)(x, None, mask_constant=pad)
  variables = model.init(jax.random.key(0), x)
  y = model.apply(variables, ft.MaskedArray.from_mask_constant(x, pad))
  np.testing.assert_array_equal(k.mask1, y.mask)
  assert k.mask1[0].ravel().tolist() == [False, True]   # only rows 2, 3
  assert not k.mask1[1].any()
  zeroed = np.where(x == pad, 0.0, x)
  np.testing.assert_allclose(k.nngp, ft.kernel_fn(model)(zeroed).nngp,
                             rtol=1e-12)
