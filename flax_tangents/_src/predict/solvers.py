"""How `ft.predict` solves with a train kernel: densely, or iteratively.

`solver=` of `gradient_descent_mse` and `gp_inference`:

- `'dense'`: Cholesky (`t=None`) or eigendecomposition (finite `t`) of the
  whole kernel on one device, in float64 (see `linalg`);
- `'cg'` or `CG(...)`: Krylov methods on the kernel as an operator, never
  gathered: preconditioned conjugate gradients for `t=None`, the Lanczos
  method for `exp(-t K)` and `(1 - exp(-t K)) / K` at finite times. The
  kernel may be sharded over a mesh (as `ft.batch` returns it) or held on
  disk as `ft.batch` checkpoint tiles (`TiledKernel`);
- `'auto'` (default): `'cg'` for a `TiledKernel` or a kernel matrix of more
  than `DENSE_MAX_N` rows, `'dense'` otherwise.

The iterative path needs an `(N, N)` kernel matrix (outputs traced over all
axes but the batch axis, e.g. `(N, C)` targets with `trace_axes=(-1,)`) and
computes in the kernel's own dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from flax_tangents._src.predict import krylov
from flax_tangents._src.predict import nystrom as nystrom_lib
from flax_tangents._src.predict import operators
from flax_tangents._src.scale import devices
from flax_tangents._src.scale import fingerprint as fingerprint_lib
from flax_tangents._src.scale.tiled_kernel import TiledKernel

__all__ = ["CG", "DENSE_MAX_N", "IterativeSystem", "SolveInfo", "resolve"]

DENSE_MAX_N = 10_000
# `CG(progress=...)`: None, a bool, or `progress(iteration, residual)`.
SolveProgressArg = Union[None, bool, Callable[[int, float], None]]

ConvergenceError = krylov.ConvergenceError


@dataclasses.dataclass(frozen=True)
class CG:
  """Iterative solves with a kernel matrix, without gathering it.

  Conjugate gradients (`t=None`) stop when every column's relative residual
  `||y - (K + diag_reg I) x|| / ||y||` is at most `tol` (checked on the
  recomputed residual); the Lanczos method (finite `t`) stops when its
  result changes by at most `tol` (relative) between checks. Either raises
  `ConvergenceError` rather than return an unconverged answer.

  Attributes:
    tol: the tolerance; default `1e-10` for float64 kernels, `1e-5` for
      float32 ones (whose attainable residual is about `eps` times the
      condition number).
    maxiter: the most iterations (one product with the kernel each);
      default `min(10 * N, 5000)`.
    preconditioner: `'nystrom'` (randomized Nystrom, one extra product
      with `rank` vectors) or `None`.
    rank: the Nystrom rank (capped at `N`).
    seed: seed of the Nystrom test matrix.
    progress: `True` reports iterations and residuals on stderr (and tiles
      streamed per product), `None` does when stderr is a terminal, a
      callable is called as `progress(iteration, relative_residual)`.
    mesh: the devices that stream a `TiledKernel` (default: all).
    state_dir: where conjugate gradients on a `TiledKernel` save their
      state after every iteration, so that a rerun after a crash resumes;
      default `<checkpoint_dir>/solves` when writable, `''` for none.
  """
  tol: Optional[float] = None
  maxiter: Optional[int] = None
  preconditioner: Optional[str] = "nystrom"
  rank: int = 100
  seed: int = 0
  progress: SolveProgressArg = None
  mesh: Optional[Mesh] = None
  state_dir: Optional[str] = None

  def __post_init__(self):
    if self.preconditioner not in ("nystrom", None):
      raise ValueError(f"CG: preconditioner must be 'nystrom' or None, got "
                       f"{self.preconditioner!r}.")
    if self.tol is not None and not 0 < self.tol < 1:
      raise ValueError(f"CG: tol must be in (0, 1), got {self.tol!r}.")
    if self.maxiter is not None and self.maxiter < 1:
      raise ValueError(f"CG: maxiter must be positive, got {self.maxiter}.")
    if self.rank < 1:
      raise ValueError(f"CG: rank must be positive, got {self.rank}.")


class SolveInfo(NamedTuple):
  """How a solve went (`predict_fn.solve_info[name]`).

  Attributes:
    method: `'cg'` or `'lanczos'`.
    iterations: products with the kernel spent (not counting the
      preconditioner's one product with `rank` vectors, nor the final
      residual check).
    residual: the largest relative residual reached (CG), or the last
      relative change (Lanczos).
    tol: the tolerance asked for.
    preconditioner: e.g. `'nystrom(rank=100)'` or `'none'`.
    seconds: wall time of the solve, preconditioner included.
    resumed_from: the iteration a saved state resumed from (0 if none).
  """
  method: str
  iterations: int
  residual: float
  tol: float
  preconditioner: str
  seconds: float
  resumed_from: int = 0


SolverArg = Union[str, CG, None]


def resolve(solver: SolverArg, kernel: Any, kept_ndim: int) -> Optional[CG]:
  """The iterative configuration to use, or None for the dense path."""
  if solver is None:
    solver = "auto"
  if isinstance(solver, str):
    if solver not in ("auto", "dense", "cg"):
      raise ValueError(f"solver must be 'auto', 'dense', 'cg' or "
                       f"ft.predict.CG(...), got {solver!r}.")
  elif not isinstance(solver, CG):
    raise TypeError(f"solver must be 'auto', 'dense', 'cg' or "
                    f"ft.predict.CG(...), got {type(solver).__name__}.")
  tiled = isinstance(kernel, TiledKernel)
  if solver == "dense":
    if tiled:
      raise ValueError(
          "A TiledKernel is solved iteratively (it is never loaded whole); "
          "pass solver='auto', 'cg' or ft.predict.CG(...).")
    return None
  if solver == "auto":
    n = kernel.shape[0] if hasattr(kernel, "shape") else 0
    if not tiled and (n <= DENSE_MAX_N or len(kernel.shape) != 2):
      return None
    solver = CG()
  elif solver == "cg":
    solver = CG()
  if kept_ndim != 1 or len(kernel.shape) != 2:
    raise ValueError(
        f"The iterative solvers need an (N, N) kernel matrix, with every "
        f"output axis but the batch axis in trace_axes; got a kernel of "
        f"shape {tuple(kernel.shape)}. Use solver='dense', or compute the "
        "kernel with trace_axes covering the output axes.")
  return solver


class _Reporter:
  """Progress of one solve: a line on stderr, or a user callback."""

  def __init__(self, setting: SolveProgressArg, label: str, tol: float):
    self.callback = setting if callable(setting) else None
    primary = devices.is_primary_process()
    self.draw = primary and self.callback is None and (
        sys.stderr.isatty() if setting is None else bool(setting))
    self.label, self.tol = label, tol
    self.start = time.perf_counter()
    self.status = ""

  def tiles(self, done: int, total: int) -> None:
    if self.draw:
      sys.stderr.write(f"\r{self.status} [tiles {done}/{total}]   ")
      sys.stderr.flush()

  def iteration(self, iteration: int, residual: float) -> None:
    if self.callback is not None:
      self.callback(iteration, residual)
    self.status = (f"ft.predict {self.label}: iteration {iteration}, "
                   f"residual {residual:.2e} (tol {self.tol:.0e}), "
                   f"{time.perf_counter() - self.start:.0f}s")
    if self.draw:
      sys.stderr.write(f"\r{self.status}   ")
      sys.stderr.flush()

  def close(self) -> None:
    if self.draw:
      sys.stderr.write("\n")
      sys.stderr.flush()


@jax.jit
def _shifted(kv: jax.Array, v: jax.Array, mu: jax.Array) -> jax.Array:
  return kv + mu * v


class IterativeSystem:
  """`K + mu I` for one train kernel, with its preconditioner.

  Args:
    kernel: an `(N, N)` array (sharded or not) or a `TiledKernel`.
    name: how messages name it.
    diag_reg: the regularizer.
    diag_reg_absolute_scale: whether `diag_reg` is absolute.
    config: the solver settings.
  """

  def __init__(self, kernel: Any, name: str, diag_reg: float,
               diag_reg_absolute_scale: bool, config: CG):
    self.kernel, self.name, self.config = kernel, name, config
    self._reporter: Optional[_Reporter] = None
    self.operator = operators.as_operator(kernel, config.mesh,
                                          progress=self._tiles)
    n1, n2 = self.operator.shape
    if n1 != n2:
      raise ValueError(f"{name} must be square; got shape {(n1, n2)}.")
    self.n, self.dtype = n1, self.operator.dtype
    mean_diagonal = float(jnp.mean(self.operator.diagonal()))
    self.mu = float(diag_reg if diag_reg_absolute_scale
                    else diag_reg * mean_diagonal)
    self.tol = config.tol if config.tol is not None else (
        1e-10 if jnp.finfo(self.dtype).bits >= 64 else 1e-5)
    self.maxiter = config.maxiter or min(10 * self.n, 5000)
    self._preconditioner: Optional[nystrom_lib.Nystrom] = None
    self.preconditioner_seconds = 0.

  def _tiles(self, done: int, total: int) -> None:
    if self._reporter is not None:
      self._reporter.tiles(done, total)

  def matmul(self, v: jax.Array) -> jax.Array:
    return _shifted(self.operator.matmul(v), v.astype(self.dtype),
                    jnp.asarray(self.mu, self.dtype))

  def preconditioner_name(self) -> str:
    if self.config.preconditioner is None:
      return "none"
    return f"nystrom(rank={min(self.config.rank, self.n)})"

  def precondition(self) -> Callable[[jax.Array], jax.Array]:
    if self.config.preconditioner is None:
      return lambda r: r
    if self._preconditioner is None:
      start = time.perf_counter()
      self._preconditioner = nystrom_lib.nystrom(
          self.operator.matmul, self.n, min(self.config.rank, self.n),
          self.dtype, jax.random.PRNGKey(self.config.seed))
      self.preconditioner_seconds = time.perf_counter() - start
    approximation, mu = self._preconditioner, jnp.asarray(self.mu, self.dtype)
    return lambda r: nystrom_lib.apply_inverse(approximation, mu, r)

  # --------------------------------------------------------------- solves

  def solve(self, b: jax.Array, label: str) -> tuple[jax.Array, SolveInfo]:
    """`(K + mu I)^{-1} b` for `b` of shape `(N, c)`."""
    start = time.perf_counter()
    b = jnp.asarray(b, self.dtype)
    store = _StateStore.for_system(self, b, label)
    state, resumed = None, 0
    if store is not None:
      state, self._preconditioner = store.load(self._preconditioner)
      resumed = 0 if state is None else state.iteration
    precondition = self.precondition()
    reporter = self._reporter = _Reporter(self.config.progress,
                                          f"CG {label}", self.tol)

    def on_iteration(state, residual):
      if store is not None:  # Saved first: a crash then loses nothing.
        store.save(state, self._preconditioner)
      reporter.iteration(state.iteration, residual)

    try:
      x, state, residual = krylov.conjugate_gradients(
          self.matmul, b, precondition, self.tol, self.maxiter, state=state,
          on_iteration=on_iteration, what=f"{self.name} ({label})")
    finally:
      reporter.close()
      self._reporter = None
    if store is not None:
      store.save(state, self._preconditioner)
    return x, SolveInfo("cg", state.iteration, residual, self.tol,
                        self.preconditioner_name(),
                        time.perf_counter() - start, resumed)

  def functions(self, v: jax.Array, functions, label: str
                ) -> tuple[list[jax.Array], SolveInfo]:
    """`f(K + mu I) v` for each of `functions` (Lanczos)."""
    start = time.perf_counter()
    reporter = self._reporter = _Reporter(self.config.progress,
                                          f"Lanczos {label}", self.tol)
    try:
      results, iterations, change = krylov.lanczos_functions(
          self.matmul, jnp.asarray(v, self.dtype), functions, self.tol,
          self.maxiter, on_iteration=reporter.iteration,
          what=f"{self.name} ({label})")
    finally:
      reporter.close()
      self._reporter = None
    return results, SolveInfo("lanczos", iterations, change, self.tol, "none",
                              time.perf_counter() - start)


class _StateStore:
  """Conjugate-gradient state of one solve on a `TiledKernel`, on disk."""

  def __init__(self, path: str):
    self.path = path

  @classmethod
  def for_system(cls, system: IterativeSystem, b: jax.Array,
                 label: str) -> Optional["_StateStore"]:
    kernel, config = system.kernel, system.config
    if not isinstance(kernel, TiledKernel) or config.state_dir == "":
      return None
    directory = config.state_dir or os.path.join(kernel.directory, "solves")
    with open(os.path.join(kernel.directory, "fingerprint.json")) as f:
      kernel_identity = f.read()
    problem = json.dumps({
        "kernel": kernel_identity, "leaf": kernel.leaf_name,
        "mu": repr(system.mu), "rhs": fingerprint_lib.digest(b),
        "preconditioner": system.preconditioner_name(),
        "seed": config.seed, "dtype": str(system.dtype)}, sort_keys=True)
    digest = hashlib.sha256(problem.encode()).hexdigest()[:24]
    try:
      if devices.is_primary_process():
        os.makedirs(directory, exist_ok=True)
    except OSError:
      return None
    return cls(os.path.join(directory, f"cg_{label}_{digest}.npz"))

  def load(self, preconditioner):
    """The saved state (or None) and preconditioner (or the given one)."""
    state = _read_npz(self.path)
    saved = _read_npz(self.path + ".nystrom.npz")
    if saved is not None:
      preconditioner = nystrom_lib.Nystrom(jnp.asarray(saved["u"]),
                                           jnp.asarray(saved["lam"]))
    if state is None:
      return None, preconditioner
    return krylov.CGState(
        jnp.asarray(state["x"]), jnp.asarray(state["r"]),
        jnp.asarray(state["p"]), jnp.asarray(state["rz"]),
        int(state["iteration"]), int(state["restarts"])), preconditioner

  def save(self, state: krylov.CGState, preconditioner) -> None:
    if not devices.is_primary_process():
      return
    if preconditioner is not None and not os.path.exists(
        self.path + ".nystrom.npz"):
      _write_npz(self.path + ".nystrom.npz",
                 {"u": preconditioner.u, "lam": preconditioner.lam})
    _write_npz(self.path, {"x": state.x, "r": state.r, "p": state.p,
                           "rz": state.rz, "iteration": state.iteration,
                           "restarts": state.restarts})


def _read_npz(path: str) -> Optional[dict[str, np.ndarray]]:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as saved:
      return {k: saved[k] for k in saved.files}
  except Exception:  # pylint: disable=broad-except
    return None  # A damaged state: start over.


def _write_npz(path: str, arrays: dict[str, Any]) -> None:
  temporary = path + ".tmp"
  try:
    with open(temporary, "wb") as f:
      host: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
      np.savez(f, **host)
    os.replace(temporary, path)
  except OSError:
    pass  # Saving is a convenience; the solve itself goes on.
