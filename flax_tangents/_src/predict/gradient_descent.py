"""Outputs of one wide (or linearized) network trained by gradient descent.

`gradient_descent_mse` solves gradient flow on the mean squared error in closed
form; `gradient_descent` integrates the function-space ODE of any loss (with
optional momentum). Both follow Neural Tangents' signatures and conventions:
time is measured in steps, `absolute_time = learning_rate * t`, and the MSE
loss is `||f(x_train) - y_train||^2 / (2 * y_train.size)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Protocol, Union

import flax.struct
import jax
from jax.experimental import ode as jax_ode
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.predict import checks
from flax_tangents._src.predict import iterative
from flax_tangents._src.predict import linalg
from flax_tangents._src.predict import ode_limit
from flax_tangents._src.predict import solvers
from flax_tangents._src.scale.tiled_kernel import TiledKernel

ArrayOrScalar = Union[None, int, float, jax.Array, np.ndarray]
Axes = linalg.Axes


class PredictFn(Protocol):
  """`predict_fn(t, fx_train_0, fx_test_0, k_test_train)`: see the factory."""

  def __call__(
      self,
      t: ArrayOrScalar = None,
      fx_train_0: ArrayOrScalar = 0.,
      fx_test_0: ArrayOrScalar = None,
      k_test_train: Optional[jax.Array] = None,
  ) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
    ...


def _check_inputs(fx_train_0: Any, fx_test_0: Any,
                  k_test_train: Optional[jax.Array]) -> None:
  if fx_train_0 is None and fx_test_0 is None:
    raise ValueError("Both fx_train_0 and fx_test_0 are None: there is "
                     "nothing to predict.")
  if fx_test_0 is not None and k_test_train is None:
    raise ValueError("Predictions on the test set (fx_test_0 is not None) "
                     "need k_test_train.")


def _pick(fx_train_t, fx_test_t, want_train: bool, want_test: bool):
  if want_train and want_test:
    return fx_train_t, fx_test_t
  return fx_train_t if want_train else fx_test_t


def gradient_descent_mse(
    k_train_train: jax.typing.ArrayLike,
    y_train: jax.typing.ArrayLike,
    learning_rate: float = 1.,
    diag_reg: float = 0.,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
    *,
    solver: solvers.SolverArg = "auto",
) -> PredictFn:
  r"""Predicts gradient flow on the mean squared error, in closed form.

  A linearized network (or an infinitely wide one) trained by continuous-time
  gradient descent on `L = ||f(x_train) - y_train||^2 / (2 * y_train.size)`
  evolves in function space as

  .. math::
    f_{train}(t) = y + e^{-\eta t \Theta / n} (f_{train}(0) - y), \quad
    f_{test}(t) = f_{test}(0) + \Theta_{test,train} \Theta^{-1}
      (I - e^{-\eta t \Theta / n}) (y - f_{train}(0)),

  with `n = y_train.size` and `eta = learning_rate`. Finite times use an
  eigendecomposition of the (symmetrized, regularized) kernel; `t=None` uses a
  Cholesky solve. Both are computed once, on first use, and cached.

  Args:
    k_train_train: kernel on the training data, of shape
      `zip(y_train.shape, y_train.shape)` without the `trace_axes`, e.g.
      `(N, N)` for `(N, C)` targets and `trace_axes=(-1,)`.
    y_train: training targets.
    learning_rate: the step size; times `t` are in steps.
    diag_reg: strength of the diagonal regularizer added to `k_train_train`.
    diag_reg_absolute_scale: `True` for `diag_reg` in absolute units, `False`
      for `diag_reg` times the mean diagonal of `k_train_train`.
    trace_axes: axes of the outputs along which the kernel is the identity
      (absent from the kernels); must match how the kernel was computed.
    solver: `'dense'` (factorize the whole kernel on one device),
      `'cg'` or `ft.predict.CG(...)` (Krylov methods on the kernel as an
      operator, never gathered: conjugate gradients for `t=None`, Lanczos
      for finite `t`; `k_train_train` may then be sharded over a mesh or a
      `ft.predict.TiledKernel` on disk), or `'auto'`: `'cg'` for a
      `TiledKernel` or an `(N, N)` kernel with `N > 10000`, else `'dense'`.

  Returns:
    `predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)`
    returning train outputs, test outputs, or both (when both `fx_train_0` and
    `fx_test_0` are given) at times `t` (any shape; leading output axes) or at
    `t=None` (infinite time). `fx_train_0=None` means predictions on the test
    set only, with zero initial train outputs. With an iterative solver,
    `predict_fn.solve_info` maps each solve to its `ft.predict.SolveInfo`
    (iterations, residual, tolerance, preconditioner, time).

  Raises:
    NotPSDError: (from `predict_fn`) if `k_train_train` is not positive
      semi-definite, or a solve with it fails.
    ValueError: for a negative or non-finite `diag_reg` or `learning_rate`,
      and (from `predict_fn`) for negative or non-finite times (infinite
      time is `t=None`).

  Warns:
    IllConditionedWarning: (from `predict_fn`) if `k_train_train` is float32
      and ill-conditioned enough that its rounding can spoil the solution.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> k = jnp.array([[2., 1.], [1., 2.]])
  >>> y = jnp.array([[1.], [-1.]])
  >>> predict_fn = ft.predict.gradient_descent_mse(k, y)
  >>> fx_train, fx_test = predict_fn(t=None, fx_train_0=0., fx_test_0=0.,
  ...                                k_test_train=jnp.array([[1., 0.]]))
  >>> print(jnp.round(fx_test, 3))
  [[1.]]
  >>> predict_fn(t=jnp.array([0., 10.]), fx_train_0=jnp.zeros((2, 1))).shape
  (2, 2, 1)
  """
  checks.check_diag_reg(diag_reg)
  checks.check_learning_rate(learning_rate)
  y_train = jnp.asarray(y_train)
  if not isinstance(k_train_train, (TiledKernel, jax.Array)):
    k_train_train = jnp.asarray(k_train_train)
  layout = linalg.OutputLayout(y_train.shape, trace_axes)
  layout.check_train_kernel(k_train_train, "k_train_train")
  config = solvers.resolve(solver, k_train_train, len(layout.kept_axes))
  if config is not None:
    return iterative.gradient_descent_mse(
        k_train_train, y_train, learning_rate, diag_reg,
        diag_reg_absolute_scale, layout, config)
  normalization = y_train.size

  @functools.lru_cache(1)
  def eigh():
    return linalg.psd_eigh(k_train_train, "k_train_train", diag_reg,
                           diag_reg_absolute_scale)

  @functools.lru_cache(1)
  def cholesky():
    return linalg.psd_cholesky(k_train_train, "k_train_train", diag_reg,
                               diag_reg_absolute_scale)

  def initial(fx_0, kept_shape):
    """Initial outputs, broadcast from scalars."""
    return jnp.broadcast_to(jnp.asarray(fx_0), layout.output_shape(kept_shape))

  @jax.jit
  def compute(t, fx_train_0, fx_test_0, k_test_train, factors):
    # One compiled function per predictor (and input structure): `None`
    # arguments select what is computed.
    want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
    f0 = initial(0. if fx_train_0 is None else fx_train_0,
                 layout.train_kept_shape)
    residual_0 = layout.to_matrix(f0 - y_train)  # (rows, c)
    if want_test:
      test_shape = layout.test_kept_shape(k_test_train)
      k_td = linalg.to_matrix(k_test_train)
      fx_test_0 = initial(fx_test_0, test_shape)
    dtype = linalg.compute_dtype(k_train_train, y_train, f0,
                                 *([k_td, fx_test_0] if want_test else []))
    out_dtype = jnp.result_type(k_train_train, y_train, f0,
                                *([fx_test_0] if want_test else []))

    if t is None:
      fx_train_t = jnp.broadcast_to(y_train, f0.shape).astype(out_dtype)
      fx_test_t = None
      if want_test:
        solved = linalg.cho_solve(factors, -residual_0)
        delta = layout.from_matrix(k_td.astype(dtype) @ solved, (), test_shape)
        fx_test_t = (fx_test_0 + delta).astype(out_dtype)
      return _pick(fx_train_t, fx_test_t, want_train, want_test)

    evals, evecs = factors
    t = jnp.asarray(t, dtype)
    t_shape = t.shape
    times = t.reshape((-1,)) * learning_rate / normalization
    coords = evecs.T @ residual_0.astype(dtype)  # (m, c) in the eigenbasis

    fx_train_t = fx_test_t = None
    if want_train:
      decay = jnp.exp(-times[:, None] * evals[None, :])  # (T, m)
      residual_t = jnp.einsum("ik,tk,kc->tic", evecs, decay, coords)
      fx_train_t = (layout.from_matrix(residual_t, t_shape,
                                       layout.train_kept_shape) +
                    linalg.expand_leading(y_train, len(t_shape))
                   ).astype(out_dtype)
    if want_test:
      # Theta^{-1} (1 - exp(-Theta t)), finite as eigenvalues reach zero.
      gain = linalg.phi1(evals, times)
      projected = k_td.astype(dtype) @ evecs  # (test rows, m)
      delta = -jnp.einsum("lk,tk,kc->tlc", projected, gain, coords)
      fx_test_t = (linalg.expand_leading(fx_test_0, len(t_shape)) +
                   layout.from_matrix(delta, t_shape, test_shape)
                  ).astype(out_dtype)
    return _pick(fx_train_t, fx_test_t, want_train, want_test)

  def predict_fn(
      t: ArrayOrScalar = None,
      fx_train_0: ArrayOrScalar = 0.,
      fx_test_0: ArrayOrScalar = None,
      k_test_train: Optional[jax.typing.ArrayLike] = None,
  ) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
    """Train [and test] outputs at time[s] `t` (see `gradient_descent_mse`)."""
    _check_inputs(fx_train_0, fx_test_0, k_test_train)
    checks.check_times(t)
    if fx_test_0 is not None:
      k_test_train = jnp.asarray(k_test_train)
      layout.test_kept_shape(k_test_train)
    with checks.solve_precision(k_train_train, y_train, t, fx_train_0,
                                fx_test_0, k_test_train):
      factors = cholesky() if t is None else eigh()
      out = compute(t, fx_train_0, fx_test_0, k_test_train, factors)
    out = checks.canonical_dtypes(out)
    linalg.check_solution(out, "k_train_train")
    return out

  return predict_fn


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
  grad_loss = jax.grad(lambda fx: loss(fx, y_train))

  if momentum is None:
    time_unit, friction = learning_rate, None
  else:
    # Heavy-ball momentum in the continuous limit lives on a sqrt(eta) clock.
    time_unit = learning_rate**0.5
    friction = (momentum - 1.) / time_unit

  @functools.lru_cache(1)
  def k_dd_matrix():
    # Checked once; the PSD test costs one eigendecomposition.
    linalg.psd_eigh(k_train_train, "k_train_train", 0., True)
    with jax.ensure_compile_time_eval():
      m = linalg.to_matrix(k_train_train)
      m = m.astype(linalg.compute_dtype(m))
      return (m + m.T) / 2

  def apply_kernel(k_matrix, gradient, kept_shape):
    out = k_matrix @ layout.to_matrix(gradient).astype(k_matrix.dtype)
    return layout.from_matrix(out, (), kept_shape)

  def velocity(state: ODEState, unused_t, k_td) -> ODEState:
    k_dd = k_dd_matrix()
    g = grad_loss(state.fx_train)
    df_train = -apply_kernel(k_dd, g, layout.train_kept_shape)
    df_test = None
    if state.fx_test is not None:
      test_shape = state.fx_test.shape
      test_shape = tuple(test_shape[a] for a in layout.kept_axes)
      df_test = -apply_kernel(k_td, g, test_shape)
    if momentum is None:
      return ODEState(df_train, df_test)
    # (f, q)' = (q, -Theta grad L + friction * q)
    dq_train = df_train + friction * state.qx_train
    dq_test = (None if df_test is None else
               df_test + friction * state.qx_test)
    return ODEState(state.qx_train, state.qx_test, dq_train, dq_test)

  @jax.jit
  def solve(state_0: ODEState, times: jax.Array, k_td) -> ODEState:
    times = times * time_unit
    # The solver starts where the initial state lives and needs strictly
    # increasing times: start at 0, or just before 0 when 0 is requested.
    start = jnp.where(times[0] == 0, -1e-24, 0.).astype(times.dtype)
    times = jnp.concatenate([start[None], times])
    path = jax_ode.odeint(velocity, state_0, times, k_td, rtol=rtol,
                          atol=atol)
    return jax.tree_util.tree_map(lambda x: x[1:], path)

  def initial_state(fx_train_0, fx_test_0, qx_train_0, qx_test_0,
                    k_test_train, want_test):
    """The ODE's initial state and the test-train kernel matrix."""
    dtype = k_dd_matrix().dtype
    fx_train_0 = jnp.broadcast_to(
        jnp.asarray(0. if fx_train_0 is None else fx_train_0, dtype),
        y_train.shape)
    k_td = None
    if want_test:
      k_test_train = jnp.asarray(k_test_train)
      test_shape = layout.test_kept_shape(k_test_train)
      k_td = linalg.to_matrix(k_test_train).astype(dtype)
      fx_test_0 = jnp.broadcast_to(jnp.asarray(fx_test_0, dtype),
                                   layout.output_shape(test_shape))

    def zeros_or(q, like):
      if like is None:
        return None
      return (jnp.zeros_like(like) if q is None else
              jnp.broadcast_to(jnp.asarray(q, dtype), like.shape))

    state_0 = ODEState(fx_train_0, fx_test_0)
    if momentum is not None:
      state_0 = state_0.replace(qx_train=zeros_or(qx_train_0, fx_train_0),
                                qx_test=zeros_or(qx_test_0, fx_test_0))
    return state_0, k_td

  def integrate(t, state_0, k_td):
    t = jnp.asarray(t, k_dd_matrix().dtype)
    t_shape = t.shape
    path = solve(state_0, t.reshape((-1,)), k_td)
    return jax.tree_util.tree_map(
        lambda x: x.reshape(t_shape + x.shape[1:]), path)

  @functools.lru_cache(1)
  def curvature():
    hvp = lambda fx, u: jax.jvp(grad_loss, (fx,), (u,))[1]
    return ode_limit.curvature_fn(hvp, layout)

  def limit(state_0, k_td):
    """The state at t = inf, integrated to convergence (see `ode_limit`)."""
    if not checks.is_concrete(state_0, k_td, k_train_train, y_train):
      raise ValueError(
          "gradient_descent(...)(t=None) integrates until the outputs "
          "converge, which needs concrete inputs: call predict_fn outside "
          "jax.jit, or pass a finite t.")
    damping = None if friction is None else -friction
    evals, evecs = np.linalg.eigh(np.asarray(k_dd_matrix()))
    rates = lambda fx: ode_limit.mode_rates(evals, evecs, curvature(), fx)
    slow, fast = rates(state_0.fx_train)
    ode_limit.check_feasible(slow, fast, damping)
    dtype = k_dd_matrix().dtype

    def advance(state, tau):
      steps = jnp.asarray([tau / time_unit], dtype)
      return jax.tree_util.tree_map(lambda x: x[0], solve(state, steps, k_td))

    return ode_limit.integrate_to_limit(
        advance, state_0, lambda s: rates(s.fx_train)[0], fast, damping,
        rtol, atol)

  def predict_fn(
      t: ArrayOrScalar = None,
      fx_train_or_state_0: Union[ArrayOrScalar, ODEState] = 0.,
      fx_test_0: ArrayOrScalar = None,
      k_test_train: Optional[jax.typing.ArrayLike] = None,
  ) -> Union[jax.Array, tuple[jax.Array, jax.Array], ODEState]:
    """Train [and test] outputs at time[s] `t` (see `gradient_descent`)."""
    given_state = isinstance(fx_train_or_state_0, ODEState)
    if given_state:
      if fx_test_0 is not None:
        raise ValueError("fx_test_0 must be None when passing an ODEState; "
                         "set ODEState.fx_test instead.")
      state = fx_train_or_state_0
      fx_train_0, fx_test_0 = state.fx_train, state.fx_test
      qx_train_0, qx_test_0 = state.qx_train, state.qx_test
    else:
      fx_train_0, qx_train_0, qx_test_0 = fx_train_or_state_0, None, None
    _check_inputs(fx_train_0, fx_test_0, k_test_train)
    if momentum is None and (qx_train_0 is not None or qx_test_0 is not None):
      raise ValueError("The ODEState has momentum variables, but "
                       "momentum is None.")
    want_train, want_test = fx_train_0 is not None, fx_test_0 is not None

    checks.check_times(t)
    with checks.solve_precision(k_train_train, y_train, t, fx_train_0,
                                fx_test_0, qx_train_0, qx_test_0,
                                k_test_train):
      state_0, k_td = initial_state(fx_train_0, fx_test_0, qx_train_0,
                                    qx_test_0, k_test_train, want_test)
      path = (limit(state_0, k_td) if t is None else
              integrate(t, state_0, k_td))
    path = checks.canonical_dtypes(path)
    if given_state:
      return path
    return _pick(path.fx_train, path.fx_test, want_train, want_test)

  return predict_fn


def max_learning_rate(
    ntk_train_train: jax.typing.ArrayLike,
    y_train_size: Optional[int] = None,
    momentum: float = 0.,
    eps: float = 1e-12,
) -> float:
  r"""The largest stable learning rate of (momentum) gradient descent on MSE.

  For the loss `||f - y||^2 / (2 * y_train_size)`, discrete gradient descent
  on the linearized network contracts iff
  `learning_rate < 2 * (1 + momentum) * y_train_size / lambda_max(ntk)`.

  Args:
    ntk_train_train: NTK on the training data (analytic or empirical).
    y_train_size: `y_train.size`; by default the number of rows of the
      flattened kernel (right for `trace_axes=()`).
    momentum: momentum coefficient of the optimizer.
    eps: added to the top eigenvalue to avoid dividing by zero.

  Returns:
    The maximal feasible learning rate, as a float.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> ft.predict.max_learning_rate(jnp.array([[2., 0.], [0., 1.]]))
  2.0
  """
  matrix = linalg.to_matrix(jnp.asarray(ntk_train_train))
  matrix = matrix.astype(linalg.compute_dtype(matrix))
  factor = matrix.shape[0] if y_train_size is None else y_train_size
  top = jnp.linalg.eigvalsh((matrix + matrix.T) / 2)[-1]
  rate = 2 * (1 + momentum) * factor / (top + eps)
  value = linalg.concrete_or_none(rate)
  return rate if value is None else float(value)
