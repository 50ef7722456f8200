"""Keyword arguments of a kernel-function call, and which layers took them.

`kernel_fn(x1, x2, get, **kwargs)` routes every keyword argument where the
finite network would send it, and otherwise where Neural Tangents would:

1. Arguments of the kernel function itself (`diagonal_batch`,
   `diagonal_spatial`, and those registered with `register_front_end_arg`,
   e.g. `mask_constant`) are taken by `ft.kernel_fn` before the model runs.
2. An argument that the model's own `__call__` names (through `nn.Sequential`:
   that its first layer names) is passed to it, as `model.apply` would.
3. Every other argument is offered to every kernel rule whose signature names
   it (`rule(module, kernel, *, pattern=None, **kwargs)`), as NT passes every
   argument to every layer. This is how `pattern=` reaches an `Aggregate`
   deep inside an `nn.Sequential`.

An argument that none of these takes raises `TypeError` naming it: no
argument is ever silently ignored. Rules may also read an offered argument
without naming it, through `take(name)`, which records the use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from typing import Any, Callable, Iterator, Optional

__all__ = [
    "CallArgs",
    "accepted_names",
    "check_all_used",
    "front_end_args",
    "offering",
    "register_front_end_arg",
    "rule_kwargs",
    "take",
]

# Arguments handled by `ft.kernel_fn` itself, before the model runs.
_FRONT_END_ARGS: set[str] = {"diagonal_batch", "diagonal_spatial"}


def register_front_end_arg(name: str) -> None:
  """Declares a keyword argument taken by the kernel function's front end."""
  _FRONT_END_ARGS.add(name)


def front_end_args() -> frozenset[str]:
  """Names of the arguments the front end takes."""
  return frozenset(_FRONT_END_ARGS)


@dataclasses.dataclass
class CallArgs:
  """Arguments offered to every rule during one run of a model on kernels.

  Attributes:
    values: the offered arguments by name.
    used: names that some rule took.
  """
  values: dict[str, Any]
  used: set[str] = dataclasses.field(default_factory=set)


_state = threading.local()


def _active() -> Optional[CallArgs]:
  return getattr(_state, "call_args", None)


@contextlib.contextmanager
def offering(values: dict[str, Any]) -> Iterator[CallArgs]:
  """Offers `values` to the rules run inside the context."""
  previous = _active()
  _state.call_args = CallArgs(dict(values))
  try:
    yield _state.call_args
  finally:
    _state.call_args = previous


def take(name: str, default: Any = None) -> Any:
  """The offered argument `name` (recording that it was used), or `default`."""
  active = _active()
  if active is None or name not in active.values:
    return default
  active.used.add(name)
  return active.values[name]


@functools.lru_cache(maxsize=None)
def _named_keywords(fn: Callable[..., Any], skip: int) -> tuple[str, ...]:
  """Keyword parameters that `fn` names, after its first `skip` parameters."""
  try:
    parameters = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return ()
  names = []
  for i, p in enumerate(parameters):
    if p.kind == p.KEYWORD_ONLY or (
        p.kind == p.POSITIONAL_OR_KEYWORD and i >= skip):
      names.append(p.name)
  return tuple(names)


def rule_kwargs(rule: Callable[..., Any],
                module_kwargs: dict[str, Any]) -> dict[str, Any]:
  """Keyword arguments for calling `rule`.

  The module call's own keyword arguments, plus each offered argument that
  the rule's signature names and the call did not give.
  """
  active = _active()
  if active is None:
    return module_kwargs
  kwargs = dict(module_kwargs)
  for name in _named_keywords(rule, 2):
    if name in active.values and name not in kwargs:
      kwargs[name] = active.values[name]
      active.used.add(name)
  return kwargs


def accepted_names(method: Callable[..., Any]) -> tuple[str, ...]:
  """Keyword arguments an (unbound) `__call__` names explicitly."""
  return _named_keywords(method, 2)


def check_all_used(call_args: CallArgs, model_name: str) -> None:
  """Raises `TypeError` for offered arguments that no rule took.

  Args:
    call_args: the offered arguments and their uses.
    model_name: the model's type, for the message.

  Raises:
    TypeError: naming each unused argument and where arguments can go.
  """
  unused = sorted(set(call_args.values) - call_args.used)
  if unused:
    raise TypeError(
        f"kernel_fn got keyword argument(s) {', '.join(map(repr, unused))} "
        f"that no layer of {model_name} uses. A keyword argument goes to the "
        "model's `__call__` if it names it (for `nn.Sequential`: if its "
        "first layer names it, as Flax passes call arguments to the first "
        "layer only), and otherwise to every layer whose kernel rule names "
        "it (e.g. `pattern` for `Aggregate`, `deterministic` for `Dropout`). "
        f"The kernel function itself takes {sorted(_FRONT_END_ARGS)}. Remove "
        "the argument, fix its spelling, or set it on the layer.")
