"""Argument checks and the precision policy of `ft.predict`.

- `check_diag_reg`, `check_times`, `check_learning_rate`: refuse arguments
  that would give a plausible wrong number (a negative regularizer can make a
  PSD kernel indefinite; a negative time runs gradient flow backwards, where
  it diverges; `t=inf` is spelled `t=None`).
- `solve_precision`: factorizations and solves run in float64 for concrete
  inputs even when JAX's x64 mode is off (as NumPy's `linalg` does for
  float32 arrays), so a float32 kernel is solved as accurately as its values
  allow; outputs keep the inputs' dtype.
- `warn_if_ill_conditioned`: a kernel held in float32 (or lower) carries
  rounding errors of relative size `eps` in every entry; with condition
  number `kappa` the solution can move by up to `kappa * eps` relative. When
  that is large the caller is warned, with the fix.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional
import warnings

import jax
from jax import core
import jax.numpy as jnp
import numpy as np

__all__ = [
    "IllConditionedWarning",
    "check_diag_reg",
    "check_predict_inputs",
    "check_learning_rate",
    "check_times",
    "canonical_dtypes",
    "is_concrete",
    "is_low_precision",
    "solve_precision",
    "warn_if_ill_conditioned",
]

# Warn when kappa * eps (the relative change of the solution that the
# kernel's rounding can cause) reaches this.
ILL_CONDITIONED_THRESHOLD = 0.1
# A suggested `diag_reg` brings kappa * eps down to this.
_TARGET_KAPPA_EPS = 1e-3


class IllConditionedWarning(UserWarning):
  """A low-precision kernel is too ill-conditioned for a reliable solve.

  The message names the condition number, the error it can cause, and the
  fixes: compute the kernel in float64, or raise `diag_reg`.
  """


def _scalar(value: Any, name: str) -> Optional[float]:
  """`value` as a float, or None when it is traced."""
  if isinstance(value, core.Tracer):
    return None
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"{name} must be a scalar; got shape {array.shape}.")
  return float(array.reshape(()))


def check_diag_reg(diag_reg: Any) -> None:
  """Raises for a negative or non-finite diagonal regularizer."""
  value = _scalar(diag_reg, "diag_reg")
  if value is None:
    return
  if not math.isfinite(value) or value < 0:
    raise ValueError(
        f"diag_reg must be a finite number >= 0, got {value!r}: it is added "
        "to the kernel's diagonal, and a negative value can turn a positive "
        "semi-definite kernel indefinite (then predictions diverge). Pass "
        "diag_reg=0 for none.")


def check_learning_rate(learning_rate: Any) -> None:
  """Raises for a negative or non-finite learning rate."""
  value = _scalar(learning_rate, "learning_rate")
  if value is None:
    return
  if not math.isfinite(value) or value < 0:
    raise ValueError(
        f"learning_rate must be a finite number >= 0, got {value!r}: gradient "
        "flow with a negative step runs backwards and diverges.")


def check_times(t: Any) -> None:
  """Raises for negative or non-finite (concrete) training times.

  Args:
    t: times in steps (any shape), or None (infinite time: not checked).

  Raises:
    ValueError: naming the offending value and the fix.
  """
  if t is None or isinstance(t, core.Tracer):
    return
  times = np.asarray(t)
  if not np.issubdtype(times.dtype, np.number) or np.iscomplexobj(times):
    raise ValueError(f"t must hold real numbers (training times in steps); "
                     f"got dtype {times.dtype}.")
  if np.any(np.isnan(times)):
    raise ValueError("t holds NaN; training times must be finite numbers "
                     ">= 0 (or t=None for infinite time).")
  if np.any(np.isinf(times)):
    raise ValueError("t holds an infinite value; pass t=None for the "
                     "infinite-time limit (it is solved in closed form), "
                     "and finite times >= 0 otherwise.")
  if np.any(times < 0):
    raise ValueError(
        f"t must be >= 0 (training times in steps); got {times.min()!r}. "
        "Gradient flow backwards in time diverges along the kernel's small "
        "eigenvalues, so negative times have no meaningful prediction.")


def check_predict_inputs(fx_train_0: Any, fx_test_0: Any,
                         k_test_train: Any) -> None:
  """Raises unless a predictor's call asks for something it can compute.

  Args:
    fx_train_0: initial train outputs, or None (test set only).
    fx_test_0: initial test outputs, or None (train set only).
    k_test_train: the test-train kernel (needed for test outputs).

  Raises:
    ValueError: if both outputs are None, or test outputs lack a kernel.

  >>> check_predict_inputs(0., None, None)
  >>> check_predict_inputs(None, None, None)
  Traceback (most recent call last):
  ...
  ValueError: Both fx_train_0 and fx_test_0 are None: there is nothing ...
  """
  if fx_train_0 is None and fx_test_0 is None:
    raise ValueError("Both fx_train_0 and fx_test_0 are None: there is "
                     "nothing to predict.")
  if fx_test_0 is not None and k_test_train is None:
    raise ValueError("Predictions on the test set (fx_test_0 is not None) "
                     "need k_test_train.")


def is_concrete(*trees: Any) -> bool:
  """Whether no leaf of `trees` is being traced (e.g. under `jax.jit`)."""
  return not any(isinstance(leaf, core.Tracer)
                 for leaf in jax.tree.leaves(trees))


def solve_precision(*trees: Any) -> contextlib.AbstractContextManager:
  """A context in which factorizations and solves run in float64.

  Enters `jax.enable_x64(True)` when x64 is off and every input is concrete
  (inside a user's `jit` the inputs are traced and the computation stays in
  their precision). Code run in it must cast its outputs back to the inputs'
  dtype.
  """
  if jax.config.read("jax_enable_x64") or not is_concrete(*trees):
    return contextlib.nullcontext()
  return jax.enable_x64(True)


def canonical_dtypes(tree: Any) -> Any:
  """`tree`'s arrays in the dtypes JAX's current mode allows.

  Called after leaving `solve_precision`: with x64 off, a float64 result
  becomes float32, as any other JAX computation would return it.
  """
  def cast(leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    dtype = jax.dtypes.canonicalize_dtype(leaf.dtype)
    return leaf if dtype == leaf.dtype else leaf.astype(dtype)
  return jax.tree.map(cast, tree)


def is_low_precision(dtype: Any) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating)
              and jnp.finfo(dtype).eps > np.finfo(np.float64).eps)


def _suggest_diag_reg(top: float, mean_diag: float, eps: float,
                      absolute: bool) -> str:
  """A rounded-up `diag_reg` that brings kappa * eps to the target."""
  shift = top * eps / _TARGET_KAPPA_EPS
  unit = "in absolute units"
  if not absolute:
    shift /= max(mean_diag, np.finfo(np.float64).tiny)
    unit = "relative to its mean diagonal"
  exponent = math.floor(math.log10(shift))
  mantissa = math.ceil(shift / 10**exponent - 1e-9)
  return f"diag_reg={mantissa}e{exponent:+03d} ({unit})"


def warn_if_ill_conditioned(name: str, kernel_dtype: Any, evals_low: float,
                            evals_high: float, mean_diag: float,
                            diag_reg: float, absolute: bool,
                            stacklevel: int = 4) -> None:
  """Warns when a low-precision kernel's rounding can spoil its solve.

  Args:
    name: how the message names the kernel.
    kernel_dtype: the dtype the kernel was given in (its precision).
    evals_low: the smallest eigenvalue of the regularized kernel (or an
      estimate).
    evals_high: its largest eigenvalue (or an estimate).
    mean_diag: the mean diagonal of the unregularized kernel.
    diag_reg: the regularizer used.
    absolute: whether `diag_reg` is absolute.
    stacklevel: passed to `warnings.warn`.
  """
  if not is_low_precision(kernel_dtype) or evals_high <= 0:
    return
  eps = float(jnp.finfo(kernel_dtype).eps)
  kappa = evals_high / max(evals_low, evals_high * np.finfo(np.float64).eps)
  if kappa * eps < ILL_CONDITIONED_THRESHOLD:
    return
  dtype_name = jnp.dtype(kernel_dtype).name
  fix = _suggest_diag_reg(evals_high, mean_diag, eps, absolute)
  warnings.warn(
      f"{name} is {dtype_name} with condition number {kappa:.3g} (with "
      f"diag_reg={diag_reg}): the rounding of its {dtype_name} entries "
      f"(relative {eps:.2g}) can change the solution by up to "
      f"{_percent(kappa * eps)} (condition number x eps), so the prediction "
      f"may be wrong. Compute the kernel in float64 (call "
      f"jax.config.update('jax_enable_x64', True) before computing it, with "
      f"float64 inputs), or regularize: {fix} brings the bound to about "
      f"{_percent(_TARGET_KAPPA_EPS)}.", IllConditionedWarning,
      stacklevel=stacklevel)


def _percent(fraction: float) -> str:
  if fraction < 10:
    return f"{100 * fraction:.3g}%"
  return f"{fraction:.3g} times its size"
