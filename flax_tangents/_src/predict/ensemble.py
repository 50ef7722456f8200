"""Outputs of an infinite ensemble of wide networks trained on the MSE.

`gradient_descent_mse_ensemble` computes the train and test kernels itself
from a `kernel_fn` (cached) and gives the Gaussian distribution over
initializations of the outputs at any training time: finite times in the
eigenbasis of the regularized train kernel, `t=None` by `gp_inference`.
Conventions follow Neural Tangents: the MSE loss is
`||f - y||^2 / (2 * y_train.size)` and `absolute_time = learning_rate * t`.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from flax_tangents._src import conventions as shared
from flax_tangents._src.predict import checks
from flax_tangents._src.predict import conventions
from flax_tangents._src.predict import inference
from flax_tangents._src.predict import linalg
from flax_tangents._src.predict.conventions import Gaussian
from flax_tangents._src.predict.conventions import kernel_of
from flax_tangents._src.typing import Get

Axes = linalg.Axes


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
  y_matrix = layout.to_matrix(y_train)
  train = _TrainKernels(kernel_fn, x_train, kernel_fn_train_train_kwargs,
                        layout, diag_reg, diag_reg_absolute_scale)
  infinite_time = inference.gp_inference(
      conventions.LazyTrainKernels(train.kernel), y_train, diag_reg,
      diag_reg_absolute_scale, trace_axes)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def finite_time(g, compute_cov, t, eigen, k_td, nngp_tt, nngp_dd):
    return _moments(g, compute_cov, t, eigen, k_td, nngp_tt, nngp_dd, layout,
                    y_matrix, learning_rate, y_train.size)

  def predict_fn(t: Any = None, x_test: Optional[jax.typing.ArrayLike] = None,
                 get: Get = None, compute_cov: bool = False,
                 **kernel_fn_test_test_kwargs):
    """Mean [and covariance] at times `t`; see the factory."""
    single, gets = conventions.canonicalize_get(get, ("nngp", "ntk"))
    checks.check_times(t)
    # The NTK covariance also needs the NNGP (the covariance at init).
    needed = tuple(g for g in ("nngp", "ntk")
                   if g in gets or (g == "nngp" and compute_cov))
    train.fetch(needed)
    k_td, nngp_tt = _test_kernels(
        kernel_fn, x_test, x_train, needed, compute_cov,
        kernel_fn_train_train_kwargs, kernel_fn_test_test_kwargs)
    if t is None:
      return _at_infinity(infinite_time, gets, single, needed, k_td, nngp_tt,
                          x_test is not None, compute_cov)
    if k_td is not None:
      for g in needed:
        layout.test_kept_shape(k_td[g], f"kernel_fn(x_test, x_train, {g!r})")
    with checks.solve_precision(t, train.kernels, k_td, nngp_tt, y_train):
      out = {g: finite_time(g, compute_cov, t, train.eigh(g), k_td, nngp_tt,
                            train.kernels.get("nngp") if compute_cov else None)
             for g in gets}
    return conventions.package(checks.canonical_dtypes(out), single, gets)

  return predict_fn


class _TrainKernels:
  """The train kernels of `kernel_fn`, computed on first use and cached.

  Args:
    kernel_fn: the kernel function.
    x_train: training inputs.
    kwargs: keyword arguments of `kernel_fn` on the training data.
    layout: the outputs' layout (checks the kernels' shapes).
    diag_reg: the diagonal regularizer of the eigendecompositions.
    diag_reg_absolute_scale: whether `diag_reg` is absolute.
  """

  def __init__(self, kernel_fn: Callable[..., Any], x_train: jax.Array,
               kwargs: dict[str, Any], layout: linalg.OutputLayout,
               diag_reg: float, diag_reg_absolute_scale: bool):
    self.kernels: dict[str, jax.Array] = {}
    self._kernel_fn, self._x_train, self._kwargs = kernel_fn, x_train, kwargs
    self._layout = layout
    self._diag_reg, self._absolute = diag_reg, diag_reg_absolute_scale
    self.eigh = functools.lru_cache(None)(self._eigh)

  def fetch(self, gets: tuple[str, ...]) -> None:
    """Computes the kernels of `gets` not computed yet, in one call."""
    missing = tuple(g for g in gets if g not in self.kernels)
    if missing:
      self.kernels.update(_kernel_call(self._kernel_fn, self._x_train, None,
                                       missing, self._kwargs))
      for g in missing:
        self._layout.check_train_kernel(self.kernels[g],
                                        f"kernel_fn(x_train, None, {g!r})")

  def kernel(self, g: str) -> jax.Array:
    """The train kernel `g`."""
    self.fetch((g,))
    return self.kernels[g]

  def _eigh(self, g: str):
    return linalg.psd_eigh(self.kernel(g), f"kernel_fn(x_train, None, {g!r})",
                           self._diag_reg, self._absolute)


def _test_kernels(kernel_fn: Callable[..., Any], x_test: Any,
                  x_train: jax.Array, needed: tuple[str, ...],
                  compute_cov: bool, train_kwargs: dict[str, Any],
                  test_kwargs: dict[str, Any]):
  """`(k_td, nngp_tt)`: test-train kernels `{g: kernel}` and the test NNGP.

  Both are None without `x_test`; `nngp_tt` is None without `compute_cov`.
  """
  k_td = nngp_tt = None
  if x_test is not None:
    x_test = jnp.asarray(x_test)
    kw_td, kw_tt = _test_kwargs(train_kwargs, test_kwargs)
    k_td = _kernel_call(kernel_fn, x_test, x_train, needed, kw_td)
    if compute_cov:
      nngp_tt = _kernel_call(kernel_fn, x_test, None, ("nngp",),
                             kw_tt)["nngp"]
  return k_td, nngp_tt


def _at_infinity(infinite_time: Callable[..., Any], gets: tuple[str, ...],
                 single: bool, needed: tuple[str, ...], k_td: Any,
                 nngp_tt: Any, has_test: bool, compute_cov: bool) -> Any:
  """The outputs at `t = inf`, by `gp_inference`."""
  k_td_tuple = (None if k_td is None else
                collections.namedtuple("Kernels", needed)(**k_td))
  k_tt_arg = nngp_tt if has_test else (True if compute_cov else None)
  return infinite_time(get=gets[0] if single else gets,
                       k_test_train=k_td_tuple, k_test_test=k_tt_arg)


def _moments(g, compute_cov, t, eigen, k_td, nngp_tt, nngp_dd, layout,
             y_matrix, learning_rate, normalization):
  """Mean [and covariance] of `get=g` at finite times (traced in `jit`)."""
  evals, evecs = eigen
  dtype = evecs.dtype
  t_arr = jnp.asarray(t, dtype)
  t_shape = t_arr.shape
  times = t_arr.reshape((-1,)) * learning_rate / normalization
  coords = evecs.T @ y_matrix.astype(dtype)  # targets in the eigenbasis
  if compute_cov:
    nngp_dd = conventions.symmetrize(linalg.to_matrix(nngp_dd).astype(dtype))
  if k_td is None:  # the training set
    kept_shape = layout.train_kept_shape
    mean, cov = _train_moments(g, compute_cov, evals, evecs, times, coords,
                               nngp_dd)
  else:  # the test set
    mean, cov = _test_moments(g, compute_cov, evals, evecs, times, coords,
                              nngp_dd, k_td, nngp_tt)
    kept_shape = layout.test_kept_shape(k_td[g])
  mean = layout.from_matrix(mean, t_shape, kept_shape)
  if not compute_cov:
    return mean
  assert cov is not None  # The moments include it with `compute_cov`.
  cov = linalg.from_matrix(conventions.symmetrize(cov), t_shape, kept_shape)
  return Gaussian(mean, cov)


def _train_moments(g, compute_cov, evals, evecs, times, coords, nngp_dd):
  """`(mean, cov or None)` on the training set, as matrices."""
  decay = jnp.exp(-times[:, None] * evals[None, :])  # (T, m)
  mean = jnp.einsum("ik,tk,kc->tic", evecs, 1 - decay, coords)
  cov = None
  if compute_cov:
    if g == "nngp":
      cov = jnp.einsum("ik,tk,jk->tij", evecs, evals[None, :] * decay**2,
                       evecs)
    else:
      decay_op = jnp.einsum("ik,tk,jk->tij", evecs, decay, evecs)
      cov = decay_op @ nngp_dd @ decay_op
  return mean, cov


def _test_moments(g, compute_cov, evals, evecs, times, coords, nngp_dd, k_td,
                  nngp_tt):
  """`(mean, cov or None)` on the test set, as matrices."""
  dtype = evecs.dtype
  k_td_g = linalg.to_matrix(k_td[g])
  projected = k_td_g.astype(dtype) @ evecs  # (test rows, m)
  gain = linalg.phi1(evals, times)  # (1 - exp(-l t)) / l
  mean = jnp.einsum("lk,tk,kc->tlc", projected, gain, coords)
  cov = None
  if compute_cov:
    nngp_tt_m = linalg.to_matrix(nngp_tt).astype(dtype)[None]
    if g == "nngp":
      cov = nngp_tt_m - jnp.einsum("lk,tk,jk->tlj", projected,
                                   linalg.phi1(evals, 2 * times), projected)
    else:
      # A(t) = T_td T^{-1} (1 - exp(-T t)), test rows x train rows.
      a = jnp.einsum("lk,tk,jk->tlj", projected, gain, evecs)
      nngp_td = linalg.to_matrix(k_td["nngp"]).astype(dtype)
      cross = a @ nngp_td.T
      cov = (nngp_tt_m + a @ nngp_dd @ jnp.swapaxes(a, 1, 2) - cross -
             jnp.swapaxes(cross, 1, 2))
  return mean, cov


def _kernel_call(kernel_fn: Callable[..., Any], x1: jax.Array,
                 x2: Optional[jax.Array], gets: tuple[str, ...],
                 kwargs: dict[str, Any]) -> dict[str, jax.Array]:
  """`{g: kernel}` from one `kernel_fn` call (NT's `get` semantics)."""
  if len(gets) == 1:
    out = kernel_fn(x1, x2, gets[0], **kwargs)
    return {gets[0]: kernel_of(out, gets[0], "kernel_fn's output")}
  out = kernel_fn(x1, x2, gets, **kwargs)
  return {g: kernel_of(out, g, "kernel_fn's output") for g in gets}


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
    if shared.is_pair(key, v_dd) and shared.is_pair(key, v_tt):
      kw_td[key] = (v_tt[0], v_dd[0])
    elif conventions.is_array(v_tt) or conventions.is_array(v_dd):
      kw_td[key] = v_tt
    elif v_dd != v_tt:
      raise ValueError(
          f"kernel_fn keyword argument {key!r} is {v_dd!r} for the train "
          f"kernel but {v_tt!r} for the test kernels; they must agree.")
    kw_tt[key] = v_tt
  return kw_td, kw_tt
