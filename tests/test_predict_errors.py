"""`ft.predict`: errors that name their cause and fix, argument checks,
and float32 solves as accurate as NumPy's."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from predict_cases import assert_close
from predict_cases import mse

predict = ft.predict


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
    predict.gradient_descent(mse, k, y)(1., 0.)


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
    jax.jit(lambda f: predict.gradient_descent(mse, k, y)(None, f))(
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
    "ode negative t": (lambda: predict.gradient_descent(mse, _K, _Y)(
        -0.5, 0.), "t must be >= 0"),
    "ode infinite t": (lambda: predict.gradient_descent(mse, _K, _Y)(
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
