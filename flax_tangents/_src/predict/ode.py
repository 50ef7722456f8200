"""One wide (or linearized) network trained by gradient flow on any loss.

`gradient_descent` integrates the function-space ODE of the outputs (with
optional momentum) with an adaptive Dormand-Prince solver; `t=None` is the
limit `t = inf` (`ode_limit.py`). Conventions follow Neural Tangents: time is
measured in steps, `absolute_time = learning_rate * t`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Protocol, Union

import flax.struct
import jax
from jax.experimental import ode as jax_ode
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.predict import checks
from flax_tangents._src.predict import conventions
from flax_tangents._src.predict import linalg
from flax_tangents._src.predict import ode_limit
from flax_tangents._src.predict.gradient_descent import ArrayOrScalar

Axes = linalg.Axes


@flax.struct.dataclass
class ODEState:
  """State of the function-space ODE of `gradient_descent`.

  Attributes:
    fx_train: outputs on the training set.
    fx_test: outputs on the test set (or `None`).
    qx_train: auxiliary (momentum) variable on the training set.
    qx_test: auxiliary (momentum) variable on the test set.
  """
  fx_train: Optional[jax.Array] = None
  fx_test: Optional[jax.Array] = None
  qx_train: Optional[jax.Array] = None
  qx_test: Optional[jax.Array] = None


class PredictFnODE(Protocol):
  """`predict_fn(t, fx_train_or_state_0, fx_test_0, k_test_train)`."""

  def __call__(
      self,
      t: ArrayOrScalar = None,
      fx_train_or_state_0: Union[ArrayOrScalar, ODEState] = 0.,
      fx_test_0: ArrayOrScalar = None,
      k_test_train: Optional[jax.Array] = None,
  ) -> Union[jax.Array, tuple[jax.Array, jax.Array], ODEState]:
    ...


def gradient_descent(
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    k_train_train: jax.typing.ArrayLike,
    y_train: jax.typing.ArrayLike,
    learning_rate: float = 1.,
    momentum: Optional[float] = None,
    trace_axes: Axes = (-1,),
    *,
    rtol: float = 1.4e-8,
    atol: float = 1.4e-8,
) -> PredictFnODE:
  r"""Predicts (momentum) gradient flow on any loss, by solving an ODE.

  The outputs of a linearized network trained by continuous-time gradient
  descent on `loss(f(x_train), y_train)` follow

  .. math::
    \dot f_{train} = -\eta \, \Theta \, \nabla_f L, \qquad
    \dot f_{test} = -\eta \, \Theta_{test,train} \nabla_f L,

  integrated with an adaptive Dormand-Prince solver
  (`jax.experimental.ode.odeint`). With `momentum`, the heavy-ball ODE
  `f'' = -Theta grad L + (momentum - 1) / sqrt(eta) f'` is solved in units of
  `sqrt(eta)` time, as in Neural Tangents; then `learning_rate` and `t` are no
  longer interchangeable.

  Args:
    loss: `loss(fx_train, y_train) -> scalar`; it should treat the batch and
      output axes symmetrically (e.g. a mean over both).
    k_train_train: NTK on the training data, of shape
      `zip(y_train.shape, y_train.shape)` without the `trace_axes`.
    y_train: training targets.
    learning_rate: the step size; times `t` are in steps.
    momentum: momentum coefficient, or `None` for plain gradient descent.
    trace_axes: axes of the outputs along which the kernel is the identity.
    rtol: relative tolerance of the ODE solver (and of the convergence test
      for `t=None`).
    atol: absolute tolerance of the ODE solver (and of the convergence test
      for `t=None`).

  Returns:
    `predict_fn(t=None, fx_train_or_state_0=0., fx_test_0=None,
    k_test_train=None)`: train [and test] outputs at times `t` (strictly
    increasing, any shape; leading output axes). Given an `ODEState` instead
    of train outputs (with `fx_test_0=None`), it returns the `ODEState` at `t`,
    momentum variables included. `t=None` is `t = inf`, as in Neural
    Tangents: the ODE is integrated in doubling stages until the state moves
    by less than `atol + rtol * max|state|` over a stage and the slowest
    kernel mode has relaxed for 40 time constants; the converged state is
    returned (no leading time axis). It needs concrete (non-traced) inputs.

  Raises:
    NotPSDError: (from `predict_fn`) if `k_train_train` is not positive
      semi-definite.
    ConvergenceError: (from `predict_fn(t=None)`) if the flow has no limit it
      reaches (e.g. cross-entropy, whose outputs grow like `log(t)`;
      `momentum >= 1`; divergence), or the kernel is so ill-conditioned that
      an explicit solver cannot reach it; never an unconverged value.
    ValueError: (from `predict_fn`) for negative or non-finite times or
      `learning_rate` (infinite time is `t=None`), and for `t=None` under
      `jax.jit`.

  >>> import jax, jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> k = jnp.array([[2., 1.], [1., 2.]])
  >>> y = jnp.array([[1., 0.], [0., 1.]])
  >>> xent = lambda fx, y: -jnp.mean(jax.nn.log_softmax(fx) * y)
  >>> predict_fn = ft.predict.gradient_descent(xent, k, y, learning_rate=1.)
  >>> fx = predict_fn(jnp.array([1., 100.]), jnp.zeros((2, 2)))
  >>> fx.shape, bool(fx[1, 0, 0] > fx[0, 0, 0] > 0)
  ((2, 2, 2), True)
  >>> mse = lambda fx, y: 0.5 * jnp.mean((fx - y)**2)
  >>> fx_inf = ft.predict.gradient_descent(mse, k, y)(None, jnp.zeros((2, 2)))
  >>> print(jnp.round(fx_inf, 6))  # at t = inf the MSE flow fits y_train
  [[1. 0.]
   [0. 1.]]
  """
  checks.check_learning_rate(learning_rate)
  y_train = jnp.asarray(y_train)
  k_train_train = jnp.asarray(k_train_train)
  layout = linalg.OutputLayout(y_train.shape, trace_axes)
  layout.check_train_kernel(k_train_train, "k_train_train")
  flow = _Flow(loss, k_train_train, y_train, layout, learning_rate, momentum,
               rtol, atol)

  def predict_fn(
      t: ArrayOrScalar = None,
      fx_train_or_state_0: Union[ArrayOrScalar, ODEState] = 0.,
      fx_test_0: ArrayOrScalar = None,
      k_test_train: Optional[jax.typing.ArrayLike] = None,
  ) -> Union[jax.Array, tuple[jax.Array, jax.Array], ODEState]:
    """Train [and test] outputs at time[s] `t` (see `gradient_descent`)."""
    fx_train_0, fx_test_0, qx_train_0, qx_test_0 = _initial_values(
        fx_train_or_state_0, fx_test_0, k_test_train, momentum)
    want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
    checks.check_times(t)
    with checks.solve_precision(k_train_train, y_train, t, fx_train_0,
                                fx_test_0, qx_train_0, qx_test_0,
                                k_test_train):
      state_0, k_td = flow.initial_state(fx_train_0, fx_test_0, qx_train_0,
                                         qx_test_0, k_test_train, want_test)
      path = (flow.limit(state_0, k_td) if t is None else
              flow.integrate(t, state_0, k_td))
    path = checks.canonical_dtypes(path)
    if isinstance(fx_train_or_state_0, ODEState):
      return path
    return conventions.pick(path.fx_train, path.fx_test, want_train,
                            want_test)

  return predict_fn


def _initial_values(fx_train_or_state_0: Any, fx_test_0: Any,
                    k_test_train: Any, momentum: Optional[float]) -> tuple:
  """`(fx_train_0, fx_test_0, qx_train_0, qx_test_0)` of `predict_fn`'s call.

  Raises:
    ValueError: for `fx_test_0` beside an `ODEState`, for nothing to
      predict, for test outputs without `k_test_train`, and for momentum
      variables without `momentum`.
  """
  if isinstance(fx_train_or_state_0, ODEState):
    if fx_test_0 is not None:
      raise ValueError("fx_test_0 must be None when passing an ODEState; "
                       "set ODEState.fx_test instead.")
    state = fx_train_or_state_0
    fx_train_0, fx_test_0 = state.fx_train, state.fx_test
    qx_train_0, qx_test_0 = state.qx_train, state.qx_test
  else:
    fx_train_0, qx_train_0, qx_test_0 = fx_train_or_state_0, None, None
  checks.check_predict_inputs(fx_train_0, fx_test_0, k_test_train)
  if momentum is None and (qx_train_0 is not None or qx_test_0 is not None):
    raise ValueError("The ODEState has momentum variables, but "
                     "momentum is None.")
  return fx_train_0, fx_test_0, qx_train_0, qx_test_0


class _Flow:
  """The function-space ODE of one `gradient_descent` predictor.

  Args:
    loss: `loss(fx_train, y_train) -> scalar`.
    k_train_train: the train kernel, checked against `layout`.
    y_train: training targets.
    layout: the outputs' layout.
    learning_rate: the step size.
    momentum: momentum coefficient, or None.
    rtol: relative tolerance of the ODE solver.
    atol: absolute tolerance of the ODE solver.
  """

  def __init__(self, loss: Callable[[jax.Array, jax.Array], jax.Array],
               k_train_train: jax.Array, y_train: jax.Array,
               layout: linalg.OutputLayout, learning_rate: float,
               momentum: Optional[float], rtol: float, atol: float):
    self.k_train_train, self.y_train, self.layout = (k_train_train, y_train,
                                                     layout)
    self.momentum, self.rtol, self.atol = momentum, rtol, atol
    self.grad_loss = jax.grad(lambda fx: loss(fx, y_train))
    self.friction: Optional[float] = None
    if momentum is None:
      self.time_unit = learning_rate
    else:
      # Heavy-ball momentum in the continuous limit lives on a sqrt(eta)
      # clock.
      self.time_unit = learning_rate**0.5
      self.friction = (momentum - 1.) / self.time_unit
    self.solve = jax.jit(self._solve)

  @functools.cached_property
  def k_dd(self) -> jax.Array:
    """The symmetrized train kernel matrix, PSD-checked on first use."""
    # Checked once; the PSD test costs one eigendecomposition.
    linalg.psd_eigh(self.k_train_train, "k_train_train", 0., True)
    with jax.ensure_compile_time_eval():
      m = linalg.to_matrix(self.k_train_train)
      m = m.astype(linalg.compute_dtype(m))
      return (m + m.T) / 2

  def _apply_kernel(self, k_matrix, gradient, kept_shape):
    out = k_matrix @ self.layout.to_matrix(gradient).astype(k_matrix.dtype)
    return self.layout.from_matrix(out, (), kept_shape)

  def velocity(self, state: ODEState, unused_t, k_td) -> ODEState:
    """The time derivative of `state`."""
    k_dd = self.k_dd
    g = self.grad_loss(state.fx_train)
    df_train = -self._apply_kernel(k_dd, g, self.layout.train_kept_shape)
    df_test = None
    if state.fx_test is not None:
      test_shape = state.fx_test.shape
      test_shape = tuple(test_shape[a] for a in self.layout.kept_axes)
      df_test = -self._apply_kernel(k_td, g, test_shape)
    friction = self.friction
    if friction is None:
      return ODEState(df_train, df_test)
    # (f, q)' = (q, -Theta grad L + friction * q)
    assert state.qx_train is not None  # Momentum states carry q.
    dq_train = df_train + friction * state.qx_train
    dq_test = None
    if df_test is not None:
      assert state.qx_test is not None
      dq_test = df_test + friction * state.qx_test
    return ODEState(state.qx_train, state.qx_test, dq_train, dq_test)

  def _solve(self, state_0: ODEState, times: jax.Array, k_td) -> ODEState:
    times = times * self.time_unit
    # The solver starts where the initial state lives and needs strictly
    # increasing times: start at 0, or just before 0 when 0 is requested.
    start = jnp.where(times[0] == 0, -1e-24, 0.).astype(times.dtype)
    times = jnp.concatenate([start[None], times])
    path = jax_ode.odeint(self.velocity, state_0, times, k_td,
                          rtol=self.rtol, atol=self.atol)
    return jax.tree_util.tree_map(lambda x: x[1:], path)

  def initial_state(self, fx_train_0, fx_test_0, qx_train_0, qx_test_0,
                    k_test_train, want_test):
    """The ODE's initial state and the test-train kernel matrix."""
    dtype = self.k_dd.dtype
    fx_train_0 = jnp.broadcast_to(
        jnp.asarray(0. if fx_train_0 is None else fx_train_0, dtype),
        self.y_train.shape)
    k_td = None
    if want_test:
      k_test_train = jnp.asarray(k_test_train)
      test_shape = self.layout.test_kept_shape(k_test_train)
      k_td = linalg.to_matrix(k_test_train).astype(dtype)
      fx_test_0 = jnp.broadcast_to(jnp.asarray(fx_test_0, dtype),
                                   self.layout.output_shape(test_shape))
    state_0 = ODEState(fx_train_0, fx_test_0)
    if self.momentum is not None:
      state_0 = dataclasses.replace(
          state_0, qx_train=_zeros_or(qx_train_0, fx_train_0, dtype),
          qx_test=_zeros_or(qx_test_0, fx_test_0, dtype))
    return state_0, k_td

  def integrate(self, t, state_0: ODEState, k_td) -> ODEState:
    """The states at times `t` (any shape: leading axes)."""
    t = jnp.asarray(t, self.k_dd.dtype)
    t_shape = t.shape
    path = self.solve(state_0, t.reshape((-1,)), k_td)
    return jax.tree_util.tree_map(
        lambda x: x.reshape(t_shape + x.shape[1:]), path)

  @functools.cached_property
  def curvature(self):
    """The loss's curvature along the outputs (see `ode_limit`)."""
    hvp = lambda fx, u: jax.jvp(self.grad_loss, (fx,), (u,))[1]
    return ode_limit.curvature_fn(hvp, self.layout)

  def limit(self, state_0: ODEState, k_td) -> ODEState:
    """The state at t = inf, integrated to convergence (see `ode_limit`)."""
    if not checks.is_concrete(state_0, k_td, self.k_train_train,
                              self.y_train):
      raise ValueError(
          "gradient_descent(...)(t=None) integrates until the outputs "
          "converge, which needs concrete inputs: call predict_fn outside "
          "jax.jit, or pass a finite t.")
    damping = None if self.friction is None else -self.friction
    evals, evecs = np.linalg.eigh(np.asarray(self.k_dd))
    rates = lambda fx: ode_limit.mode_rates(evals, evecs, self.curvature, fx)
    slow, fast = rates(state_0.fx_train)
    ode_limit.check_feasible(slow, fast, damping)
    dtype = self.k_dd.dtype

    def advance(state, tau):
      steps = jnp.asarray([tau / self.time_unit], dtype)
      return jax.tree_util.tree_map(lambda x: x[0],
                                    self.solve(state, steps, k_td))

    return ode_limit.integrate_to_limit(
        advance, state_0, lambda s: rates(s.fx_train)[0], fast, damping,
        self.rtol, self.atol)


def _zeros_or(q: Any, like: Optional[jax.Array], dtype: Any) -> Any:
  """`q` broadcast like `like`, zeros for None; None without `like`."""
  if like is None:
    return None
  return (jnp.zeros_like(like) if q is None else
          jnp.broadcast_to(jnp.asarray(q, dtype), like.shape))
