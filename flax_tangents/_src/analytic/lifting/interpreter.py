"""Evaluating a traced module's program on kernels.

Equations that do not depend on the network's input are evaluated as they
are (at trace time, so their values are known); the others get kernel rules
(`elementwise_rules`, `shape_rules`), and submodule calls go back to the
interceptor. Only the equations the outputs need are evaluated (a traced
module also contains its submodules' real computations, which are not
needed).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic.elementwise import elementwise_kernel
from flax_tangents._src.analytic.errors import KernelRuleError
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.lifting import activations
from flax_tangents._src.analytic.lifting import expressions as ex
from flax_tangents._src.analytic.lifting import normal_form as nf
from flax_tangents._src.analytic.lifting import provenance as prov
from flax_tangents._src.analytic.lifting import spatial_ops
from flax_tangents._src.analytic.lifting import tracing
from flax_tangents._src.analytic.lifting.errors import LiftingError
from flax_tangents._src.analytic.lifting.errors import add_line
from flax_tangents._src.analytic.lifting.errors import source_line
from flax_tangents._src.analytic.lifting.errors import user_source_line
from flax_tangents._src.analytic.lifting.program import Equation
from flax_tangents._src.analytic.lifting.program import Literal
from flax_tangents._src.analytic.lifting.values import Const
from flax_tangents._src.analytic.lifting.values import Elem
from flax_tangents._src.analytic.lifting.values import Net
from flax_tangents._src.analytic.lifting.values import Value

__all__ = ["Interpreter"]

# `rule(interpreter, equation, operand values) -> output values`.
Rule = Callable[["Interpreter", Equation, list[Value]], Sequence[Value]]
_RULES: dict[str, Rule] = {}

# Submodule calls: `call(record, args, kwargs) -> outputs`, set by dispatch.
SubmoduleCall = Callable[[tracing.CallRecord, tuple, dict], Any]


def register(*names: str) -> Callable[[Rule], Rule]:
  """Registers a kernel rule for the primitives `names`."""

  def decorate(rule: Rule) -> Rule:
    for name in names:
      _RULES[name] = rule
    return rule

  return decorate


class Interpreter:
  """Evaluates one traced module call on kernels.

  Attributes:
    where: the module, for messages.
    trace: the traced program.
  """

  def __init__(self, trace: tracing.Trace, where: str,
               call_submodule: SubmoduleCall):
    self.trace = trace
    self.where = where
    self.program = trace.program
    self._call_submodule = call_submodule
    self.env: dict[int, Value] = {}

  # ------------------------------------------------------------ messages

  def refuse(self, eqn: Optional[Equation], reason: str,
             primitive: Optional[str] = None) -> LiftingError:
    """The error for an equation without an exact rule (to be raised)."""
    name = primitive or (eqn.name if eqn is not None else "?")
    line = source_line(eqn.source_info) if eqn is not None else None
    return LiftingError(self.where, name, line, reason)

  # --------------------------------------------------------------- values

  def read(self, atom: Any) -> Value:
    if isinstance(atom, Literal):
      return Const(np.asarray(atom.value))
    return self.env[atom]

  def net(self, value: Value, eqn: Optional[Equation]) -> Net:
    """The kernel of a value (a nonlinearity is applied here, if pending)."""
    if isinstance(value, Net):
      return value
    if isinstance(value, Const):
      raise self.refuse(eqn, "internal: a constant has no kernel")
    return self.materialize(value)

  def materialize(self, value: Elem) -> Net:
    root = value.root
    factor = nf.linear_scale(value.expr)
    if factor is not None:
      return Net(spatial_ops.scale(root.kernel, factor), root.provenance)
    ops = [op for op in ex.walk(value.expr) if isinstance(op, ex.Apply)]
    first = _first_eqn(value)
    activation = activations.recognize(value.expr, _describe_ops(ops))
    if activation is None:
      kinks = sorted({op.name for op in ops} - {"add", "mul", "sub", "neg",
                                                "div", "convert_element_type"})
      raise self.refuse(
          first, "this elementwise function has kinks or poles (through "
          f"{', '.join(f'`{k}`' for k in kinks)}) and matches none of the "
          "closed forms (ReLU family, abs, erf, GELU, sin/cos, exp, "
          "polynomials), so its Gaussian expectation has no accurate rule "
          "here. If Gauss-Hermite quadrature is accurate enough for you, "
          "use `ftn.ElementwiseNumerical(fn, deg)` for this function.",
          primitive=_describe_ops(ops))
    if not root.kernel.is_gaussian:
      what = ("the raw inputs" if root.kernel.is_input else
              "a value that is not Gaussian (the output of a nonlinearity, "
              "a product, a flattening, or a layer fed by one; or, for the "
              "NTK, of a normalization with a trainable scale, whose "
              "gradient is correlated with its output)")
      raise self.refuse(
          first, f"this elementwise function ({activation.name}) is applied "
          f"to {what}; its infinite-width kernel has no closed form there. "
          "Put an affine layer (`nn.Dense` or `nn.Conv`) in front of it.",
          primitive=_describe_ops(ops))
    kernel = elementwise_kernel(root.kernel, activation.nngp_fn,
                                activation.d_nngp_fn, activation.name)
    # As after every layer (f(0) != 0: erf(x) + c): padding reads as zeros.
    kernel = masking.remask(kernel, activation.name)
    return Net(kernel, prov.opaque([root.provenance]))

  # --------------------------------------------------------- evaluation

  def _depends_on_input(self) -> set[int]:
    """Variables whose values depend on the kernel-valued inputs."""
    dependent = set(self.program.inputs[1:])
    for eqn in self.program.equations:
      operands = eqn.inputs
      if eqn.primitive is tracing.MODULE_CALL:
        operands = operands[:eqn.params["n_inputs"]]
      if any(not isinstance(a, Literal) and a in dependent for a in operands):
        dependent.update(eqn.outputs)
    return dependent

  def _needed(self, dependent: set[int]) -> list[int]:
    """Indices of the equations the outputs need, in program order."""
    needed: set[int] = set()
    stack = [a for a in self.program.outputs if not isinstance(a, Literal)]
    seen: set[int] = set()
    while stack:
      var = stack.pop()
      if var in seen:
        continue
      seen.add(var)
      index = self.program.producer.get(var)
      if index is None or index in needed:
        continue
      needed.add(index)
      eqn = self.program.equations[index]
      operands = eqn.inputs
      if eqn.primitive is tracing.MODULE_CALL:
        n = eqn.params["n_inputs"]
        if any(not isinstance(a, Literal) and a in dependent
               for a in operands[:n]):
          operands = operands[:n]
        else:
          operands = operands[n:]  # the real outputs of a call on constants
      stack.extend(a for a in operands if not isinstance(a, Literal))
    return sorted(needed)

  def run(self, kernels: list[Kernel]) -> Any:
    """The module's outputs, with kernels for the input-dependent ones."""
    program = self.program
    key_var, *kernel_vars = program.inputs
    self.env[key_var] = Const(None, from_params=True)
    for var, kernel in zip(kernel_vars, kernels):
      self.env[var] = Net(kernel, prov.unknown(kernel))
    for var, value in program.consts.items():
      self.env[var] = Const(value)
    dependent = self._depends_on_input()
    needed = self._needed(dependent)
    self._check_shared_weights(needed, dependent)
    for index in needed:
      eqn = program.equations[index]
      if eqn.primitive is tracing.MODULE_CALL:
        outs = self._module_call(eqn, dependent)
        for var, value in zip(eqn.outputs, outs):
          self.env[var] = value
        continue
      values = [self.read(a) for a in eqn.inputs]
      self._check_own_parameters(eqn, values)
      if not any(isinstance(v, (Net, Elem)) for v in values):
        outs = self._constant(eqn, values)
      else:
        rule = _RULES.get(eqn.name)
        if rule is None:
          raise self.refuse(eqn, _no_rule_reason(eqn.name))
        self._check_masks(eqn, values)
        outs = rule(self, eqn, values)
      for var, value in zip(eqn.outputs, outs):
        self.env[var] = value
    leaves = [self._output(self.read(a)) for a in program.outputs]
    return jax.tree.unflatten(self.trace.out_tree, leaves)

  def _check_masks(self, eqn: Equation, values: list[Value]) -> None:
    """Refuses padding masks where the lifted rules would leave them stale.

    Shape rules move locations but not `mask1`/`mask2`. Elementwise
    functions keep every location in place (sums combine their masks, see
    `spatial_ops.add`), so their masks stay right.
    """
    if eqn.name in ex.ELEMENTWISE:
      return
    kernels = [v.kernel if isinstance(v, Net) else v.root.kernel
               for v in values if isinstance(v, (Net, Elem))]
    if all(k.mask1 is None and k.mask2 is None for k in kernels):
      return
    raise self.refuse(
        eqn, "its input carries padding masks (`mask_constant`, "
        "`ft.MaskedArray`), which lifted plain functions do not move with "
        "the locations; use `flax_tangents.nn` layers (`ftn.Index`, "
        "`ftn.Flatten`, `ftn.AvgPool`, `ftn.FanInConcat`, ...) there, or "
        "compute the kernel without masking")

  def _check_shared_weights(self, needed: list[int],
                            dependent: set[int]) -> None:
    """Refuses a submodule with parameters called twice on network values.

    Its weights are then shared (tied) between the calls; the NNGP is that
    of separate weights, but the NTK has cross terms no rule computes.
    """
    seen: dict[tuple[str, ...], Equation] = {}
    for index in needed:
      eqn = self.program.equations[index]
      if eqn.primitive is not tracing.MODULE_CALL:
        continue
      n = eqn.params["n_inputs"]
      if not any(not isinstance(a, Literal) and a in dependent
                 for a in eqn.inputs[:n]):
        continue
      module = self.trace.calls[eqn.params["index"]].module
      path = tuple(str(p) for p in module.path)
      if path not in self.trace.param_paths:
        continue
      if path in seen:
        raise self.refuse(
            eqn, f"the submodule '{'/'.join(path)}' "
            f"({type(module).__name__}) is called more than once, so its "
            "weights are shared between the calls (weight tying). Its NTK "
            "then has cross terms between the calls that no kernel rule "
            "computes. Use a separate module instance for each call.",
            primitive=f"{type(module).__name__} call")
      seen[path] = eqn

  def _check_own_parameters(self, eqn: Equation,
                            values: list[Value]) -> None:
    if eqn.name in ("scan", "cond", "while"):
      # Flax's `nn.scan` passes its steps' parameters (`scan_rule`); Flax's
      # `nn.cond` / `nn.while_loop` pass the module's variables to a control
      # flow primitive, which is refused as such (`_no_rule_reason`).
      return
    if any(isinstance(v, Const) and v.from_params for v in values) and any(
        isinstance(v, (Net, Elem)) for v in values):
      raise self.refuse(
          eqn, "the module combines a network value with a parameter it "
          "creates itself (`self.param`); such a module has no lifted "
          "kernel. Keep trainable weights in `nn.Dense` / `nn.Conv` "
          "submodules, or give the module a rule with "
          "`ft.register_kernel_rule`.")

  def _constant(self, eqn: Equation, values: list[Value]) -> list[Value]:
    consts = [v for v in values if isinstance(v, Const)]
    assert len(consts) == len(values), "called on constants only"
    from_params = any(v.from_params for v in consts)
    if from_params:
      # Never needed as numbers: parameters only matter if they meet a
      # kernel, which is refused.
      return [Const(None, from_params=True) for _ in eqn.outputs]
    params = eqn.primitive.get_bind_params(eqn.params)
    with jax.ensure_compile_time_eval():
      outs = eqn.primitive.bind(*(v.value for v in consts), **params)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    return [Const(o) for o in outs]

  def _module_call(self, eqn: Equation, dependent: set[int]) -> list[Value]:
    n = eqn.params["n_inputs"]
    record = self.trace.calls[eqn.params["index"]]
    if not any(not isinstance(a, Literal) and a in dependent
               for a in eqn.inputs[:n]):
      return [self.read(a) for a in eqn.inputs[n:]]
    operands = [self.read(a) for a in eqn.inputs[:n]]
    arrays = []
    for value in operands:
      if isinstance(value, Const):
        if value.from_params:
          raise self.refuse(
              eqn, "a submodule is called with the module's own parameters",
              primitive=f"{record.module.__class__.__name__} call")
        arrays.append(value.value)
      else:
        net = self.net(value, eqn)
        prov.record(net.kernel, net.provenance)
        arrays.append(net.kernel)
    it = iter(arrays)
    leaves = [next(it) if x is None else x for x in record.in_leaves]
    args, kwargs = jax.tree.unflatten(record.in_tree, leaves)
    try:
      out = self._call_submodule(record, args, kwargs)
    except (KernelRuleError, NotImplementedError) as e:
      # A submodule's rule refused (e.g. `nn.BatchNorm` in training mode):
      # name the line that called it (once, at the innermost lifted call).
      add_line(e, user_source_line(eqn.source_info))
      raise
    out_leaves = jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, Kernel))
    outs: list[Value] = []
    for leaf in out_leaves:
      if isinstance(leaf, Kernel):
        found = prov.lookup(leaf)
        outs.append(Net(leaf, found if found is not None else prov.opaque(
            [v.provenance for v in operands if isinstance(v, Net)],
            f"<call {id(record)}>")))
      elif leaf is not None and hasattr(leaf, "shape"):
        outs.append(Const(leaf))
    if len(outs) != len(eqn.outputs):
      raise self.refuse(
          eqn, "the submodule's kernel output does not match its array "
          "output (a rule returned a different structure)",
          primitive=f"{record.module.__class__.__name__} call")
    return outs

  def _output(self, value: Value) -> Any:
    if isinstance(value, Const):
      if value.from_params:
        raise LiftingError(self.where, "return", None,
                           "the module returns its own parameters, which "
                           "have no kernel")
      return value.value
    net = self.net(value, None)
    prov.record(net.kernel, net.provenance)
    return net.kernel


def _first_eqn(value: Elem) -> Optional[Equation]:
  return value.origin


def _describe_ops(ops: list[ex.Apply]) -> str:
  """The functions applied, by the names the user wrote where known."""
  names = []
  for op in reversed(ops):
    written = [c for c in op.calls if not c.startswith("_") and c not in (
        "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
        "checkpoint", "remat2", "closed_call", "core_call", "jit", "pjit")]
    name = written[0] if written else op.name
    if name not in names:
      names.append(name)
  return ", ".join(names)


def _no_rule_reason(name: str) -> str:
  if name in ("reduce_max", "reduce_min", "reduce_window_max",
              "reduce_window_min", "argmax", "argmin", "reduce_window"):
    return ("a maximum or minimum over locations (e.g. max pooling) has no "
            "Gaussian closed form in the infinite-width limit; use average "
            "pooling (`nn.avg_pool`) or a global mean instead")
  if name in ("cond", "while", "scan", "switch"):
    return ("control flow inside the module's call depends on the network's "
            "values (or loops over them); write it with Flax's `nn.scan` over "
            "a submodule, or unroll it")
  if name in ("sort", "top_k", "cumsum", "cumprod", "cummax", "cumlogsumexp"):
    return "this operation has no infinite-width kernel rule"
  if name in ("dot_general", "conv_general_dilated"):
    return ("a product with a fixed (non-random) matrix or with another "
            "network value has no infinite-width rule here; trainable "
            "weights belong in `nn.Dense` / `nn.Conv` submodules")
  return (f"the primitive `{name}` has no infinite-width kernel rule (lifted: "
          "elementwise functions of one pre-activation, reshapes, "
          "transposes, slicing, padding, sums and means over locations, "
          "average pooling, concatenation, sums and products of "
          "independent branches, scaling by constants)")
