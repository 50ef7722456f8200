"""The kernel function's front end: its arguments, inputs and outputs.

Helpers of `ft.kernel_fn` (in `interceptor`): which keyword arguments go to
the model's `__call__` and which are offered to every rule (`call_args`),
how input containers are passed, which covariance layout to compute, and
how `get` selects the output.
"""

from __future__ import annotations

import collections
import functools
import inspect
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from flax_tangents._src.analytic import inputs
from flax_tangents._src.analytic import requirements
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.typing import Get

__all__ = [
    "call_signature",
    "canonical_get",
    "check_diagonal_arg",
    "check_kernel_layout",
    "check_model",
    "choose_layout",
    "input_kernels",
    "positional",
    "route_kwargs",
    "select",
    "structure_key",
]

_KERNEL_FIELDS = tuple(Kernel.__dataclass_fields__)


def _is_kernel(x: Any) -> bool:
  return isinstance(x, Kernel)


@functools.lru_cache(maxsize=None)
def call_signature(module_type: type) -> Optional[inspect.Signature]:
  try:
    return inspect.signature(module_type.__call__)
  except (TypeError, ValueError):
    return None


def first_callee(model: nn.Module) -> Any:
  """The module (or function) that receives `model.apply`'s arguments."""
  target = model
  while isinstance(target, nn.Sequential) and target.layers:
    target = target.layers[0]
  return target


def callee_signature(target: Any) -> Optional[inspect.Signature]:
  if isinstance(target, nn.Module):
    return call_signature(type(target))
  try:
    return inspect.signature(target)
  except (TypeError, ValueError):
    return None


def route_kwargs(model: nn.Module, kwargs: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits keyword arguments into those for `model.apply` and the offered.

  See `call_args`: an argument named by the `__call__` that `model.apply`
  reaches (through `nn.Sequential`, its first layer's) goes there, as in
  the finite network; the others are offered to every rule.
  """
  target = first_callee(model)
  signature = callee_signature(target)
  if isinstance(target, nn.Sequential) or signature is None:
    return {}, dict(kwargs)
  parameters = list(signature.parameters.values())
  if any(p.kind == p.VAR_KEYWORD for p in parameters):
    return dict(kwargs), {}  # The user's `__call__` forwards them itself.
  skip = 1 if isinstance(target, nn.Module) else 0
  named = {p.name for p in parameters[skip + 1:]
           if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
  passed = {k: v for k, v in kwargs.items() if k in named}
  offered = {k: v for k, v in kwargs.items() if k not in named}
  return passed, offered


def positional(model: nn.Module, inputs: Any) -> tuple[Any, ...]:
  """`model.apply`'s positional arguments for `inputs`.

  A tuple or list goes as one argument (NT's NTTree inputs), unless the
  receiving `__call__` requires that many positional arguments; then it is
  unpacked, as `nn.Sequential` unpacks a tuple between layers.
  """
  if not isinstance(inputs, (tuple, list)):
    return (inputs,)
  target = first_callee(model)
  signature = callee_signature(target)
  if signature is None:
    return (inputs,)
  skip = 1 if isinstance(target, nn.Module) else 0
  required = [p for p in list(signature.parameters.values())[skip:]
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
              and p.default is p.empty]
  if len(required) >= 2 and len(required) == len(inputs):
    return tuple(inputs)
  return (inputs,)


@functools.lru_cache(maxsize=None)
def namedtuple(fields: tuple[str, ...]) -> type:
  return collections.namedtuple("Kernel", fields)


def canonical_get(get: Get) -> Optional[tuple[str, ...]]:
  if get is None:
    return None
  fields = (get,) if isinstance(get, str) else tuple(get)
  for field in fields:
    if field not in _KERNEL_FIELDS:
      raise ValueError(
          f"`get` names unknown field {field!r}; choose from "
          f"{_KERNEL_FIELDS}, e.g. get=('nngp', 'ntk').")
  return fields


def select(output: Any, get: Get) -> Any:
  fields = canonical_get(get)
  if fields is None:
    return output

  def pick(k: Any) -> Any:
    if not isinstance(k, Kernel):
      return k
    if isinstance(get, str):
      return getattr(k, get)
    return namedtuple(fields)(*(getattr(k, f) for f in fields))

  return jax.tree.map(pick, output, is_leaf=_is_kernel)


def structure_key(tree: Any) -> Optional[tuple[Any, ...]]:
  """A hashable key of `tree` with arrays replaced by shapes and dtypes."""
  def spec(x):
    if isinstance(x, (jax.Array, np.ndarray)):
      return ("array", tuple(x.shape), str(x.dtype))
    return x
  leaves, treedef = jax.tree.flatten(tree)
  key = (treedef, tuple(spec(x) for x in leaves))
  try:
    hash(key)
  except TypeError:
    return None
  return key


def check_model(model: Any) -> None:
  """Refuses what is not a Linen module, with the fix."""
  if isinstance(model, nn.Module):
    return
  owner = getattr(model, "__self__", None)
  if isinstance(owner, nn.Module):
    raise TypeError(
        f"ft.kernel_fn takes the module itself, not its method "
        f"`{getattr(model, '__name__', 'method')}`: write "
        "`ft.kernel_fn(model)`. (For the finite-width kernel of "
        "`model.apply`, use `ft.empirical_kernel_fn(model.apply)`.)")
  raise TypeError(
      f"ft.kernel_fn expects a flax.linen.Module built from layers with "
      f"kernel rules, got {type(model).__name__}. For any function "
      "`f(params, x)` use `ft.empirical_kernel_fn(f)` (finite width) or "
      "`ft.monte_carlo_kernel_fn`.")


def check_diagonal_arg(name: str, value: Any) -> None:
  if value is not None and not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be True, False or None (the cheapest "
                    f"layout the model allows), got {value!r}.")


def choose_layout(recorded: requirements.Recording, spatial_output: bool,
                   diagonal_batch: Optional[bool],
                   diagonal_spatial: Optional[bool]) -> tuple[bool, bool]:
  """The covariance layout: the cheapest one, or the one asked for.

  Raises:
    ValueError: if the layout asked for lacks covariances a layer needs.
  """
  needs_batch = sorted(set(recorded.full_batch))
  needs_spatial = sorted(set(recorded.full_spatial))
  if diagonal_batch and needs_batch:
    raise ValueError(
        f"diagonal_batch=True was asked for, but {', '.join(needs_batch)} "
        "need covariances between different inputs in `cov1`/`cov2`. Omit "
        "`diagonal_batch` (or pass False).")
  if diagonal_spatial and needs_spatial:
    raise ValueError(
        f"diagonal_spatial=True was asked for, but {', '.join(needs_spatial)}"
        " need covariances between different locations. Omit "
        "`diagonal_spatial` (or pass False).")
  auto_batch = not needs_batch
  auto_spatial = not needs_spatial and not spatial_output
  return (auto_batch if diagonal_batch is None else bool(diagonal_batch),
          auto_spatial if diagonal_spatial is None else bool(diagonal_spatial))


def check_kernel_layout(kernels: list[Kernel],
                         diagonal_batch: Optional[bool],
                         diagonal_spatial: Optional[bool]) -> None:
  for kernel in kernels:
    for name, asked in (("diagonal_batch", diagonal_batch),
                        ("diagonal_spatial", diagonal_spatial)):
      if asked is not None and bool(asked) != getattr(kernel, name):
        raise ValueError(
            f"{name}={asked} was asked for, but the Kernel passed in has "
            f"{name}={getattr(kernel, name)}; its layout is fixed. Build it "
            f"with `{name}={asked}` (e.g. `ft.Kernel.from_inputs(x, {name}="
            f"{asked})`), or omit `{name}`.")


def input_kernels(x1: Any, x2: Any, **layout: bool) -> Any:
  """One input kernel per array of `x1` (paired with `x2`'s)."""
  if not inputs.is_tree(x1):
    return Kernel.from_inputs(x1, x2, **layout)
  if x2 is None:
    return jax.tree.map(
        lambda a: Kernel.from_inputs(a, None, **layout), x1)
  return jax.tree.map(
      lambda a, b: Kernel.from_inputs(a, b, **layout), x1, x2)
