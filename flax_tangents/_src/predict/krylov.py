"""Krylov methods on kernel operators: conjugate gradients and Lanczos.

- `conjugate_gradients` solves `(K + mu I) X = B` for a block of right-hand
  sides (each column its own step sizes), preconditioned. It stops when
  every column's relative residual `||b - (K + mu I) x|| / ||b||` is at most
  `tol`, recomputed from scratch at the end (the updated residual drifts in
  finite precision; CG restarts from the true one when it has). A direction
  of non-positive curvature means the kernel is not positive definite.
- `lanczos_functions` computes `f(K + mu I) V` for several scalar functions
  `f` (here `exp(-t x)` and `(1 - exp(-t x)) / x` at many times `t`) from
  one Krylov basis per column, built with full reorthogonalization; it
  stops when the results change by at most `tol` (relative) between checks.

Each iteration applies the operator once to all columns; everything else is
compiled vector algebra, so the same code runs on sharded and streamed
kernels. Progress and resumable state go through callbacks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CGState", "ConvergenceError", "conjugate_gradients",
           "lanczos_functions"]

_HIGHEST = jax.lax.Precision.HIGHEST
_MAX_RESTARTS = 3

MatMul = Callable[[jax.Array], jax.Array]


class ConvergenceError(RuntimeError):
  """An iterative solve did not reach its tolerance."""


@dataclasses.dataclass
class CGState:
  """Where conjugate gradients stand (saved to resume a long solve)."""
  x: jax.Array
  r: jax.Array
  p: jax.Array
  rz: jax.Array
  iteration: int = 0
  restarts: int = 0


@jax.jit
def _column_norms(a: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(a * a, axis=0))


@jax.jit
def _step(x, r, p, ap, rz, active):
  curvature = jnp.sum(p * ap, axis=0)
  alpha = jnp.where(active, rz / jnp.where(active, curvature, 1.), 0.)
  return (x + alpha[None] * p, r - alpha[None] * ap, curvature,
          _column_norms(r - alpha[None] * ap))


@jax.jit
def _direction(z, p, r, rz_old, active):
  rz = jnp.sum(r * z, axis=0)
  beta = jnp.where(active, rz / jnp.where(active, rz_old, 1.), 0.)
  return z + beta[None] * p, jnp.where(active, rz, rz_old)


@jax.jit
def _residual(b, ax):
  r = b - ax
  return r, _column_norms(r)


def conjugate_gradients(
    matmul: MatMul, b: jax.Array, precondition: Callable[[jax.Array],
                                                         jax.Array],
    tol: float, maxiter: int, *, state: Optional[CGState] = None,
    on_iteration: Optional[Callable[[CGState, float], None]] = None,
    what: str = "the kernel") -> tuple[jax.Array, CGState, float]:
  """Solves `A X = B` for a symmetric positive definite operator `A`.

  Args:
    matmul: `V -> A V` (with the regularizer already included).
    b: right-hand sides, `(n, c)`.
    precondition: `R -> P^{-1} R`.
    tol: relative residual to reach in every column.
    maxiter: the most iterations (operator applications) to spend.
    state: a saved state to resume from.
    on_iteration: called as `on_iteration(state, relative_residual)` after
      every iteration (for progress and saving).
    what: how error messages name the operator.

  Returns:
    `(X, final state, largest relative residual)`.

  Raises:
    ConvergenceError: if `tol` is not reached within `maxiter` iterations.
    NotPositiveDefinite (a ValueError): on a direction of non-positive
      curvature.
  """
  b_norms = np.asarray(_column_norms(b))
  scale = np.where(b_norms > 0, b_norms, 1.)
  if state is None:
    x = jnp.zeros_like(b)
    state = _restart(matmul, b, x, precondition, 0, 0, from_zero=True)
  while True:
    relative = _run(matmul, b, precondition, tol, maxiter, state, scale,
                    on_iteration, what)
    # The updated residual drifts from the true one: check the true one.
    state.r, norms = _residual(b, matmul(state.x))
    true_relative = float(np.max(np.asarray(norms) / scale))
    if true_relative <= tol:
      return state.x, state, true_relative
    if state.iteration >= maxiter or state.restarts >= _MAX_RESTARTS:
      updated = (f" (the updated residual was {relative:.3g})"
                 if relative < tol else "")
      raise ConvergenceError(
          f"Conjugate gradients on {what} reached a relative residual of "
          f"{true_relative:.3g} after {state.iteration} iterations "
          f"({state.restarts} restarts), not the tolerance {tol:g}"
          f"{updated}. "
          "Raise maxiter, raise diag_reg (better conditioning), use a "
          "larger preconditioner rank, or, in float32, a larger tol (its "
          "attainable residual is about eps times the condition number) "
          "or float64.")
    state = _restart(matmul, b, state.x, precondition, state.iteration,
                     state.restarts + 1, residual=state.r)


def _restart(matmul, b, x, precondition, iteration, restarts,
             from_zero=False, residual=None) -> CGState:
  r = b if from_zero else (residual if residual is not None
                           else b - matmul(x))
  z = precondition(r)
  return CGState(x, r, z, jnp.sum(r * z, axis=0), iteration, restarts)


def _run(matmul, b, precondition, tol, maxiter, state, scale, on_iteration,
         what) -> float:
  """Iterates until the updated residuals reach `tol` (or `maxiter`)."""
  relative_norms = np.asarray(_column_norms(state.r)) / scale
  while state.iteration < maxiter:
    active = relative_norms > tol
    if not active.any():
      break
    active = jnp.asarray(active)
    ap = matmul(state.p)
    state.x, state.r, curvature, norms = _step(state.x, state.r, state.p, ap,
                                               state.rz, active)
    curvature = np.asarray(curvature)
    if np.any(np.asarray(active) & ~(curvature > 0)):
      raise NotPositiveDefinite(
          f"{what} is not positive definite: conjugate gradients met a "
          f"direction p with p^T (K + diag_reg I) p = {curvature.min():.3g}. "
          "Check how the kernel was computed, or raise diag_reg.")
    z = precondition(state.r)
    state.p, state.rz = _direction(z, state.p, state.r, state.rz, active)
    state.iteration += 1
    relative_norms = np.asarray(norms) / scale
    if on_iteration is not None:
      on_iteration(state, float(relative_norms.max()))
  return float(relative_norms.max())


class NotPositiveDefinite(ValueError):
  """Raised by the iterative solvers; `ft.predict` re-raises it as
  `NotPSDError`."""


# ------------------------------------------------------------------ Lanczos


def lanczos_functions(
    matmul: MatMul, v: jax.Array,
    functions: Sequence[Callable[[jax.Array], jax.Array]], tol: float,
    maxiter: int, *, check_every: int = 5,
    on_iteration: Optional[Callable[[int, float], None]] = None,
    what: str = "the kernel") -> tuple[list[jax.Array], int, float]:
  """`f(A) V` for each `f` in `functions`, by the Lanczos method.

  Args:
    matmul: `V -> A V` for a symmetric positive semi-definite `A`.
    v: the vectors, `(n, c)`.
    functions: maps from eigenvalues `(m, c)` to values `(T, m, c)`
      (several times at once); each result is then `(T, n, c)`.
    tol: relative change between checks at which to stop.
    maxiter: the largest Krylov dimension.
    check_every: iterations between convergence checks.
    on_iteration: called as `on_iteration(iteration, change)` at checks.
    what: how error messages name the operator.

  Returns:
    `(results, iterations, last relative change)`.

  Raises:
    ConvergenceError: if the results still change by more than `tol` after
    `maxiter` iterations.
  """
  n, c = v.shape
  limit = min(maxiter, n)
  norms = _column_norms(v)
  # Buffers grow by doubling, so each compiled step is reused.
  capacity = min(limit, 16)
  basis = jnp.zeros((capacity + 1, n, c), v.dtype).at[0].set(
      v / jnp.where(norms > 0, norms, 1.)[None])
  alphas = jnp.zeros((capacity, c), v.dtype)
  betas = jnp.zeros((capacity, c), v.dtype)
  previous, change, a_norm = None, np.inf, jnp.zeros((), v.dtype)
  for k in range(limit):
    if k == capacity:
      capacity = min(2 * capacity, limit)
      basis, alphas, betas = _grow(basis, alphas, betas, capacity)
    w = matmul(_row(basis, k))
    basis, alphas, betas, a_norm, exhausted = _lanczos_step(
        basis, alphas, betas, w, k, a_norm)
    exhausted = bool(exhausted)
    m = k + 1
    if m % check_every and not exhausted and m < limit:
      continue
    coefficients = _coefficients(alphas, betas, m, functions, norms)
    if previous is not None:
      change = _relative_change(coefficients, previous)
    previous = coefficients
    if on_iteration is not None:
      on_iteration(m, change)
    if change <= tol or exhausted:
      results = [_combine(basis, coef) for coef in coefficients]
      return results, m, 0. if exhausted else change
  raise ConvergenceError(
      f"The Lanczos method on {what} still changed by {change:.3g} "
      f"(relative) after {limit} iterations, above the tolerance {tol:g}. "
      "Raise maxiter or diag_reg, or ask for smaller times t.")


@jax.jit
def _row(basis, k):
  return basis[k]


@functools.partial(jax.jit, static_argnums=(3,))
def _grow(basis, alphas, betas, capacity):
  extra = capacity - alphas.shape[0]
  return (jnp.pad(basis, ((0, extra), (0, 0), (0, 0))),
          jnp.pad(alphas, ((0, extra), (0, 0))),
          jnp.pad(betas, ((0, extra), (0, 0))))


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def _lanczos_step(basis, alphas, betas, w, k, a_norm):
  """One step: `q_{k+1}` from `w = A q_k`, fully reorthogonalized."""
  q = basis[k]
  q_previous = jnp.where(k > 0, basis[jnp.maximum(k - 1, 0)], 0.)
  beta_previous = jnp.where(k > 0, betas[jnp.maximum(k - 1, 0)], 0.)
  alpha = jnp.sum(q * w, axis=0)
  w = w - alpha[None] * q - beta_previous[None] * q_previous
  used = (jnp.arange(basis.shape[0]) <= k)[:, None]
  for _ in range(2):  # Twice is enough (Giraud et al. 2005).
    overlaps = jnp.einsum("kic,ic->kc", basis, w, precision=_HIGHEST)
    w = w - jnp.einsum("kic,kc->ic", basis, jnp.where(used, overlaps, 0.),
                       precision=_HIGHEST)
  beta = _column_norms(w)
  a_norm = jnp.maximum(a_norm, jnp.max(jnp.abs(alpha)))
  # An exhausted Krylov space ends that column exactly; its next vectors
  # are zero, which decouples them from the result.
  small = beta <= 1e3 * jnp.finfo(w.dtype).eps * jnp.maximum(
      a_norm, jnp.finfo(w.dtype).tiny)
  beta = jnp.where(small, 0., beta)
  q_next = jnp.where(small[None], 0., w / jnp.where(small, 1., beta)[None])
  return (basis.at[k + 1].set(q_next), alphas.at[k].set(alpha),
          betas.at[k].set(beta), a_norm, jnp.all(small))


@jax.jit
def _tridiagonal_eigh(alphas, betas, m):
  """Eigenvalues and eigenvectors of each column's tridiagonal `T_m`,
  padded with a decoupled zero block to the buffers' size."""
  capacity = alphas.shape[0]
  alphas = jnp.where((jnp.arange(capacity) < m)[:, None], alphas, 0.)
  off = jnp.where((jnp.arange(capacity - 1) < m - 1)[:, None], betas[:-1],
                  0.)

  def one(alpha, beta):
    t = jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)
    return jnp.linalg.eigh(t)
  theta, s = jax.vmap(one, in_axes=(1, 1), out_axes=-1)(alphas, off)
  return jnp.maximum(theta, 0.), s  # (m, c), (m, m, c); A is PSD.


def _coefficients(alphas, betas, m, functions, norms):
  """`||v|| f(T) e_1` per column, for each function: `(T, capacity, c)`."""
  theta, s = _tridiagonal_eigh(alphas, betas, m)
  first = s[0]  # (m, c): first components of the eigenvectors
  return [norms[None, None] * jnp.einsum("kmc,tmc->tkc", s,
                                         f(theta) * first[None],
                                         precision=_HIGHEST)
          for f in functions]


@jax.jit
def _combine(basis, coefficients):
  return jnp.einsum("kic,tkc->tic", basis[:-1], coefficients,
                    precision=_HIGHEST)


def _relative_change(current, previous) -> float:
  worst = 0.
  for now, before in zip(current, previous):
    extra = now.shape[1] - before.shape[1]
    before = jnp.pad(before, ((0, 0), (0, extra), (0, 0)))
    difference = jnp.linalg.norm(now - before, axis=1)
    size = jnp.linalg.norm(now, axis=1)
    ratio = jnp.where(size > 0, difference / jnp.where(size > 0, size, 1.),
                      0.)
    worst = max(worst, float(jnp.max(ratio)))
  return worst
