"""What `ft.kernel_fn` does with each module call that receives a kernel.

In order:

1. a Flax lifted transform (`nn.scan`, `nn.remat`, ...): `transforms`;
2. a module with a registered kernel rule: the rule replaces `__call__`;
3. a stock Flax module without a rule (other than `nn.Sequential`): refused;
4. any other module (user modules, `nn.Sequential`): its method is traced
   and the trace is evaluated on kernels (`tracing`, `interpreter`), each
   submodule call coming back here.

The provenance of every kernel a call returns is recorded, so that sums and
products of branches in the caller can be checked (`provenance`).
"""

from __future__ import annotations

import threading
import traceback
from typing import Any, Callable

import flax
import flax.linen as nn
import jax

from flax_tangents._src.analytic import registry
from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.errors import PlainFunctionError
from flax_tangents._src.analytic.lifting import elementwise_rules  # noqa: F401
from flax_tangents._src.analytic.lifting import paths
from flax_tangents._src.analytic.lifting import provenance as prov
from flax_tangents._src.analytic.lifting import scan_rule  # noqa: F401
from flax_tangents._src.analytic.lifting import shape_rules  # noqa: F401
from flax_tangents._src.analytic.lifting import tracing
from flax_tangents._src.analytic.lifting import transforms
from flax_tangents._src.analytic.lifting.errors import LiftingError
from flax_tangents._src.analytic.lifting.errors import _LIBRARY_DIRS
from flax_tangents._src.analytic.lifting.interpreter import Interpreter
from flax_tangents.kernel import Kernel

__all__ = ["intercept"]

# Stock Flax modules that only call their submodules: lifted like user ones.
_TRANSPARENT_STOCK_MODULES = (nn.Sequential,)


class _Depth(threading.local):
  def __init__(self):
    self.value = 0


_depth = _Depth()


def _is_kernel(x: Any) -> bool:
  return isinstance(x, Kernel)


def kernels_in(tree: Any) -> list[Kernel]:
  return [x for x in jax.tree.leaves(tree, is_leaf=_is_kernel)
          if isinstance(x, Kernel)]


def _fresh_affine_types() -> tuple[type, ...]:
  """Layers whose output is `W x + b` with fresh centred i.i.d. weights."""
  from flax_tangents.nn import conv as ftn_conv  # pylint: disable=g-import-not-at-top
  from flax_tangents.nn import linear as ftn_linear  # pylint: disable=g-import-not-at-top
  return (nn.Dense, nn.Conv, nn.ConvLocal, nn.ConvTranspose,
          ftn_linear.Dense, ftn_conv.Conv, ftn_conv.ConvLocal,
          ftn_conv.ConvTranspose)


def _no_rule_error(module: nn.Module) -> KernelRuleError:
  return KernelRuleError(
      f"{paths.describe(module)} has no infinite-width kernel rule. Use the "
      "matching layer from `flax_tangents.nn` (e.g. `ftn.Dense`, "
      "`ftn.Relu`), or register a rule with "
      "`ft.register_kernel_rule(ModuleType, rule)`.")


def _note_once(error: BaseException, module: nn.Module) -> None:
  # Only the innermost module adds its path: that is where the error arose.
  if not getattr(error, "_flax_tangents_noted", False):
    error.add_note(f"(raised while computing the kernel of "
                   f"{paths.describe(module)})")
    error._flax_tangents_noted = True  # pylint: disable=protected-access


def _record_rule_output(module: nn.Module, args: Any, out: Any) -> None:
  inputs = [prov.unknown(k) for k in kernels_in(args)]
  name = "/".join(paths.full_path(module)) + f"#{id(module)}"
  if isinstance(out, Kernel) and isinstance(module, _fresh_affine_types()):
    prov.record(out, prov.fresh(name, inputs))
    return
  from flax_tangents.nn import combinators as ftn_combinators  # pylint: disable=g-import-not-at-top
  concatenates = isinstance(module, ftn_combinators.FanInConcat)
  for kernel in kernels_in(out):
    if prov.lookup(kernel) is None:
      prov.record(kernel, prov.opaque(inputs, name,
                                      homogeneous=not concatenates))


def _user_line(error: BaseException) -> str:
  frames = traceback.extract_tb(error.__traceback__)
  for frame in reversed(frames):
    if not frame.filename.startswith(_LIBRARY_DIRS) and (
        "/jax/" not in frame.filename):
      return f"{frame.filename}:{frame.lineno} ({frame.name})"
  return "an unknown line"


def _call_submodule(record: tracing.CallRecord, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
  child = record.module.clone(parent=None, _deep_clone=True)
  with paths.prefix(paths.full_path(record.module)):
    return child.apply({}, *args, method=record.method, **kwargs)


def lift(module: nn.Module, method: str, args: tuple[Any, ...],
         kwargs: dict[str, Any]) -> Any:
  """The kernel of `module.<method>(*args, **kwargs)` by lifting its code."""
  where = paths.describe(module)
  try:
    trace = tracing.trace_method(module, method, args, kwargs)
  except (jax.errors.TracerBoolConversionError,
          jax.errors.ConcretizationTypeError,
          jax.errors.TracerIntegerConversionError,
          jax.errors.TracerArrayConversionError) as e:
    raise LiftingError(
        where, "Python control flow", _user_line(e),
        "the module's Python code needs the value of a network activation "
        "(an `if`, `int()` or NumPy call on it), which is not known in the "
        "infinite-width limit.") from e
  kernels = kernels_in((args, kwargs))
  with paths.prefix(paths.full_path(module)):
    return Interpreter(trace, where, _call_submodule).run(kernels)


def _dispatch(next_fun: Callable[..., Any], module: nn.Module, method: str,
              args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
  transform = transforms.enclosing_transform(module)
  if transform is not None and transform.name not in transforms.TRANSPARENT:
    # Reached only when the transformed module is the model itself (or is
    # called by a rule): inside a lifted module, `scan_rule` handles it.
    if transform.name != "scan":
      raise transforms.refuse(transform)
    raise KernelRuleError(
        f"{transforms.describe(transform)} is the whole model; its kernel "
        "is computed when it is called inside a module: wrap it, e.g. "
        "`class Net(nn.Module): ... h, _ = Stack(...)(x, None)`.")
  rule = registry.find_rule(type(module))
  if rule is not None:
    if method != "__call__":
      raise KernelRuleError(
          f"{paths.describe(module)}: its method `{method}` was called on a "
          "kernel, but kernel rules replace `__call__` only.")
    out = rule(module, *args, **kwargs)
    _record_rule_output(module, (args, kwargs), out)
    return out
  is_stock = type(module).__module__.startswith("flax.")
  if is_stock and not isinstance(module, _TRANSPARENT_STOCK_MODULES):
    raise _no_rule_error(module)
  del next_fun
  return lift(module, method, args, kwargs)


def intercept(next_fun: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any],
              context: nn.module.InterceptorContext) -> Any:
  """The per-module dispatch of `ft.kernel_fn` (see the module docstring)."""
  if tracing.tracing() or not kernels_in((args, kwargs)):
    return next_fun(*args, **kwargs)
  module, method = context.module, context.method_name
  if method == "setup":
    return next_fun(*args, **kwargs)
  _depth.value += 1
  try:
    return _dispatch(next_fun, module, method, args, kwargs)
  except PlainFunctionError as e:
    raise KernelRuleError(
        f"{paths.describe(module)} passed a Kernel to a plain function (such "
        "as `nn.relu` or `jnp.tanh`) outside a module call that can be "
        "lifted. Use a layer from `flax_tangents.nn` instead (e.g. "
        "`ftn.Relu()` for `nn.relu`), or give your module a rule with "
        "`ft.register_kernel_rule`.") from e
  except KernelRuleError:
    raise
  except (flax.errors.ScopeParamNotFoundError,
          flax.errors.ScopeCollectionNotFound) as e:
    raise _no_rule_error(module) from e
  except Exception as e:  # pylint: disable=broad-except
    _note_once(e, module)
    raise
  finally:
    _depth.value -= 1
    if _depth.value == 0:
      prov.clear()
