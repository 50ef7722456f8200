"""One wide (or linearized) network trained by gradient flow on the MSE.

`gradient_descent_mse` solves gradient flow on the mean squared error in
closed form (an eigendecomposition for finite times, a Cholesky solve for
`t=None`, or the iterative solvers of `iterative.py`); `max_learning_rate` is
the largest stable step of discrete gradient descent on it. The ODE for any
loss is in `ode.py`. Both follow Neural Tangents' signatures and conventions:
time is measured in steps, `absolute_time = learning_rate * t`, and the MSE
loss is `||f(x_train) - y_train||^2 / (2 * y_train.size)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Protocol, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.predict import checks
from flax_tangents._src.predict import conventions
from flax_tangents._src.predict import iterative
from flax_tangents._src.predict import linalg
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
  cholesky, eigh = _factorizations(k_train_train, diag_reg,
                                   diag_reg_absolute_scale)

  @jax.jit
  def compute(t, fx_train_0, fx_test_0, k_test_train, factors):
    # One compiled function per predictor (and input structure): `None`
    # arguments select what is computed.
    start = _Start.of(layout, k_train_train, y_train, fx_train_0, fx_test_0,
                      k_test_train)
    if t is None:
      return _at_infinity(start, layout, y_train, factors)
    return _at_times(start, layout, y_train, factors, t, learning_rate)

  def predict_fn(
      t: ArrayOrScalar = None,
      fx_train_0: ArrayOrScalar = 0.,
      fx_test_0: ArrayOrScalar = None,
      k_test_train: Optional[jax.typing.ArrayLike] = None,
  ) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
    """Train [and test] outputs at time[s] `t` (see `gradient_descent_mse`)."""
    checks.check_predict_inputs(fx_train_0, fx_test_0, k_test_train)
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


def _factorizations(k_train_train: jax.Array, diag_reg: float,
                    diag_reg_absolute_scale: bool
                    ) -> tuple[Callable[[], Any], Callable[[], Any]]:
  """`(cholesky, eigh)` of the regularized kernel, each made on first use."""

  @functools.lru_cache(1)
  def eigh():
    return linalg.psd_eigh(k_train_train, "k_train_train", diag_reg,
                           diag_reg_absolute_scale)

  @functools.lru_cache(1)
  def cholesky():
    return linalg.psd_cholesky(k_train_train, "k_train_train", diag_reg,
                               diag_reg_absolute_scale)

  return cholesky, eigh


class _Start(NamedTuple):
  """The initial condition of the MSE flow, as matrices (traced in `jit`).

  Attributes:
    want_train: whether train outputs are asked for.
    want_test: whether test outputs are asked for.
    f0: train outputs at `t=0` (zeros when not asked for).
    residual_0: `f0 - y_train` as a `(rows, c)` matrix.
    k_td: the test-train kernel as a matrix (None without test outputs).
    fx_test_0: test outputs at `t=0`, broadcast (None without them).
    test_shape: the test kernel's kept shape (None without test outputs).
    dtype: the dtype of the computation.
    out_dtype: the dtype of the outputs.
  """
  want_train: bool
  want_test: bool
  f0: jax.Array
  residual_0: jax.Array
  k_td: Any
  fx_test_0: Any
  test_shape: Any
  dtype: Any
  out_dtype: Any

  @classmethod
  def of(cls, layout: linalg.OutputLayout, k_train_train: Any,
         y_train: jax.Array, fx_train_0: Any, fx_test_0: Any,
         k_test_train: Any) -> "_Start":
    """The initial condition of `predict_fn`'s arguments."""

    def initial(fx_0, kept_shape):
      """Initial outputs, broadcast from scalars."""
      return jnp.broadcast_to(jnp.asarray(fx_0),
                              layout.output_shape(kept_shape))

    want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
    f0 = initial(0. if fx_train_0 is None else fx_train_0,
                 layout.train_kept_shape)
    residual_0 = layout.to_matrix(f0 - y_train)  # (rows, c)
    k_td = test_shape = None
    if want_test:
      test_shape = layout.test_kept_shape(k_test_train)
      k_td = linalg.to_matrix(k_test_train)
      fx_test_0 = initial(fx_test_0, test_shape)
    dtype = linalg.compute_dtype(k_train_train, y_train, f0,
                                 *([k_td, fx_test_0] if want_test else []))
    out_dtype = jnp.result_type(k_train_train, y_train, f0,
                                *([fx_test_0] if want_test else []))
    return cls(want_train, want_test, f0, residual_0, k_td, fx_test_0,
               test_shape, dtype, out_dtype)


def _at_infinity(start: _Start, layout: linalg.OutputLayout,
                 y_train: jax.Array, factors: Any) -> Any:
  """Outputs at `t = inf`: `y_train`, and a Cholesky solve for the test set."""
  fx_train_t = jnp.broadcast_to(y_train, start.f0.shape).astype(
      start.out_dtype)
  fx_test_t = None
  if start.want_test:
    solved = linalg.cho_solve(factors, -start.residual_0)
    delta = layout.from_matrix(start.k_td.astype(start.dtype) @ solved, (),
                               start.test_shape)
    fx_test_t = (start.fx_test_0 + delta).astype(start.out_dtype)
  return conventions.pick(fx_train_t, fx_test_t, start.want_train,
                          start.want_test)


def _at_times(start: _Start, layout: linalg.OutputLayout, y_train: jax.Array,
              factors: Any, t: Any, learning_rate: float) -> Any:
  """Outputs at finite times `t`, in the kernel's eigenbasis."""
  evals, evecs = factors
  t = jnp.asarray(t, start.dtype)
  t_shape = t.shape
  times = t.reshape((-1,)) * learning_rate / y_train.size
  coords = evecs.T @ start.residual_0.astype(start.dtype)  # (m, c)

  fx_train_t = fx_test_t = None
  if start.want_train:
    decay = jnp.exp(-times[:, None] * evals[None, :])  # (T, m)
    residual_t = jnp.einsum("ik,tk,kc->tic", evecs, decay, coords)
    fx_train_t = (layout.from_matrix(residual_t, t_shape,
                                     layout.train_kept_shape) +
                  linalg.expand_leading(y_train, len(t_shape))
                 ).astype(start.out_dtype)
  if start.want_test:
    # Theta^{-1} (1 - exp(-Theta t)), finite as eigenvalues reach zero.
    gain = linalg.phi1(evals, times)
    projected = start.k_td.astype(start.dtype) @ evecs  # (test rows, m)
    delta = -jnp.einsum("lk,tk,kc->tlc", projected, gain, coords)
    fx_test_t = (linalg.expand_leading(start.fx_test_0, len(t_shape)) +
                 layout.from_matrix(delta, t_shape, start.test_shape)
                ).astype(start.out_dtype)
  return conventions.pick(fx_train_t, fx_test_t, start.want_train,
                          start.want_test)


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
