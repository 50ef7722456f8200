"""`ft.kernel_fn`: NT's calling conventions, composition, jit, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn

RNG = np.random.RandomState(0)
X1 = RNG.randn(4, 6)
X2 = RNG.randn(3, 6)


def mlp():
  return nn.Sequential([ftn.Dense(64, W_std=1.5, b_std=0.1), ftn.Relu(),
                        ftn.Dense(64, W_std=1.5, b_std=0.1), ftn.Erf(),
                        ftn.Dense(2)])


def test_get_semantics():
  kernel_fn = ft.kernel_fn(mlp())
  kernel = kernel_fn(X1, X2)
  assert isinstance(kernel, ft.Kernel)
  assert kernel.nngp.shape == kernel.ntk.shape == (4, 3)
  assert kernel.cov1.shape == (4,) and kernel.cov2.shape == (3,)
  np.testing.assert_array_equal(kernel_fn(X1, X2, "nngp"), kernel.nngp)
  both = kernel_fn(X1, X2, ("ntk", "nngp"))
  assert both._fields == ("ntk", "nngp")
  np.testing.assert_array_equal(both.ntk, kernel.ntk)
  assert kernel_fn(X1, X2, ("nngp",)).nngp.shape == (4, 3)
  assert kernel_fn(X1, X2, "shape1") == (4, 2)


def test_nngp_only_skips_ntk():
  kernel = ft.kernel_fn(mlp())(X1, X2, ("nngp", "cov1"))
  assert kernel.nngp.shape == (4, 3)
  assert ft.kernel_fn(mlp())(X1, X2, "nngp").shape == (4, 3)


def test_unknown_get():
  with pytest.raises(ValueError, match="unknown field 'ntks'"):
    ft.kernel_fn(mlp())(X1, X2, "ntks")


def test_x2_none_is_x1():
  kernel_fn = ft.kernel_fn(mlp())
  same = kernel_fn(X1, None)
  explicit = kernel_fn(X1, X1)
  assert same.x1_is_x2 and same.cov2 is None and not explicit.x1_is_x2
  np.testing.assert_allclose(same.nngp, explicit.nngp, rtol=1e-12)
  np.testing.assert_allclose(same.ntk, explicit.ntk, rtol=1e-12)
  np.testing.assert_allclose(np.diag(same.nngp), same.cov1, rtol=1e-12)


def test_composition_with_kernel_input():
  first = nn.Sequential([ftn.Dense(8, W_std=1.3, b_std=0.2), ftn.Relu()])
  second = nn.Sequential([ftn.Dense(8), ftn.Erf(), ftn.Dense(1)])
  whole = nn.Sequential([first, second])
  composed = ft.kernel_fn(second)(ft.kernel_fn(first)(X1, X2))
  direct = ft.kernel_fn(whole)(X1, X2)
  np.testing.assert_allclose(composed.nngp, direct.nngp, rtol=1e-12)
  np.testing.assert_allclose(composed.ntk, direct.ntk, rtol=1e-12)


def test_kernel_and_x2_refused():
  kernel = ft.kernel_fn(ftn.Dense(2))(X1, X2)
  with pytest.raises(ValueError, match="not a Kernel and x2"):
    ft.kernel_fn(ftn.Dense(2))(kernel, X2)


def test_jit_matches_eager_and_differentiates():
  kernel_fn = ft.kernel_fn(mlp())
  jitted = jax.jit(kernel_fn, static_argnames="get")
  np.testing.assert_allclose(jitted(X1, X2, "ntk"), kernel_fn(X1, X2, "ntk"),
                             rtol=1e-12)
  # Gradients in the inputs, including the diagonal x1 == x2 entries where
  # the arc-cosine kernel is at its boundary, are finite and match finite
  # differences.
  loss = lambda x: jnp.sum(kernel_fn(x, None, "ntk") ** 2)
  grad = jax.grad(loss)(jnp.asarray(X1))
  assert np.all(np.isfinite(grad))
  direction = RNG.randn(*X1.shape)
  eps = 1e-6
  numeric = (loss(X1 + eps * direction) - loss(X1 - eps * direction)) / (
      2 * eps)
  np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtypes(dtype):
  kernel = ft.kernel_fn(mlp())(X1.astype(dtype), X2.astype(dtype))
  assert kernel.nngp.dtype == dtype and kernel.ntk.dtype == dtype
  reference = ft.kernel_fn(mlp())(X1, X2)
  rtol = 1e-5 if dtype == jnp.float32 else 1e-12
  np.testing.assert_allclose(kernel.ntk, reference.ntk, rtol=rtol)


class ResidualBlock(nn.Module):
  """A user-written residual block, as in a Flax codebase."""
  width: int

  @nn.compact
  def __call__(self, x):
    y = ftn.Dense(self.width, W_std=1.5)(ftn.Relu()(x))
    return x + y


class BranchConcat(nn.Module):
  """Two branches on the same input, concatenated along channels."""

  @nn.compact
  def __call__(self, x):
    a = ftn.Relu()(ftn.Dense(6, W_std=1.2)(x))
    b = ftn.Erf()(ftn.Dense(2, W_std=0.8, b_std=0.3)(x))
    return ftn.FanInConcat()([a, b])


def test_residual_user_module():
  model = nn.Sequential([ftn.Dense(8, W_std=1.1), ResidualBlock(8),
                         ftn.Dense(1)])
  kernel = ft.kernel_fn(model)(X1, X2)
  # By hand: h = W x; residual adds an independent branch W' relu(h).
  dot = X1 @ X2.T / 6
  h = ft.kernel_fn(ftn.Dense(8, W_std=1.1))(X1, X2)
  relu = ft.kernel_fn(nn.Sequential([ftn.Relu(), ftn.Dense(8, W_std=1.5)]))(h)
  expected_nngp = h.nngp + relu.nngp
  np.testing.assert_allclose(kernel.nngp, expected_nngp, rtol=1e-12)
  np.testing.assert_allclose(h.nngp, 1.21 * dot, rtol=1e-12)
  expected_ntk = expected_nngp + (h.ntk + relu.ntk)
  np.testing.assert_allclose(kernel.ntk, expected_ntk, rtol=1e-12)


def test_branch_concat_is_channel_weighted():
  kernel = ft.kernel_fn(BranchConcat())(X1, X2)
  a = ft.kernel_fn(nn.Sequential([ftn.Dense(6, W_std=1.2), ftn.Relu()]))(
      X1, X2)
  b = ft.kernel_fn(nn.Sequential([ftn.Dense(2, W_std=0.8, b_std=0.3),
                                  ftn.Erf()]))(X1, X2)
  np.testing.assert_allclose(kernel.nngp, 0.75 * a.nngp + 0.25 * b.nngp,
                             rtol=1e-12)
  np.testing.assert_allclose(kernel.ntk, 0.75 * a.ntk + 0.25 * b.ntk,
                             rtol=1e-12)
  assert kernel.shape1 == (4, 8)


def test_fan_in_prod_product_rule():
  class Prod(nn.Module):
    @nn.compact
    def __call__(self, x):
      return ftn.FanInProd()([ftn.Dense(3, b_std=0.5)(x), ftn.Dense(3)(x)])

  kernel = ft.kernel_fn(Prod())(X1, X2)
  a = ft.kernel_fn(ftn.Dense(3, b_std=0.5))(X1, X2)
  b = ft.kernel_fn(ftn.Dense(3))(X1, X2)
  np.testing.assert_allclose(kernel.nngp, a.nngp * b.nngp, rtol=1e-12)
  np.testing.assert_allclose(kernel.ntk, a.ntk * b.nngp + a.nngp * b.ntk,
                             rtol=1e-12)
  assert not kernel.is_gaussian


# ----------------------------------------------------------------- errors


class OwnParameter(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x @ self.param("w", nn.initializers.normal(), (6, 3))


class MismatchedBranches(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.Dense(3)(x) + ftn.Dense(4)(x)


@pytest.mark.parametrize("model, error, message", [
    (OwnParameter(), ft.KernelRuleError,
     r"OwnParameter.*`dot_general` at .*test_kernel_fn.py:\d+.*self.param"),
    (nn.Sequential([ftn.Dense(3), nn.PReLU()]),
     ft.KernelRuleError, r"'layers_1' of type flax.linen.activation"
     r".PReLU has no infinite-width kernel rule"),
    (nn.Sequential([ftn.Dense(3), nn.BatchNorm(use_running_average=False)]),
     NotImplementedError, r"'layers_1'\) in training mode.*mixes the "
     r"examples"),
    (nn.Sequential([ftn.Relu()]), ValueError, r"raw inputs.*not Gaussian"),
    (nn.Sequential([ftn.Dense(3), ftn.Relu(), ftn.Erf()]), ValueError,
     r"Erf is applied to the output of a nonlinearity"),
    (MismatchedBranches(), TypeError,
     r"add got incompatible shapes for broadcasting: \(\d+, 3\), \(\d+, "
     r"4\)"),
], ids=["own_parameter", "stock_prelu", "stock_batchnorm_training",
        "relu_on_inputs", "erf_after_relu", "mismatched_branches"])
def test_errors_name_cause_and_fix(model, error, message):
  with pytest.raises(error, match=message):
    ft.kernel_fn(model)(X1, X2)


def test_error_names_module_path():
  with pytest.raises(ValueError) as info:
    ft.kernel_fn(nn.Sequential([ftn.Dense(3), ftn.Relu(), ftn.Erf()]))(X1)
  assert any("'layers_2'" in note for note in info.value.__notes__)


@pytest.mark.parametrize("x2, message", [
    (np.ones((3, 5)), "differ only in batch size"),
    (np.full((3, 6), np.nan), "x2 contains NaN"),
])
def test_bad_inputs(x2, message):
  with pytest.raises(ValueError, match=message):
    ft.kernel_fn(mlp())(X1, x2)


def test_stock_dense_rule():
  # Stock nn.Dense: standard parameterization, lecun_normal (W_std = 1),
  # zero bias whose gradient still adds 1 to the NTK.
  kernel = ft.kernel_fn(nn.Dense(3))(X1, X2)
  np.testing.assert_allclose(kernel.nngp, X1 @ X2.T / 6, rtol=1e-12)
  np.testing.assert_allclose(kernel.ntk, X1 @ X2.T + 1, rtol=1e-12)


# ------------------------------------------- errors name the right thing


def test_setup_parameters_blame_the_module_that_creates_them():
  # nn.Embed creates its table in `setup`, which runs while the enclosing
  # Sequential calls it: the error must still name the Embed.
  model = nn.Sequential([nn.Embed(5, 3), ftn.Dense(2)])
  with pytest.raises(ft.KernelRuleError,
                     match=r"'layers_0' of type flax.linen.linear.Embed.*"
                     r"one_hot"):
    ft.kernel_fn(model)(np.zeros((2, 4)))


@pytest.mark.parametrize("not_a_module, message", [
    (mlp().apply, r"not its method `apply`.*ft.kernel_fn\(model\)"),
    (lambda params, x: x, "empirical_kernel_fn"),
], ids=["apply", "function"])
def test_kernel_fn_of_a_function_says_what_to_pass(not_a_module, message):
  with pytest.raises(TypeError, match=message):
    ft.kernel_fn(not_a_module)


class Difference(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.Dense(3, b_std=0.2)(x) - 3.0 * ftn.Dense(3)(x)


def test_nt_arithmetic_inside_a_user_module():
  # h1 - 3 h2 of independent branches: K1 + 9 K2 (NT's meaning).
  kernel = ft.kernel_fn(Difference())(X1, X2)
  k1 = ft.kernel_fn(ftn.Dense(3, b_std=0.2))(X1, X2)
  k2 = ft.kernel_fn(ftn.Dense(3))(X1, X2)
  np.testing.assert_allclose(kernel.nngp, k1.nngp + 9 * k2.nngp, rtol=1e-12)
  np.testing.assert_allclose(kernel.ntk, k1.ntk + 9 * k2.ntk, rtol=1e-12)


def test_difference_of_non_centred_branches_is_refused_with_advice():
  class ReluDifference(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = ftn.Dense(3)(x)
      return ftn.Relu()(h) - ftn.Relu()(ftn.Dense(3)(x))

  # Lifting refuses the `-` with the line; FanInSum refuses it too.
  with pytest.raises((ValueError, ft.KernelRuleError),
                     match="FanInSum: branch 0 is not a centred|not centred"):
    ft.kernel_fn(ReluDifference())(X1, X2)


# ------------------------------------------------ NT's Elementwise page


def _page_nngp_fn(cov12, var1, var2):
  # As on NT's `stax.Elementwise` page: written with NumPy's sqrt.
  prod = (1 + 2 * var1) * (1 + 2 * var2)
  return jnp.arcsin(2 * cov12 / np.sqrt(prod)) * 2 / np.pi


def test_elementwise_page_example_runs_eagerly_and_matches_erf():
  def model(nonlinearity):
    return nn.Sequential([ftn.Dense(8, W_std=1.3, b_std=0.2), nonlinearity,
                          ftn.Dense(1)])

  auto = ft.kernel_fn(model(ftn.Elementwise(jax.scipy.special.erf,
                                            _page_nngp_fn)))
  closed_form = ft.kernel_fn(model(ftn.Erf()))
  a, b = auto(X1, X2), closed_form(X1, X2)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-12)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10)
  # Under jit, NumPy cannot see traced values: a clear error.
  with pytest.raises(TypeError, match="write it with `jax.numpy`"):
    jax.jit(auto, static_argnames="get")(X1, X2, "nngp")
  # On the raw inputs it stays refused (as NT 0.6.5 refuses it).
  with pytest.raises(ValueError, match="Elementwise is applied to the raw "
                     "inputs"):
    ft.kernel_fn(ftn.Elementwise(jax.scipy.special.erf, _page_nngp_fn))(X1)
