"""Flax lifted transforms (`nn.scan`, `nn.remat`, `nn.jit`, ...) on kernels.

`nn.remat(Block)` is a class whose `__call__` (a `wrapped_fn` of
`flax.linen.transforms`) runs `Block.__call__` on a clone inside a
`flax.core.lift` transform. Flax's method interceptors see only that inner
call, so the transform is found from the calling frames: the nearest frame
running a class transform's `wrapped_fn` for the same module holds the
transformed module (`self`), and the transform, the wrapped class and their
arguments are that function's free variables.

- `checkpoint`/`remat` and `jit` do not change what is computed: the inner
  call is lifted as usual (their bodies are inlined in the traced program).
- `scan` gets a rule (`scan_rule`): its step is applied `length` times to
  the kernel, compiled once as a `jax.lax.scan` once the kernel's structure
  stops changing, after checking that every step has its own parameters.
- every other transform is refused by name.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

from flax.core.scope import in_filter
import flax.linen as nn
import jax

from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.lifting import paths

__all__ = ["LiftedTransform", "TRANSPARENT", "check_scan_parameters",
           "enclosing_transform", "refuse", "repeat"]

TRANSPARENT = ("checkpoint", "remat", "jit", "named_call")


@dataclasses.dataclass(frozen=True)
class LiftedTransform:
  """A Flax lifted transform applied to a module class.

  Attributes:
    name: the `flax.core.lift` transform (`'scan'`, `'vmap'`, ...).
    module_class: the transformed class.
    kwargs: the transform's keyword arguments.
    module: the transformed module instance (bound).
  """
  name: str
  module_class: type
  kwargs: dict[str, Any]
  module: Any


class _Probe(nn.Module):
  def __call__(self, x):
    return x


# Code objects of the methods that Flax's class transforms install.
_WRAPPED_FN_CODES = frozenset(
    type_.__dict__["__call__"].__code__
    for type_ in (nn.remat(_Probe), nn.jit(_Probe)))


def enclosing_transform(module: nn.Module) -> Optional[LiftedTransform]:
  """The lifted transform that is running `module`'s method, if any."""
  path = tuple(module.path)
  frame = inspect.currentframe()
  try:
    while frame is not None:
      if frame.f_code in _WRAPPED_FN_CODES:
        local = frame.f_locals
        owner = local.get("self")
        if isinstance(owner, nn.Module) and tuple(owner.path) == path:
          transform = local.get("transform")
          module_class = local.get("module_class")
          assert isinstance(module_class, type), module_class
          return LiftedTransform(
              getattr(transform, "__name__", repr(transform)),
              module_class, dict(local.get("trafo_kwargs", {})), owner)
        return None
      frame = frame.f_back
    return None
  finally:
    del frame


def describe(transform: LiftedTransform) -> str:
  return (f"nn.{transform.name}({transform.module_class.__name__}) "
          f"(module '{paths.path_string(transform.module)}')")


def refuse(transform: LiftedTransform) -> KernelRuleError:
  """The error for a transform without a kernel rule."""
  if transform.name == "vmap":
    return KernelRuleError(
        f"{describe(transform)} has no infinite-width kernel rule: a "
        "vmapped module maps over an axis of its inputs, which a kernel "
        "(covariances over examples and locations) cannot split, and with "
        "separate parameters per slice (`variable_axes={'params': 0}`) the "
        "slices are independent networks whose cross-covariances would be "
        "computed wrongly. Use `nn.ConvLocal` for separate weights per "
        "location, or `nn.Conv` with kernel size 1 (or `nn.Dense`, which "
        "acts on the last axis only) for shared weights.")
  return KernelRuleError(
      f"{describe(transform)}: the lifted transform `nn.{transform.name}` "
      "has no infinite-width kernel rule; supported are nn.scan (with "
      "independent parameters per step), nn.remat / nn.checkpoint and "
      "nn.jit.")


def inner_module(transform: LiftedTransform) -> nn.Module:
  """An unbound instance of the transformed class with the same fields."""
  module = transform.module
  attrs = {f.name: getattr(module, f.name)
           for f in dataclasses.fields(module)
           if f.init and f.name not in ("parent", "name")}
  return transform.module_class(**attrs)


def broadcasts_params(transform: LiftedTransform) -> bool:
  """Whether an `nn.scan` shares one set of 'params' between its steps."""
  broadcast = transform.kwargs.get("variable_broadcast", False)
  return broadcast is not False and in_filter(broadcast, "params")


def check_scan_parameters(transform: LiftedTransform,
                          has_params: bool) -> None:
  """Refuses an `nn.scan` whose steps share (or copy) their parameters.

  Raises:
    KernelRuleError: if 'params' are broadcast (one set for all steps) or
      not mapped, or mapped without splitting the 'params' RNG.
  """
  kw = transform.kwargs
  where = describe(transform)
  if not has_params:
    return
  mapped = [axis for f, axis in dict(kw.get("variable_axes", {})).items()
            if in_filter(f, "params")]
  if not mapped:
    tied = broadcasts_params(transform)
    raise KernelRuleError(
        f"{where} " + ("broadcasts" if tied else "does not map") + " its "
        "'params' over the steps: every step then uses the same weights, "
        "whose NTK has cross-step terms that the kernel rule does not "
        "compute. Use `variable_axes={'params': 0}` and "
        "`split_rngs={'params': True}` (independent layers).")
  split = [value for f, value in dict(kw.get("split_rngs", {})).items()
           if in_filter(f, "params")]
  if not split or not split[0]:
    raise KernelRuleError(
        f"{where} maps 'params' over the steps but does not split the "
        "'params' RNG, so every step is initialized with the same weights "
        "(correlated layers). Add `split_rngs={'params': True}`.")


def _structure(tree: Any) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), x.dtype) for x in leaves)


def repeat(step: Callable[[Any], Any], carry: Any, length: int,
           max_peeled: int = 4) -> Any:
  """`step` applied `length` times; one `lax.scan` once the kernel's
  structure (shapes and static fields) is the same before and after."""
  remaining = length
  peeled = 0
  while remaining > 0:
    after = jax.eval_shape(step, carry)
    if _structure(after) == _structure(carry):
      break
    carry = step(carry)
    remaining -= 1
    peeled += 1
    if peeled >= max_peeled:
      for _ in range(remaining):
        carry = step(carry)
      return carry
  if remaining:
    carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, None,
                            length=remaining)
  return carry
