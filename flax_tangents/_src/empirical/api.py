"""Empirical (finite-width) NNGP and NTK of any Flax `apply`.

`f(params, x, **kwargs)` is any function returning a pytree of arrays; a
Flax `model.apply` is one. When `params` is a Flax variables mapping with a
`'params'` collection (what `model.init` returns), only that collection is
differentiated; `batch_stats` and other collections are held fixed, and
keyword arguments (`train`, `rngs`, `mutable`, ...) pass through to `f`.
With `mutable=...`, Flax returns `(output, state)`: only `output` is used.

Kernel layout follows Neural Tangents: for an output of shape `(N, O)`,
`trace_axes=(-1,)` gives `(N1, N2)` (averaged over `O`), `trace_axes=()`
gives `(N1, N2, O, O)`, and each axis in `diagonal_axes` appears once.

Flax NNX models: split once, then differentiate a pure function of the
state (the two-line recipe):

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import flax_tangents as ft
>>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
>>> graphdef, params = nnx.split(model)
>>> f = lambda p, x: nnx.merge(graphdef, p)(x)
>>> ft.empirical_ntk_fn(f)(jnp.ones((4, 3)), None, params).shape
(4, 4)
"""

import collections
import functools
from typing import Any, Callable, Optional, Union

import jax
from jax import core

from flax_tangents._src import nnx_adapter
from flax_tangents._src.empirical import auto
from flax_tangents._src.empirical import dispatch
from flax_tangents._src.empirical import layout
from flax_tangents._src.empirical.implementation import NtkImplementation
from flax_tangents._src.typing import ApplyFn
from flax_tangents._src.typing import EmpiricalGetKernelFn
from flax_tangents._src.typing import EmpiricalKernelFn as KernelFn

__all__ = [
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "empirical_ntk_vp_fn",
]


def _tuple_axes(axes: layout.Axes) -> tuple[int, ...]:
  return (axes,) if isinstance(axes, int) else tuple(axes)


def _require_params(params: Any, fn_name: str) -> None:
  if params is None:
    raise TypeError(
        f"{fn_name} needs the parameters: call it as {fn_name}(x1, x2, "
        "params, **kwargs), e.g. with params=model.init(key, x1).")


def _make_ntk_fn(f: ApplyFn, trace_axes: layout.Axes,
                 diagonal_axes: layout.Axes, vmap_axes: Any,
                 implementation: Any) -> KernelFn:
  """`ntk_fn(x1, x2, params, **kwargs)`, jit-compiled, for one algorithm."""
  implementation = dispatch.as_implementation(implementation)
  if implementation != NtkImplementation.AUTO:
    dispatch.implementation_fn(implementation)  # Fails early if missing.
  dispatch.check_vmap_axes_type(vmap_axes)
  trace_axes, diagonal_axes = _tuple_axes(trace_axes), _tuple_axes(
      diagonal_axes)

  def prepare(variables, x1, x2, kwargs_arrays, static):
    kwargs = dispatch.merge_kwargs(kwargs_arrays, static)
    return dispatch.prepare(f, variables, x1, x2, kwargs, trace_axes,
                            diagonal_axes, vmap_axes)

  def compute(variables, x1, x2, kwargs_arrays, algorithm, static):
    prepared = prepare(variables, x1, x2, kwargs_arrays, static)
    ntk = dispatch.implementation_fn(algorithm)
    return ntk(prepared.f, prepared.params, x1, x2, prepared.kwargs1,
               prepared.kwargs2, trace_axes=trace_axes,
               diagonal_axes=diagonal_axes, vmap_axes=prepared.vmap_axes)

  compiled = jax.jit(compute, static_argnums=(4, 5))
  selector = auto.AutoSelector()

  def ntk_fn(x1: layout.PyTree, x2: Optional[layout.PyTree] = None,
             params: layout.PyTree = None, **kwargs) -> layout.PyTree:
    _require_params(params, "ntk_fn")
    kwargs_arrays, static = dispatch.partition_kwargs(kwargs)
    args = (params, x1, x2, kwargs_arrays)
    if implementation != NtkImplementation.AUTO:
      return compiled(*args, implementation, static)

    def candidates():
      # Bad input fails here, once, rather than in every candidate.
      jax.eval_shape(lambda v, a, b, k: prepare(v, a, b, k, static).fx1,
                     *args)
      return {
          a: functools.partial(compiled.trace, *args, a, static)
          for a in dispatch.available_implementations()
      }

    key = (auto.signature(args), static, jax.default_backend())
    choice = selector.choose(key, candidates, args)
    if not any(isinstance(leaf, core.Tracer)
               for leaf in jax.tree.leaves(args)):
      try:  # The executable AUTO compiled: no second compilation.
        return choice.executable(*args)
      except (TypeError, ValueError):  # E.g. inputs on another device.
        pass
    return compiled(*args, choice.implementation, static)

  # AUTO's cached choices, for benchmarks and tests to inspect.
  ntk_fn.auto_selector = selector
  return _with_layout(ntk_fn, trace_axes, diagonal_axes)


def _with_layout(fn: Callable[..., Any], trace_axes: layout.Axes,
                 diagonal_axes: layout.Axes) -> Callable[..., Any]:
  # The output layout, readable by `ft.batch` (it transposes mirror tiles of
  # symmetric kernels instead of computing them).
  fn.trace_axes = _tuple_axes(trace_axes)
  fn.diagonal_axes = _tuple_axes(diagonal_axes)
  return fn


def empirical_ntk_fn(
    f: ApplyFn,
    trace_axes: layout.Axes = (-1,),
    diagonal_axes: layout.Axes = (),
    vmap_axes: Any = None,
    implementation: Union[NtkImplementation,
                          int] = NtkImplementation.JACOBIAN_CONTRACTION,
) -> KernelFn:
  """Returns a function computing the empirical NTK `J(x1) J(x2)^T` of `f`.

  Args:
    f: `f(params, x, **kwargs)` returning a pytree of arrays, e.g. a Flax
      `model.apply`. Only the `'params'` collection of Flax variables is
      differentiated. Or an `nnx.Module`: only its `nnx.Param` variables are
      differentiated, and `params` may be None (its current state), a
      module of the same structure, or an `nnx.State` of its parameters.
    trace_axes: output axes to average over (the kernel is summed along each
      pair and divided by its size, as NT does), e.g. the logit axis.
    diagonal_axes: output axes along which only the diagonal of each pair is
      kept (present once in the result).
    vmap_axes: None, or an int `b` (inputs and outputs batched along `b`), or
      a triple `(in_axes, out_axes, kwargs_axes)` with `kwargs_axes` a dict
      from keyword name to the batch axis of that keyword's value. Declares
      that each output example depends only on its input example, so that
      Jacobians can be computed example by example. Leave it None when
      examples interact (BatchNorm in training mode, dropout masks drawn for
      the whole batch).
    implementation: an `NtkImplementation` (or its int value). AUTO picks
      one on the first call for given shapes (a cost model of each, timing
      the close ones, never one that would not fit in memory; see
      `ntk_fn.auto_selector.choices` for what it chose and why) and uses it
      from then on.

  Returns:
    `ntk_fn(x1, x2=None, params, **kwargs)`. `x2=None` means `x2 = x1`.
    Keyword arguments are passed to `f`; a 2-tuple value is split between
    the `x1` and `x2` calls, and `rng`/`rngs` keys are reused for `x2` only
    if `x2 == x1` (see `arguments.split_kwargs`). It returns a pytree like
    `f`'s output of kernels of shape "zipped" from the two outputs' shapes:
    each axis pair `(A1, A2)` in order, traced axes dropped, diagonal axes
    once.
    It is jit-compiled and composes with `jax.jit`, `jax.grad`, `jax.vmap`.

  Raises:
    ValueError: for an unknown `implementation` or malformed `vmap_axes`;
      when called, for inputs whose shapes differ beyond the batch size,
      axes that do not fit the outputs, or `vmap_axes` that do not fit.
    NotImplementedError: for STRUCTURED_DERIVATIVES when it is unavailable.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import flax_tangents as ft
  >>> model = nn.Dense(3)
  >>> x = jnp.ones((4, 2))
  >>> variables = model.init(jax.random.PRNGKey(0), x)
  >>> ntk_fn = ft.empirical_ntk_fn(model.apply, trace_axes=())
  >>> ntk_fn(x, jnp.ones((5, 2)), variables).shape
  (4, 5, 3, 3)
  """
  if nnx_adapter.is_module(f):
    return nnx_adapter.kernel_fn_of(f, lambda g: empirical_ntk_fn(
        g, trace_axes, diagonal_axes, vmap_axes, implementation), False)
  return _make_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation)


def empirical_nngp_fn(f: ApplyFn, trace_axes: layout.Axes = (-1,),
                      diagonal_axes: layout.Axes = ()) -> KernelFn:
  """Returns a function computing the empirical NNGP `f(x1) f(x2)^T` of `f`.

  Args:
    f: `f(params, x, **kwargs)` returning a pytree of arrays, or an
      `nnx.Module` (as in `empirical_ntk_fn`).
    trace_axes: output axes to average over.
    diagonal_axes: output axes of which only the diagonal is kept.

  Returns:
    `nngp_fn(x1, x2=None, params, **kwargs)` returning a pytree like `f`'s
    output of kernels in the same layout as `empirical_ntk_fn`.

  Raises:
    ValueError: when called, for mismatched inputs or axes that do not fit.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> nngp_fn = ft.empirical_nngp_fn(lambda p, x: x @ p, diagonal_axes=(0,))
  >>> nngp_fn(jnp.ones((4, 2)), None, jnp.ones((2, 3)))
  Array([4., 4., 4., 4.], dtype=float...)
  """
  if nnx_adapter.is_module(f):
    return nnx_adapter.kernel_fn_of(f, lambda g: empirical_nngp_fn(
        g, trace_axes, diagonal_axes), False)
  trace_axes, diagonal_axes = _tuple_axes(trace_axes), _tuple_axes(
      diagonal_axes)

  def compute(variables, x1, x2, kwargs_arrays, static):
    kwargs = dispatch.merge_kwargs(kwargs_arrays, static)
    prepared = dispatch.prepare(f, variables, x1, x2, kwargs, trace_axes,
                                diagonal_axes, None)
    out1 = prepared.f(prepared.params, x1, **prepared.kwargs1)
    out2 = out1 if x2 is None else prepared.f(prepared.params, x2,
                                              **prepared.kwargs2)

    def leaf_kernel(a, b):
      trace, diagonal = layout.check_trace_and_diagonal(
          trace_axes, diagonal_axes, a.shape, b.shape)
      return layout.contract(a, b, a.ndim, trace, diagonal)

    return jax.tree.map(leaf_kernel, out1, out2)

  compiled = jax.jit(compute, static_argnums=(4,))

  def nngp_fn(x1: layout.PyTree, x2: Optional[layout.PyTree] = None,
              params: layout.PyTree = None, **kwargs) -> layout.PyTree:
    _require_params(params, "nngp_fn")
    kwargs_arrays, static = dispatch.partition_kwargs(kwargs)
    return compiled(params, x1, x2, kwargs_arrays, static)

  return _with_layout(nngp_fn, trace_axes, diagonal_axes)


@functools.lru_cache(maxsize=None)
def _kernel_tuple(fields: tuple[str, ...]) -> type:
  return collections.namedtuple("EmpiricalKernel", fields)


def empirical_kernel_fn(
    f: ApplyFn,
    trace_axes: layout.Axes = (-1,),
    diagonal_axes: layout.Axes = (),
    vmap_axes: Any = None,
    implementation: Union[NtkImplementation,
                          int] = NtkImplementation.JACOBIAN_CONTRACTION,
) -> EmpiricalGetKernelFn:
  """Returns a function computing the empirical NNGP and/or NTK of `f`.

  Args:
    f: `f(params, x, **kwargs)` returning a pytree of arrays, or an
      `nnx.Module` (as in `empirical_ntk_fn`).
    trace_axes: output axes to average over.
    diagonal_axes: output axes of which only the diagonal is kept.
    vmap_axes: as in `empirical_ntk_fn` (used by the NTK only).
    implementation: as in `empirical_ntk_fn` (used by the NTK only).

  Returns:
    `kernel_fn(x1, x2=None, get=None, params, **kwargs)`. `get` is `'nngp'`,
    `'ntk'` (one kernel), a tuple of them (an `EmpiricalKernel` namedtuple),
    or None for both. For pytree outputs of `f` the namedtuples are the
    leaves of a pytree like the output.

  Raises:
    ValueError: for an unknown `get`, or as `empirical_ntk_fn`.
    NotImplementedError: as `empirical_ntk_fn`.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> kernel_fn = ft.empirical_kernel_fn(lambda p, x: x @ p)
  >>> k = kernel_fn(jnp.ones((4, 2)), None, None, jnp.ones((2, 3)))
  >>> k.nngp.shape, k.ntk.shape
  ((4, 4), (4, 4))
  """
  if nnx_adapter.is_module(f):
    return nnx_adapter.kernel_fn_of(f, lambda g: empirical_kernel_fn(
        g, trace_axes, diagonal_axes, vmap_axes, implementation), True)
  kernel_fns = {
      "nngp": empirical_nngp_fn(f, trace_axes, diagonal_axes),
      "ntk": _make_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes,
                          implementation),
  }

  def kernel_fn(x1: layout.PyTree, x2: Optional[layout.PyTree] = None,
                get: Union[None, str, tuple[str, ...]] = None,
                params: layout.PyTree = None, **kwargs) -> Any:
    _require_params(params, "kernel_fn")
    single = isinstance(get, str)
    fields = ("nngp", "ntk") if get is None else (get,) if single else tuple(
        get)
    unknown = [g for g in fields if g not in kernel_fns]
    if unknown or not fields:
      raise ValueError(f"get={get!r}: choose 'nngp', 'ntk', a tuple of them, "
                       "or None for both.")
    kernels = {g: kernel_fns[g](x1, x2, params, **kwargs) for g in fields}
    if single:
      return kernels[get]
    kernel_tuple = _kernel_tuple(fields)
    return jax.tree.map(lambda *ks: kernel_tuple(*ks),
                        *[kernels[g] for g in fields])

  return _with_layout(kernel_fn, trace_axes, diagonal_axes)


def empirical_ntk_vp_fn(f: ApplyFn, x1: layout.PyTree,
                        x2: Optional[layout.PyTree], params: layout.PyTree,
                        **kwargs) -> Callable[[layout.PyTree], layout.PyTree]:
  """Returns `v -> NTK(x1, x2) v` without forming the NTK.

  Costs one vector-Jacobian product through `f(params, x2)` and one
  Jacobian-vector product through `f(params, x1)` per call.

  Args:
    f: `f(params, x, **kwargs)` returning a pytree of arrays, or an
      `nnx.Module` (as in `empirical_ntk_fn`).
    x1: first inputs.
    x2: second inputs, or None for `x1`.
    params: Flax variables (only `'params'` is differentiated) or any
      parameter pytree.
    **kwargs: keyword arguments for `f`, split as in `empirical_ntk_fn`.

  Returns:
    `ntk_vp_fn(cotangents)`: `cotangents` is a pytree like `f(params, x2)`;
    the result is like `f(params, x1)`. Jit it for repeated use.

  Raises:
    ValueError: for mismatched `x1` and `x2`.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> vp_fn = ft.empirical_ntk_vp_fn(lambda p, x: x @ p, jnp.ones((4, 2)),
  ...                                jnp.ones((3, 2)), jnp.ones((2, 5)))
  >>> vp_fn(jnp.ones((3, 5))).shape
  (4, 5)
  """
  if nnx_adapter.is_module(f):
    f, params = nnx_adapter.as_apply(f, params, "params")
  prepared = dispatch.prepare(f, params, x1, x2, kwargs, (), (), None)
  x2_ = x1 if x2 is None else x2

  def ntk_vp_fn(cotangents: layout.PyTree) -> layout.PyTree:
    f1 = lambda p: prepared.f(p, x1, **prepared.kwargs1)  # noqa: E731
    f2 = lambda p: prepared.f(p, x2_, **prepared.kwargs2)  # noqa: E731
    _, pullback = jax.vjp(f2, prepared.params)
    (tangent,) = pullback(cotangents)
    return jax.jvp(f1, (prepared.params,), (tangent,))[1]

  return ntk_vp_fn
