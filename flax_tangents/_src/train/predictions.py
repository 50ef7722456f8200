"""NTK predictions of `ft.train.fit`'s curves, with `ft.predict`.

From the outputs at initialization, the empirical NTK at the initial
parameters and (for models with an infinite-width limit) the analytic NTK
predict the outputs at the recorded steps, `t = step * learning_rate`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.interceptor import kernel_fn as ft_kernel_fn
from flax_tangents._src.empirical.api import empirical_ntk_fn
from flax_tangents._src.predict import gradient_descent as gd
from flax_tangents._src.predict import ode
from flax_tangents._src.train import results
from flax_tangents._src.typing import PyTree

__all__ = ["AUTO", "analytic_curves", "empirical_curves", "predicted_curves"]

# `kernel_fn=AUTO`: `ft.kernel_fn` of the module behind `apply_fn`, if any.
AUTO = "auto"


def empirical_curves(f: Callable[..., Any], params_0: PyTree,
                     ntk_trace_axes: Sequence[int], x_train: jax.Array,
                     x_test: Optional[jax.Array],
                     **predict_kwargs: Any) -> results.Curves:
  """Curves predicted with the empirical NTK of `f` at `params_0`.

  Args:
    f: `f(params, x) -> (N, O)`.
    params_0: the initial parameters.
    ntk_trace_axes: `()` or `(-1,)` (see `ft.train.fit`).
    x_train: training inputs.
    x_test: test inputs, or None.
    **predict_kwargs: the keyword arguments of `predicted_curves`.

  Returns:
    The predicted `Curves`.

  Raises:
    ValueError: for other `ntk_trace_axes`.
  """
  trace = tuple(ntk_trace_axes)
  if trace not in ((), (-1,), (1,)):
    raise ValueError("ntk_trace_axes must be () or (-1,); got "
                     f"{ntk_trace_axes}.")
  # Examples are independent at initialization (inference mode), so
  # Jacobians are taken example by example.
  ntk_fn = empirical_ntk_fn(f, trace_axes=trace, vmap_axes=0)
  k_dd = ntk_fn(x_train, None, params_0)
  k_td = None if x_test is None else ntk_fn(x_test, x_train, params_0)
  return predicted_curves(k_dd, k_td, trace_axes=trace or (),
                          **predict_kwargs)


def analytic_curves(kernel_fn: Any, apply_fn: Callable[..., Any],
                    x_train: jax.Array, x_test: Optional[jax.Array],
                    **predict_kwargs: Any) -> Optional[results.Curves]:
  """Curves predicted with the infinite-width NTK, or None without one.

  Args:
    kernel_fn: an analytic kernel function, `AUTO` (that of the module
      behind `apply_fn`, when it has kernel rules) or None (no prediction).
    apply_fn: the network's apply function.
    x_train: training inputs.
    x_test: test inputs, or None.
    **predict_kwargs: the keyword arguments of `predicted_curves`.

  Returns:
    The predicted `Curves`, or None.
  """
  analytic = None
  if kernel_fn == AUTO:
    auto_fn = _analytic_kernel_fn(apply_fn)
    if auto_fn is not None:
      try:
        analytic = _analytic_ntk(auto_fn, x_train, x_test)
      except KernelRuleError:
        pass  # Some layer has no infinite-width rule: no analytic limit.
  elif kernel_fn is not None:
    analytic = _analytic_ntk(kernel_fn, x_train, x_test)
  if analytic is None:
    return None
  return predicted_curves(*analytic, trace_axes=(-1,), **predict_kwargs)


def _analytic_kernel_fn(apply_fn: Callable[..., Any]) -> Optional[Callable]:
  """`ft.kernel_fn` of the module behind `model.apply`, if it has one."""
  module = getattr(apply_fn, "__self__", None)
  if module is None:
    return None
  try:
    return ft_kernel_fn(module)
  except Exception:  # pylint: disable=broad-except
    # Not built from layers with kernel rules: no infinite-width limit.
    return None


def _analytic_ntk(kernel_fn, x_train, x_test):
  """Train-train and test-train NTKs, compiled when `kernel_fn` allows."""

  def kernels(x_tr, x_te):
    k_dd = kernel_fn(x_tr, None, "ntk")
    return k_dd, (None if x_te is None else kernel_fn(x_te, x_tr, "ntk"))

  try:
    return jax.jit(kernels)(x_train, x_test)
  except (jax.errors.ConcretizationTypeError, TypeError):
    # A kernel function that needs concrete inputs runs eagerly.
    return kernels(x_train, x_test)


def predicted_curves(k_dd, k_td, *, trace_axes, loss, loss_fn, y_train,
                     y_test, steps, learning_rate, momentum, fx_train_0,
                     fx_test_0) -> results.Curves:
  """Curves of the NTK prediction at the recorded steps.

  Args:
    k_dd: the train-train NTK.
    k_td: the test-train NTK (None without a test set).
    trace_axes: the kernels' trace axes.
    loss: the `loss` argument of `fit` (`'mse'` has a closed form).
    loss_fn: the loss function.
    y_train: training targets.
    y_test: test targets, or None.
    steps: the recorded steps.
    learning_rate: the SGD learning rate.
    momentum: the SGD momentum, or None.
    fx_train_0: the network's train outputs at initialization.
    fx_test_0: its test outputs at initialization, or None.

  Returns:
    The predicted `Curves`.
  """
  if loss == "mse" and momentum is None:
    predict_fn = gd.gradient_descent_mse(
        k_dd, y_train, learning_rate=learning_rate, trace_axes=trace_axes)
  else:
    predict_fn = ode.gradient_descent(
        loss_fn, k_dd, y_train, learning_rate=learning_rate,
        momentum=momentum, trace_axes=trace_axes)
  t = jnp.asarray(steps, fx_train_0.dtype)
  if fx_test_0 is None:
    fx_train = predict_fn(t, fx_train_0)
    fx_test = None
  else:
    out = predict_fn(t, fx_train_0, fx_test_0, k_td)
    assert isinstance(out, tuple)  # Train and test outputs were asked for.
    fx_train, fx_test = out
  return results.Curves.from_outputs(loss_fn, fx_train, y_train, fx_test,
                                     y_test)
