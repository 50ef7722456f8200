"""Gaussian predictions of infinite ensembles of infinitely wide networks.

`gp_inference` is exact Gaussian-process inference with the NNGP (Bayesian
posterior), the NTK (the distribution of an infinite ensemble trained to
convergence on the MSE) or "ntkgp"; `ensemble.py` adds finite training
times (`gradient_descent_mse_ensemble`) and computes the kernels itself from
a `kernel_fn`. Conventions follow Neural Tangents: the MSE loss is
`||f - y||^2 / (2 * y_train.size)` and `absolute_time = learning_rate * t`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.predict import checks
from flax_tangents._src.predict import conventions
from flax_tangents._src.predict import iterative
from flax_tangents._src.predict import linalg
from flax_tangents._src.predict import solvers
from flax_tangents._src.predict.conventions import Gaussian
from flax_tangents._src.predict.conventions import kernel_of
from flax_tangents._src.scale.tiled_kernel import TiledKernel
from flax_tangents._src.typing import Get

Axes = linalg.Axes

_solve_jit = jax.jit(linalg.cho_solve)


def gp_inference(
    k_train_train: Any,
    y_train: jax.typing.ArrayLike,
    diag_reg: float = 0.,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
    *,
    solver: solvers.SolverArg = "auto",
):
  r"""Exact Gaussian-process "posterior" with the NNGP, NTK or NTKGP.

  - `'nngp'`: the posterior of an infinitely wide Bayesian network,
    `mean = K_td K^{-1} y`, `cov = K_tt - K_td K^{-1} K_dt`.
  - `'ntk'`: the outputs of an infinite ensemble of infinitely wide networks
    trained to convergence by gradient flow on the MSE,
    `mean = T_td T^{-1} y` and
    `cov = K_tt + T_td T^{-1} K T^{-1} T_dt - (T_td T^{-1} K_dt + h.c.)`,
    with `T` the NTK and `K` the NNGP.
  - `'ntkgp'`: the GP posterior with the NTK as covariance.

  Solves use a Cholesky factorization of the symmetrized, regularized train
  kernel, made once per kernel on first use and cached.

  Args:
    k_train_train: train-train kernel: an array (used for every `get`), an
      `ft.Kernel`, or a namedtuple with `nngp` and/or `ntk` fields.
    y_train: training targets.
    diag_reg: strength of the diagonal regularizer added to the train kernel.
    diag_reg_absolute_scale: `True` for `diag_reg` in absolute units, `False`
      for `diag_reg` times the kernel's mean diagonal.
    trace_axes: output axes along which the kernels are the identity.
    solver: `'dense'` (Cholesky on one device), `'cg'` or
      `ft.predict.CG(...)` (preconditioned conjugate gradients on the kernel
      as an operator, never gathered; the train kernels may then be sharded
      over a mesh or `ft.predict.TiledKernel`s on disk), or `'auto'`:
      `'cg'` for a `TiledKernel` or an `(N, N)` kernel with `N > 10000`,
      else `'dense'`.

  Returns:
    `predict_fn(get=None, k_test_train=None, k_test_test=None)`. `get` is
    `'nngp'`, `'ntk'`, `'ntkgp'` or a tuple (default `('nngp', 'ntk')`); a
    string gives one result, a tuple a namedtuple. Each result is the mean, or
    a `Gaussian(mean, covariance)` when `k_test_test` is given (its `nngp`,
    or `ntk` for `'ntkgp'`). The NTK covariance needs both kernels in
    `k_train_train` and `k_test_train`. `k_test_train=None` gives train-set
    outputs, `N(y_train, 0)`. With an iterative solver,
    `predict_fn.solve_info` maps each solve to its `ft.predict.SolveInfo`.

  Raises:
    NotPSDError: (from `predict_fn`) if a train kernel is not numerically
      positive definite after regularization.
    ValueError: for a negative or non-finite `diag_reg`.

  Warns:
    IllConditionedWarning: (from `predict_fn`) if a train kernel is float32
      and ill-conditioned enough that its rounding can spoil the solution.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> k_dd = jnp.array([[2., 1.], [1., 2.]])
  >>> k_td = jnp.array([[1., 1.]])
  >>> predict_fn = ft.predict.gp_inference(k_dd, jnp.array([[1.], [1.]]))
  >>> mean, cov = predict_fn('nngp', k_td, jnp.array([[1.]]))
  >>> print(jnp.round(mean, 4), jnp.round(cov, 4))
  [[0.6667]] [[0.3333]]
  """
  checks.check_diag_reg(diag_reg)
  y_train = jnp.asarray(y_train)
  layout = linalg.OutputLayout(y_train.shape, trace_axes)
  config = _iterative_config(k_train_train, solver, layout)
  if config is not None:
    return iterative.gp_inference(k_train_train, y_train, diag_reg,
                                  diag_reg_absolute_scale, layout, config)
  factor, k_inv_y = _cached_solves(k_train_train, y_train, layout, diag_reg,
                                   diag_reg_absolute_scale)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def compute(gets, has_cov, k_tds, k_tts, factors, k_inv_ys, nngp_dd):
    return {g: _posterior(g, has_cov, layout, y_train, k_tds, k_tts, factors,
                          k_inv_ys, nngp_dd) for g in gets}

  def predict_fn(get: Get = None, k_test_train: Any = None,
                 k_test_test: Any = None):
    """Test-set posterior; see `gp_inference`."""
    single, gets = conventions.canonicalize_get(get, ("nngp", "ntk",
                                                     "ntkgp"))
    has_cov = k_test_test is not None
    if k_test_train is None:  # the training set: N(y_train, 0)
      return conventions.package(
          _train_set(k_train_train, y_train, gets, has_cov), single, gets)
    solved, k_tds, k_tts, nngp_dd, k_dds = _test_kernels(
        k_train_train, k_test_train, k_test_test, gets, layout)
    with checks.solve_precision(y_train, k_dds, k_tds, k_tts, nngp_dd):
      out = compute(gets, has_cov, k_tds, k_tts,
                    {n: factor(n) for n in solved},
                    {n: k_inv_y(n) for n in solved}, nngp_dd)
    out = checks.canonical_dtypes(out)
    linalg.check_solution(out, "the train kernel")
    return conventions.package(out, single, gets)

  return predict_fn


def _representative(k: Any) -> Any:
  """One train kernel of `k` (to choose the solver by its size)."""
  if isinstance(k, (TiledKernel, jax.Array, np.ndarray)):
    return k
  if isinstance(k, conventions.LazyTrainKernels):
    return None  # Computed on demand: stays dense.
  for g in ("ntk", "nngp"):
    value = getattr(k, g, None)
    if value is not None:
      return value
  return None


def _iterative_config(k_train_train: Any, solver: solvers.SolverArg,
                      layout: linalg.OutputLayout) -> Any:
  """The iterative solver's configuration, or None for the dense solver."""
  representative = _representative(k_train_train)
  if representative is None:
    if solver not in ("auto", "dense", None):
      raise ValueError("gp_inference: an iterative solver needs the train "
                       "kernels as arrays or TiledKernels.")
    return None
  config = solvers.resolve(solver, representative, len(layout.kept_axes))
  if config is not None:
    layout.check_train_kernel(representative, "k_train_train")
  return config


def _cached_solves(k_train_train: Any, y_train: jax.Array,
                   layout: linalg.OutputLayout, diag_reg: float,
                   diag_reg_absolute_scale: bool
                   ) -> tuple[Callable[[str], Any], Callable[[str], Any]]:
  """`(factor(g), k_inv_y(g))`: Cholesky factors and `K^{-1} y`, cached."""

  @functools.lru_cache(None)
  def factor(g: str) -> jax.Array:
    k_dd = kernel_of(k_train_train, g, "k_train_train")
    layout.check_train_kernel(k_dd, f"k_train_train ({g})")
    return linalg.psd_cholesky(k_dd, f"k_train_train ({g})", diag_reg,
                               diag_reg_absolute_scale)

  @functools.lru_cache(None)
  def k_inv_y(g: str) -> jax.Array:
    solved = _solve_jit(factor(g), layout.to_matrix(y_train))
    linalg.check_solution(solved, f"k_train_train ({g})")
    return solved

  return factor, k_inv_y


def _train_set(k_train_train: Any, y_train: jax.Array,
               gets: tuple[str, ...], has_cov: bool) -> dict[str, Any]:
  """`{g: N(y_train, 0)}`: the posterior on the training set."""
  out = {}
  for g in gets:
    k_dd = kernel_of(k_train_train, "ntk" if g == "ntkgp" else g,
                     "k_train_train")
    mean = y_train.astype(jnp.result_type(k_dd, y_train))
    out[g] = (Gaussian(mean, jnp.zeros_like(k_dd, mean.dtype)) if has_cov
              else mean)
  return out


def _test_kernels(k_train_train: Any, k_test_train: Any, k_test_test: Any,
                  gets: tuple[str, ...], layout: linalg.OutputLayout):
  """`(solved, k_tds, k_tts, nngp_dd, k_dds)`: the kernels a call needs.

  `solved` names the train kernels solved with, `k_tds`/`k_tts` map names
  to test-train/test-test kernels, `nngp_dd` is the train NNGP (for the NTK
  covariance, else None) and `k_dds` the solved train kernels.
  """
  has_cov = k_test_test is not None
  ntk_cov = has_cov and "ntk" in gets
  if ntk_cov and (conventions.is_array(k_train_train) or
                  conventions.is_array(k_test_train)):
    raise ValueError(
        "The NTK posterior covariance needs both the NNGP and the NTK "
        "in k_train_train and k_test_train: pass ft.Kernel objects or "
        "namedtuples with nngp and ntk fields, not arrays.")
  solved = sorted({"ntk" if g == "ntkgp" else g for g in gets})
  k_tds = {n: kernel_of(k_test_train, n, "k_test_train")
           for n in set(solved) | ({"nngp"} if ntk_cov else set())}
  for name, k_td in k_tds.items():
    layout.test_kept_shape(k_td, f"k_test_train ({name})")
  k_tts = {}
  if has_cov:
    priors = {"ntk" if g == "ntkgp" else "nngp" for g in gets}
    k_tts = {n: kernel_of(k_test_test, n, "k_test_test") for n in priors}
  nngp_dd = (kernel_of(k_train_train, "nngp", "k_train_train") if ntk_cov
             else None)
  k_dds = [kernel_of(k_train_train, n, "k_train_train") for n in solved]
  return solved, k_tds, k_tts, nngp_dd, k_dds


def _posterior(g: str, has_cov: bool, layout: linalg.OutputLayout,
               y_train: jax.Array, k_tds: dict[str, Any],
               k_tts: dict[str, Any], factors: dict[str, Any],
               k_inv_ys: dict[str, Any], nngp_dd: Optional[jax.Array]):
  """The mean (or `Gaussian`) of `get=g` on the test set (traced in `jit`)."""
  solved = "ntk" if g == "ntkgp" else g  # the kernel we solve with
  prior = "ntk" if g == "ntkgp" else "nngp"  # the covariance at init
  test_shape = layout.test_kept_shape(k_tds[solved])
  factor_g = factors[solved]
  k_td = linalg.to_matrix(k_tds[solved]).astype(factor_g.dtype)
  out_dtype = jnp.result_type(k_tds[solved], y_train)
  mean = layout.from_matrix(k_td @ k_inv_ys[solved], (), test_shape)
  mean = mean.astype(out_dtype)
  if not has_cov:
    return mean
  k_tt = linalg.to_matrix(k_tts[prior]).astype(factor_g.dtype)
  if g in ("nngp", "ntkgp"):
    cov = k_tt - k_td @ linalg.cho_solve(factor_g, k_td.T)
  else:
    assert nngp_dd is not None  # `_test_kernels` passes it for the NTK.
    nngp_td = linalg.to_matrix(k_tds["nngp"]).astype(k_td.dtype)
    nngp_dd_m = linalg.to_matrix(nngp_dd).astype(k_td.dtype)
    # A^T = T^{-1} T_dt maps train residuals to test outputs.
    a_t = linalg.cho_solve(factor_g, k_td.T)
    cross = nngp_td @ a_t
    cov = k_tt + a_t.T @ nngp_dd_m @ a_t - cross - cross.T
  cov = linalg.from_matrix(conventions.symmetrize(cov), (), test_shape)
  return Gaussian(mean, cov.astype(out_dtype))
