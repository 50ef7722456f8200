"""Tests of `ft.predict`: NT's golden outputs, ODE vs closed form, errors."""

import collections
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from golden_models import load_golden

predict = ft.predict
NngpNtk = collections.namedtuple("NngpNtk", "nngp ntk")


def assert_close(actual, expected, rtol=1e-6):
  """Relative agreement, with an absolute floor scaled to the array."""
  expected = np.asarray(expected)
  atol = rtol * max(float(np.max(np.abs(expected))), 1e-300)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                             atol=atol)


@pytest.fixture(scope="module")
def golden():
  return load_golden("predict")


def relu_network_kernel_fn(x1, x2=None, get=None):
  """Closed-form kernels of Dense(64, 1.4, 0.1) - Relu - Dense(3, 1.1, 0.05).

  NTK parameterization. With q = W1^2 x.x' / d + b1^2 the first layer's
  covariance (its NTK equals it: the inputs carry no NTK), the ReLU gives the
  arc-cosine kernel of degree 1 and its derivative's degree-0 kernel,
    E[relu relu'] = sqrt(q11 q22) (sin t + (pi - t) cos t) / (2 pi),
    E[step step'] = (pi - t) / (2 pi),   with cos t = q12 / sqrt(q11 q22),
  and the readout layer gives nngp = W2^2 E[relu relu'] + b2^2 and
  ntk = W2^2 (E[relu relu'] + q12 E[step step']) + b2^2.
  """
  same = x2 is None
  x2 = x1 if same else x2

  def first_layer(a, b):
    return 1.4**2 * jnp.sum(a * b, axis=-1) / a.shape[-1] + 0.1**2

  q12 = first_layer(x1[:, None, :], x2[None, :, :])
  q11, q22 = first_layer(x1, x1), first_layer(x2, x2)
  norm = jnp.sqrt(q11[:, None] * q22[None, :])
  cos = jnp.clip(q12 / norm, -1., 1.)
  angle = jnp.arccos(cos)
  if same:  # exactly zero on the diagonal, where rounding would leave ~1e-8
    angle = angle * (1 - jnp.eye(angle.shape[0], dtype=angle.dtype))
  relu_cov = norm * (jnp.sin(angle) + (jnp.pi - angle) * cos) / (2 * jnp.pi)
  step_cov = (jnp.pi - angle) / (2 * jnp.pi)
  kernels = {"nngp": 1.1**2 * relu_cov + 0.05**2,
             "ntk": 1.1**2 * (relu_cov + q12 * step_cov) + 0.05**2}
  if isinstance(get, str):
    return kernels[get]
  get = ("nngp", "ntk") if get is None else tuple(get)
  return collections.namedtuple("Kernels", get)(*(kernels[g] for g in get))


def cross_entropy(fx, y):
  """Mean over examples of the softmax cross-entropy over the output axis."""
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(fx) * y, axis=-1))


# ------------------------------------------------------------------ golden ---


def test_gradient_descent_mse_golden(golden):
  g = golden
  predict_fn = predict.gradient_descent_mse(
      g["ntk_train_train"], g["y_train"], learning_rate=0.7, diag_reg=1e-2)
  fx_train, fx_test = predict_fn(g["ts"], g["fx_train_0"], g["fx_test_0"],
                                 g["ntk_test_train"])
  assert fx_train.shape == (4, 12, 3) and fx_test.shape == (4, 5, 3)
  assert_close(fx_train, g["gd_mse_train"])
  assert_close(fx_test, g["gd_mse_test"])
  fx_train, fx_test = predict_fn(None, g["fx_train_0"], g["fx_test_0"],
                                 g["ntk_test_train"])
  assert_close(fx_train, g["gd_mse_train_inf"])
  assert_close(fx_test, g["gd_mse_test_inf"])
  # Test-only predictions and scalar times.
  fx_test = predict_fn(g["ts"][2], None, g["fx_test_0"], g["ntk_test_train"])
  assert fx_test.shape == (5, 3)


def test_gradient_descent_mse_golden_is_jittable(golden):
  g = golden
  predict_fn = predict.gradient_descent_mse(
      g["ntk_train_train"], g["y_train"], learning_rate=0.7, diag_reg=1e-2)
  fx_train, fx_test = jax.jit(predict_fn)(
      g["ts"], g["fx_train_0"], g["fx_test_0"], g["ntk_test_train"])
  assert_close(fx_train, g["gd_mse_train"])
  assert_close(fx_test, g["gd_mse_test"])


def test_gp_inference_golden(golden):
  g = golden
  train = NngpNtk(g["nngp_train_train"], g["ntk_train_train"])
  test_train = NngpNtk(g["nngp_test_train"], g["ntk_test_train"])
  test_test = NngpNtk(g["nngp_test_test"], g["ntk_test_test"])
  predict_fn = predict.gp_inference(train, g["y_train"], diag_reg=1e-3)
  out = predict_fn(("nngp", "ntk"), test_train, test_test)
  assert type(out).__name__ == "Gaussians" and out._fields == ("nngp", "ntk")
  assert isinstance(out.nngp, predict.Gaussian)
  assert_close(out.nngp.mean, g["gp_nngp_mean"])
  assert_close(out.nngp.covariance, g["gp_nngp_cov"])
  assert_close(out.ntk.mean, g["gp_ntk_mean"])
  assert_close(out.ntk.covariance, g["gp_ntk_cov"])
  # A string `get` gives one result; no k_test_test gives the mean only.
  assert_close(predict_fn("ntk", test_train), g["gp_ntk_mean"])
  # ft.Kernel inputs work like namedtuples.
  def as_kernel(k):
    base = ft.Kernel.from_inputs(jnp.ones((2, 1)))
    return base.replace(nngp=jnp.asarray(k.nngp), ntk=jnp.asarray(k.ntk))
  out = predict.gp_inference(as_kernel(train), g["y_train"], diag_reg=1e-3)(
      "ntk", as_kernel(test_train), as_kernel(test_test))
  assert_close(out.covariance, g["gp_ntk_cov"])


def test_gp_inference_train_set_and_ntkgp(golden):
  g = golden
  train = NngpNtk(g["nngp_train_train"], g["ntk_train_train"])
  predict_fn = predict.gp_inference(train, g["y_train"])
  mean, cov = predict_fn("nngp", None, True)
  np.testing.assert_array_equal(mean, g["y_train"])
  np.testing.assert_array_equal(cov, np.zeros((12, 12)))
  # ntkgp is the nngp formula with the NTK in place of the NNGP.
  test_train = NngpNtk(g["nngp_test_train"], g["ntk_test_train"])
  test_test = NngpNtk(g["nngp_test_test"], g["ntk_test_test"])
  ntkgp = predict_fn("ntkgp", test_train, test_test)
  as_nngp = predict.gp_inference(g["ntk_train_train"], g["y_train"])(
      "nngp", g["ntk_test_train"], g["ntk_test_test"])
  assert_close(ntkgp.covariance, as_nngp.covariance)
  with pytest.raises(ValueError, match="both the NNGP and the NTK"):
    predict.gp_inference(g["ntk_train_train"], g["y_train"])(
        "ntk", g["ntk_test_train"], g["ntk_test_test"])


def test_ensemble_golden(golden):
  g = golden
  for name, k in [("nngp_train_train", relu_network_kernel_fn(g["x_train"])),
                  ("ntk_test_train", relu_network_kernel_fn(g["x_test"],
                                                            g["x_train"]))]:
    assert_close(getattr(k, name.split("_")[0]), g[name])
  predict_fn = predict.gradient_descent_mse_ensemble(
      relu_network_kernel_fn, g["x_train"], g["y_train"], learning_rate=1.0,
      diag_reg=1e-4)
  out = predict_fn(g["ts"][1:], g["x_test"], ("nngp", "ntk"), compute_cov=True)
  assert_close(out.nngp.mean, g["ens_nngp_mean"])
  assert_close(out.nngp.covariance, g["ens_nngp_cov"])
  assert_close(out.ntk.mean, g["ens_ntk_mean"])
  assert_close(out.ntk.covariance, g["ens_ntk_cov"])
  assert_close(predict_fn(None, g["x_test"], "ntk"), g["ens_ntk_mean_inf"])


def test_ensemble_with_analytic_kernel_fn(golden):
  ftn = pytest.importorskip("flax_tangents.nn")
  import flax.linen as nn
  try:
    model = nn.Sequential([ftn.Dense(64, W_std=1.4, b_std=0.1), ftn.Relu(),
                           ftn.Dense(3, W_std=1.1, b_std=0.05)])
    kernel_fn = ft.kernel_fn(model)
  except (AttributeError, NotImplementedError) as e:
    pytest.skip(f"analytic kernels are not available yet: {e}")
  g = golden
  predict_fn = predict.gradient_descent_mse_ensemble(
      kernel_fn, g["x_train"], g["y_train"], learning_rate=1.0, diag_reg=1e-4)
  out = predict_fn(g["ts"][1:], g["x_test"], ("nngp", "ntk"), compute_cov=True)
  assert_close(out.nngp.mean, g["ens_nngp_mean"])
  assert_close(out.ntk.mean, g["ens_ntk_mean"])
  assert_close(out.ntk.covariance, g["ens_ntk_cov"])
  assert_close(predict_fn(None, g["x_test"], "ntk"), g["ens_ntk_mean_inf"])


def test_ensemble_limits_and_train_set(golden):
  g = golden
  predict_fn = predict.gradient_descent_mse_ensemble(
      relu_network_kernel_fn, g["x_train"], g["y_train"], diag_reg=1e-4)
  # Long finite times approach t=None, on test and train sets.
  late = predict_fn(1e8, g["x_test"], ("nngp", "ntk"), compute_cov=True)
  inf = predict_fn(None, g["x_test"], ("nngp", "ntk"), compute_cov=True)
  for g_ in ("nngp", "ntk"):
    assert_close(getattr(late, g_).mean, getattr(inf, g_).mean, rtol=1e-5)
    assert_close(getattr(late, g_).covariance, getattr(inf, g_).covariance,
                 rtol=1e-5)
  train = predict_fn(np.array([0., 1e9]), None, "ntk", compute_cov=True)
  assert train.mean.shape == (2, 12, 3)
  assert train.covariance.shape == (2, 12, 12)
  np.testing.assert_allclose(train.mean[0], 0.)
  assert_close(train.mean[1], g["y_train"], rtol=1e-4)
  # At t=0 the covariance is the prior's.
  assert_close(train.covariance[0], relu_network_kernel_fn(g["x_train"]).nngp)


def test_ensemble_kernel_fn_keyword_arguments(golden):
  g = golden
  calls = []

  def kernel_fn(x1, x2, get, scale=1., pair=(None, None)):
    calls.append((x1.shape[0], None if x2 is None else x2.shape[0], pair))
    out = relu_network_kernel_fn(x1, x2, get)
    return jax.tree_util.tree_map(lambda k: scale * k, out)

  plain = predict.gradient_descent_mse_ensemble(
      relu_network_kernel_fn, g["x_train"], g["y_train"])(2., g["x_test"], "ntk")
  scaled = predict.gradient_descent_mse_ensemble(
      kernel_fn, g["x_train"], g["y_train"], scale=2., pair=("tr", "tr"))
  # Doubling the kernel doubles the speed of training.
  assert_close(scaled(1., g["x_test"], "ntk", pair=("te", "te")), plain)
  assert ("te", "tr") in [c[2] for c in calls if c[1] == 12 and c[0] == 5]
  with pytest.raises(ValueError, match="scale"):
    scaled(1., g["x_test"], "ntk", scale=3.)


def test_gradient_descent_golden(golden):
  g = golden
  for momentum, key in [(None, "gd_ce"), (0.9, "gd_ce_mom")]:
    predict_fn = predict.gradient_descent(
        cross_entropy, g["ntk_train_train"], g["y_onehot"], learning_rate=0.5,
        momentum=momentum)
    fx_train, fx_test = predict_fn(g["ts"][1:3], g["fx_train_0"],
                                   g["fx_test_0"], g["ntk_test_train"])
    # The solver's tolerance is 1.4e-8.
    assert_close(fx_train, g[key + "_train"], rtol=1e-6)
    assert_close(fx_test, g[key + "_test"], rtol=1e-6)


def test_max_learning_rate_golden(golden):
  lr = predict.max_learning_rate(golden["ntk_train_train"])
  assert isinstance(lr, float)
  assert_close(lr, golden["max_learning_rate"])
  assert_close(predict.max_learning_rate(golden["ntk_train_train"],
                                         momentum=0.5),
               1.5 * golden["max_learning_rate"])


# ----------------------------------------------------- ODE vs closed form ---


def _mse(fx, y):
  return 0.5 * jnp.mean((fx - y)**2)


def _rk4(velocity, f0, t_end, n_steps):
  """Fixed-step classical Runge-Kutta, independent of the adaptive solver."""
  h = t_end / n_steps
  f = f0
  for _ in range(n_steps):
    k1 = velocity(f)
    k2 = velocity(f + h / 2 * k1)
    k3 = velocity(f + h / 2 * k2)
    k4 = velocity(f + h * k3)
    f = f + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  return f


def test_closed_form_matches_ode_integration(golden):
  g = golden
  k_dd, k_td = g["ntk_train_train"], g["ntk_test_train"]
  y, f0, f0_test = g["y_train"], g["fx_train_0"], g["fx_test_0"]
  lr, t = 0.3, 40.
  closed = predict.gradient_descent_mse(k_dd, y, learning_rate=lr)
  closed_train, closed_test = closed(t, f0, f0_test, k_td)
  ode = predict.gradient_descent(_mse, k_dd, y, learning_rate=lr)
  ode_train, ode_test = ode(t, f0, f0_test, k_td)
  assert_close(ode_train, closed_train, rtol=1e-7)
  assert_close(ode_test, closed_test, rtol=1e-7)

  # An explicit fixed-step integration of the train + test dynamics.
  def velocity(f):
    f_train = f[:12]
    residual = (f_train - y) / y.size
    return -lr * jnp.concatenate([k_dd @ residual, k_td @ residual])
  rk4 = _rk4(velocity, jnp.concatenate([f0, f0_test]), t, 200)
  assert_close(rk4[:12], closed_train, rtol=1e-7)
  assert_close(rk4[12:], closed_test, rtol=1e-7)


def test_momentum_ode_state_resumes(golden):
  g = golden
  predict_fn = predict.gradient_descent(
      cross_entropy, g["ntk_train_train"], g["y_onehot"], learning_rate=0.5,
      momentum=0.9)
  straight = predict_fn(np.array([1., 3.]), g["fx_train_0"])
  state_1 = predict_fn(1., predict.ODEState(g["fx_train_0"]))
  assert state_1.qx_train.shape == (12, 3)
  np.testing.assert_allclose(state_1.fx_train, straight[0], rtol=1e-6)
  # Starting from the state at step 1, two more steps reach step 3.
  state_3 = predict_fn(2., state_1)
  np.testing.assert_allclose(state_3.fx_train, straight[1], rtol=1e-6,
                             atol=1e-9)
  with pytest.raises(ValueError, match="momentum"):
    predict.gradient_descent(cross_entropy, g["ntk_train_train"],
                             g["y_onehot"])(1., state_1)


def test_trace_axes_and_absolute_regularization(golden):
  g = golden
  k_dd, k_td = g["ntk_train_train"], g["ntk_test_train"]
  y, f0, f0_test, ts = g["y_train"], g["fx_train_0"], g["fx_test_0"], g["ts"]
  eye = np.eye(3)
  # Theta (x) I written out with the output axes kept: (N, N, 3, 3).
  k_dd_full = np.einsum("ij,ab->iajb", k_dd, eye).reshape(12, 3, 12, 3)
  k_dd_full = k_dd_full.transpose(0, 2, 1, 3)
  k_td_full = np.einsum("ij,ab->iajb", k_td, eye).reshape(5, 3, 12, 3)
  k_td_full = k_td_full.transpose(0, 2, 1, 3)
  reg = 1e-2
  mean_diag = np.trace(k_dd) / 12
  traced = predict.gradient_descent_mse(k_dd, y, 0.7, reg)
  full = predict.gradient_descent_mse(k_dd_full, y, 0.7, reg * mean_diag,
                                      diag_reg_absolute_scale=True,
                                      trace_axes=())
  for t in (ts, None):
    for a, b in zip(traced(t, f0, f0_test, k_td),
                    full(t, f0, f0_test, k_td_full)):
      assert_close(b, a, rtol=1e-9)
  # Outputs with the traced axis first: (3, N) targets.
  first = predict.gradient_descent_mse(k_dd, y.T, 0.7, reg, trace_axes=(0,))
  a_train, a_test = traced(ts, f0, f0_test, k_td)
  b_train, b_test = first(ts, f0.T, f0_test.T, k_td)
  assert_close(jnp.swapaxes(b_train, 1, 2), a_train, rtol=1e-9)
  assert_close(jnp.swapaxes(b_test, 1, 2), a_test, rtol=1e-9)


def test_float32_inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  k = x @ x.T + np.eye(6, dtype=np.float32)
  y = rng.normal(size=(6, 2)).astype(np.float32)
  fx = predict.gradient_descent_mse(k, y)(np.float32(3.), np.zeros_like(y))
  assert fx.dtype == np.float32 and np.all(np.isfinite(fx))


# ------------------------------------------------------------------ errors ---


def test_not_psd_kernel_error_names_matrix_and_fix():
  k = np.array([[1., 2.], [2., 1.]])  # eigenvalues -1 and 3
  y = np.ones((2, 1))
  with pytest.raises(predict.NotPSDError) as info:
    predict.gradient_descent_mse(k, y)(1., 0.)
  message = str(info.value)
  assert "k_train_train" in message and "-1" in message
  assert "diag_reg >= " in message
  # The suggested regularizer does fix it.
  suggested = float(message.split("diag_reg >= ")[1].split()[0])
  fx = predict.gradient_descent_mse(k, y, diag_reg=suggested)(1., 0.)
  assert np.all(np.isfinite(fx))
  with pytest.raises(predict.NotPSDError, match="k_train_train"):
    predict.gp_inference(k, y)("nngp", np.ones((1, 2)))
  with pytest.raises(predict.NotPSDError, match="smallest eigenvalue"):
    predict.gradient_descent(_mse, k, y)(1., 0.)


def test_singular_kernel_cholesky_error():
  x = np.array([[1., 0.], [2., 0.], [0., 1.]])
  k = x @ x.T  # rank 2 of 3: PSD, but singular without regularization
  y = np.ones((3, 1))
  with pytest.raises(predict.NotPSDError, match="Cholesky") as info:
    predict.gradient_descent_mse(k, y)(None, 0., np.zeros((1, 1)),
                                       np.ones((1, 3)))
  assert "diag_reg >= " in str(info.value)
  # Finite times need no inverse and work on the singular kernel.
  assert np.all(np.isfinite(predict.gradient_descent_mse(k, y)(
      2., 0., np.zeros((1, 1)), np.ones((1, 3)))[1]))
  fx = predict.gradient_descent_mse(k, y, diag_reg=1e-6)(
      None, 0., np.zeros((1, 1)), np.ones((1, 3)))
  assert np.all(np.isfinite(fx[1]))


def test_input_errors():
  k, y = np.eye(3), np.ones((3, 2))
  with pytest.raises(ValueError, match="NaN"):
    predict.gradient_descent_mse(np.full((3, 3), np.nan), y)(1., 0.)
  with pytest.raises(ValueError, match="k_test_train"):
    predict.gradient_descent_mse(k, y)(1., 0., np.zeros((2, 2)))
  with pytest.raises(ValueError, match="nothing to predict"):
    predict.gradient_descent_mse(k, y)(1., None)
  with pytest.raises(ValueError, match="shape"):
    predict.gradient_descent_mse(np.eye(4), y)
  with pytest.raises(ValueError, match="jax.jit"):
    jax.jit(lambda f: predict.gradient_descent(_mse, k, y)(None, f))(
        jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="get"):
    predict.gp_inference(k, y)("bad", np.ones((1, 3)))


# ----------------------------------------- argument checks, float32 solves ---


def _linear_kernel_fn(x1, x2=None, get=None):
  return x1 @ (x1 if x2 is None else x2).T


_K, _Y = np.eye(3) + 0.5, np.ones((3, 2))
BAD_ARGUMENTS = {
    "negative t": (lambda: predict.gradient_descent_mse(_K, _Y)(-1., 0.),
                   "t must be >= 0"),
    "one negative t": (lambda: predict.gradient_descent_mse(_K, _Y)(
        np.array([1., -2.]), 0.), "t must be >= 0"),
    "nan t": (lambda: predict.gradient_descent_mse(_K, _Y)(np.nan, 0.),
              "NaN"),
    "infinite t": (lambda: predict.gradient_descent_mse(_K, _Y)(np.inf, 0.),
                   "t=None"),
    "negative diag_reg": (lambda: predict.gradient_descent_mse(
        _K, _Y, diag_reg=-1e-3), "diag_reg must be a finite number >= 0"),
    "nan diag_reg": (lambda: predict.gp_inference(_K, _Y, diag_reg=np.nan),
                     "diag_reg"),
    "gp negative diag_reg": (lambda: predict.gp_inference(_K, _Y, -1.),
                             "diag_reg"),
    "negative learning rate": (lambda: predict.gradient_descent_mse(
        _K, _Y, learning_rate=-1.), "learning_rate"),
    "ode negative t": (lambda: predict.gradient_descent(_mse, _K, _Y)(
        -0.5, 0.), "t must be >= 0"),
    "ode infinite t": (lambda: predict.gradient_descent(_mse, _K, _Y)(
        np.array([1., np.inf]), 0.), "t=None"),
    "ensemble negative diag_reg": (lambda: predict.gradient_descent_mse_ensemble(
        _linear_kernel_fn, np.eye(3), _Y, diag_reg=-1.), "diag_reg"),
    "ensemble negative t": (lambda: predict.gradient_descent_mse_ensemble(
        _linear_kernel_fn, np.eye(3), _Y)(-3., np.ones((1, 3)), "ntk"),
                            "t must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_refuses_bad_times_and_regularizers(case):
  run, message = BAD_ARGUMENTS[case]
  with pytest.raises(ValueError, match=message):
    run()


def _conditioned_kernel(n, condition, seed):
  """A float32 PSD matrix with eigenvalues log-spaced over `condition`, and
  the float64 matrix it rounds."""
  rng = np.random.RandomState(seed)
  q, _ = np.linalg.qr(rng.randn(n, n))
  exact = (q * np.logspace(0, -np.log10(condition), n)) @ q.T
  return exact.astype(np.float32), exact


def _relative_error(x, reference):
  return np.linalg.norm(np.asarray(x, np.float64) - reference) / (
      np.linalg.norm(reference))


@pytest.mark.parametrize("condition", [1e2, 1e5, 1e7])
def test_float32_solves_as_accurate_as_numpy(condition):
  """With x64 off, a float32 kernel is solved as NumPy solves it (float64
  arithmetic, float32 result), also at condition numbers near 1 / eps where
  a float32 factorization is off by percents."""
  n = 80
  errors = {name: [] for name in ("numpy", "gp", "gd", "numpy vs exact",
                                  "gd vs exact")}
  for seed in range(3):
    k, exact = _conditioned_kernel(n, condition, seed)
    y = np.random.RandomState(seed + 10).randn(n, 2).astype(np.float32)
    of_rounded = np.linalg.solve(k.astype(np.float64), y.astype(np.float64))
    of_exact = np.linalg.solve(exact, y.astype(np.float64))
    eye = np.eye(n, dtype=np.float32)  # k_test_train = I gives K^-1 y.
    with jax.enable_x64(False), warnings.catch_warnings():
      warnings.simplefilter("ignore", predict.IllConditionedWarning)
      gp = predict.gp_inference(k, y)("nngp", eye)
      gd = predict.gradient_descent_mse(k, y)(None, None, np.zeros_like(y),
                                              eye)
    assert gp.dtype == gd.dtype == np.float32
    numpy_solution = np.linalg.solve(k, y)
    assert numpy_solution.dtype == np.float32
    errors["numpy"].append(_relative_error(numpy_solution, of_rounded))
    errors["gp"].append(_relative_error(gp, of_rounded))
    errors["gd"].append(_relative_error(gd, of_rounded))
    errors["numpy vs exact"].append(_relative_error(numpy_solution, of_exact))
    errors["gd vs exact"].append(_relative_error(gd, of_exact))
  mean = {name: np.mean(e) for name, e in errors.items()}
  # Both are float64 solves rounded to float32: equal up to that rounding.
  assert mean["gp"] <= 1.05 * mean["numpy"] + 1e-9, mean
  assert mean["gd"] <= 1.05 * mean["numpy"] + 1e-9, mean
  assert mean["gd vs exact"] <= 1.05 * mean["numpy vs exact"] + 1e-9, mean
  assert mean["gd"] < 1e-7, mean


def test_float32_finite_time_matches_float64():
  k, _ = _conditioned_kernel(60, 1e6, 0)
  y = np.random.RandomState(1).randn(60, 1).astype(np.float32)
  t = np.array([1., 1e3, 1e6], np.float32)
  expected = predict.gradient_descent_mse(k.astype(np.float64),
                                          y.astype(np.float64))(
                                              t.astype(np.float64), 0.)
  with jax.enable_x64(False), warnings.catch_warnings():
    warnings.simplefilter("ignore", predict.IllConditionedWarning)
    got = predict.gradient_descent_mse(k, y)(t, 0.)
  assert got.dtype == np.float32
  assert_close(got, expected, rtol=1e-6)


def test_float32_ill_conditioned_kernel_warns_with_fix():
  k, _ = _conditioned_kernel(60, 1e7, 0)
  y = np.ones((60, 1), np.float32)
  eye = np.eye(60, dtype=np.float32)
  for x64 in (False, True):  # the kernel's dtype decides, not the mode
    with jax.enable_x64(x64):
      with pytest.warns(predict.IllConditionedWarning) as record:
        predict.gp_inference(k, y)("nngp", eye)
      message = str(record[0].message)
      assert "condition number 1" in message and "e+07" in message, message
      assert "jax_enable_x64" in message and "diag_reg=" in message
      with pytest.warns(predict.IllConditionedWarning, match="condition"):
        predict.gradient_descent_mse(k, y)(5., 0.)  # the eigh path
  # The suggested regularizer silences it; a float64 or well-conditioned
  # kernel never warns.
  suggested = float(message.split("diag_reg=")[2].split()[0])
  well, _ = _conditioned_kernel(60, 1e3, 0)
  with warnings.catch_warnings(), jax.enable_x64(False):
    warnings.simplefilter("error", predict.IllConditionedWarning)
    predict.gp_inference(k, y, diag_reg=suggested)("nngp", eye)
    predict.gp_inference(well, y)("nngp", eye)
    predict.gradient_descent_mse(well, y)(5., 0.)
  with warnings.catch_warnings():
    warnings.simplefilter("error", predict.IllConditionedWarning)
    predict.gp_inference(k.astype(np.float64), y)("nngp", eye)


# ------------------------------------ gradient_descent(t=None), NT's t=inf ---


def test_ode_infinite_time_matches_closed_form(golden):
  # NT reads t=None as t=inf; for the MSE the limit has a closed form.
  g = golden
  k_dd, k_td = g["ntk_train_train"], g["ntk_test_train"]
  y, f0, f0_test = g["y_train"], g["fx_train_0"], g["fx_test_0"]
  closed = predict.gradient_descent_mse(k_dd, y, learning_rate=0.3)(
      None, f0, f0_test, k_td)
  ode = predict.gradient_descent(_mse, k_dd, y, learning_rate=0.3)
  fx_train, fx_test = ode(None, f0, f0_test, k_td)
  assert fx_train.shape == y.shape and fx_test.shape == f0_test.shape
  assert_close(fx_train, closed[0], rtol=1e-7)
  assert_close(fx_test, closed[1], rtol=1e-7)


def test_ode_infinite_time_with_momentum_returns_state():
  # The heavy-ball flow on the MSE ends where plain gradient flow ends, with
  # zero momentum; trace_axes=() and an ODEState in and out.
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 6))
  k = a @ a.T / 6 + 0.5 * np.eye(6)  # (3 examples x 2 outputs) squared
  y = rng.normal(size=(3, 2))
  k4 = k.reshape(3, 2, 3, 2).transpose(0, 2, 1, 3)
  closed = predict.gradient_descent_mse(k4, y, trace_axes=())(None, 0., 0.,
                                                              k4[:1])
  state = predict.gradient_descent(_mse, k4, y, learning_rate=0.5,
                                   momentum=0.5, trace_axes=())(
                                       None, predict.ODEState(
                                           np.zeros((3, 2)), np.zeros((1, 2))),
                                       k_test_train=k4[:1])
  assert isinstance(state, predict.ODEState)
  assert_close(state.fx_train, closed[0], rtol=1e-7)
  assert_close(state.fx_test, closed[1], rtol=1e-7)
  np.testing.assert_allclose(state.qx_train, 0., atol=1e-7)


@pytest.mark.parametrize("case", ["cross_entropy", "momentum_1",
                                  "ill_conditioned"])
def test_ode_infinite_time_refuses_what_does_not_converge(case):
  k, y = np.array([[2., 1.], [1., 2.]]), np.eye(2)
  if case == "cross_entropy":  # outputs grow like log(t) forever
    run = predict.gradient_descent(cross_entropy, k, y)
    match = "did not converge"
  elif case == "momentum_1":  # no friction: the flow oscillates forever
    run = predict.gradient_descent(_mse, k, y, momentum=1.)
    match = "momentum >= 1"
  else:  # a slow mode out of an explicit solver's reach
    run = predict.gradient_descent(_mse, np.diag([1., 1e-9]), y)
    match = "steps"
  with pytest.raises(predict.ConvergenceError, match=match):
    run(None, np.zeros((2, 2)))
