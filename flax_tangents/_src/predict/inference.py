"""Gaussian predictions of infinite ensembles of infinitely wide networks.

`gp_inference` is exact Gaussian-process inference with the NNGP (Bayesian
posterior), the NTK (the distribution of an infinite ensemble trained to
convergence on the MSE) or "ntkgp"; `gradient_descent_mse_ensemble` adds
finite training times and computes the kernels itself from a `kernel_fn`.
Conventions follow Neural Tangents: the MSE loss is
`||f - y||^2 / (2 * y_train.size)` and `absolute_time = learning_rate * t`.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.predict import checks
from flax_tangents._src.predict import iterative
from flax_tangents._src.predict import linalg
from flax_tangents._src.predict import solvers
from flax_tangents._src.scale.tiled_kernel import TiledKernel
from flax_tangents._src.typing import Get

Axes = linalg.Axes


class Gaussian(NamedTuple):
  """A `(mean, covariance)` pair.

  Attributes:
    mean: mean, of the shape of the network outputs (with any leading time
      axes).
    covariance: covariance, of the shape of the respective kernel (e.g.
      `(N_test, N_test)`), with any leading time axes.
  """
  mean: jax.Array
  covariance: jax.Array


def _canonicalize_get(get: Get, allowed: Sequence[str]
                      ) -> tuple[bool, tuple[str, ...]]:
  """`(whether one string was given, the requested kernels in order)`."""
  if get is None:
    get = ("nngp", "ntk")
  single = isinstance(get, str)
  gets = (get,) if single else tuple(get)
  for g in gets:
    if g not in allowed:
      raise ValueError(f"get must be one of {tuple(allowed)} or a tuple of "
                       f"them; got {g!r}.")
  if len(set(gets)) != len(gets):
    raise ValueError(f"Repeated entries in get={gets}.")
  return single, gets


@functools.lru_cache(None)
def _namedtuple(fields: tuple[str, ...]):
  return collections.namedtuple("Gaussians", fields)


def _package(out: dict[str, Any], single: bool, gets: tuple[str, ...]):
  """NT's `get` semantics: a string gives one value, a tuple a namedtuple."""
  if single:
    return out[gets[0]]
  return _namedtuple(gets)(*(out[g] for g in gets))


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def _kernel_of(k: Any, g: str, name: str) -> Any:
  """`k` if it is an array, else its `g` field (a `Kernel` or namedtuple)."""
  if isinstance(k, TiledKernel):
    return k
  if _is_array(k):
    return jnp.asarray(k)
  value = getattr(k, g, None)
  if value is None:
    raise ValueError(f"{name} has no {g!r} kernel; pass a Kernel or a "
                     f"namedtuple with a {g!r} field.")
  return value if isinstance(value, TiledKernel) else jnp.asarray(value)


def _representative(k: Any) -> Any:
  """One train kernel of `k` (to choose the solver by its size)."""
  if isinstance(k, (TiledKernel, jax.Array, np.ndarray)):
    return k
  if isinstance(k, _LazyTrainKernels):
    return None  # Computed on demand: stays dense.
  for g in ("ntk", "nngp"):
    value = getattr(k, g, None)
    if value is not None:
      return value
  return None


_solve_jit = jax.jit(linalg.cho_solve)


def _symmetrize(cov: jax.Array) -> jax.Array:
  return (cov + jnp.swapaxes(cov, -1, -2)) / 2


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
  representative = _representative(k_train_train)
  config = None
  if representative is not None:
    config = solvers.resolve(solver, representative, len(layout.kept_axes))
  elif solver not in ("auto", "dense", None):
    raise ValueError("gp_inference: an iterative solver needs the train "
                     "kernels as arrays or TiledKernels.")
  if config is not None:
    layout.check_train_kernel(representative, "k_train_train")
    return iterative.gp_inference(k_train_train, y_train, diag_reg,
                                  diag_reg_absolute_scale, layout, config,
                                  _kernel_of, _canonicalize_get, _package,
                                  Gaussian)

  @functools.lru_cache(None)
  def factor(g: str) -> jax.Array:
    k_dd = _kernel_of(k_train_train, g, "k_train_train")
    layout.check_train_kernel(k_dd, f"k_train_train ({g})")
    return linalg.psd_cholesky(k_dd, f"k_train_train ({g})", diag_reg,
                               diag_reg_absolute_scale)

  @functools.lru_cache(None)
  def k_inv_y(g: str) -> jax.Array:
    solved = _solve_jit(factor(g), layout.to_matrix(y_train))
    linalg.check_solution(solved, f"k_train_train ({g})")
    return solved

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def compute(gets, has_cov, k_tds, k_tts, factors, k_inv_ys, nngp_dd):
    out = {}
    for g in gets:
      solved = "ntk" if g == "ntkgp" else g  # the kernel we solve with
      prior = "ntk" if g == "ntkgp" else "nngp"  # the covariance at init
      test_shape = layout.test_kept_shape(k_tds[solved])
      factor_g = factors[solved]
      k_td = linalg.to_matrix(k_tds[solved]).astype(factor_g.dtype)
      out_dtype = jnp.result_type(k_tds[solved], y_train)
      mean = layout.from_matrix(k_td @ k_inv_ys[solved], (), test_shape)
      mean = mean.astype(out_dtype)
      if not has_cov:
        out[g] = mean
        continue
      k_tt = linalg.to_matrix(k_tts[prior]).astype(factor_g.dtype)
      if g in ("nngp", "ntkgp"):
        cov = k_tt - k_td @ linalg.cho_solve(factor_g, k_td.T)
      else:
        nngp_td = linalg.to_matrix(k_tds["nngp"]).astype(k_td.dtype)
        nngp_dd_m = linalg.to_matrix(nngp_dd).astype(k_td.dtype)
        # A^T = T^{-1} T_dt maps train residuals to test outputs.
        a_t = linalg.cho_solve(factor_g, k_td.T)
        cross = nngp_td @ a_t
        cov = k_tt + a_t.T @ nngp_dd_m @ a_t - cross - cross.T
      cov = linalg.from_matrix(_symmetrize(cov), (), test_shape)
      out[g] = Gaussian(mean, cov.astype(out_dtype))
    return out

  def predict_fn(get: Get = None, k_test_train: Any = None,
                 k_test_test: Any = None):
    """Test-set posterior; see `gp_inference`."""
    single, gets = _canonicalize_get(get, ("nngp", "ntk", "ntkgp"))
    has_cov = k_test_test is not None
    if k_test_train is None:  # the training set: N(y_train, 0)
      out = {}
      for g in gets:
        k_dd = _kernel_of(k_train_train, "ntk" if g == "ntkgp" else g,
                          "k_train_train")
        mean = y_train.astype(jnp.result_type(k_dd, y_train))
        out[g] = (Gaussian(mean, jnp.zeros_like(k_dd, mean.dtype)) if has_cov
                  else mean)
      return _package(out, single, gets)

    ntk_cov = has_cov and "ntk" in gets
    if ntk_cov and (_is_array(k_train_train) or _is_array(k_test_train)):
      raise ValueError(
          "The NTK posterior covariance needs both the NNGP and the NTK "
          "in k_train_train and k_test_train: pass ft.Kernel objects or "
          "namedtuples with nngp and ntk fields, not arrays.")
    solved = sorted({"ntk" if g == "ntkgp" else g for g in gets})
    k_tds = {n: _kernel_of(k_test_train, n, "k_test_train")
             for n in set(solved) | ({"nngp"} if ntk_cov else set())}
    for name, k_td in k_tds.items():
      layout.test_kept_shape(k_td, f"k_test_train ({name})")
    k_tts = {}
    if has_cov:
      priors = {"ntk" if g == "ntkgp" else "nngp" for g in gets}
      k_tts = {n: _kernel_of(k_test_test, n, "k_test_test") for n in priors}
    nngp_dd = (_kernel_of(k_train_train, "nngp", "k_train_train") if ntk_cov
               else None)
    k_dds = [_kernel_of(k_train_train, n, "k_train_train") for n in solved]
    with checks.solve_precision(y_train, k_dds, k_tds, k_tts, nngp_dd):
      out = compute(gets, has_cov, k_tds, k_tts,
                    {n: factor(n) for n in solved},
                    {n: k_inv_y(n) for n in solved}, nngp_dd)
    out = checks.canonical_dtypes(out)
    linalg.check_solution(out, "the train kernel")
    return _package(out, single, gets)

  return predict_fn


def _kernel_call(kernel_fn: Callable[..., Any], x1: jax.Array,
                 x2: Optional[jax.Array], gets: tuple[str, ...],
                 kwargs: dict[str, Any]) -> dict[str, jax.Array]:
  """`{g: kernel}` from one `kernel_fn` call (NT's `get` semantics)."""
  if len(gets) == 1:
    out = kernel_fn(x1, x2, gets[0], **kwargs)
    return {gets[0]: _kernel_of(out, gets[0], "kernel_fn's output")}
  out = kernel_fn(x1, x2, gets, **kwargs)
  return {g: _kernel_of(out, g, "kernel_fn's output") for g in gets}


def _test_kwargs(train_kwargs: dict[str, Any],
                 test_kwargs: dict[str, Any]) -> tuple[dict, dict]:
  """Keyword arguments for the test-train and test-test `kernel_fn` calls.

  A value given for both calls as a pair `(for_x1, for_x2)` (e.g. per-input
  masks or patterns) is combined as `(test's, train's)` for the test-train
  call; an array given for the test call replaces the train one; any other
  value must not differ between the two calls.
  """
  kw_td, kw_tt = dict(train_kwargs), dict(train_kwargs)
  for key, v_tt in test_kwargs.items():
    if key not in train_kwargs:
      kw_td[key] = kw_tt[key] = v_tt
      continue
    v_dd = train_kwargs[key]
    if (isinstance(v_dd, tuple) and isinstance(v_tt, tuple) and
        len(v_dd) == 2 and len(v_tt) == 2):
      kw_td[key] = (v_tt[0], v_dd[0])
    elif _is_array(v_tt) or _is_array(v_dd):
      kw_td[key] = v_tt
    elif v_dd != v_tt:
      raise ValueError(
          f"kernel_fn keyword argument {key!r} is {v_dd!r} for the train "
          f"kernel but {v_tt!r} for the test kernels; they must agree.")
    kw_tt[key] = v_tt
  return kw_td, kw_tt


class _LazyTrainKernels:
  """`nngp`/`ntk` attributes computed by `fetch` on first access."""

  def __init__(self, fetch: Callable[[str], jax.Array]):
    self._fetch = fetch

  @property
  def nngp(self) -> jax.Array:
    return self._fetch("nngp")

  @property
  def ntk(self) -> jax.Array:
    return self._fetch("ntk")


def gradient_descent_mse_ensemble(
    kernel_fn: Callable[..., Any],
    x_train: jax.typing.ArrayLike,
    y_train: jax.typing.ArrayLike,
    learning_rate: float = 1.,
    diag_reg: float = 0.,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
    **kernel_fn_train_train_kwargs,
):
  r"""Outputs of an infinite ensemble of wide networks trained on the MSE.

  With `kernel_fn` the infinite-width kernel function of a network, this is
  the Gaussian distribution (over initializations) of its outputs after
  training time[s] `t` of gradient flow on the MSE. `get='ntk'` trains all
  layers; `get='nngp'` is the Bayesian counterpart (training the last layer
  only), which becomes NNGP inference at `t=None`. Finite times use an
  eigendecomposition of the regularized train kernel, `t=None` a Cholesky
  solve (via `gp_inference`); kernels and factorizations are cached.

  Args:
    kernel_fn: `kernel_fn(x1, x2, get, **kwargs)` returning an array for a
      string `get` and an `ft.Kernel` or namedtuple for a tuple, e.g.
      `ft.kernel_fn(model)`; it should represent an infinite-width kernel.
    x_train: training inputs.
    y_train: training targets.
    learning_rate: the step size; times `t` are in steps.
    diag_reg: strength of the diagonal regularizer of the train kernel.
    diag_reg_absolute_scale: `True` for `diag_reg` in absolute units, `False`
      for `diag_reg` times the kernel's mean diagonal.
    trace_axes: output axes along which the kernels are the identity.
    **kernel_fn_train_train_kwargs: keyword arguments for `kernel_fn` on the
      training data; also used for the test kernels unless the predictor's
      own keyword arguments override them.

  Returns:
    `predict_fn(t=None, x_test=None, get=None, compute_cov=False,
    **kernel_fn_test_test_kwargs)` giving the mean (or `Gaussian(mean,
    covariance)` when `compute_cov`) on `x_test` (or, for `x_test=None`, on
    the training set, unregularized) at times `t` (any shape; leading axes),
    for `get` in `'nngp'`, `'ntk'` or a tuple (default both; a tuple gives a
    namedtuple).

  Raises:
    NotPSDError: (from `predict_fn`) if a train kernel is not positive
      semi-definite.
    ValueError: for a negative or non-finite `diag_reg` or `learning_rate`,
      and (from `predict_fn`) for negative or non-finite times.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> def kernel_fn(x1, x2, get):  # a linear model: NNGP = NTK = x1 . x2
  ...   return x1 @ (x1 if x2 is None else x2).T
  >>> x = jnp.array([[1., 0.], [0., 1.]])
  >>> predict_fn = ft.predict.gradient_descent_mse_ensemble(
  ...     kernel_fn, x, jnp.array([[1.], [2.]]))
  >>> print(predict_fn(None, jnp.array([[1., 1.]]), 'ntk'))
  [[3.]]
  """
  checks.check_diag_reg(diag_reg)
  checks.check_learning_rate(learning_rate)
  x_train = jnp.asarray(x_train)
  y_train = jnp.asarray(y_train)
  layout = linalg.OutputLayout(y_train.shape, trace_axes)
  normalization = y_train.size
  y_matrix = layout.to_matrix(y_train)
  train_kernels: dict[str, jax.Array] = {}

  def fetch_train(gets: tuple[str, ...]) -> None:
    missing = tuple(g for g in gets if g not in train_kernels)
    if missing:
      train_kernels.update(_kernel_call(kernel_fn, x_train, None, missing,
                                        kernel_fn_train_train_kwargs))
      for g in missing:
        layout.check_train_kernel(train_kernels[g],
                                  f"kernel_fn(x_train, None, {g!r})")

  def train_kernel(g: str) -> jax.Array:
    fetch_train((g,))
    return train_kernels[g]

  infinite_time = gp_inference(_LazyTrainKernels(train_kernel), y_train,
                               diag_reg, diag_reg_absolute_scale, trace_axes)

  @functools.lru_cache(None)
  def eigh(g: str):
    return linalg.psd_eigh(train_kernel(g), f"kernel_fn(x_train, None, {g!r})",
                           diag_reg, diag_reg_absolute_scale)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def finite_time(g, compute_cov, t, eigen, k_td, nngp_tt, nngp_dd):
    evals, evecs = eigen
    dtype = evecs.dtype
    t_arr = jnp.asarray(t, dtype)
    t_shape = t_arr.shape
    times = t_arr.reshape((-1,)) * learning_rate / normalization
    coords = evecs.T @ y_matrix.astype(dtype)  # targets in the eigenbasis
    if compute_cov:
      nngp_dd = _symmetrize(linalg.to_matrix(nngp_dd).astype(dtype))

    if k_td is None:  # the training set
      kept_shape = layout.train_kept_shape
      decay = jnp.exp(-times[:, None] * evals[None, :])  # (T, m)
      mean = jnp.einsum("ik,tk,kc->tic", evecs, 1 - decay, coords)
      if compute_cov:
        if g == "nngp":
          cov = jnp.einsum("ik,tk,jk->tij", evecs,
                           evals[None, :] * decay**2, evecs)
        else:
          decay_op = jnp.einsum("ik,tk,jk->tij", evecs, decay, evecs)
          cov = decay_op @ nngp_dd @ decay_op
    else:  # the test set
      k_td_g = linalg.to_matrix(k_td[g])
      kept_shape = layout.test_kept_shape(k_td[g])
      projected = k_td_g.astype(dtype) @ evecs  # (test rows, m)
      gain = linalg.phi1(evals, times)  # (1 - exp(-l t)) / l
      mean = jnp.einsum("lk,tk,kc->tlc", projected, gain, coords)
      if compute_cov:
        nngp_tt_m = linalg.to_matrix(nngp_tt).astype(dtype)[None]
        if g == "nngp":
          cov = nngp_tt_m - jnp.einsum("lk,tk,jk->tlj", projected,
                                       linalg.phi1(evals, 2 * times),
                                       projected)
        else:
          # A(t) = T_td T^{-1} (1 - exp(-T t)), test rows x train rows.
          a = jnp.einsum("lk,tk,jk->tlj", projected, gain, evecs)
          nngp_td = linalg.to_matrix(k_td["nngp"]).astype(dtype)
          cross = a @ nngp_td.T
          cov = (nngp_tt_m + a @ nngp_dd @ jnp.swapaxes(a, 1, 2) - cross -
                 jnp.swapaxes(cross, 1, 2))

    mean = layout.from_matrix(mean, t_shape, kept_shape)
    if not compute_cov:
      return mean
    cov = linalg.from_matrix(_symmetrize(cov), t_shape, kept_shape)
    return Gaussian(mean, cov)

  def predict_fn(t: Any = None, x_test: Optional[jax.typing.ArrayLike] = None,
                 get: Get = None, compute_cov: bool = False,
                 **kernel_fn_test_test_kwargs):
    """Mean [and covariance] at times `t`; see the factory."""
    single, gets = _canonicalize_get(get, ("nngp", "ntk"))
    checks.check_times(t)
    # The NTK covariance also needs the NNGP (the covariance at init).
    needed = tuple(g for g in ("nngp", "ntk")
                   if g in gets or (g == "nngp" and compute_cov))
    fetch_train(needed)

    k_td = nngp_tt = None
    if x_test is not None:
      x_test = jnp.asarray(x_test)
      kw_td, kw_tt = _test_kwargs(kernel_fn_train_train_kwargs,
                                  kernel_fn_test_test_kwargs)
      k_td = _kernel_call(kernel_fn, x_test, x_train, needed, kw_td)
      if compute_cov:
        nngp_tt = _kernel_call(kernel_fn, x_test, None, ("nngp",),
                               kw_tt)["nngp"]

    if t is None:
      k_td_tuple = (None if k_td is None else
                    collections.namedtuple("Kernels", needed)(**k_td))
      k_tt_arg = nngp_tt if x_test is not None else (True if compute_cov
                                                     else None)
      return infinite_time(get=gets[0] if single else gets,
                           k_test_train=k_td_tuple, k_test_test=k_tt_arg)

    if k_td is not None:
      for g in needed:
        layout.test_kept_shape(k_td[g], f"kernel_fn(x_test, x_train, {g!r})")
    with checks.solve_precision(t, train_kernels, k_td, nngp_tt, y_train):
      out = {g: finite_time(g, compute_cov, t, eigh(g), k_td, nngp_tt,
                            train_kernels.get("nngp") if compute_cov else None)
             for g in gets}
    return _package(checks.canonical_dtypes(out), single, gets)

  return predict_fn
