"""Proves, from the program alone, that examples are independent.

Without `vmap_axes`, the interpreter sees the whole batch. When every output
slice `out[n]` depends on a stop variable `y` only through `y[n]` (along one
axis of each), the Jacobian `d out / d y` is block-diagonal over examples, and
one reverse pass per output coordinate, seeded at *all* examples at once,
gives every diagonal block: `d (sum_n out[n]) / d y` restricted to `y[n]` is
`d out[n] / d y[n]`. That replaces `N * O` reverse passes by `O`, and the
einsum then pairs the examples' blocks with the factors of the same example.

The proof is a forward propagation of a *batch axis* per variable over the
flat program: an int `b` means "slice `n` along `b` depends on the sources
only through their slice `n`", `None` means "independent of the sources",
and `MIXED` means no such axis is known. Each primitive has a conservative
rule; one without a rule, or that sees a batched operand in a way it does
not understand, gives `MIXED` (the interpreter then keeps the general path,
which is always correct). Custom-JVP calls are analysed through the JAXPR of
their JVP (via the public `jax.jvp`), so their custom derivative rules are
what is checked.
"""

from collections.abc import Sequence
import math
from typing import Optional, Union

import jax

from flax_tangents._src.empirical.structured import ir

__all__ = ["MIXED", "propagate"]


class _Mixed:

  def __repr__(self):
    return "MIXED"


MIXED = _Mixed()
State = Union[None, int, _Mixed]

_ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2",
    "atanh", "cbrt", "ceil", "clamp", "convert_element_type", "copy",
    "copy_p", "cos", "cosh", "digamma", "div", "eq", "erf", "erf_inv",
    "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
    "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic",
    "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow",
    "real", "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign",
    "sin", "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh",
    "xor", "shift_left", "shift_right_logical", "shift_right_arithmetic",
    "population_count", "clz", "not_equal", "bitcast_convert_type",
})
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
    "reduce_or", "reduce_xor", "argmax", "argmin",
})
_CUMULATIVE = frozenset(
    {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})


def _batched(states) -> list[int]:
  return [k for k, s in enumerate(states) if s is not None]


def _elementwise(shapes, out_shape, states) -> State:
  axes = {s for s in states if s is not None}
  if len(axes) != 1 or MIXED in axes:
    return MIXED
  for shape, s in zip(shapes, states):
    if s is not None and tuple(shape) != tuple(out_shape):
      return MIXED
  return axes.pop()


def _reshape(in_shape, out_shape, b) -> State:
  prefix = math.prod(in_shape[:b])
  for b_out in range(len(out_shape)):
    if (math.prod(out_shape[:b_out]) == prefix and
        out_shape[b_out] == in_shape[b]):
      return b_out
  return MIXED


def _dot_general(eqn, shapes, states) -> State:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ls, rs = states
  nl, nr = len(shapes[0]), len(shapes[1])
  l_free = [a for a in range(nl) if a not in lc + lb]
  r_free = [a for a in range(nr) if a not in rc + rb]
  if ls is not None and rs is not None:
    if ls in lb and rs in rb and lb.index(ls) == rb.index(rs):
      return lb.index(ls)
    return MIXED
  if ls is not None:
    return len(lb) + l_free.index(ls) if ls in l_free else MIXED
  return len(lb) + len(l_free) + r_free.index(rs) if rs in r_free else MIXED


def _conv(eqn, states) -> State:
  lhs_spec, _, out_spec = eqn.params["dimension_numbers"]
  ls, rs = states
  if rs is None and ls == lhs_spec[0] and eqn.params["batch_group_count"] == 1:
    return out_spec[0]
  return MIXED


def _gather(eqn, shapes, out_shape, states) -> State:
  os_, is_ = states
  if os_ is not None:
    return MIXED
  dn = eqn.params["dimension_numbers"]
  index_dims = [a for a in range(len(shapes[1])) if a != len(shapes[1]) - 1]
  if is_ not in index_dims:
    return MIXED
  batch_out = [a for a in range(len(out_shape)) if a not in dn.offset_dims]
  return batch_out[index_dims.index(is_)]


def _custom_jvp(eqn, shapes, dtypes, states, primal_only: bool) -> State:
  """Analyses the primal body and the JAXPR of the call's JVP.

  The JVP is traced with the public `jax.jvp`, so the custom rule is what is
  checked. Custom calls inside it compute primal values only, so there (with
  `primal_only`) only their bodies are analysed.
  """
  body = eqn.params["call_jaxpr"]
  primal = set(propagate(ir.from_closed_jaxpr(body), states,
                         primal_only=True))
  if primal_only:
    return primal.pop() if len(primal) == 1 else MIXED
  prim, params = eqn.primitive, eqn.primitive.get_bind_params(eqn.params)
  args = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes)]

  def jvp(primals, tangents):
    fn = lambda *a: prim.bind(*a, **params)  # noqa: E731
    return jax.jvp(fn, primals, tangents)

  try:
    closed = jax.make_jaxpr(jvp)(args, args)
  except Exception:  # pylint: disable=broad-except
    return MIXED
  outs = propagate(ir.from_closed_jaxpr(closed), list(states) + list(states),
                   primal_only=True)
  joined = primal | set(outs)
  return joined.pop() if len(joined) == 1 else MIXED


def _rule(eqn: ir.Equation, program: ir.FlatProgram,
          states: Sequence[State], primal_only: bool = False) -> State:
  """The batch axis of `eqn`'s outputs (all of them) given its operands'."""
  if all(s is None for s in states):
    return None
  if any(s is MIXED for s in states):
    return MIXED
  name, p = eqn.name, eqn.params
  shapes = [program.shape(a) for a in eqn.inputs]
  out_shape = program.shapes[eqn.outputs[0]]
  batched = _batched(states)
  b = states[batched[0]]
  if name in _ELEMENTWISE:
    return _elementwise(shapes, out_shape, states)
  if len(eqn.outputs) != 1 and name != "custom_jvp_call":
    return MIXED
  if name == "broadcast_in_dim":
    if batched != [0]:
      return MIXED
    target = p["broadcast_dimensions"][b]
    return target if out_shape[target] == shapes[0][b] else MIXED
  if name == "reshape":
    if batched != [0] or p.get("dimensions") is not None:
      return MIXED
    return _reshape(shapes[0], out_shape, b)
  if name == "squeeze":
    dims = [d % len(shapes[0]) for d in p["dimensions"]]
    return MIXED if b in dims else b - sum(d < b for d in dims)
  if name == "expand_dims":
    return MIXED
  if name == "transpose":
    return list(p["permutation"]).index(b)
  if name in _REDUCTIONS:
    axes = p["axes"]
    return MIXED if b in axes else b - sum(a < b for a in axes)
  if name in _CUMULATIVE:
    return MIXED if p["axis"] == b else b
  if name == "rev":
    return MIXED if b in p["dimensions"] else b
  if name == "dot_general":
    return _dot_general(eqn, shapes, states)
  if name == "conv_general_dilated":
    return _conv(eqn, states)
  if name == "concatenate":
    if p["dimension"] == b:
      return MIXED
    return b if len({s for s in states if s is not None}) == 1 else MIXED
  if name == "pad":
    if batched != [0] or tuple(p["padding_config"][b]) != (0, 0, 0):
      return MIXED
    return b
  if name == "slice":
    strides = p["strides"] or (1,) * len(shapes[0])
    if (batched != [0] or p["start_indices"][b] != 0 or
        p["limit_indices"][b] != shapes[0][b] or strides[b] != 1):
      return MIXED
    return b
  if name == "dynamic_slice":
    if batched != [0] or p["slice_sizes"][b] != shapes[0][b]:
      return MIXED
    return b
  if name == "gather":
    return _gather(eqn, shapes, out_shape, states)
  if name == "custom_jvp_call":
    dtypes = [program.dtype(a) for a in eqn.inputs]
    return _custom_jvp(eqn, shapes, dtypes, states, primal_only)
  return MIXED


def propagate(program: ir.FlatProgram, input_states: Sequence[State],
              extra: Optional[dict[int, State]] = None,
              primal_only: bool = False) -> list[State]:
  """Batch axes of `program`'s outputs.

  Args:
    program: the flat program.
    input_states: the state of each of `program.inputs`.
    extra: states of further source variables (perturbed stop variables),
      joined with what their equations give.
    primal_only: analyse custom-JVP calls by their primal bodies only (for
      values that are never differentiated).

  Returns:
    The state of each output (`None` for literals).
  """
  states: dict[int, State] = dict(zip(program.inputs, input_states))
  extra = extra or {}
  for var, s in extra.items():
    states[var] = _join(states.get(var), s)

  def read(atom) -> State:
    return None if isinstance(atom, ir.Literal) else states.get(atom)

  for eqn in program.equations:
    out = _rule(eqn, program, [read(a) for a in eqn.inputs], primal_only)
    for var in eqn.outputs:
      states[var] = _join(out, extra.get(var))
  return [read(a) for a in program.outputs]


def variable_states(program: ir.FlatProgram,
                    input_states: Sequence[State]) -> dict[int, State]:
  """The state of every variable, from the states of the inputs."""
  states: dict[int, State] = dict(zip(program.inputs, input_states))
  read = lambda a: None if isinstance(a, ir.Literal) else states.get(a)  # noqa: E731
  for eqn in program.equations:
    out = _rule(eqn, program, [read(a) for a in eqn.inputs])
    for var in eqn.outputs:
      states[var] = out
  return states


def _join(a: State, b: State) -> State:
  if a is None:
    return b
  if b is None or a == b:
    return a
  return MIXED


def input_states(program: ir.FlatProgram, n_params: int,
                 n_x: int, x_shapes: Sequence[tuple[int, ...]]
                 ) -> Optional[list[State]]:
  """Sources for the data analysis: the leaves of `x`, batched along 0."""
  if not x_shapes or any(len(s) == 0 for s in x_shapes):
    return None
  if len({s[0] for s in x_shapes}) != 1:
    return None
  n_rest = len(program.inputs) - n_params - n_x
  return [None] * n_params + [0] * n_x + [None] * n_rest

