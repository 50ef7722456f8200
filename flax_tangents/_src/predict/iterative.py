"""`gradient_descent_mse` and `gp_inference` with iterative solvers.

The predictors returned here compute what the dense ones do (see
`gradient_descent.py` and `inference.py` for the formulas), with every
application of `(K + mu I)^{-1}` or of a function of it done by a Krylov
method on the kernel as an operator (`solvers.IterativeSystem`): the train
kernel is never gathered or factorized. Each solve's iterations and
residual are recorded in `predict_fn.solve_info`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Union

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.predict import checks
from flax_tangents._src.predict import conventions
from flax_tangents._src.predict import krylov
from flax_tangents._src.predict import linalg
from flax_tangents._src.predict import operators
from flax_tangents._src.predict import solvers
from flax_tangents._src.predict.conventions import Gaussian
from flax_tangents._src.predict.conventions import kernel_of
from flax_tangents._src.scale.tiled_kernel import TiledKernel

__all__ = ["gp_inference", "gradient_descent_mse"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _not_psd(error: krylov.NotPositiveDefinite) -> linalg.NotPSDError:
  return linalg.NotPSDError(str(error))


def _solve(system: solvers.IterativeSystem, b, label, info):
  try:
    x, info[label] = system.solve(b, label)
  except krylov.NotPositiveDefinite as error:
    raise _not_psd(error) from None
  return x


def _apply(kernel: Any, v: jax.Array, mesh) -> jax.Array:
  """`kernel @ v` for a test-train kernel (array or `TiledKernel`)."""
  return operators.as_operator(kernel, mesh).matmul(v)


def _check_test_kernel(kernel: Any, n_train: int, name: str) -> int:
  shape = tuple(kernel.shape)
  if len(shape) != 2 or shape[1] != n_train:
    raise ValueError(f"{name} has shape {shape}; it must be (N_test, "
                     f"{n_train}) for the iterative solvers.")
  return shape[0]


def _dense(kernel: Any) -> jax.Array:
  """A test kernel as an array (covariances need it whole)."""
  if isinstance(kernel, TiledKernel):
    return jnp.asarray(kernel.to_array())
  if isinstance(kernel, jax.Array) and not kernel.is_fully_addressable:
    # Spread over several processes (multi-host): every process gets it.
    return jnp.asarray(multihost_utils.process_allgather(kernel, tiled=True))
  return jnp.asarray(kernel)


def gradient_descent_mse(k_train_train, y_train, learning_rate, diag_reg,
                         diag_reg_absolute_scale, layout, config):
  """The iterative `gradient_descent_mse` predictor (see there)."""
  system = solvers.IterativeSystem(k_train_train, "k_train_train", diag_reg,
                                   diag_reg_absolute_scale, config)
  info: dict[str, solvers.SolveInfo] = {}

  def predict_fn(
      t: Any = None,
      fx_train_0: Any = 0.,
      fx_test_0: Any = None,
      k_test_train: Any = None,
  ) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
    """Train [and test] outputs at time[s] `t` (see `gradient_descent_mse`)."""
    checks.check_predict_inputs(fx_train_0, fx_test_0, k_test_train)
    checks.check_times(t)
    start = _Start.of(system, layout, y_train, fx_train_0, fx_test_0,
                      k_test_train)
    if t is None:
      return _at_infinity(start, system, layout, y_train, k_test_train,
                          config.mesh, info)
    return _at_times(start, system, layout, y_train, k_test_train,
                     config.mesh, info, t, learning_rate)

  predict_fn.solve_info = info
  return predict_fn


class _Start(NamedTuple):
  """The initial condition of the MSE flow, for the iterative solvers.

  Attributes:
    want_train: whether train outputs are asked for.
    want_test: whether test outputs are asked for.
    f0: train outputs at `t=0` (zeros when not asked for).
    residual_0: `f0 - y_train` as an `(N, c)` matrix, in the solver's dtype.
    fx_test_0: test outputs at `t=0`, broadcast (None without them).
    n_test: the number of test rows (None without test outputs).
    out_dtype: the dtype of the outputs.
  """
  want_train: bool
  want_test: bool
  f0: jax.Array
  residual_0: jax.Array
  fx_test_0: Any
  n_test: Any
  out_dtype: Any

  @classmethod
  def of(cls, system: solvers.IterativeSystem, layout: linalg.OutputLayout,
         y_train: jax.Array, fx_train_0: Any, fx_test_0: Any,
         k_test_train: Any) -> "_Start":
    """The initial condition of `predict_fn`'s arguments."""
    want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
    f0 = jnp.broadcast_to(jnp.asarray(0. if fx_train_0 is None
                                      else fx_train_0), y_train.shape)
    out_dtype = jnp.result_type(system.dtype, y_train, f0)
    residual_0 = layout.to_matrix(f0 - y_train).astype(system.dtype)
    n_test = None
    if want_test:
      n_test = _check_test_kernel(k_test_train, system.n, "k_test_train")
      fx_test_0 = jnp.broadcast_to(jnp.asarray(fx_test_0),
                                   layout.output_shape((n_test,)))
      out_dtype = jnp.result_type(out_dtype, fx_test_0)
    return cls(want_train, want_test, f0, residual_0, fx_test_0, n_test,
               out_dtype)


def _at_infinity(start: _Start, system: solvers.IterativeSystem,
                 layout: linalg.OutputLayout, y_train: jax.Array,
                 k_test_train: Any, mesh: Any,
                 info: dict[str, solvers.SolveInfo]) -> Any:
  """Outputs at `t = inf`: `y_train`, and one CG solve for the test set."""
  fx_train_t = jnp.broadcast_to(y_train, start.f0.shape).astype(
      start.out_dtype)
  fx_test_t = None
  if start.want_test:
    x = _solve(system, -start.residual_0, "t=None", info)
    delta = _apply(k_test_train, x, mesh)
    fx_test_t = (start.fx_test_0 +
                 layout.from_matrix(delta, (), (start.n_test,))
                ).astype(start.out_dtype)
  return conventions.pick(fx_train_t, fx_test_t, start.want_train,
                          start.want_test)


def _at_times(start: _Start, system: solvers.IterativeSystem,
              layout: linalg.OutputLayout, y_train: jax.Array,
              k_test_train: Any, mesh: Any,
              info: dict[str, solvers.SolveInfo], t: Any,
              learning_rate: float) -> Any:
  """Outputs at finite times `t`, with functions of the kernel by Lanczos."""
  t = np.asarray(t, np.float64)
  times = jnp.asarray(t.reshape(-1) * learning_rate / y_train.size,
                      system.dtype)
  functions = []
  if start.want_train:  # exp(-t lam), lam of shape (m, c)
    functions.append(lambda lam: jnp.exp(-times[:, None, None] * lam[None]))
  if start.want_test:  # (1 - exp(-t lam)) / lam
    functions.append(lambda lam: jax.vmap(
        lambda l: linalg.phi1(l, times), in_axes=1, out_axes=2)(lam))
  try:
    results, info["finite t"] = system.functions(start.residual_0, functions,
                                                 "finite t")
  except krylov.NotPositiveDefinite as error:
    raise _not_psd(error) from None
  fx_train_t = fx_test_t = None
  if start.want_train:
    residual_t = results.pop(0)  # (T, N, c)
    fx_train_t = (layout.from_matrix(residual_t, t.shape, (system.n,)) +
                  linalg.expand_leading(y_train, t.ndim)
                 ).astype(start.out_dtype)
  if start.want_test:
    gain = results.pop(0)  # (T, N, c)
    deltas = _apply_times(k_test_train, gain, mesh)
    fx_test_t = (linalg.expand_leading(start.fx_test_0, t.ndim) -
                 layout.from_matrix(deltas, t.shape, (start.n_test,))
                ).astype(start.out_dtype)
  return conventions.pick(fx_train_t, fx_test_t, start.want_train,
                          start.want_test)


def _apply_times(kernel, blocks: jax.Array, mesh) -> jax.Array:
  """`kernel @ blocks[t]` for every time, in one product."""
  n_times, n, c = blocks.shape
  flat = jnp.transpose(blocks, (1, 0, 2)).reshape(n, n_times * c)
  product = _apply(kernel, flat, mesh)
  return jnp.transpose(product.reshape(-1, n_times, c), (1, 0, 2))


def gp_inference(k_train_train, y_train, diag_reg, diag_reg_absolute_scale,
                 layout, config):
  """The iterative `gp_inference` predictor (see there)."""
  info: dict[str, solvers.SolveInfo] = {}

  @functools.lru_cache(None)
  def system(g: str) -> solvers.IterativeSystem:
    return solvers.IterativeSystem(
        kernel_of(k_train_train, g, "k_train_train"), "k_train_train",
        diag_reg, diag_reg_absolute_scale, config)

  @functools.lru_cache(None)
  def k_inv_y(g: str) -> jax.Array:
    s = system(g)
    return _solve(s, layout.to_matrix(y_train).astype(s.dtype), g, info)

  def predict_fn(get=None, k_test_train=None, k_test_test=None):
    """Test-set posterior; see `gp_inference`."""
    single, gets = conventions.canonicalize_get(get, ("nngp", "ntk",
                                                     "ntkgp"))
    has_cov = k_test_test is not None
    if k_test_train is None:  # the training set: N(y_train, 0)
      out = {}
      for g in gets:
        mean = y_train
        n = system("ntk" if g == "ntkgp" else g).n
        out[g] = (Gaussian(mean, jnp.zeros((n, n), mean.dtype)) if has_cov
                  else mean)
      return conventions.package(out, single, gets)
    out = {}
    for g in gets:
      solved = "ntk" if g == "ntkgp" else g
      s = system(solved)
      k_td = kernel_of(k_test_train, solved, "k_test_train")
      n_test = _check_test_kernel(k_td, s.n, f"k_test_train ({solved})")
      mean = layout.from_matrix(_apply(k_td, k_inv_y(solved), config.mesh),
                                (), (n_test,)).astype(
                                    jnp.result_type(s.dtype, y_train))
      if not has_cov:
        out[g] = mean
        continue
      cov = _covariance(g, s, k_test_train, k_test_test, k_train_train,
                        info, config)
      out[g] = Gaussian(mean, cov.astype(mean.dtype))
    return conventions.package(out, single, gets)

  predict_fn.solve_info = info
  return predict_fn


def _covariance(g, s, k_test_train, k_test_test, k_train_train, info,
                config):
  """Posterior covariance, with `(K + mu I)^{-1}` applied by CG."""
  solved = "ntk" if g == "ntkgp" else g
  prior = "ntk" if g == "ntkgp" else "nngp"
  k_td = _dense(kernel_of(k_test_train, solved, "k_test_train"))
  k_tt = _dense(kernel_of(k_test_test, prior, "k_test_test"))
  a_t = _solve(s, k_td.T.astype(s.dtype), f"{g} covariance", info)
  if g in ("nngp", "ntkgp"):
    cov = k_tt - jnp.matmul(k_td, a_t, precision=_HIGHEST)
  else:
    nngp_td = _dense(kernel_of(k_test_train, "nngp", "k_test_train"))
    nngp_dd = kernel_of(k_train_train, "nngp", "k_train_train")
    cross = jnp.matmul(nngp_td, a_t, precision=_HIGHEST)
    cov = (k_tt + jnp.matmul(a_t.T, _apply(nngp_dd, a_t, config.mesh),
                             precision=_HIGHEST) - cross - cross.T)
  return (cov + cov.T) / 2
