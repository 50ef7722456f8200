"""The lifting side of `ft.kernel_fn`'s per-module dispatch.

`interceptor._interceptor` replaces a module with a registered rule by its
rule and lifts every other module (user modules, `nn.Sequential`): `lift`
traces its method and evaluates the trace on kernels (`tracing`,
`interpreter`), each submodule call coming back to the interceptor. This
module also records the provenance of every kernel a call returns (so that
sums and products of branches in the caller can be checked), and refuses
Flax lifted transforms that reach the interceptor directly.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax

from flax_tangents._src.analytic import registry
from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.lifting import elementwise_rules  # noqa: F401
from flax_tangents._src.analytic.lifting import paths
from flax_tangents._src.analytic.lifting import provenance as prov
from flax_tangents._src.analytic.lifting import scan_rule  # noqa: F401
from flax_tangents._src.analytic.lifting import shape_rules  # noqa: F401
from flax_tangents._src.analytic.lifting import tracing as tracing_lib
from flax_tangents._src.analytic.lifting import transforms
from flax_tangents._src.analytic.lifting.errors import LiftingError
from flax_tangents._src.analytic.lifting.errors import add_line
from flax_tangents._src.analytic.lifting.errors import user_frame
from flax_tangents._src.analytic.lifting.interpreter import Interpreter

__all__ = ["call_depth", "check_transform", "lift", "record_rule_output",
           "tracing"]


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
  """Layers whose output is `W x + b` with fresh centred i.i.d. weights:
  stock Flax's and those of `registry.register_fresh_affine` (`ftn.Dense`,
  `ftn.Conv`, ...)."""
  return ((nn.Dense, nn.Conv, nn.ConvLocal, nn.ConvTranspose) +
          registry.fresh_affine_types())


def record_rule_output(module: nn.Module, args: Any, out: Any) -> None:
  inputs = [prov.unknown(k) for k in kernels_in(args)]
  name = "/".join(paths.full_path(module)) + f"#{id(module)}"
  if isinstance(out, Kernel) and isinstance(module, _fresh_affine_types()):
    prov.record(out, prov.fresh(name, inputs))
    return
  for kernel in kernels_in(out):
    if prov.lookup(kernel) is None:
      prov.record(kernel, prov.opaque(inputs, name))


def _traceback_line(error: BaseException) -> Optional[str]:
  """The innermost line of the user's code in `error`'s traceback, written
  as JAX writes source lines (`file:line:column (qualified name)`)."""
  summaries = traceback.extract_tb(error.__traceback__)
  frames = []
  for summary, (frame, _) in zip(summaries,
                                 traceback.walk_tb(error.__traceback__)):
    name = getattr(frame.f_code, "co_qualname", summary.name)
    column = "" if summary.colno is None else f":{summary.colno}"
    frames.append(f"{summary.filename}:{summary.lineno}{column} ({name})")
  return user_frame(frames)


def _user_line(error: BaseException) -> str:
  return _traceback_line(error) or "an unknown line"


def _call_submodule(record: tracing_lib.CallRecord, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
  child = record.module.clone(parent=None, _deep_clone=True)
  with paths.prefix(paths.full_path(record.module)):
    return child.apply({}, *args, method=record.method, **kwargs)


def lift(module: nn.Module, method: str, args: tuple[Any, ...],
         kwargs: dict[str, Any]) -> Any:
  """The kernel of `module.<method>(*args, **kwargs)` by lifting its code."""
  where = paths.describe(module)
  try:
    with paths.prefix(paths.full_path(module)):
      trace = tracing_lib.trace_method(module, method, args, kwargs)
  except (jax.errors.TracerBoolConversionError,
          jax.errors.ConcretizationTypeError,
          jax.errors.TracerIntegerConversionError,
          jax.errors.TracerArrayConversionError) as e:
    raise LiftingError(
        where, "Python control flow", _user_line(e),
        "the module's Python code needs the value of a network activation "
        "(an `if`, `int()` or NumPy call on it), which is not known in the "
        "infinite-width limit.") from e
  except (KernelRuleError, NotImplementedError) as e:
    # A refusal while tracing (a lifted transform, a stock module that
    # cannot run): name the line of the user's code that called it.
    add_line(e, _traceback_line(e))
    raise
  kernels = kernels_in((args, kwargs))
  with paths.prefix(paths.full_path(module)):
    return Interpreter(trace, where, _call_submodule).run(kernels)


def set_no_rule_error(factory) -> None:
  """The interceptor's error for a stock module without a rule, which
  tracing raises when such a module cannot even run on stand-in arrays."""
  tracing_lib.no_rule_error = factory


def tracing() -> bool:
  """Whether lifting is tracing a module (the interceptor must stand by)."""
  return tracing_lib.tracing()


@contextlib.contextmanager
def call_depth() -> Iterator[None]:
  """Marks a module call on kernels; provenance is forgotten at the top."""
  _depth.value += 1
  try:
    yield
  finally:
    _depth.value -= 1
    if _depth.value == 0:
      prov.clear()


def check_transform(module: nn.Module) -> None:
  """Refuses a Flax lifted transform reached by the interceptor directly.

  Inside a lifted module, `nn.scan` is handled by `scan_rule` and other
  transforms are refused while tracing; this is reached only when the
  transformed module is the model itself (or is called by a rule).
  """
  transform = transforms.enclosing_transform(module)
  if transform is None or transform.name in transforms.TRANSPARENT:
    return
  if transform.name != "scan":
    raise transforms.refuse(transform)
  raise KernelRuleError(
      f"{transforms.describe(transform)} is the whole model; its kernel is "
      "computed when it is called inside a module: wrap it, e.g. `class "
      "Net(nn.Module): ... h, _ = Stack(...)(x, None)`.")
