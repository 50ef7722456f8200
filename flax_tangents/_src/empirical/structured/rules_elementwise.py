"""Structure rules for elementwise primitives.

Every output element depends on the element of the operand at the same
position, so the Jacobian is diagonal: the output keeps the operand's labels
(new labels where the operand is broadcast along a size-one axis, or is a
scalar) and at most one dense factor holds the derivative values: the other
operand for `mul`, and for nonlinearities (`tanh`, `max`, a custom-JVP
`nn.relu`) the derivative read off a JVP with a tangent of ones.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.empirical.structured import ir
from flax_tangents._src.empirical.structured import structure
from flax_tangents._src.empirical.structured.ir import Atom

__all__ = ["RULES"]


def _out_labels(ctx: structure.RuleContext) -> Optional[tuple[int, ...]]:
  """Output labels of an elementwise op: the operand's, broadcast if needed."""
  in_shape, out_shape = ctx.in_shape, ctx.out_shape
  if not in_shape:
    return ctx.labels.new_for(out_shape)
  if len(in_shape) != len(out_shape):
    return None
  return tuple(
      label if size == out else ctx.labels.new(out)
      for label, size, out in zip(ctx.in_labels, in_shape, out_shape))


def _operand_factor(ctx: structure.RuleContext, atom: Atom,
                    out_labels: tuple[int, ...],
                    fn: Callable[[Any], Any]) -> structure.DenseFactor:
  """A factor `fn(operand)` over the output labels the operand varies along.

  Size-one axes the operand is broadcast along are squeezed, so a scalar
  (e.g. an NTK-parameterization constant) stays a scalar factor.
  """
  shape, out_shape = ctx.shape(atom), ctx.out_shape
  if not shape:
    return structure.DenseFactor((), lambda read: fn(read(atom)))
  squeezed = tuple(a for a, (s, o) in enumerate(zip(shape, out_shape))
                   if s != o)
  labels = tuple(l for a, l in enumerate(out_labels) if a not in squeezed)
  return structure.DenseFactor(
      labels, lambda read: fn(jnp.squeeze(read(atom), squeezed)))


def _scalar(value: float) -> structure.DenseFactor:
  return structure.DenseFactor((), lambda read: jnp.asarray(value))


def _identity(ctx):
  labels = _out_labels(ctx)
  return None if labels is None else structure.RuleResult(labels)


def _add(ctx):
  return _identity(ctx)


def _sub(ctx):
  labels = _out_labels(ctx)
  if labels is None:
    return None
  factors = (_scalar(-1.),) if ctx.position == 1 else ()
  return structure.RuleResult(labels, factors)


def _neg(ctx):
  labels = _out_labels(ctx)
  return None if labels is None else structure.RuleResult(
      labels, (_scalar(-1.),))


def _mul(ctx):
  labels = _out_labels(ctx)
  if labels is None:
    return None
  other = ctx.equation.inputs[1 - ctx.position]
  return structure.RuleResult(
      labels, (_operand_factor(ctx, other, labels, lambda v: v),))


def _div(ctx):
  labels = _out_labels(ctx)
  if labels is None:
    return None
  numerator, denominator = ctx.equation.inputs
  if ctx.position == 0:  # d(w / c)/dw = 1 / c.
    return structure.RuleResult(
        labels, (_operand_factor(ctx, denominator, labels,
                                 lambda v: 1. / v),))
  # d(c / w)/dw = -c / w**2, over every output axis.
  out_shape = ctx.out_shape

  def derivative(read):
    num = jnp.broadcast_to(read(numerator), out_shape)
    den = jnp.broadcast_to(read(denominator), out_shape)
    return -num / (den * den)

  return structure.RuleResult(labels,
                              (structure.DenseFactor(labels, derivative),))


def _select_n(ctx):
  if ctx.position == 0:  # The predicate is not differentiable.
    return None
  labels = _out_labels(ctx)
  if labels is None:
    return None
  predicate = ctx.equation.inputs[0]
  case = ctx.position - 1
  # The derivative is 1 where this case is selected, else 0.
  return structure.RuleResult(labels, (_operand_factor(
      ctx, predicate, labels,
      lambda p: (p.astype(jnp.int32) == case).astype(jnp.float32)),))


def _convert_element_type(ctx):
  if not jnp.issubdtype(ctx.program.dtypes[ctx.equation.outputs[0]],
                        jnp.inexact):
    return None
  return _identity(ctx)


def _derivative(ctx):
  """Any elementwise primitive: its derivative, by a JVP with ones.

  The Jacobian of an elementwise map is diagonal, so one forward-mode pass
  with a tangent of ones on the operand gives its diagonal (JAX's own
  derivative rule, custom or not).
  """
  labels = _out_labels(ctx)
  if labels is None:
    return None
  eqn, position = ctx.equation, ctx.position
  primitive = eqn.primitive
  params = primitive.get_bind_params(eqn.params)
  out_shape = ctx.out_shape

  def derivative(read):
    operands = [jnp.asarray(read(a)) for a in eqn.inputs]
    tangents = [jnp.zeros_like(v) if jnp.issubdtype(v.dtype, jnp.inexact)
                else np.zeros(v.shape, jax.dtypes.float0) for v in operands]
    tangents[position] = jnp.ones_like(operands[position])
    _, out = jax.jvp(lambda *ops: primitive.bind(*ops, **params), operands,
                     tangents)
    out = out[0] if primitive.multiple_results else out
    return jnp.broadcast_to(out, out_shape)

  return structure.RuleResult(labels,
                              (structure.DenseFactor(labels, derivative),))


def _is_elementwise_body(program) -> bool:
  """Every equation of a (custom-JVP) body maps elements to elements."""
  return all(e.name in _ELEMENTWISE_NAMES or (
      e.name == "custom_jvp_call" and
      _is_elementwise_body(ir.from_closed_jaxpr(e.params["call_jaxpr"])))
             for e in program.equations)


def _custom_jvp_call(ctx):
  """A custom-JVP function made of elementwise operations (`nn.relu`)."""
  eqn = ctx.equation
  if len(eqn.outputs) != 1 or tuple(ctx.in_shape) != tuple(ctx.out_shape):
    return None
  if not _is_elementwise_body(ir.from_closed_jaxpr(eqn.params["call_jaxpr"])):
    return None
  return _derivative(ctx)


# Elementwise primitives whose derivative is read off a JVP.
_SMOOTH = (
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
    "cos", "cosh", "digamma", "erf", "erf_inv", "erfc", "exp", "exp2",
    "expm1", "integer_pow", "lgamma", "log", "log1p", "logistic", "max",
    "min", "pow", "rsqrt", "sin", "sinh", "sqrt", "square", "tan", "tanh",
    "clamp",
)
_ELEMENTWISE_NAMES = frozenset(_SMOOTH) | {
    "add", "sub", "mul", "div", "neg", "select_n", "convert_element_type",
    "sign", "floor", "ceil", "round", "eq", "ne", "lt", "le", "gt", "ge",
    "and", "or", "not", "is_finite", "stop_gradient", "copy", "copy_p",
}

RULES: dict[str, structure.Rule] = {
    **{name: _derivative for name in _SMOOTH},
    "custom_jvp_call": _custom_jvp_call,
    "add": _add,
    "add_any": _add,
    "sub": _sub,
    "neg": _neg,
    "mul": _mul,
    "div": _div,
    "select_n": _select_n,
    "convert_element_type": _convert_element_type,
    "copy": _identity,
    "copy_p": _identity,
    "reduce_precision": _identity,
    "sharding_constraint": _identity,
    # No rule for `optimization_barrier`: the chain stops before it.
}
