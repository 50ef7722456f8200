"""Tests of `ft.predict` against NT's golden outputs (see also
`test_predict_ode.py` and `test_predict_errors.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from golden_models import load_golden
from predict_cases import NngpNtk
from predict_cases import assert_close
from predict_cases import cross_entropy
from predict_cases import relu_network_kernel_fn

predict = ft.predict


@pytest.fixture(scope="module")
def golden():
  return load_golden("predict")


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
