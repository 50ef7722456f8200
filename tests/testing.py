"""The shared test harness: `assert_trees_close`; `make_inputs`,
`jit_kernel_fn`; `sample_kernels` (finite networks' NNGP and NTK, written
here so checks do not depend on the library's empirical kernels),
`exact_ntk`, `assert_mc_close`; and `LayerRuleTest`, whose subclasses give
only tables of rows (`MonteCarloCase`, `ExactCase`, `DtypeCase`,
`RaisesCase`), each row getting its Monte Carlo, exact, float32/float64 and
jit, or error check."""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft


def assert_trees_close(actual: Any, desired: Any, *, rtol: float = 1e-12,
                       atol: float = 0.0,
                       fields: Optional[Sequence[str]] = None) -> None:
  """Asserts equal tree structures and leaves close within `rtol`, `atol`.

  For `ft.Kernel`s the structure holds the static fields (shapes, layouts,
  flags), so those must match exactly. With `fields`, only those fields of
  two kernels, their shapes and spatial layout are compared (their flags,
  such as `is_input`, may differ).

  >>> assert_trees_close({"a": np.ones(2)}, {"a": np.ones(2) + 1e-14})
  """
  if fields is not None:
    assert (actual.shape1, actual.shape2, actual.diagonal_spatial) == (
        desired.shape1, desired.shape2, desired.diagonal_spatial)
    actual, desired = ({f: getattr(k, f) for f in fields}
                       for k in (actual, desired))
  flat_a, tree_a = jax.tree.flatten(actual)
  flat_d, tree_d = jax.tree.flatten(desired)
  assert tree_a == tree_d, f"tree structures differ:\n{tree_a}\n{tree_d}"
  for path, a, d in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                        flat_a, flat_d):
    np.testing.assert_allclose(a, d, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path[0]))


def make_inputs(spatial: tuple[int, ...] = (), n1: int = 2, n2: int = 2,
                channels: int = 2, seed: int = 0
                ) -> tuple[jax.Array, jax.Array]:
  """Standard normal batches `(n1, *spatial, channels)`, `(n2, ...)`.

  >>> x1, x2 = make_inputs((4, 4), n2=3)
  >>> x1.shape, x2.shape
  ((2, 4, 4, 2), (3, 4, 4, 2))
  """
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (n1,) + spatial + (channels,)),
          jax.random.normal(k2, (n2,) + spatial + (channels,)))


def jit_kernel_fn(model: nn.Module, **kwargs: Any) -> Callable[..., Any]:
  """`ft.kernel_fn(model)` compiled, `get` static: one compilation instead
  of many eager ones; each call makes a new function (no shared trace)."""
  return jax.jit(ft.kernel_fn(model, **kwargs), static_argnames="get")


def _pair_spec(n_spatial: int, extra: str = "") -> str:
  """einsum `a{s}c{extra},b{t}c{extra}->ab{s0 t0 s1 t1 ...}`."""
  letters = iter(string.ascii_lowercase[4:])
  s = [next(letters) for _ in range(n_spatial)]
  t = [next(letters) for _ in range(n_spatial)]
  out = "".join(i + j for i, j in zip(s, t))
  return f"a{''.join(s)}c{extra},b{''.join(t)}c{extra}->ab{out}"


def _jacobian_kernel(out1, jac1, out2, jac2, precision=None):
  """`J(x1) J(x2)^T / C` in the analytic layout, contracting parameters."""
  spec = _pair_spec(out1.ndim - 2, "p")
  return sum(jnp.einsum(spec, j1.reshape(out1.shape + (-1,)),
                        j2.reshape(out2.shape + (-1,)), precision=precision)
             for j1, j2 in zip(jax.tree.leaves(jac1), jax.tree.leaves(jac2))
             ) / out1.shape[-1]


def _projected_ntk(f, params, x, out, v_key):
  """Unbiased NTK estimate from gradients of `v . f(x_i)` (no Jacobians)."""
  n_out = out.shape[-1]
  v = jax.random.normal(v_key, (n_out,), out.dtype)
  grads = jax.vmap(lambda xi: jax.grad(
      lambda p: jnp.dot(f(p, xi[None])[0], v))(params))(x)
  flat = jnp.concatenate([g.reshape(x.shape[0], -1)
                          for g in jax.tree.leaves(grads)], axis=1)
  return flat @ flat.T / n_out


def sample_kernels(model: nn.Module, x1: Any, x2: Any, key: jax.Array,
                   n_samples: int, *, ntk: Optional[str] = "jacobian",
                   joint: bool = False, dropout: bool = False,
                   batch_size: Optional[int] = None,
                   **apply_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """Per-network NNGP and NTK estimates, `(n_samples, N1, N2, ...)` each.

  One network from `model.init` (applied with all its variables, only
  `'params'` differentiated) gives `f(x1) f(x2)^T / C` and
  `J(x1) J(x2)^T / C` (contracting channels and parameters) in the analytic
  layout `(N1, N2, S1, S1', ...)`. `x2=None`: one forward pass on `x1` (one
  dropout mask for both sides, as `x1_is_x2`). `ntk`: `'jacobian'`,
  `'projected'` (gradients of `v . f` for a standard normal `v`: unbiased,
  noisier, no Jacobians; outputs `(N, C)`) or `None` (zeros). `joint`: one
  forward pass on `x1` and `x2` concatenated, as dropout (implied by
  `dropout`, which passes a `'dropout'` key) and batch-wide `apply_kwargs`
  need. `batch_size`: networks per `jax.lax.map` step (`None`: vmap all).

  >>> key = jax.random.key(0)
  >>> nngp, _ = sample_kernels(nn.Dense(3), np.ones((2, 4)), None, key, 5,
  ...                          ntk=None)
  >>> nngp.shape
  (5, 2, 2)
  """
  joint = joint or dropout or x2 is None or ntk == "projected"
  n1 = x1.shape[0]
  xs = x1 if x2 is None else jnp.concatenate([jnp.asarray(x1),
                                              jnp.asarray(x2)])

  def one_network(k):
    extra = dropout or ntk == "projected"
    init_key, extra_key = jax.random.split(k) if extra else (k, None)
    variables = model.init(init_key, x1)
    rngs = {"dropout": extra_key} if dropout else {}
    f = lambda p, x: model.apply({**variables, "params": p}, x, rngs=rngs,
                                 **apply_kwargs)
    params = variables.get("params", {})
    in1, in2 = (xs, xs) if joint else (x1, x2)
    out1 = f(params, in1)
    out2 = out1 if joint else f(params, in2)
    nngp = jnp.einsum(_pair_spec(out1.ndim - 2), out1, out2) / out1.shape[-1]
    if ntk == "projected":
      emp = _projected_ntk(f, params, xs, out1, extra_key)
    elif ntk is None:
      emp = jnp.zeros_like(nngp)
    else:
      jac1 = jax.jacobian(f)(params, in1)
      jac2 = jac1 if joint else jax.jacobian(f)(params, in2)
      emp = _jacobian_kernel(out1, jac1, out2, jac2)
    if joint and x2 is not None:
      return nngp[:n1, n1:], emp[:n1, n1:]
    return nngp, emp

  keys = jax.random.split(key, n_samples)
  if batch_size is None:
    run = jax.vmap(one_network)
  else:
    run = lambda ks: jax.lax.map(one_network, ks, batch_size=batch_size)
  nngp, emp = jax.jit(run)(keys)
  return np.asarray(nngp), np.asarray(emp)


def exact_ntk(model: nn.Module, x1: jax.Array, x2: jax.Array) -> np.ndarray:
  """`J(x1) J(x2)^T / C` of one draw, parameters in float64.

  A network with one parameterized layer followed by parameter-free linear
  layers is linear in its parameters, so this is the same for every draw
  and equals the infinite-width NTK exactly (and the NNGP, for the NTK
  parameterization): a sampling-free check of a layer's geometry.

  >>> x = np.ones((2, 3))  # NTK of Dense: x.x' + 1 (bias)
  >>> np.testing.assert_allclose(exact_ntk(nn.Dense(2), x, x), 4.0)
  """
  n1 = x1.shape[0]
  xs = jnp.concatenate([x1, x2])

  @jax.jit
  def kernel(key):
    params = model.init(key, xs)["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    f = lambda p: model.apply({"params": p}, xs)
    out, jac = f(params), jax.jacobian(f)(params)
    ntk = _jacobian_kernel(out, jac, out, jac, jax.lax.Precision.HIGHEST)
    return ntk[:n1, n1:]

  # "rbg" keys compile faster than threefry; the values do not matter.
  return np.asarray(kernel(jax.random.key(0, impl="rbg")))


def assert_mc_close(samples: Any, expected: Any, *, n_se: float = 5.0,
                    bias: float = 0.0, rel_floor: float = 1e-6,
                    atol: float = 0.0,
                    max_relative_se: Optional[float] = None) -> None:
  """Checks a sample mean against its limit within a justified tolerance.

  The tolerance is `n_se` standard errors of the mean (measured from the
  samples) plus `bias` times the kernel's scale `max|expected|`, for the
  O(1/width) finite-width bias of networks whose estimates are biased (zero
  for one hidden layer below linear layers: unbiased at any width), plus
  `rel_floor` times the scale and `atol` for round-off.
  `max_relative_se` guards against a vacuous check: every standard error
  must be below that fraction of the scale.

  >>> s = np.random.default_rng(0).normal(1.0, 0.1, size=(64, 2))
  >>> assert_mc_close(s, np.ones(2), max_relative_se=0.1)
  """
  samples = np.asarray(samples, np.float64)
  expected = np.asarray(expected)
  mean = samples.mean(0)
  se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
  scale = np.abs(expected).max()
  if max_relative_se is not None:
    assert np.all(se <= max_relative_se * scale), (
        f"vacuous check: standard errors up to {se.max():.3g}, over "
        f"{max_relative_se} of the scale {scale:.3g}")
  tolerance = n_se * se + (bias + rel_floor) * scale + atol
  excess = np.abs(mean - expected) - tolerance
  assert np.all(excess <= 0), (
      f"Monte Carlo mean differs from the limit beyond {n_se} standard "
      f"errors (+{bias} x scale): max excess {excess.max():.3g}, "
      f"mean={mean}, expected={expected}, se={se}")


@dataclasses.dataclass(frozen=True)
class MonteCarloCase:
  """Finite networks of `model()` converge to `ft.kernel_fn(model())`.

  `n_samples` networks from key `(seed, impl)` (`'rbg'` compiles faster),
  within `n_se` standard errors plus `bias` (a fraction of the kernel's
  scale; state why in the row, zero when the estimates are unbiased). With
  `nngp_readout`, the NNGP comes from forward passes of
  `model(nngp_readout)` (a wide readout) and the NTK from `ntk_samples`
  networks `model(1)` keyed `seed + 1`. `kwargs` go to `sample_kernels`,
  `kernel_kwargs` to the kernel function (compiled if `jit`).
  """
  name: str
  model: Callable[..., nn.Module]
  x1: Any
  x2: Any
  n_samples: int
  bias: float = 0.0
  seed: int = 1
  impl: Optional[str] = None
  n_se: float = 5.0
  nngp_readout: Optional[int] = None
  ntk_samples: Optional[int] = None
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  kernel_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  jit: bool = False


@dataclasses.dataclass(frozen=True)
class ExactCase:
  """Linear in its parameters: the NTK is `exact_ntk` (float64 precision),
  and so is the NNGP if `nngp_is_ntk` (NTK parameterization, nothing above)."""
  name: str
  model: nn.Module
  x1: Any
  x2: Any
  nngp_is_ntk: bool = True


@dataclasses.dataclass(frozen=True)
class DtypeCase:
  """float64: compiled (`jit=True`) equals eager to `rtol64`; float32: within
  `rtol32` (`atol32` + `atol32_rel` x scale) of float64; `get`: the fields
  compared; `finite`: the finite network's outputs have the dtype too."""
  name: str
  model: nn.Module
  x1: Any
  x2: Any = None
  get: tuple[str, ...] = ("nngp", "ntk")
  rtol32: float = 1e-5
  atol32: float = 0.0
  atol32_rel: float = 0.0
  rtol64: float = 1e-12
  jit: bool = True
  finite: bool = True
  kernel_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RaisesCase:
  """`call()` raises `error` with a message matching `match`."""
  name: str
  call: Callable[[], Any]
  match: str
  error: Any = ValueError


def _kernel(model, x1, x2, get, jit, kwargs):
  fn = jit_kernel_fn(model) if jit else ft.kernel_fn(model)
  return fn(x1, x2, get, **kwargs)


_KERNELS64: dict[tuple[int, bool], Any] = {}


def _kernel64(case, jit):
  """A row's float64 kernel, once for its two dtype tests (ids are kept)."""
  key = (id(case), jit)
  if key not in _KERNELS64:
    _KERNELS64[key] = _kernel(case.model, case.x1, case.x2, case.get, jit,
                              case.kernel_kwargs)
  return _KERNELS64[key]


def _cast(tree, dtype):
  """The floating arrays of `tree` (inputs, kernel arguments) in `dtype`."""
  cast = lambda a: (jnp.asarray(a, dtype) if isinstance(
      a, np.ndarray | jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)
                    else a)
  return jax.tree.map(cast, tree)


class LayerRuleTest:
  """Base class of a layer family's test: subclasses give only tables.

  Each row of `monte_carlo_cases`, `exact_cases`, `dtype_cases` and
  `raises_cases` becomes one test, named by the row (as distrax's
  `EquivalenceTest`): a new layer gets its checks by adding rows. Only
  the checks of non-empty tables are collected.
  """
  monte_carlo_cases: ClassVar[Sequence[MonteCarloCase]] = ()
  exact_cases: ClassVar[Sequence[ExactCase]] = ()
  dtype_cases: ClassVar[Sequence[DtypeCase]] = ()
  raises_cases: ClassVar[Sequence[RaisesCase]] = ()

  def __init_subclass__(cls, **kwargs: Any) -> None:
    super().__init_subclass__(**kwargs)
    for table, check in (("monte_carlo_cases", "monte_carlo"),
                         ("exact_cases", "exact"), ("dtype_cases", "dtypes"),
                         ("raises_cases", "raises")):
      if getattr(cls, table):
        setattr(cls, "test_" + check, getattr(LayerRuleTest, "check_" + check))

  def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
    tables = {"mc_case": self.monte_carlo_cases,
              "exact_case": self.exact_cases,
              "dtype_case": self.dtype_cases,
              "raises_case": self.raises_cases}
    for arg, rows in tables.items():
      if arg in metafunc.fixturenames:
        metafunc.parametrize(arg, rows, ids=[r.name for r in rows])
    if "dtype" in metafunc.fixturenames:
      metafunc.parametrize("dtype", [jnp.float32, jnp.float64],
                           ids=["float32", "float64"])

  def check_monte_carlo(self, mc_case: MonteCarloCase) -> None:
    c = mc_case
    key = jax.random.key(c.seed, impl=c.impl)
    if c.nngp_readout is None:
      model = c.model()
      nngp, ntk = sample_kernels(model, c.x1, c.x2, key, c.n_samples,
                                 **c.kwargs)
    else:
      nngp, _ = sample_kernels(c.model(c.nngp_readout), c.x1, c.x2, key,
                               c.n_samples, ntk=None, **c.kwargs)
      model = c.model(1)
      _, ntk = sample_kernels(model, c.x1, c.x2,
                              jax.random.key(c.seed + 1, impl=c.impl),
                              c.ntk_samples or c.n_samples, **c.kwargs)
    k = _kernel(model, c.x1, c.x2, ("nngp", "ntk"), c.jit, c.kernel_kwargs)
    assert k.nngp.shape == nngp.shape[1:] and k.ntk.shape == ntk.shape[1:]
    assert_mc_close(nngp, k.nngp, n_se=c.n_se, bias=c.bias)
    assert_mc_close(ntk, k.ntk, n_se=c.n_se, bias=c.bias)

  def check_exact(self, exact_case: ExactCase) -> None:
    c = exact_case
    k = jit_kernel_fn(c.model)(c.x1, c.x2, ("nngp", "ntk"))
    np.testing.assert_allclose(k.ntk, exact_ntk(c.model, c.x1, c.x2),
                               rtol=1e-10, atol=1e-12)
    if c.nngp_is_ntk:
      np.testing.assert_allclose(k.nngp, k.ntk, rtol=1e-12)

  def check_dtypes(self, dtype_case: DtypeCase, dtype: Any) -> None:
    c = dtype_case
    if dtype == jnp.float32:
      got = _kernel(c.model, _cast(c.x1, dtype), _cast(c.x2, dtype), c.get,
                    c.jit, _cast(c.kernel_kwargs, dtype))
      want = _kernel64(c, c.jit)
    else:  # compiled against eager (the same when `jit=False`)
      got, want = _kernel64(c, c.jit), _kernel64(c, False)
    for a, e in zip(got, want):
      assert a.dtype == dtype and e.dtype == jnp.float64
      assert np.all(np.isfinite(e))
      rtol = c.rtol32 if dtype == jnp.float32 else c.rtol64
      atol = (c.atol32 + c.atol32_rel * np.abs(e).max()
              if dtype == jnp.float32 else 0.0)
      np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    if c.finite:
      x = _cast(c.x1, dtype)
      variables = jax.eval_shape(c.model.init, jax.random.key(0), x)
      assert jax.eval_shape(c.model.apply, variables, x).dtype == dtype

  def check_raises(self, raises_case: RaisesCase) -> None:
    with pytest.raises(raises_case.error, match=raises_case.match):
      raises_case.call()
