"""`ft.predict`: the ODE solver against closed forms and integration,
trace axes, float32, and `t=None` (NT's `t=inf`)."""

import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from golden_models import load_golden
from predict_cases import assert_close
from predict_cases import cross_entropy
from predict_cases import mse

predict = ft.predict


@pytest.fixture(scope="module")
def golden():
  return load_golden("predict")


# ----------------------------------------------------- ODE vs closed form ---


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
  ode = predict.gradient_descent(mse, k_dd, y, learning_rate=lr)
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


# ------------------------------------ gradient_descent(t=None), NT's t=inf ---


def test_ode_infinite_time_matches_closed_form(golden):
  # NT reads t=None as t=inf; for the MSE the limit has a closed form.
  g = golden
  k_dd, k_td = g["ntk_train_train"], g["ntk_test_train"]
  y, f0, f0_test = g["y_train"], g["fx_train_0"], g["fx_test_0"]
  closed = predict.gradient_descent_mse(k_dd, y, learning_rate=0.3)(
      None, f0, f0_test, k_td)
  ode = predict.gradient_descent(mse, k_dd, y, learning_rate=0.3)
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
  state = predict.gradient_descent(mse, k4, y, learning_rate=0.5,
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
    run = predict.gradient_descent(mse, k, y, momentum=1.)
    match = "momentum >= 1"
  else:  # a slow mode out of an explicit solver's reach
    run = predict.gradient_descent(mse, np.diag([1., 1e-9]), y)
    match = "steps"
  with pytest.raises(predict.ConvergenceError, match=match):
    run(None, np.zeros((2, 2)))
