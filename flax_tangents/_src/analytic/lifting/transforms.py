"""Flax lifted transforms (`nn.scan`, `nn.remat`, `nn.jit`, ...) on kernels.

`nn.remat(Block)` is a class whose `__call__` runs `Block.__call__` inside a
`flax.core.lift` transform; the transform, the wrapped class and its
arguments are the free variables of that method. Transforms that do not
change what is computed (`checkpoint`/`remat`, `jit`) run the wrapped class
on the kernels directly. `nn.scan` gets a rule: its step is applied `length`
times to the kernel, compiled once as a `jax.lax.scan` once the kernel's
structure stops changing. Every other transform is refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
from flax.core.scope import in_filter
import jax

from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.lifting import paths
from flax_tangents.kernel import Kernel

__all__ = ["LiftedTransform", "apply_transform", "find_transform"]

_TRANSPARENT = ("checkpoint", "remat", "jit", "named_call")


@dataclasses.dataclass(frozen=True)
class LiftedTransform:
  """A Flax lifted transform applied to a module class.

  Attributes:
    name: the `flax.core.lift` transform (`'scan'`, `'vmap'`, ...).
    module_class: the transformed class.
    args: the transform's positional arguments.
    kwargs: its keyword arguments.
  """
  name: str
  module_class: type
  args: tuple[Any, ...]
  kwargs: dict[str, Any]


def _closure(fn: Callable[..., Any]) -> dict[str, Any]:
  code = getattr(fn, "__code__", None)
  cells = getattr(fn, "__closure__", None) or ()
  if code is None or len(code.co_freevars) != len(cells):
    return {}
  out = {}
  for name, cell in zip(code.co_freevars, cells):
    try:
      out[name] = cell.cell_contents
    except ValueError:
      pass
  return out


def find_transform(module: nn.Module, method: str
                   ) -> Optional[LiftedTransform]:
  """The lifted transform that `type(module)` applies to `method`, if any."""
  for cls in type(module).__mro__:
    fn = cls.__dict__.get(method)
    while fn is not None:
      found = _closure(fn)
      if "transform" in found and "module_class" in found:
        transform = found["transform"]
        return LiftedTransform(
            getattr(transform, "__name__", repr(transform)),
            found["module_class"], tuple(found.get("trafo_args", ())),
            dict(found.get("trafo_kwargs", {})))
      fn = getattr(fn, "__wrapped__", None)
  return None


def _inner_module(module: nn.Module, module_class: type) -> nn.Module:
  attrs = {f.name: getattr(module, f.name)
           for f in dataclasses.fields(module)
           if f.init and f.name not in ("parent", "name")}
  return module_class(**attrs)


def _describe(module: nn.Module, transform: LiftedTransform) -> str:
  return (f"nn.{transform.name}({transform.module_class.__name__}) "
          f"(module '{paths.path_string(module)}')")


def apply_transform(transform: LiftedTransform, module: nn.Module,
                    method: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
  """The kernel of a transformed module's call.

  Raises:
    KernelRuleError: for transforms other than `scan`, `checkpoint`/`remat`
      and `jit`, and for `nn.scan` settings without an exact limit.
  """
  inner = _inner_module(module, transform.module_class)
  if transform.name in _TRANSPARENT:
    with paths.prefix(paths.full_path(module)):
      return inner.apply({}, *args, method=method, **kwargs)
  if transform.name == "scan":
    return _scan(transform, module, inner, method, args, kwargs)
  if transform.name == "vmap":
    raise KernelRuleError(
        f"{_describe(module, transform)} has no infinite-width kernel rule: "
        "a vmapped module maps over an axis of its inputs, which a kernel "
        "(covariances over examples and locations) cannot split, and with "
        "separate parameters per slice (`variable_axes={'params': 0}`) the "
        "slices are independent networks whose cross-covariances would be "
        "computed wrongly. Use `nn.ConvLocal` / `ftn.ConvLocal` for separate "
        "weights per location, or `nn.Conv` with kernel size 1 (or "
        "`nn.Dense`, which acts on the last axis only) for shared weights.")
  raise KernelRuleError(
      f"{_describe(module, transform)}: the lifted transform "
      f"`nn.{transform.name}` has no infinite-width kernel rule; supported "
      "are nn.scan (independent parameters per step), nn.remat / "
      "nn.checkpoint and nn.jit.")


def _has_params(inner: nn.Module, method: str, args, kwargs) -> bool:
  def abstract(x):
    if isinstance(x, Kernel):
      dtype = x.nngp.dtype if x.nngp is not None else jax.numpy.float32
      return jax.ShapeDtypeStruct((1,) + tuple(x.shape1[1:]), dtype)
    return x

  arrays = jax.tree.map(abstract, (args, kwargs),
                        is_leaf=lambda x: isinstance(x, Kernel))
  variables = jax.eval_shape(
      lambda a, k: inner.init({"params": jax.random.key(0),
                               "dropout": jax.random.key(0)}, *a,
                              method=method, **k), *arrays)
  return bool(jax.tree.leaves(variables.get("params", {})))


def _check_scan_parameters(transform, module, inner, method, args, kwargs):
  kw = transform.kwargs
  where = _describe(module, transform)
  if not _has_params(inner, method, args, kwargs):
    return
  mapped = [axis for f, axis in dict(kw.get("variable_axes", {})).items()
            if in_filter(f, "params")]
  broadcast = kw.get("variable_broadcast", False)
  if not mapped:
    tied = broadcast is not False and in_filter(broadcast, "params")
    raise KernelRuleError(
        f"{where} " + ("broadcasts" if tied else "does not map") + " its "
        "'params' over the steps: every step then uses the same weights, "
        "whose NTK has cross-step terms that the kernel rule does not "
        "compute. Use `variable_axes={'params': 0}` and "
        "`split_rngs={'params': True}` (independent layers, as NT's "
        "`stax.repeat` of fresh layers).")
  split = [value for f, value in dict(kw.get("split_rngs", {})).items()
           if in_filter(f, "params")]
  if not split or not split[0]:
    raise KernelRuleError(
        f"{where} maps 'params' over the steps but does not split the "
        "'params' RNG, so every step is initialized with the same weights "
        "(correlated layers). Add `split_rngs={'params': True}`.")


def _scan(transform, module, inner, method, args, kwargs):
  kw = transform.kwargs
  where = _describe(module, transform)
  carry, *xs = args
  if jax.tree.leaves(xs, is_leaf=lambda x: isinstance(x, Kernel)) and any(
      isinstance(x, Kernel) for x in jax.tree.leaves(
          xs, is_leaf=lambda x: isinstance(x, Kernel))):
    raise KernelRuleError(
        f"{where} scans over kernels (`xs`); only the carry may be a "
        "network value.")
  if jax.tree.leaves(xs):
    raise KernelRuleError(
        f"{where} scans over arrays `xs`; only scans whose inputs are the "
        "carry alone (xs=None, as for a stack of layers) are supported.")
  length = kw.get("length")
  if length is None:
    raise KernelRuleError(f"{where} needs `length` (no `xs` to count).")
  _check_scan_parameters(transform, module, inner, method, (carry, *xs),
                         kwargs)

  def step(c):
    with paths.prefix(paths.full_path(module)):
      new_carry, ys = inner.apply({}, c, *xs, method=method, **kwargs)
    if jax.tree.leaves(ys):
      raise KernelRuleError(
          f"{where}: the step returns outputs `ys` besides the carry; only "
          "`(carry, None)` steps are supported.")
    return new_carry

  return _repeat(step, carry, length), None


def _structure(tree: Any) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), x.dtype) for x in leaves)


def _repeat(step: Callable[[Any], Any], carry: Any, length: int,
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
