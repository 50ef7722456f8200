"""Flax NNX modules as pure functions for the empirical and training APIs.

An `nnx.Module` holds its parameters inside itself; the functions of this
library take `f(variables, x, **kwargs)` and variables. This module splits a
module into its graph definition (static: structure, hyperparameters and
modes such as `model.eval()`) and its state, carried as Flax-like variables
`{'params': <the nnx.Param state>, 'nnx_state': <all other state>}`. The
machinery built for Linen variables then differentiates only the `nnx.Param`
variables and holds everything else fixed (BatchNorm statistics, RNG keys and
counts, caches), exactly as it does for Linen's `batch_stats`.

Every evaluation merges a fresh copy of the module (`nnx.merge(...,
copy=True)`), so a module that updates its own state when called (BatchNorm in
training mode, Dropout's RNG count) changes that copy only: neither the
user's module nor the state held fixed is ever mutated. Consequently Dropout
draws its masks from the RNG state held fixed, the same for every evaluation.

Where the parameters come from (the `params` argument of the kernel
functions, `variables` of `ft.train.fit`):

- `None`: the module's state at the time of the call;
- an `nnx.Module` of the same structure: its graph definition and state;
- an `nnx.State` (e.g. `nnx.state(model, nnx.Param)`): its `nnx.Param`
  variables replace the module's; its other variables, if it has any,
  replace the module's other state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import sys
from typing import Any, Optional

import jax

from flax_tangents._src.typing import PyTree

__all__ = [
    "REST",
    "LinenLike",
    "as_sampler_model",
    "expansion_of",
    "apply_fn",
    "as_apply",
    "is_module",
    "kernel_fn_of",
    "merged_state",
    "split",
    "to_variables",
    "with_states",
]

# The key of the non-`nnx.Param` state in the variables built here.
REST = "nnx_state"


def is_module(obj: Any) -> bool:
  """Whether `obj` is an `nnx.Module` (without importing NNX otherwise)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(obj, nnx.Module)


def _nnx():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx


def _snapshot(state: Any) -> Any:
  """A copy of `state` with its own Variable objects (same arrays).

  `nnx.split` returns the module's own Variables, which in-place training
  (`nnx.Optimizer.update`) changes later; a snapshot does not change.
  """
  return jax.tree.map(lambda leaf: leaf, state)


def split(module: Any) -> tuple[Any, dict[str, Any]]:
  """`(graphdef, variables)` of a module's current state (a snapshot)."""
  nnx = _nnx()
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  return graphdef, {"params": _snapshot(params), REST: _snapshot(rest)}


def to_variables(
    params: Any, default: Callable[[], tuple[Any, dict[str, Any]]],
    where: str) -> tuple[Any, dict[str, Any]]:
  """`(graphdef, variables)` for the `params` a user passed with a module.

  Args:
    params: None, an `nnx.Module`, or an `nnx.State` (see the module
      docstring).
    default: returns `(graphdef, variables)` of the module the function was
      built from; used for `None` and for what a `State` leaves out.
    where: the argument's name, for errors.

  Returns:
    The graph definition to merge with and the variables
    `{'params': ..., 'nnx_state': ...}`.

  Raises:
    TypeError: for anything else, e.g. Linen variables or a plain dict.
  """
  nnx = _nnx()
  if params is None:
    return default()
  if is_module(params):
    return split(params)
  if isinstance(params, nnx.State):
    graphdef, variables = default()
    param_state, rest = nnx.split_state(params, nnx.Param, ...)
    if not jax.tree.leaves(param_state):
      raise TypeError(
          f"{where}: the nnx.State has no nnx.Param variables; pass "
          "nnx.state(model, nnx.Param), nnx.state(model), or the module.")
    variables = {"params": param_state,
                 REST: rest if jax.tree.leaves(rest) else variables[REST]}
    return graphdef, variables
  raise TypeError(
      f"{where}: for an nnx.Module give None (the module's current state), "
      f"an nnx.Module of the same structure, or an nnx.State such as "
      f"nnx.state(model, nnx.Param); got {type(params).__name__}.")


def apply_fn(graphdef: Any) -> Callable[..., PyTree]:
  """`apply(variables, x, **kwargs)` evaluating a fresh copy of the module."""
  nnx = _nnx()

  def apply(variables: Mapping[str, Any], x: PyTree, **kwargs) -> PyTree:
    module = nnx.merge(graphdef, variables["params"], variables[REST],
                       copy=True)
    return module(x, **kwargs)

  return apply


def merged_state(variables: Mapping[str, Any]) -> Any:
  """One `nnx.State` of the variables built here (for `nnx.update`)."""
  return _nnx().merge_state(variables["params"], variables[REST])


def as_apply(module: Any, params: Any,
             where: str) -> tuple[Callable[..., PyTree], dict[str, Any]]:
  """`(apply, variables)` of a module, for Linen-style functions."""
  graphdef, variables = to_variables(params, lambda: split(module), where)
  return apply_fn(graphdef), variables


def with_states(result: Any) -> Any:
  """`ft.train.fit`'s result with `nnx.State`s instead of variables dicts."""
  lin = result.linearized_variables
  return dataclasses.replace(
      result, variables=merged_state(result.variables),
      linearized_variables=None if lin is None else merged_state(lin))


def _live(module: Any) -> Callable[[], tuple[Any, dict[str, Any]]]:
  return lambda: split(module)


def kernel_fn_of(module: Any, make: Callable[[Callable[..., PyTree]], Any],
                 takes_get: bool) -> Callable[..., Any]:
  """An empirical kernel function of an `nnx.Module`.

  Args:
    module: the module; with `params=None` its state at call time is used.
    make: builds the kernel function of a pure `f(variables, x, **kwargs)`,
      e.g. `lambda f: ft.empirical_ntk_fn(f, ...)`.
    takes_get: whether the kernel function has NT's `get` argument between
      `x2` and `params` (`empirical_kernel_fn`) or not.

  Returns:
    A kernel function of the signature that `make` gives, whose `params`
    is optional. One kernel function is built per graph definition, so a
    module switched between `train()` and `eval()` is compiled once per mode.
  """
  built: dict[Any, Any] = {}

  def for_graph(graphdef):
    if graphdef not in built:
      built[graphdef] = make(apply_fn(graphdef))
    return built[graphdef]

  def call(x1, x2, get_args, params, kwargs):
    graphdef, variables = to_variables(params, _live(module), "params")
    return for_graph(graphdef)(x1, x2, *get_args, variables, **kwargs)

  kernel_fn = (_with_get if takes_get else _without_get)(call)

  first = for_graph(split(module)[0])
  for name in ("trace_axes", "diagonal_axes", "auto_selector"):
    if hasattr(first, name):
      setattr(kernel_fn, name, getattr(first, name))
  return kernel_fn


def _with_get(call: Callable[..., Any]) -> Callable[..., Any]:
  """`kernel_fn(x1, x2=None, get=None, params=None, **kwargs)` of `call`."""

  def kernel_fn(x1: PyTree, x2: Optional[PyTree] = None, get: Any = None,
                params: Any = None, **kwargs) -> Any:
    return call(x1, x2, (get,), params, kwargs)

  return kernel_fn


def _without_get(call: Callable[..., Any]) -> Callable[..., Any]:
  """`kernel_fn(x1, x2=None, params=None, **kwargs)` of `call`."""

  def kernel_fn(x1: PyTree, x2: Optional[PyTree] = None, params: Any = None,
                **kwargs) -> Any:
    return call(x1, x2, (), params, kwargs)

  return kernel_fn


def expansion_of(module: Any, params: Any,
                 expand: Callable[[Callable[..., PyTree], PyTree],
                                  Callable[..., PyTree]]) -> Callable[..., Any]:
  """`ft.linearize` / `ft.taylor_expand` of an `nnx.Module`.

  The expansion point is the module's state when this is called (a snapshot:
  training the module in place later does not move it), or `params`.

  Returns:
    `f_exp(p, x, **kwargs)`: `p` is an `nnx.State` of parameters (its other
    variables, if any, replace the snapshot's) or an `nnx.Module` (its graph
    definition, e.g. after `eval()`, and its state are used).
  """
  point = to_variables(params, _live(module), "params")
  graphdef_0, variables_0 = point
  expanded: dict[Any, Callable[..., PyTree]] = {}

  def f_exp(p: Any, x: PyTree, **kwargs) -> PyTree:
    graphdef, variables = to_variables(p, lambda: point, "p")
    if graphdef not in expanded:
      expanded[graphdef] = expand(apply_fn(graphdef), variables_0)
    return expanded[graphdef](variables, x, **kwargs)

  del graphdef_0
  return f_exp


class LinenLike:
  """`init`/`apply` of NNX modules built by `make(rngs=nnx.Rngs(key))`.

  What `ft.monte_carlo_kernel_fn` samples: each `init(key, x)` builds a new
  module with the factory and returns its variables.
  """

  def __init__(self, make: Callable[..., Any]):
    nnx = _nnx()
    self.make = make
    abstract = nnx.eval_shape(lambda: self._build(jax.random.key(0)))
    self.graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    self.apply = apply_fn(self.graphdef)

  def _build(self, key: jax.Array) -> Any:
    module = self.make(rngs=_nnx().Rngs(key))
    if not is_module(module):
      raise TypeError(
          "ft.monte_carlo_kernel_fn: a factory must return an nnx.Module, "
          f"e.g. lambda rngs: MyModel(..., rngs=rngs); got "
          f"{type(module).__name__}.")
    return module

  def init(self, key: jax.Array, x: PyTree, **unused_kwargs) -> dict[str, Any]:
    del x  # An NNX module is built without example inputs.
    graphdef, variables = split(self._build(key))
    if graphdef != self.graphdef:
      raise ValueError(
          "ft.monte_carlo_kernel_fn: the factory built modules of different "
          "structures for different keys; it must build one architecture.")
    return variables


def as_sampler_model(model: Any) -> Any:
  """What `ft.monte_carlo_kernel_fn` samples from: Linen, or an NNX factory.

  Raises:
    TypeError: for an `nnx.Module` instance (one network: its constructor,
      which defines the distribution of networks, is not known).
  """
  if is_module(model):
    raise TypeError(
        "ft.monte_carlo_kernel_fn samples networks, and an nnx.Module "
        f"instance ({type(model).__name__}) is one network: its parameters "
        "are already drawn. Pass the factory that builds it, e.g. "
        f"`lambda rngs: {type(model).__name__}(..., rngs=rngs)`; sample s "
        "is built with rngs=nnx.Rngs(k_s).")
  if hasattr(model, "init") and hasattr(model, "apply"):
    return model
  if callable(model):
    return LinenLike(model)
  raise TypeError(
      "ft.monte_carlo_kernel_fn: `model` must be a Flax Linen module or a "
      "factory `make(rngs) -> nnx.Module`; got " f"{type(model).__name__}.")
