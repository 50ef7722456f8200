"""Shape bookkeeping and PSD-safe factorizations shared by `ft.predict`.

Kernels follow Neural Tangents' layout: for outputs `f(x)` of shape
`(N, *rest)` and `trace_axes` removed from `rest`, a kernel has the shape of
`zip(f1.shape, f2.shape)` over the kept axes, e.g. `(N1, N2)` for
`trace_axes=(-1,)` on `(N, C)` outputs, or `(N1, N2, C1, C2)` for
`trace_axes=()`. Everything here flattens such kernels to matrices, and
targets to `(rows, trace_size)` matrices, so that the algebra is plain linear
algebra on 2-D arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.predict import checks
from flax_tangents._src.typing import Axes


class NotPSDError(ValueError):
  """A kernel matrix is not positive (semi-)definite enough to be solved with.

  The message names the matrix, its smallest eigenvalue and a `diag_reg` that
  would make it positive definite.
  """


# ------------------------------------------------------------------ shapes ---


def canonicalize_axes(axes: Axes, ndim: int) -> tuple[int, ...]:
  """Sorted non-negative axes of an `ndim`-dimensional array."""
  if isinstance(axes, int):
    axes = (axes,)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"Axis {a} is out of range for outputs of {ndim} "
                       "dimensions.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"Repeated axes in {tuple(axes)}.")
  return tuple(sorted(out))


def to_matrix(kernel: jax.Array) -> jax.Array:
  """Flattens a zipped kernel `(a1, b1, a2, ...)` to `(a1*a2*.., b1*b2*..)`."""
  kernel = jnp.asarray(kernel)
  n = kernel.ndim
  if n % 2:
    raise ValueError(
        "A kernel must have an even number of axes (the zipped axes of its two "
        f"arguments); got shape {kernel.shape}.")
  first, second = tuple(range(0, n, 2)), tuple(range(1, n, 2))
  kernel = jnp.transpose(kernel, first + second)
  rows = math.prod(kernel.shape[:n // 2])
  return kernel.reshape((rows, -1))


def from_matrix(matrix: jax.Array, lead_shape: tuple[int, ...],
                shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `to_matrix` for a square kernel, with leading batch axes.

  Args:
    matrix: array of shape `lead_shape + (prod(shape), prod(shape))`.
    lead_shape: leading axes kept in front (e.g. time axes).
    shape: the per-argument shape of the kernel.

  Returns:
    An array of shape `lead_shape + zip(shape, shape)`.
  """
  n_lead, n = len(lead_shape), len(shape)
  out = matrix.reshape(lead_shape + shape + shape)
  zipped = []
  for i in range(n):
    zipped += [n_lead + i, n_lead + n + i]
  return jnp.transpose(out, tuple(range(n_lead)) + tuple(zipped))


class OutputLayout:
  """How outputs of shape `y_train.shape` map to `(rows, trace_size)` matrices.

  Rows run over the axes the kernel keeps; columns over `trace_axes`, along
  which the kernel acts as the identity.
  """

  def __init__(self, y_shape: tuple[int, ...], trace_axes: Axes):
    self.ndim = len(y_shape)
    self.trace_axes = canonicalize_axes(trace_axes, self.ndim)
    self.kept_axes = tuple(
        a for a in range(self.ndim) if a not in self.trace_axes)
    self.trace_shape = tuple(y_shape[a] for a in self.trace_axes)
    self.trace_size = math.prod(self.trace_shape)
    self.train_kept_shape = tuple(y_shape[a] for a in self.kept_axes)

  def to_matrix(self, y: jax.Array) -> jax.Array:
    """`(..kept.., ..trace..)` outputs as a `(rows, trace_size)` matrix."""
    y = jnp.moveaxis(y, self.trace_axes,
                     tuple(range(self.ndim - len(self.trace_axes), self.ndim)))
    return y.reshape((-1, self.trace_size))

  def from_matrix(self, m: jax.Array, lead_shape: tuple[int, ...],
                  kept_shape: tuple[int, ...]) -> jax.Array:
    """`lead_shape + (rows, trace_size)` back to `lead_shape + outputs`."""
    out = m.reshape(lead_shape + kept_shape + self.trace_shape)
    n_trace = len(self.trace_axes)
    # Negative destinations skip the leading (time) axes.
    return jnp.moveaxis(out, tuple(range(-n_trace, 0)),
                        tuple(a - self.ndim for a in self.trace_axes))

  def output_shape(self, kept_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of outputs whose kept axes have `kept_shape`."""
    kept, trace = iter(kept_shape), iter(self.trace_shape)
    return tuple(next(trace) if a in self.trace_axes else next(kept)
                 for a in range(self.ndim))

  def kernel_shape(self, kept_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Expected shape of a kernel between two sets of kept axes."""
    return tuple(d for pair in zip(kept_shape, kept_shape) for d in pair)

  def check_train_kernel(self, kernel: jax.Array, name: str) -> None:
    expected = self.kernel_shape(self.train_kept_shape)
    if tuple(kernel.shape) != expected:
      raise ValueError(
          f"{name} has shape {tuple(kernel.shape)}, but outputs of shape "
          f"{self.train_kept_shape + self.trace_shape} (y_train) with "
          f"trace_axes={self.trace_axes} need a kernel of shape {expected}.")

  def test_kept_shape(self, k_test_train: jax.Array,
                      name: str = "k_test_train") -> tuple[int, ...]:
    """Kept shape of the test outputs, from the test-train kernel."""
    shape = tuple(k_test_train.shape)
    if (len(shape) != 2 * len(self.kept_axes) or
        shape[1::2] != self.train_kept_shape):
      raise ValueError(
          f"{name} has shape {shape}; with training outputs of kept shape "
          f"{self.train_kept_shape} it must be zip(test_shape, "
          f"{self.train_kept_shape}).")
    return shape[::2]


# ------------------------------------------------------------ dtypes/values ---


def compute_dtype(*arrays: Any) -> jnp.dtype:
  """float64 where enabled (whatever the inputs), else the inputs' float."""
  dtype = jnp.result_type(*[a for a in arrays if a is not None], float)
  return jnp.promote_types(dtype, jax.dtypes.canonicalize_dtype(jnp.float64))


def concrete_or_none(x: Any) -> Optional[np.ndarray]:
  """`x` as a NumPy array, or `None` when `x` is traced (checks are skipped)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def expand_leading(x: jax.Array, n: int) -> jax.Array:
  """`x` with `n` leading unit axes (explicit, for strict rank promotion)."""
  return jnp.reshape(x, (1,) * n + tuple(x.shape))


def check_finite(x: Any, name: str) -> None:
  """Raises if a concrete `x` holds NaN or infinity."""
  value = concrete_or_none(x)
  if value is not None and not np.all(np.isfinite(value)):
    raise ValueError(f"{name} contains NaN or infinite values.")


# ------------------------------------------------------------ factorizing ---


def _diag_shift(matrix: jax.Array, diag_reg: float,
                diag_reg_absolute_scale: bool) -> jax.Array:
  """The absolute diagonal shift that `diag_reg` stands for."""
  if diag_reg_absolute_scale:
    return jnp.asarray(diag_reg, matrix.dtype)
  return diag_reg * jnp.trace(matrix) / matrix.shape[0]


def _suggest_diag_reg(evals: np.ndarray, matrix: np.ndarray,
                      diag_reg_absolute_scale: bool) -> str:
  """A rounded-up `diag_reg` that makes the smallest eigenvalue positive."""
  eps = np.finfo(matrix.dtype).eps
  top = max(float(np.max(np.abs(evals))), np.finfo(matrix.dtype).tiny)
  # Lift the spectrum to a condition number of at most 1 / sqrt(eps).
  needed = max(-float(evals[0]), 0.) + np.sqrt(eps) * top
  if not diag_reg_absolute_scale:
    mean_diag = float(np.trace(matrix)) / matrix.shape[0]
    if mean_diag <= 0:
      return ("none exists relative to its mean diagonal (which is "
              f"{mean_diag:.3g}); use diag_reg_absolute_scale=True and "
              f"diag_reg >= {needed:.1e}")
    needed /= mean_diag
  exponent = math.floor(math.log10(needed))
  mantissa = math.ceil(needed / 10**exponent)
  unit = ("in absolute units" if diag_reg_absolute_scale else
          "relative to its mean diagonal")
  return f"diag_reg >= {mantissa}e{exponent:+03d} ({unit})"


def _not_psd_message(name: str, what: str, evals: np.ndarray,
                     matrix: np.ndarray, diag_reg: float,
                     diag_reg_absolute_scale: bool) -> str:
  fix = _suggest_diag_reg(evals, matrix, diag_reg_absolute_scale)
  return (f"{name} {what}: after symmetrizing and adding diag_reg={diag_reg} "
          f"(diag_reg_absolute_scale={diag_reg_absolute_scale}), its smallest "
          f"eigenvalue is {evals[0]:.4g} (largest {evals[-1]:.4g}). Pass "
          f"{fix} to make it positive definite, or check how the kernel was "
          "computed (a kernel must be symmetric positive semi-definite).")


def regularized_matrix(kernel: jax.Array, name: str, diag_reg: float,
                       diag_reg_absolute_scale: bool) -> jax.Array:
  """Symmetrized `kernel` as a matrix, plus the diagonal regularizer."""
  check_finite(kernel, name)
  kernel = jnp.asarray(kernel)
  if kernel.ndim % 2 or kernel.shape[::2] != kernel.shape[1::2]:
    raise ValueError(f"{name} must be a square kernel, of shape zip(s, s); "
                     f"got shape {tuple(kernel.shape)}.")
  return _regularized_matrix(kernel, diag_reg, diag_reg_absolute_scale)


@functools.partial(jax.jit, static_argnums=(2,))
def _regularized_matrix(kernel, diag_reg, diag_reg_absolute_scale):
  matrix = to_matrix(kernel)
  matrix = matrix.astype(compute_dtype(matrix))
  # Kernels computed in finite precision are symmetric only up to rounding.
  matrix = (matrix + matrix.T) / 2
  shift = _diag_shift(matrix, diag_reg, diag_reg_absolute_scale)
  return matrix + shift * jnp.eye(matrix.shape[0], dtype=matrix.dtype)


_eigh = jax.jit(jnp.linalg.eigh)
_cholesky = jax.jit(jnp.linalg.cholesky)


def psd_eigh(kernel: jax.Array, name: str, diag_reg: float,
             diag_reg_absolute_scale: bool) -> tuple[jax.Array, jax.Array]:
  """Eigendecomposition of a regularized PSD kernel, checked when concrete.

  Args:
    kernel: a square zipped kernel (e.g. `(N, N)` or `(N, N, C, C)`).
    name: how error messages name the kernel.
    diag_reg: diagonal regularizer strength.
    diag_reg_absolute_scale: whether `diag_reg` is absolute or relative to the
      mean diagonal of `kernel`.

  Returns:
    `(evals, evecs)` of the symmetrized, regularized matrix, with eigenvalues
    ascending and clipped at zero (negative ones are rounding noise).

  Raises:
    NotPSDError: if the smallest eigenvalue is negative beyond rounding
      (`-sqrt(eps)` relative to the largest).
  """
  with jax.ensure_compile_time_eval():
    matrix = regularized_matrix(kernel, name, diag_reg,
                                diag_reg_absolute_scale)
    evals, evecs = _eigh(matrix)
  values = concrete_or_none(evals)
  if values is not None:
    if not np.all(np.isfinite(values)):
      raise NotPSDError(f"The eigendecomposition of {name} yielded NaN.")
    tol = np.sqrt(np.finfo(values.dtype).eps) * max(np.max(np.abs(values)),
                                                    np.finfo(values.dtype).tiny)
    if values[0] < -tol:
      raise NotPSDError(_not_psd_message(
          name, "is not positive semi-definite", values,
          np.asarray(matrix), diag_reg, diag_reg_absolute_scale))
    with jax.ensure_compile_time_eval():
      checks.warn_if_ill_conditioned(
          name, jnp.result_type(kernel), float(values[0]), float(values[-1]),
          _mean_diagonal(kernel), diag_reg, diag_reg_absolute_scale)
  with jax.ensure_compile_time_eval():
    return jnp.maximum(evals, 0.), evecs


def psd_cholesky(kernel: jax.Array, name: str, diag_reg: float,
                 diag_reg_absolute_scale: bool) -> jax.Array:
  """Lower Cholesky factor of a regularized kernel, checked when concrete.

  Args:
    kernel: a square zipped kernel.
    name: how error messages name the kernel.
    diag_reg: diagonal regularizer strength.
    diag_reg_absolute_scale: whether `diag_reg` is absolute.

  Returns:
    The lower-triangular factor `L` with `L @ L.T` the regularized matrix.

  Raises:
    NotPSDError: if the factorization fails (the regularized matrix is not
      numerically positive definite).
  """
  with jax.ensure_compile_time_eval():
    matrix = regularized_matrix(kernel, name, diag_reg,
                                diag_reg_absolute_scale)
    factor = _cholesky(matrix)
  value = concrete_or_none(factor)
  if value is not None and not np.all(np.isfinite(value)):
    dense = np.asarray(matrix)
    evals = np.linalg.eigvalsh(dense)
    raise NotPSDError(_not_psd_message(
        name, "is not numerically positive definite (its Cholesky "
        "factorization yielded NaN)", evals, dense, diag_reg,
        diag_reg_absolute_scale))
  if value is not None and checks.is_low_precision(jnp.result_type(kernel)):
    with jax.ensure_compile_time_eval():
      low, high = _extreme_eigenvalues(matrix, factor)
      checks.warn_if_ill_conditioned(
          name, jnp.result_type(kernel), float(low), float(high),
          _mean_diagonal(kernel), diag_reg, diag_reg_absolute_scale)
  return factor


def _mean_diagonal(kernel: jax.Array) -> float:
  matrix = to_matrix(kernel)
  return float(jnp.trace(matrix)) / matrix.shape[0]


@functools.partial(jax.jit, static_argnums=(2,))
def _extreme_eigenvalues(matrix: jax.Array, factor: jax.Array,
                         iterations: int = 40) -> tuple[jax.Array, jax.Array]:
  """Estimates of the smallest and largest eigenvalues of `matrix`.

  Power iteration on `matrix` and inverse iteration with its Cholesky
  `factor`, from fixed random starts: O(iterations * n^2), next to the
  O(n^3) factorization. Both estimates err towards a smaller condition
  number; after 40 iterations they are within a small factor of it.
  """
  n = matrix.shape[0]
  start = jax.random.normal(jax.random.PRNGKey(0), (2, n), matrix.dtype)

  def normalized(v):
    return v / jnp.linalg.norm(v)

  top = jax.lax.fori_loop(0, iterations, lambda _, v: normalized(matrix @ v),
                          normalized(start[0]))
  bottom = jax.lax.fori_loop(
      0, iterations, lambda _, v: normalized(cho_solve(factor, v)),
      normalized(start[1]))
  return bottom @ matrix @ bottom, top @ matrix @ top


def cho_solve(factor: jax.Array, rhs: jax.Array) -> jax.Array:
  """Solves `(L L^T) x = rhs` for a lower Cholesky factor `L`."""
  return jax.scipy.linalg.cho_solve((factor, True), rhs.astype(factor.dtype))


def check_solution(x: Any, name: str) -> None:
  """Raises if a concrete solve result holds NaN or infinity."""
  leaves = [concrete_or_none(v) for v in jax.tree_util.tree_leaves(x)]
  if any(v is not None and not np.all(np.isfinite(v)) for v in leaves):
    raise NotPSDError(f"Solving with {name} yielded NaN or infinity; the "
                      "inputs hold non-finite values, or the kernel is too "
                      "ill-conditioned (raise diag_reg).")


def phi1(evals: jax.Array, times: jax.Array) -> jax.Array:
  """`(1 - exp(-evals * t)) / evals`, equal to `t` in the limit `evals -> 0`.

  Args:
    evals: non-negative eigenvalues, shape `(m,)`.
    times: times, shape `(T,)`.

  Returns:
    An array of shape `(T, m)`.
  """
  lt = times[:, None] * evals[None, :]
  safe = jnp.where(evals > 0, evals, 1.)
  ratio = -jnp.expm1(-lt) / safe[None, :]
  t_full = jnp.broadcast_to(times[:, None], lt.shape)
  # Below ~eps the ratio loses all precision; its limit is t.
  small = lt < jnp.finfo(lt.dtype).eps
  return jnp.where(small, t_full, ratio)
