"""A module's method as a jaxpr, with its submodule calls kept opaque.

The module is cloned (unbound) and initialized abstractly inside
`jax.make_jaxpr`, with stand-in arrays for its kernel-valued arguments. Every
call of a submodule method is intercepted: the submodule runs for real (so
its outputs have the right shapes), and its outputs are then replaced by
those of an opaque equation, `flax_tangents_module_call`, whose operands are
the call's array arguments followed by the real outputs. The interpreter
evaluates that equation on kernels (the submodule's rule, or lifting it in
turn), or, for a call on constants, reads the real outputs.

Parameters exist only because the trace initializes the module: every value
computed from the initialization key is a parameter (or derived from one),
which the interpreter refuses to combine with a kernel (a module that
creates its own parameters has no lifted rule).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Optional

import flax.linen as nn
import jax
from jax import core as jax_core
from jax.extend import core as jex_core
import numpy as np

from flax_tangents._src.analytic import call_args as call_args_lib
from flax_tangents._src.analytic import registry
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.lifting import program as program_lib
from flax_tangents._src.analytic.lifting import transforms

__all__ = ["CallRecord", "MODULE_CALL", "Trace", "trace_method"]

MODULE_CALL = jex_core.Primitive("flax_tangents_module_call")
MODULE_CALL.multiple_results = True


@MODULE_CALL.def_abstract_eval
def _module_call_abstract_eval(*avals, index: int, n_inputs: int):
  del index
  return avals[n_inputs:]


@dataclasses.dataclass
class CallRecord:
  """One opaque submodule call.

  Attributes:
    module: the submodule, bound to the (finished) trace's scope.
    method: the method name.
    in_tree: treedef of `(args, kwargs)`.
    in_leaves: the leaves, with `None` where an array operand goes.
    out_tree: treedef of the outputs.
    out_leaves: output leaves, with `None` where an array result goes.
    transform: the `nn.scan` that runs this call as its step, if any.
  """
  module: nn.Module
  method: str
  in_tree: Any
  in_leaves: list[Any]
  out_tree: Any
  out_leaves: list[Any]
  transform: Optional[transforms.LiftedTransform] = None


@dataclasses.dataclass
class Trace:
  """A traced method: its flat program, submodule calls and output tree.

  The program's inputs are the initialization key, then one stand-in per
  kernel leaf of the arguments.
  """
  program: program_lib.Program
  calls: list[CallRecord]
  out_tree: Any
  out_leaves: list[Any]
  batch_size: int
  param_paths: frozenset[tuple[str, ...]]


class _State(threading.local):
  def __init__(self):
    self.calls: Optional[list[CallRecord]] = None
    self.inside_child = 0
    # Batch sizes of the kernels being lifted: (N1, N2 or None if x1 is x2).
    self.batches: tuple[int, Optional[int]] = (1, None)


_state = _State()


def tracing() -> bool:
  """Whether a module is being traced (the kernel interceptor then rests)."""
  return _state.calls is not None


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(
      x, np.generic)


def _tracing_interceptor(next_fun, args, kwargs, context):
  if (_state.calls is None or _state.inside_child or
      not context.module.path or context.method_name == "setup"):
    return next_fun(*args, **kwargs)
  leaves, in_tree = jax.tree.flatten((args, kwargs))
  operands = [x for x in leaves if isinstance(x, jax_core.Tracer)]
  if not operands:
    return next_fun(*args, **kwargs)
  transform = transforms.enclosing_transform(context.module)
  if transform is not None and transform.name not in transforms.TRANSPARENT:
    if transform.name != "scan":
      raise transforms.refuse(transform)
    if transforms.broadcasts_params(transform):
      # Refused before Flax's broadcast initialization pass runs.
      transforms.check_scan_parameters(transform, has_params=True)
  else:
    transform = None
  _state.inside_child += 1
  try:
    real = next_fun(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    # A layer defined by its kernel only (no finite forward pass), or a
    # module reused with other shapes: its rule gives the output shapes.
    real = _outputs_from_rule(context.module, args, kwargs)
    if real is None:
      if no_rule_error is not None and _is_stock(context.module):
        # What the kernel computation would say (e.g. `nn.Embed` on floats).
        raise no_rule_error(context.module) from e
      raise
  finally:
    _state.inside_child -= 1
  out_leaves, out_tree = jax.tree.flatten(real)
  results = [x for x in out_leaves if _is_array(x)]
  index = len(_state.calls)
  _state.calls.append(CallRecord(
      module=context.module, method=context.method_name, in_tree=in_tree,
      in_leaves=[None if isinstance(x, jax_core.Tracer) else x
                 for x in leaves],
      out_tree=out_tree,
      out_leaves=[None if _is_array(x) else x for x in out_leaves],
      transform=transform))
  opaque = iter(MODULE_CALL.bind(*operands, *results, index=index,
                                 n_inputs=len(operands)))
  return jax.tree.unflatten(
      out_tree, [next(opaque) if _is_array(x) else x for x in out_leaves])


# `interceptor` installs its error for stock modules without a rule here.
no_rule_error: Optional[Any] = None


def _is_stock(module: nn.Module) -> bool:
  return (type(module).__module__.startswith("flax.") and
          not isinstance(module, nn.Sequential))


def _outputs_from_rule(module: nn.Module, args: Any, kwargs: Any) -> Any:
  """Zeros shaped like the module's outputs, from its kernel rule."""
  rule = registry.find_rule(type(module))
  if rule is None:
    return None
  leaves, tree = jax.tree.flatten((args, kwargs))
  found: list[Any] = []
  named = set(call_args_lib.accepted_names(rule))

  def shapes(*arrays, diagonal_batch):
    it = iter(arrays)
    full = [next(it) if isinstance(x, jax_core.Tracer) else x
            for x in leaves]
    call_args, call_kwargs = jax.tree.unflatten(tree, full)
    n1, n2 = _state.batches

    def as_kernel(x):
      per_example = x[:1]
      first = jax.numpy.broadcast_to(per_example, (n1,) + x.shape[1:])
      second = None if n2 is None else jax.numpy.broadcast_to(
          per_example, (n2,) + x.shape[1:])
      return Kernel.from_inputs(
          first, second, diagonal_batch=diagonal_batch,
          diagonal_spatial=False).replace(is_gaussian=True, is_input=False)

    to_kernels = functools.partial(jax.tree.map, lambda x: as_kernel(x) if
                                   isinstance(x, jax_core.Tracer) else x)
    # Keywords the rule names are call arguments (e.g. a graph `pattern`,
    # traced under an outer `jit`), not network values.
    call_args = to_kernels(call_args)
    call_kwargs = {name: value if name in named else to_kernels(value)
                   for name, value in call_kwargs.items()}
    out = rule(module, *call_args,
               **call_args_lib.rule_kwargs(rule, call_kwargs))
    found.append(out)
    return 0

  tracers = [x for x in leaves if isinstance(x, jax_core.Tracer)]
  specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in tracers]
  try:
    jax.eval_shape(functools.partial(shapes, diagonal_batch=True), *specs)
  except Exception as first_error:  # pylint: disable=broad-except
    # A rule that needs full batch covariances (e.g. one mixing examples,
    # which ft.batch must then hear of) gets them; abstract, so free. If it
    # still fails, the rule's first error is the one its kernel computation
    # raises.
    found.clear()
    try:
      jax.eval_shape(functools.partial(shapes, diagonal_batch=False), *specs)
    except Exception:  # pylint: disable=broad-except
      raise first_error from None
  dtype = tracers[0].dtype
  batch = tracers[0].shape[0]
  return jax.tree.map(
      lambda k: jax.numpy.zeros((batch,) + tuple(k.shape1[1:]), dtype),
      found[0], is_leaf=lambda x: isinstance(x, Kernel))


def _batch_size(kernels: list[Kernel]) -> int:
  """A stand-in batch size equal to no other dimension (unambiguous axes).

  The first kernel's own batch size when it qualifies (so that messages
  show the user's shapes), otherwise an odd number that divides no other
  dimension.
  """
  dims = {d for k in kernels for d in k.shape1[1:]}
  ambiguous = lambda n: n < 2 or n in dims or any(
      d and (d % n == 0 or n % d == 0) for d in dims if d > 1)
  if kernels and not ambiguous(kernels[0].shape1[0]):
    return kernels[0].shape1[0]
  size = 7
  while ambiguous(size):
    size += 2
  return size


def trace_method(module: nn.Module, method: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Trace:
  """Traces `module.<method>(*args, **kwargs)` with kernels as arrays.

  Args:
    module: the (bound) module whose method is lifted; it is cloned.
    method: the method's name.
    args: positional arguments; `Kernel` leaves become stand-in arrays of the
      kernel's activation shape (with a stand-in batch size).
    kwargs: keyword arguments, likewise.

  Returns:
    The `Trace`.
  """
  leaves, tree = jax.tree.flatten((args, kwargs),
                                  is_leaf=lambda x: isinstance(x, Kernel))
  kernel_positions = [i for i, x in enumerate(leaves)
                      if isinstance(x, Kernel)]
  kernels = [leaves[i] for i in kernel_positions]
  batch = _batch_size(kernels)
  stand_ins = [jax.ShapeDtypeStruct((batch,) + tuple(k.shape1[1:]),
                                    _dtype(k)) for k in kernels]
  clone = module.clone(parent=None, _deep_clone=True)

  def traced(key, *arrays):
    full = list(leaves)
    for i, a in zip(kernel_positions, arrays):
      full[i] = a
    call_args, call_kwargs = jax.tree.unflatten(tree, full)
    out, variables = clone.init_with_output(
        {"params": key, "dropout": key}, *call_args, method=method,
        **call_kwargs)
    for path, _ in jax.tree_util.tree_leaves_with_path(
        variables.get("params", {})):
      keys = tuple(str(getattr(p, "key", p)) for p in path)
      param_paths.update(keys[:i] for i in range(len(keys)))
    return out

  calls: list[CallRecord] = []
  param_paths: set[tuple[str, ...]] = set()
  previous = _state.calls, _state.inside_child, _state.batches
  _state.calls, _state.inside_child = calls, 0
  if kernels:
    first = kernels[0]
    _state.batches = (first.shape1[0],
                      None if first.x1_is_x2 else first.shape2[0])
  try:
    with nn.intercept_methods(_tracing_interceptor):
      closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(
          jax.random.key(0), *stand_ins)
  finally:
    _state.calls, _state.inside_child, _state.batches = previous
  out_leaves, out_tree = jax.tree.flatten(out_shape)
  return Trace(program_lib.from_closed_jaxpr(closed), calls, out_tree,
               out_leaves, batch, frozenset(param_paths))


def _dtype(kernel: Kernel) -> Any:
  for field in (kernel.nngp, kernel.cov1):
    if field is not None:
      return field.dtype
  return jax.numpy.result_type(float)
