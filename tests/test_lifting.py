"""Plain functions inside unmodified Flax modules, lifted to kernel rules.

Each lifted pattern is checked against the same model written with
`flax_tangents.nn` layers (closed forms: to float64 precision; quadrature:
against a high-degree `ElementwiseNumerical`), and a few whole models
against Monte Carlo estimates from `model.init`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from testing import assert_mc_close
from testing import assert_trees_close
from testing import exact_ntk
from testing import jit_kernel_fn
from testing import sample_kernels

RS = np.random.RandomState(0)
X1, X2 = RS.randn(3, 4), RS.randn(2, 4)
IMG1, IMG2 = RS.randn(2, 5, 4, 3), RS.randn(3, 5, 4, 3)
erf = jax.scipy.special.erf


def _kernels(model, x1, x2):
  return jit_kernel_fn(model)(x1, x2, get=("nngp", "ntk"))


def _assert_same(lifted, reference, x1=X1, x2=X2, rtol=1e-12, atol=1e-14):
  assert_trees_close(_kernels(lifted, x1, x2), _kernels(reference, x1, x2),
                     rtol=rtol, atol=atol)


def _mlp(activation):
  """Dense -> activation -> Dense, with stock layers."""
  return nn.Sequential([nn.Dense(8, bias_init=nn.initializers.normal(0.3)),
                        activation, nn.Dense(2)])


# (plain function, the flax_tangents layer it must equal).
CLOSED_FORMS = {
    "relu": (nn.relu, ftn.Relu()),
    "leaky_relu": (nn.leaky_relu, ftn.LeakyRelu(0.01)),
    "leaky_relu_0.2": (lambda x: nn.leaky_relu(x, 0.2), ftn.LeakyRelu(0.2)),
    "maximum": (lambda x: jnp.maximum(x, 0.1 * x), ftn.LeakyRelu(0.1)),
    "minimum": (lambda x: jnp.minimum(x, 0.0), ftn.ABRelu(1.0, 0.0)),
    "where": (lambda x: jnp.where(x > 0, 2 * x, -0.5 * x),
              ftn.ABRelu(-0.5, 2.0)),
    "abs": (jnp.abs, ftn.Abs()),
    "residual_relu": (lambda x: x + nn.relu(x), ftn.ABRelu(1.0, 2.0)),
    "erf": (erf, ftn.Erf()),
    "erf_affine": (lambda x: 2 * erf(3 * x) + 1, ftn.Erf(2.0, 3.0, 1.0)),
    "sign": (jnp.sign, ftn.Sign()),
    "sin": (jnp.sin, ftn.Sin()),
    "cos_affine": (lambda x: 2 * jnp.cos(3 * x + 1), ftn.Cos(2.0, 3.0, 1.0)),
    "exp": (lambda x: 0.5 * jnp.exp(0.3 * x), ftn.Exp(0.5, 0.3)),
    "gaussian": (lambda x: jnp.exp(-x**2), ftn.Gaussian()),
    "polynomial": (lambda x: x**3 - 2 * x + 1,
                   ftn.Polynomial((1.0, -2.0, 0.0, 1.0))),
    "square": (jnp.square, ftn.Monomial(2)),
    "relu_squared": (lambda x: nn.relu(x)**2, ftn.RectifiedMonomial(2)),
    "scaled": (lambda x: 3.0 * x, ftn.Polynomial((0.0, 3.0))),
    "shifted": (lambda x: x / 2 + 1.5, ftn.Polynomial((1.5, 0.5))),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_closed_form_activations(name):
  fn, layer = CLOSED_FORMS[name]
  _assert_same(_mlp(fn), _mlp(layer))


def test_exact_gelu():
  # Flax's erf GELU uses float32 constants (1/sqrt2 rounded): the kernel is
  # that of the function as written, equal to ftn.Gelu to ~1e-8.
  fn = lambda x: nn.gelu(x, approximate=False)
  _assert_same(_mlp(fn), _mlp(ftn.Gelu()), rtol=1e-7)
  written = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))
  _assert_same(_mlp(written), _mlp(ftn.Gelu()), rtol=1e-12)


# Functions without a closed form: quadrature on 64 nodes (with a closed-form
# control variate where one is close), compared with ElementwiseNumerical on
# 150 nodes; at these variances (1 to 2.5) the stated accuracy is a few
# 1e-6 (tanh's NTK factor is the least accurate).
SMOOTH = {
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "silu": nn.silu,
    "softplus": nn.softplus,
    "gelu_tanh": nn.gelu,  # Flax's default: the tanh approximation
    "tanh_shifted": lambda x: jnp.tanh(x + 0.5),
}


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_smooth_activations_by_quadrature(name):
  fn = SMOOTH[name]
  reference = ftn.ElementwiseNumerical(fn=fn, deg=150)
  _assert_same(_mlp(fn), _mlp(reference), rtol=5e-6, atol=1e-9)


def test_gelu_tanh_is_not_the_erf_gelu_kernel():
  # The tanh approximation's kernel differs from the exact GELU's by ~1e-4:
  # lifting computes the former (what the finite network uses).
  got = ft.kernel_fn(_mlp(nn.gelu))(X1, X2, "nngp")
  erf_gelu = ft.kernel_fn(_mlp(ftn.Gelu()))(X1, X2, "nngp")
  difference = np.max(np.abs(got - erf_gelu)) / np.max(np.abs(erf_gelu))
  assert 1e-6 < difference < 1e-3, difference


# ---------------------------------------------------------------- structure


class Flatten(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(2)(x)


class GlobalMean(nn.Module):
  total: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = x.sum(axis=(1, 2)) if self.total else jnp.mean(x, axis=(1, 2))
    return nn.Dense(2)(x)


class Pool(nn.Module):
  padding: str = "VALID"
  count_include_pad: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 1), padding=self.padding,
                    count_include_pad=self.count_include_pad)
    return nn.Dense(2)(x.reshape((x.shape[0], -1)))


def _ref(*middle):
  return nn.Sequential([nn.Conv(6, (3, 3)), ftn.Relu(), *middle,
                        nn.Dense(2)])


STRUCTURE = {
    "flatten": (Flatten(), _ref(ftn.Flatten())),
    "mean": (GlobalMean(), _ref(ftn.GlobalAvgPool())),
    "sum": (GlobalMean(total=True), _ref(ftn.GlobalSumPool())),
    "avg_pool": (Pool(), _ref(ftn.AvgPool((2, 2), (2, 1)), ftn.Flatten())),
    "avg_pool_same": (Pool("SAME"), _ref(ftn.AvgPool((2, 2), (2, 1), "SAME"),
                                         ftn.Flatten())),
    "avg_pool_edges": (Pool("SAME", False),
                       _ref(ftn.AvgPool((2, 2), (2, 1), "SAME",
                                        normalize_edges=True),
                            ftn.Flatten())),
}


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_structure_matches_ftn_layers(name):
  lifted, reference = STRUCTURE[name]
  _assert_same(lifted, reference, IMG1, IMG2)


class Branches(nn.Module):
  op: str

  @nn.compact
  def __call__(self, x):
    a = nn.Dense(6, name="a")(x)
    b = nn.Dense(6, name="b")(x)
    if self.op == "add":
      y = a + b
    elif self.op == "relu_add":
      y = nn.relu(a) + b
    elif self.op == "sub":
      y = 2.0 * a - b
    elif self.op == "mul":
      y = a * b
    else:
      y = jnp.concatenate([nn.relu(a), nn.Dense(3, name="c")(x)], axis=-1)
    return nn.Dense(1, name="out")(y)


@ft.kernel_rule(lambda m, k, **kw: k.replace(
    nngp=4 * k.nngp, ntk=4 * k.ntk, cov1=4 * k.cov1,
    cov2=None if k.cov2 is None else 4 * k.cov2))
class Double(nn.Module):
  @nn.compact
  def __call__(self, x):
    return 2 * x


class BranchesRef(nn.Module):
  op: str

  @nn.compact
  def __call__(self, x):
    a = nn.Dense(6, name="a")(x)
    b = nn.Dense(6, name="b")(x)
    if self.op == "add":
      y = ftn.FanInSum()([a, b])
    elif self.op == "sub":
      y = ftn.FanInSum()([Double()(a), b])
    elif self.op == "mul":
      y = ftn.FanInProd()([a, b])
    else:
      y = ftn.FanInConcat()([ftn.Relu()(a), nn.Dense(3, name="c")(x)])
    return nn.Dense(1, name="out")(y)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "concat"])
def test_branches_match_fan_in_layers(op):
  _assert_same(Branches(op), BranchesRef(op))


def test_non_centred_plus_fresh_branch():
  # relu(a) + b with b a fresh affine output: E[relu(a) b'] = 0, so the
  # kernel is the sum of the branch kernels although relu(a) is not centred
  # (FanInSum, as NT's, would refuse it).
  got = _kernels(Branches("relu_add"), X1, X2)
  dense = ft.kernel_fn(nn.Dense(6))(X1, X2)
  relu = ft.kernel_fn(ftn.Relu())(dense)
  total = relu.replace(nngp=relu.nngp + dense.nngp, ntk=relu.ntk + dense.ntk,
                       cov1=relu.cov1 + dense.cov1, cov2=relu.cov2 + dense.cov2)
  want = ft.kernel_fn(nn.Dense(1))(total, get=("nngp", "ntk"))
  assert_trees_close(got, want, rtol=1e-12, atol=1e-14)


class Spatial(nn.Module):
  op: str

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (2, 2), padding="SAME")(x)
    if self.op == "transpose":
      x = jnp.transpose(x, (0, 2, 1, 3))
    elif self.op == "index":
      x = x[:, 1:4, ::-1]
    elif self.op == "int_index":
      x = x[:, 2]
    return x


@pytest.mark.parametrize("op, expected", [
    ("transpose", lambda k: k.transpose((1, 0))),
    ("index", lambda k: ftn.Index(np.s_[:, 1:4, ::-1])),
    ("int_index", lambda k: ftn.Index(np.s_[:, 2])),
])
def test_transpose_and_indexing(op, expected):
  x1, x2 = IMG1, IMG2
  got = ft.kernel_fn(Spatial(op))(x1, x2)
  conv = ft.kernel_fn(nn.Conv(4, (2, 2), padding="SAME"))(x1, x2)
  want = expected(conv)
  if isinstance(want, nn.Module):
    want = ft.kernel_fn(want)(conv)
  for field in ("nngp", "ntk", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(got, field), getattr(want, field),
                               rtol=1e-12)
  assert got.shape1 == want.shape1


def test_padding_is_exact_for_a_linear_network():
  # Conv -> zero padding -> flatten is linear in its parameters: its NTK is
  # the same for every draw, so the finite network gives it exactly.

  class Padded(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(3, (2, 2), kernel_init=nn.initializers.normal(1.0))(x)
      return jnp.pad(x, ((0, 0), (1, 2), (0, 1), (0, 0)))

  model = Padded()
  got = ft.kernel_fn(model)(IMG1, IMG2, "ntk")
  np.testing.assert_allclose(got, exact_ntk(model, IMG1, IMG2), rtol=1e-10,
                             atol=1e-12)


# ------------------------------------------------------------- Monte Carlo


class OneHidden(nn.Module):
  """A single hidden layer: its NNGP is unbiased at any width."""
  width: int = 256

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.width, kernel_init=nn.initializers.he_normal(),
                 bias_init=nn.initializers.normal(0.2))(x)
    y = jnp.concatenate([nn.gelu(h[..., :self.width // 2]),
                         jnp.tanh(h[..., self.width // 2:]) * 1.5], axis=-1)
    return nn.Dense(1)(y)


def test_monte_carlo_one_hidden_layer():
  model = OneHidden()
  k = ft.kernel_fn(model)(X1, X2, ("nngp", "ntk"))
  nngp, ntk = sample_kernels(model, jnp.asarray(X1), jnp.asarray(X2),
                             jax.random.key(1), 128)
  assert_mc_close(nngp, np.asarray(k.nngp), n_se=5.0)
  # The standard-parameterization NTK of one hidden layer: also unbiased.
  assert_mc_close(ntk, np.asarray(k.ntk), n_se=5.0)


def test_relu_plus_a_constant():
  # E[(relu(u) + c)(relu(v) + c)] = E[relu relu] + c (E relu(u) + E relu(v))
  # + c^2, with E relu(u) = sqrt(var / (2 pi)); checked against adaptive
  # quadrature (Gauss-Hermite converges too slowly on the kink).
  integrate = pytest.importorskip("scipy.integrate")
  from flax_tangents._src.analytic.lifting import activations
  from flax_tangents._src.analytic.lifting import expressions as ex
  expr = ex.Apply(jax.lax.add_p, {}, (
      ex.Apply(jax.lax.max_p, {}, (ex.ROOT, ex.Constant(np.asarray(0.0)))),
      ex.Constant(np.asarray(0.7))))
  activation = activations.recognize(expr)
  assert activation.exact
  c, v1, v2 = 0.6, 1.3, 0.9
  f = lambda x: max(x, 0.0) + 0.7
  s, a = np.sqrt(v1), c / np.sqrt(v1)
  r = np.sqrt(v2 - a * a)
  pdf = lambda z: np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
  inner = lambda z1: integrate.quad(lambda z2: pdf(z2) * f(a * z1 + r * z2),
                                    -12, 12, points=[-a * z1 / r])[0]
  want = integrate.quad(lambda z1: pdf(z1) * f(s * z1) * inner(z1), -12, 12,
                        points=[0.0], epsabs=1e-13)[0]
  got = activation.nngp_fn(jnp.asarray(c), jnp.asarray(v1), jnp.asarray(v2))
  np.testing.assert_allclose(got, want, rtol=1e-10)
  # And inside a model it runs (it is not the plain ReLU kernel).
  shifted = ft.kernel_fn(_mlp(lambda x: nn.relu(x) + 0.7))(X1, X2, "nngp")
  assert not np.allclose(shifted, ft.kernel_fn(_mlp(nn.relu))(X1, X2,
                                                              "nngp"))


def test_float32_and_gradients():
  # float32 inputs give float32 kernels close to float64 ones (quadrature
  # included), and lifted kernels are differentiable in the inputs, as
  # those of the same model written with ftn layers.
  lifted, reference = _mlp(nn.silu), _mlp(ftn.ElementwiseNumerical(
      fn=nn.silu, deg=64))
  k32 = _kernels(lifted, X1.astype(np.float32), X2.astype(np.float32))
  k64 = _kernels(lifted, X1, X2)
  assert k32.nngp.dtype == np.float32
  assert_trees_close(k32, k64, rtol=2e-5, atol=1e-6)

  def total(model):
    return jax.grad(lambda x: jit_kernel_fn(model)(x, X2, get="ntk").sum())(
        jnp.asarray(X1))

  np.testing.assert_allclose(total(lifted), total(reference), rtol=1e-6,
                             atol=1e-9)
