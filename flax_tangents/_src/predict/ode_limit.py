"""The infinite-time (`t=None`) limit of `gradient_descent`'s ODE.

Neural Tangents reads `t=None` as `t=inf` and hands it to the ODE solver,
which may not stop or may stop anywhere. Here the autonomous ODE is advanced
in stages of doubling length, and the state is accepted as the limit only
when both hold:

- the whole state (train and test outputs, momentum variables) moved by at
  most `atol + rtol * max|state|` over the last stage, and
- the elapsed time is at least `SETTLE` time constants of the slowest mode
  the kernel drives, `1 / (lambda_min+ * h)`, where `lambda_min+` is the
  smallest numerically non-zero eigenvalue of the train kernel and `h` the
  loss curvature along its eigenvector (measured at the current state, by
  Hessian-vector products). The guard rejects the classic false positive of
  change-based tests: a slow mode still far from its limit but moving too
  slowly to register. For the MSE, `h` is exact, so after `SETTLE = 40` time
  constants every mode is within `exp(-40)` of its limit.

Otherwise `ConvergenceError` names the cause: no damping (`momentum >= 1`),
divergence (non-finite outputs), a kernel too ill-conditioned for an
explicit solver to reach the limit, or no limit at all (e.g. cross-entropy,
whose outputs grow without bound).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.predict.krylov import ConvergenceError

# e-folds of the slowest mode before a state is accepted as the limit.
SETTLE = 40.
# Stages (doublings of the step) before giving up.
MAX_DOUBLINGS = 40
# Refuse up front when the explicit solver would need about this many steps.
MAX_SOLVER_STEPS = 1e7
# Trace-axis entries probed for the loss curvature of one kernel mode.
MAX_PROBED_CHANNELS = 32

_FIX = ("For the MSE loss use gradient_descent_mse(...)(t=None), which "
        "solves the limit in closed form; otherwise ask for a finite t.")


def curvature_fn(hvp: Callable[[jax.Array, jax.Array], jax.Array],
                 layout: Any) -> Callable[[jax.Array, np.ndarray], np.ndarray]:
  """`curvature(fx, vector)`: loss curvatures along a kernel mode.

  Args:
    hvp: `hvp(fx, u)`, the loss Hessian at `fx` applied to `u`.
    layout: the `OutputLayout` of the train outputs.

  Returns:
    A function of train outputs `fx` and a kernel eigenvector (length: the
    kernel's rows) giving `u^T H u` for `u` the eigenvector in each of the
    first `MAX_PROBED_CHANNELS` trace channels (compiled once).
  """
  n_channels = min(layout.trace_size, MAX_PROBED_CHANNELS)
  eye = np.eye(layout.trace_size)[:n_channels]

  @jax.jit
  def curvature(fx, vector):
    directions = (vector[None, :, None] * eye[:, None, :]).astype(fx.dtype)

    def one(m):
      u = layout.from_matrix(m, (), layout.train_kept_shape)
      return jnp.vdot(u, hvp(fx, u))

    return jax.vmap(one)(directions)

  return lambda fx, vector: np.asarray(curvature(fx, jnp.asarray(vector)))


def mode_rates(evals: np.ndarray, evecs: np.ndarray,
               curvature: Callable[[jax.Array, np.ndarray], np.ndarray],
               fx: jax.Array) -> tuple[float, float]:
  """`(slowest, fastest)` relaxation rates `lambda * h` of the kernel modes.

  Args:
    evals: ascending eigenvalues of the symmetrized train kernel matrix.
    evecs: its eigenvectors (columns).
    curvature: from `curvature_fn`.
    fx: train outputs where the curvature is measured.

  Returns:
    Rates in ODE time (0. when no mode moves).
  """
  top = float(evals[-1]) if evals.size else 0.
  floor = top * evals.size * np.finfo(evals.dtype).eps
  moving = np.nonzero(evals > floor)[0]
  if top <= 0 or not moving.size:
    return 0., 0.
  slow_h = curvature(fx, evecs[:, moving[0]])
  fast_h = curvature(fx, evecs[:, -1])
  positive = slow_h[slow_h > 0]
  slow = float(evals[moving[0]] * positive.min()) if positive.size else 0.
  return slow, float(top * max(fast_h.max(), 0.))


def decay_rate(rate: float, damping: Optional[float]) -> float:
  """Decay rate of a mode `f' = -rate f`, or of `f'' = -rate f - damping f'`."""
  if damping is None:
    return rate
  discriminant = damping**2 - 4 * rate
  if discriminant <= 0:  # under-damped: oscillates inside a decaying envelope
    return damping / 2
  return (damping - math.sqrt(discriminant)) / 2


def _max_abs(tree: Any) -> float:
  leaves = [np.max(np.abs(np.asarray(x))) for x in jax.tree_util.tree_leaves(
      tree) if np.size(x)]
  return float(max(leaves, default=0.))


def _change(old: Any, new: Any) -> float:
  return _max_abs(jax.tree_util.tree_map(lambda a, b: b - a, old, new))


def check_feasible(slow: float, fast: float,
                   damping: Optional[float]) -> None:
  """Raises `ConvergenceError` when the limit is beyond an ODE solver."""
  if damping is not None and damping <= 0:
    raise ConvergenceError(
        "gradient_descent(..., momentum>=1)(t=None): with momentum >= 1 the "
        "continuous-time heavy-ball flow has no friction, so its outputs "
        "oscillate or grow forever and have no t=inf limit. Use momentum < 1 "
        "or a finite t.")
  slow_decay = decay_rate(slow, damping)
  fastest = fast if damping is None else max(damping, math.sqrt(fast))
  if slow_decay > 0 and SETTLE / slow_decay * fastest > MAX_SOLVER_STEPS:
    raise ConvergenceError(
        f"gradient_descent(...)(t=None): the train kernel's modes relax at "
        f"rates from {slow_decay:.3g} to {fastest:.3g} (ratio "
        f"{fastest / slow_decay:.3g}); an explicit ODE solver would need "
        f"about {SETTLE * fastest / slow_decay:.3g} steps to reach the "
        f"t=inf limit. {_FIX} A diag_reg-style ridge on k_train_train "
        "(k + c * I) also shortens the slowest time scale.")


def integrate_to_limit(advance: Callable[[Any, float], Any], state: Any,
                       slow_rate: Callable[[Any], float], fast: float,
                       damping: Optional[float], rtol: float,
                       atol: float) -> Any:
  """Advances an autonomous ODE until its state has converged.

  Args:
    advance: `advance(state, tau)`, the state after ODE time `tau`.
    state: the initial state (a pytree).
    slow_rate: `slow_rate(state)`, the slowest mode's rate at `state`.
    fast: the fastest mode's rate (sets the first stage's length).
    damping: friction of the momentum ODE, or None for plain gradient flow.
    rtol: relative tolerance on the change over one stage.
    atol: absolute tolerance on the change over one stage.

  Returns:
    The converged state.

  Raises:
    ConvergenceError: if the outputs diverge or do not settle within
      `MAX_DOUBLINGS` stages.
  """
  tau = 1. / fast if fast > 0 else 1.
  elapsed, change = 0., math.inf
  for _ in range(MAX_DOUBLINGS):
    new = advance(state, tau)
    if not all(np.all(np.isfinite(np.asarray(x)))
               for x in jax.tree_util.tree_leaves(new)):
      raise ConvergenceError(
          f"gradient_descent(...)(t=None): the outputs became infinite or "
          f"NaN after time {elapsed + tau:.3g}; the flow diverges. {_FIX}")
    change, state, elapsed = _change(state, new), new, elapsed + tau
    slow = decay_rate(slow_rate(state), damping)
    settled = slow <= 0 or elapsed * slow >= SETTLE
    if settled and change <= atol + rtol * _max_abs(state):
      return state
    tau *= 2
  raise ConvergenceError(
      f"gradient_descent(...)(t=None) did not converge: after ODE time "
      f"{elapsed:.3g} the outputs still moved by {change:.3g} over the last "
      f"{tau / 2:.3g}. The loss may have no minimum the flow reaches (e.g. "
      f"cross-entropy on targets it can fit, whose outputs grow like "
      f"log(t)). {_FIX}")
