"""Proves, from the program alone, that examples are independent.

The proof is a forward propagation of a *batch axis* per variable over a
flat program: an int `b` means "slice `n` along `b` depends on the sources
only through their slice `n`", `None` means "independent of the sources",
and a `Mixed` (with the reason) means no such axis is known. Each primitive
has a conservative rule; one without a rule, or that sees a batched operand
in a way it does not understand, gives `Mixed`. Bodies of `scan`, `while`
and `cond` are analysed (loop carries to a fixed point), and custom-JVP
calls through the JAXPR of their JVP (via the public `jax.jvp`), so their
custom derivative rules are what is checked.

Two questions are asked of it:

* Block-diagonal Jacobians (the default): does `out[n]` depend on a source
  only through its slice `n`? Values that do not depend on the sources
  (parameters, random numbers drawn from a fixed key) are constants.
  STRUCTURED_DERIVATIVES then forms only the diagonal blocks (see
  `interpreter`).
* Per-example evaluation (`strict=True`, for `vmap_axes`): is `f(x)[n]`
  what `f` computes on example `n` alone? This also needs every value that
  does not depend on the inputs but has a batch-sized axis to be constant
  along it (a broadcast), since evaluated on one example it would have
  size one: random numbers drawn for the whole batch, `jnp.arange(batch)`,
  or a keyword argument with a batch axis that `vmap_axes` does not name
  differ from example to example, and are refused.
"""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any, NamedTuple, Optional, Union

import jax
from jax.extend import source_info_util
import numpy as np

from flax_tangents._src.empirical.structured import ir

__all__ = [
    "Analysis", "Finding", "Mixed", "MIXED", "analyse", "describe",
    "input_states", "propagate", "variable_states"
]


class Mixed:
  """No batch axis is known; `reason` says where and why it was lost."""

  def __init__(self, reason: str = "examples are mixed"):
    self.reason = reason
    self.finding: Optional[Finding] = None

  def __repr__(self):
    return "MIXED"

  def __eq__(self, other):
    return isinstance(other, Mixed)

  def __hash__(self):
    return hash(Mixed)


MIXED = Mixed()
State = Union[None, int, Mixed]
# Addresses of variables: an int at the top level, `(equation index,
# address)` inside the body of a loop (the body's own variable ids).
Address = Union[int, tuple]


@dataclasses.dataclass(frozen=True)
class Finding:
  """Where a batch axis was lost first: the primitive, why, and the line."""
  primitive: str
  reason: str
  where: str

  def __str__(self):
    at = f" at {self.where}" if self.where else ""
    return f"`{self.primitive}`{at}: {self.reason}"


def _is_int(s: State) -> bool:
  return isinstance(s, int) and not isinstance(s, bool)


_ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan",
    "atan2", "atanh", "cbrt", "ceil", "clamp", "convert_element_type",
    "copy", "copy_p", "cos", "cosh", "digamma", "div", "eq", "erf",
    "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
    "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic",
    "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow",
    "real", "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign",
    "sin", "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh",
    "xor", "shift_left", "shift_right_logical", "shift_right_arithmetic",
    "population_count", "clz", "not_equal", "bitcast_convert_type",
    "sharding_constraint", "optimization_barrier",
})
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
    "reduce_or", "reduce_xor", "argmax", "argmin",
})
_CUMULATIVE = frozenset(
    {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_WINDOWED = frozenset({"reduce_window_max", "reduce_window_min",
                       "reduce_window_sum", "reduce_window"})
_VARYING = ("differs from example to example although it does not depend on "
            "the inputs (random numbers drawn for the whole batch, an index "
            "over the batch, or a keyword argument with a batch axis that "
            "vmap_axes does not name)")


class _Eqn:
  """What a rule sees: an equation, its operands' states and shapes."""

  def __init__(self, analysis: "_Analysis", program: ir.FlatProgram,
               index: int, eqn: ir.Equation, read_state, read_consts):
    self.analysis, self.program, self.index = analysis, program, index
    self.read_state, self.read_consts = read_state, read_consts
    self.eqn = eqn
    self.states = [read_state(a) for a in eqn.inputs]
    self.consts = [read_consts(a) for a in eqn.inputs]
    self.p = eqn.params
    self.shapes = [tuple(program.shape(a)) for a in eqn.inputs]
    self.out_shapes = [tuple(program.shapes[v]) for v in eqn.outputs]

  @property
  def out_shape(self):
    return self.out_shapes[0]

  def batched(self) -> list[int]:
    return [k for k, s in enumerate(self.states) if s is not None]

  def varying(self, k: int, axis: int, size: int) -> bool:
    """Strict mode: unbatched operand `k` differs along `axis` of `size`."""
    if not self.analysis.strict or self.states[k] is not None:
      return False
    shape = self.shapes[k]
    return (size > 1 and len(shape) > axis and shape[axis] == size and
            axis not in self.consts[k])


def _elementwise(e: _Eqn) -> State:
  axes = {s for s in e.states if s is not None}
  if len(axes) != 1:
    return Mixed("operands are batched along different axes")
  b = axes.pop()
  out = e.out_shape
  for shape, s in zip(e.shapes, e.states):
    if s is None:
      continue
    if len(shape) != len(out) or shape[b] != out[b]:
      return Mixed("one example is broadcast to the whole batch")
  for k in range(len(e.states)):
    if e.varying(k, b, out[b]):
      return Mixed(f"an operand of shape {e.shapes[k]} {_VARYING}")
  return b


def _reshape(in_shape, out_shape, b) -> State:
  prefix = math.prod(in_shape[:b])
  for b_out in range(len(out_shape)):
    if (math.prod(out_shape[:b_out]) == prefix and
        out_shape[b_out] == in_shape[b]):
      return b_out
  return Mixed("the batch axis is merged with or split into other axes")


def _dot_general(e: _Eqn) -> State:
  (lc, rc), (lb, rb) = e.p["dimension_numbers"]
  ls, rs = e.states
  nl, nr = len(e.shapes[0]), len(e.shapes[1])
  l_free = [a for a in range(nl) if a not in lc + lb]
  r_free = [a for a in range(nr) if a not in rc + rb]
  if ls is not None and rs is not None:
    if ls in lb and rs in rb and lb.index(ls) == rb.index(rs):
      return lb.index(ls)
    return Mixed("both operands are batched and contracted together")
  if ls is not None:
    if ls not in l_free:
      return Mixed("the batch axis is contracted")
    out = len(lb) + l_free.index(ls)
  else:
    if rs not in r_free:
      return Mixed("the batch axis is contracted")
    out = len(lb) + len(l_free) + r_free.index(rs)
  return out


def _conv(e: _Eqn) -> State:
  lhs_spec, _, out_spec = e.p["dimension_numbers"]
  ls, rs = e.states
  if rs is not None:
    return Mixed("the filter depends on the examples")
  if ls == lhs_spec[0] and e.p["batch_group_count"] == 1:
    return out_spec[0]
  return Mixed("the batch axis is convolved over")


def _windowed(e: _Eqn) -> State:
  p = e.p
  n_operands = len(e.states) // 2 if e.eqn.name == "reduce_window" else 1
  if any(s is not None for s in e.states[n_operands:]):
    return Mixed("the initial value depends on the examples")
  axes = {s for s in e.states[:n_operands] if s is not None}
  if len(axes) != 1:
    return Mixed("operands are batched along different axes")
  b = axes.pop()
  if (p["window_dimensions"][b] != 1 or p["window_strides"][b] != 1 or
      tuple(p["padding"][b]) != (0, 0) or p["base_dilation"][b] != 1):
    return Mixed("the window spans several examples")
  return b


def _index_components(e: _Eqn) -> list[tuple[State, frozenset, Any]]:
  """`(state, constant axes, known value)` of each index-vector component.

  Index arrays are often built by concatenating columns (`x[i, arange]`),
  so a concatenation along the index-vector axis is looked through.
  """
  indices = e.eqn.inputs[1]
  producer = e.program.producer(indices)
  pieces = [indices]
  if producer is not None:
    eqn = e.program.equations[producer]
    if (eqn.name == "concatenate" and
        eqn.params["dimension"] == len(e.shapes[1]) - 1):
      pieces = list(eqn.inputs)
  comps = []
  for piece in pieces:
    known = e.program.known_value(piece)
    for column in range(e.program.shape(piece)[-1]):
      comps.append((e.read_state(piece), e.read_consts(piece),
                    None if known is None else known[..., column]))
  return comps


def _arange_axis(value: np.ndarray, size: int) -> Optional[int]:
  """The axis along which `value` is `0, 1, ..., size - 1` (constant along
  the others), or None."""
  for axis in range(value.ndim):
    if value.shape[axis] != size:
      continue
    shape = [1] * value.ndim
    shape[axis] = size
    if np.array_equal(value, np.broadcast_to(
        np.arange(size).reshape(shape), value.shape)):
      return axis
  return None


def _constant_along(value: np.ndarray, axis: int) -> bool:
  return bool(np.all(value == np.take(value, [0], axis=axis)))


def _gather_paired(e: _Eqn, b: int) -> State:
  """`operand[..., arange(N), ...]`: each output reads its own example."""
  dn = e.p["dimension_numbers"]
  start_map = tuple(dn.start_index_map)
  if b not in start_map or e.p["slice_sizes"][b] != 1:
    return Mixed("an example-dependent array is indexed along its batch "
                 "axis")
  comps = _index_components(e)
  k = start_map.index(b)
  known = comps[k][2]
  i_b = None if known is None else _arange_axis(known, e.shapes[0][b])
  if i_b is None:
    return Mixed("an example-dependent array is indexed along its batch "
                 "axis by something other than the examples' positions")
  for j, (state, consts, value) in enumerate(comps):
    if j == k:
      continue
    if state is not None and state != i_b:
      return Mixed("the indices are batched along another axis")
    if state is None and e.analysis.strict and not (
        i_b in consts or (value is not None and
                          _constant_along(value, i_b))):
      return Mixed(f"the indices {_VARYING}")
  if e.states[1] is not None and e.states[1] != i_b:
    return Mixed("the indices are batched along another axis")
  index_dims = list(range(len(e.shapes[1]) - 1))
  batch_out = [a for a in range(len(e.out_shape))
               if a not in e.p["dimension_numbers"].offset_dims]
  return batch_out[index_dims.index(i_b)]


def _gather(e: _Eqn) -> State:
  os_, is_ = e.states
  dn = e.p["dimension_numbers"]
  n_idx = len(e.shapes[1])
  index_dims = [a for a in range(n_idx) if a != n_idx - 1]
  batch_out = [a for a in range(len(e.out_shape)) if a not in dn.offset_dims]
  op_batching = tuple(dn.operand_batching_dims)
  idx_batching = tuple(dn.start_indices_batching_dims)
  if os_ is not None and os_ not in op_batching:
    return _gather_paired(e, os_)
  if os_ is not None:
    # Along a batching dimension paired with the indices' own.
    paired = idx_batching[op_batching.index(os_)]
    if is_ is not None and is_ != paired:
      return Mixed("operand and indices are batched along unpaired axes")
    if is_ is None and e.varying(1, paired, e.shapes[1][paired]):
      return Mixed(f"the indices {_VARYING}")
    return batch_out[index_dims.index(paired)]
  if is_ not in index_dims:
    return Mixed("the batch axis holds index coordinates")
  return batch_out[index_dims.index(is_)]


def _feeds_gather_indices_only(e: _Eqn) -> bool:
  uses = e.program.consumers().get(e.eqn.outputs[0], [])
  return bool(uses) and all(
      e.program.equations[i].name == "gather" and k == 1 for i, k in uses)


def _concatenate(e: _Eqn) -> State:
  axes = {s for s in e.states if s is not None}
  b = axes.pop()
  if axes or e.p["dimension"] == b:
    return Mixed("examples are concatenated along the batch axis")
  # Columns of gather indices are checked by the gather (`x[i, arange]`).
  lenient = _feeds_gather_indices_only(e)
  for k in range(len(e.states)):
    if lenient and e.program.known_value(e.eqn.inputs[k]) is not None:
      continue
    if e.varying(k, b, e.out_shape[b]):
      return Mixed(f"an operand of shape {e.shapes[k]} {_VARYING}")
  return b


def _stack(e: _Eqn) -> State:
  axes = {s for s in e.states if s is not None}
  if len(axes) != 1:
    return Mixed("operands are batched along different axes")
  b = axes.pop()
  for k in range(len(e.states)):
    if e.varying(k, b, e.shapes[k][b]):
      return Mixed(f"an operand of shape {e.shapes[k]} {_VARYING}")
  return b if b < e.p["axis"] else b + 1


def _only_first(e: _Eqn, what: str) -> Optional[Mixed]:
  if e.batched() != [0]:
    return Mixed(f"the {what} depends on the examples")
  return None


def _shape_rule(e: _Eqn) -> State:
  """Rules for primitives that move elements of one operand."""
  name, p, b = e.eqn.name, e.p, e.states[e.batched()[0]]
  in_shape, out_shape = e.shapes[0], e.out_shape
  if name == "broadcast_in_dim":
    bad = _only_first(e, "broadcast shape")
    if bad:
      return bad
    target = p["broadcast_dimensions"][b]
    if out_shape[target] != in_shape[b]:
      return Mixed("one example is broadcast to the whole batch")
    return target
  if name == "reshape":
    bad = _only_first(e, "new shape")
    if bad:
      return bad
    if p.get("dimensions") is not None:
      return Mixed("a reshape with a transposition")
    return _reshape(in_shape, out_shape, b)
  if name == "squeeze":
    dims = [d % len(in_shape) for d in p["dimensions"]]
    return b - sum(d < b for d in dims)
  if name == "transpose":
    return list(p["permutation"]).index(b)
  if name in _REDUCTIONS:
    if b in p["axes"]:
      return Mixed("reduces over the batch axis (a batch statistic)")
    return b - sum(a < b for a in p["axes"])
  if name in _CUMULATIVE:
    return Mixed("accumulates along the batch axis") if p["axis"] == b else b
  if name == "rev":
    if b in p["dimensions"]:
      return Mixed("reverses the order of the examples")
    return b
  if name == "pad":
    bad = _only_first(e, "padding value")
    if bad:
      return bad
    if tuple(p["padding_config"][b]) != (0, 0, 0):
      return Mixed("pads along the batch axis")
    return b
  if name == "slice":
    strides = p["strides"] or (1,) * len(in_shape)
    if (p["start_indices"][b] != 0 or p["limit_indices"][b] != in_shape[b]
        or strides[b] != 1):
      return Mixed("slices the batch axis")
    return b
  if name == "dynamic_slice":
    bad = _only_first(e, "start index")
    if bad:
      return bad
    if p["slice_sizes"][b] != in_shape[b]:
      return Mixed("slices the batch axis")
    return b
  return None  # Not a shape primitive.


def _dynamic_update_slice(e: _Eqn) -> State:
  if any(s is not None for s in e.states[2:]):
    return Mixed("a start index depends on the examples")
  axes = {s for s in e.states[:2] if s is not None}
  if len(axes) != 1:
    return Mixed("operand and update are batched along different axes")
  b = axes.pop()
  if e.shapes[1][b] != e.shapes[0][b]:
    return Mixed("updates part of the batch axis")
  for k in (0, 1):
    if e.varying(k, b, e.shapes[0][b]):
      return Mixed(f"an operand {_VARYING}")
  return b


def _sort_like(e: _Eqn, axis: int) -> State:
  axes = {s for s in e.states if s is not None}
  if len(axes) != 1:
    return Mixed("operands are batched along different axes")
  b = axes.pop()
  if b == axis % len(e.shapes[0]):
    return Mixed("sorts along the batch axis")
  for k in range(len(e.states)):
    if e.varying(k, b, e.shapes[0][b]):
      return Mixed(f"an operand {_VARYING}")
  return b


def _custom_jvp(e: _Eqn) -> State:
  """Analyses the primal body and the JAXPR of the call's JVP.

  The JVP is traced with the public `jax.jvp`, so the custom rule is what is
  checked. Custom calls inside it compute primal values only, so there (with
  `primal_only`) only their bodies are analysed.
  """
  analysis = e.analysis
  body = ir.from_closed_jaxpr(e.p["call_jaxpr"])
  inner = analysis.child(primal_only=True)
  primal = inner.run(body, e.states, e.consts).states
  if analysis.primal_only:
    return _single(primal)
  prim = e.eqn.primitive
  params = prim.get_bind_params(e.eqn.params)
  dtypes = [e.program.dtype(a) for a in e.eqn.inputs]
  args = [jax.ShapeDtypeStruct(s, d) for s, d in zip(e.shapes, dtypes)]

  def jvp(primals, tangents):
    fn = lambda *a: prim.bind(*a, **params)  # noqa: E731
    return jax.jvp(fn, primals, tangents)

  try:
    closed = jax.make_jaxpr(jvp)(args, args)
  except Exception:  # pylint: disable=broad-except
    return Mixed("its custom derivative could not be traced")
  outs = inner.run(ir.from_closed_jaxpr(closed),
                   list(e.states) * 2, list(e.consts) * 2).states
  return _single(list(primal) + list(outs))


def _single(states: Sequence[State]) -> State:
  found = set(states)
  if len(found) == 1:
    return found.pop()
  mixed = [s for s in states if isinstance(s, Mixed)]
  return mixed[0] if mixed else Mixed("outputs are batched along different "
                                      "axes")


def _scan(e: _Eqn) -> list[State]:
  p = e.p
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  body = e.program.body(e.index)
  states, consts = list(e.states), list(e.consts)
  xs_states = []
  for s in states[n_consts + n_carry:]:
    if s == 0:
      return [Mixed("the loop runs over the batch axis")] * len(e.out_shapes)
    xs_states.append(None if s is None else s - 1)
  xs_consts = [frozenset(a - 1 for a in c if a > 0)
               for c in consts[n_consts + n_carry:]]
  carry = states[n_consts:n_consts + n_carry]
  carry_consts = consts[n_consts:n_consts + n_carry]
  result = _fixed_point(e, body, states[:n_consts], consts[:n_consts], carry,
                        carry_consts, xs_states, xs_consts)
  outs = result.states
  ys = [s if isinstance(s, Mixed) or s is None else s + 1
        for s in outs[n_carry:]]
  return list(outs[:n_carry]) + ys


def _fixed_point(e: _Eqn, body, const_states, const_consts, carry,
                 carry_consts, xs_states, xs_consts, n_carry=None):
  """Runs a loop body until its carries' states are stable."""
  n_carry = len(carry) if n_carry is None else n_carry
  carry, carry_consts = list(carry), list(carry_consts)
  for _ in range(8):
    result = e.analysis.nested(e.index).run(
        body, list(const_states) + carry + list(xs_states),
        list(const_consts) + carry_consts + list(xs_consts))
    new = [_join(a, b) for a, b in zip(carry, result.states[:n_carry])]
    new_consts = [a & b for a, b in zip(carry_consts,
                                        result.consts[:n_carry])]
    if new == carry and new_consts == carry_consts and all(
        type(a) is type(b) for a, b in zip(new, carry)):
      return result
    carry, carry_consts = new, new_consts
  return result


def _while(e: _Eqn) -> list[State]:
  p = e.p
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  states, consts = list(e.states), list(e.consts)
  carry = states[nc + nb:]
  carry_consts = consts[nc + nb:]
  body = e.program.body(e.index, "body_jaxpr")
  result = _fixed_point(e, body, states[nc:nc + nb], consts[nc:nc + nb],
                        carry, carry_consts, [], [])
  cond = e.program.body(e.index, "cond_jaxpr")
  final = [_join(a, b) for a, b in zip(carry, result.states)]
  predicate = e.analysis.child().run(cond, states[:nc] + final,
                                     consts[:nc] + carry_consts).states
  if any(s is not None for s in predicate):
    return [Mixed("the loop's stopping condition depends on the examples")
            ] * len(e.out_shapes)
  return final


def _cond(e: _Eqn) -> list[State]:
  if e.states[0] is not None:
    return [Mixed("the branch taken depends on the examples")] * len(
        e.out_shapes)
  outs = None
  for k in range(len(e.p["branches"])):
    body = e.program.body(e.index, "branches", k)
    states = e.analysis.nested(e.index).run(body, e.states[1:],
                                            e.consts[1:]).states
    outs = states if outs is None else [_join(a, b)
                                        for a, b in zip(outs, states)]
  return outs


def _rule(e: _Eqn) -> list[State]:
  """The batch axis of each of the equation's outputs."""
  n_out = len(e.out_shapes)
  if all(s is None for s in e.states):
    return [None] * n_out
  mixed = [s for s in e.states if isinstance(s, Mixed)]
  if mixed:
    return [mixed[0]] * n_out
  name = e.eqn.name
  if name in _ELEMENTWISE:
    return [_elementwise(e)] * n_out
  if name == "scan":
    return _scan(e)
  if name == "while":
    return _while(e)
  if name == "cond":
    return _cond(e)
  if name == "split":
    b = e.states[0]
    return [Mixed("splits the batch axis") if b == e.p["axis"] else b
            ] * n_out
  if name == "sort":
    return [_sort_like(e, e.p["dimension"])] * n_out
  if name == "top_k":
    return [_sort_like(e, e.p.get("axis", -1))] * n_out
  if name == "custom_jvp_call":
    return [_custom_jvp(e)] * n_out
  if n_out != 1:
    return [Mixed("a primitive with several outputs and no rule")] * n_out
  if name == "dot_general":
    return [_dot_general(e)]
  if name == "conv_general_dilated":
    return [_conv(e)]
  if name in _WINDOWED:
    return [_windowed(e)]
  if name == "concatenate":
    return [_concatenate(e)]
  if name == "stack":
    return [_stack(e)]
  if name == "gather":
    return [_gather(e)]
  if name == "dynamic_update_slice":
    return [_dynamic_update_slice(e)]
  state = _shape_rule(e)
  if state is None:
    return [Mixed("no batching rule for this primitive")]
  return [state]


# Constant axes: along which a value that does not depend on the sources is
# constant (a broadcast). Only needed in strict mode.


def _size_one(shape) -> frozenset:
  return frozenset(a for a, s in enumerate(shape) if s == 1)


def _const_axes(e: _Eqn) -> list[frozenset]:
  name, p = e.eqn.name, e.p
  outs = [_size_one(s) for s in e.out_shapes]
  out_shape = e.out_shapes[0] if e.out_shapes else ()
  if name == "broadcast_in_dim":
    in_shape, dims = e.shapes[0], p["broadcast_dimensions"]
    const = set(range(len(out_shape))) - set(dims)
    for a, d in enumerate(dims):
      if in_shape[a] == 1 or a in e.consts[0]:
        const.add(d)
    return [frozenset(const)]
  if name == "iota":
    return [frozenset(range(len(out_shape))) - {p["dimension"]}]
  if name in _ELEMENTWISE:
    const = set(range(len(out_shape)))
    for shape, c in zip(e.shapes, e.consts):
      if shape:
        const &= {a for a in range(len(shape)) if shape[a] == 1 or a in c}
    return [frozenset(const) | o for o in outs]
  if name == "transpose":
    perm = p["permutation"]
    return [frozenset(a for a, q in enumerate(perm) if q in e.consts[0])]
  if name == "squeeze":
    dims = sorted(d % len(e.shapes[0]) for d in p["dimensions"])
    kept = [a for a in range(len(e.shapes[0])) if a not in dims]
    return [frozenset(i for i, a in enumerate(kept) if a in e.consts[0])
            | outs[0]]
  if name in _REDUCTIONS:
    kept = [a for a in range(len(e.shapes[0])) if a not in p["axes"]]
    return [frozenset(i for i, a in enumerate(kept) if a in e.consts[0])
            | outs[0]]
  if name == "reshape":
    in_shape = e.shapes[0]
    const = set(outs[0])
    for b_out in range(len(out_shape)):
      prefix = math.prod(out_shape[:b_out])
      for a in e.consts[0]:
        if (math.prod(in_shape[:a]) == prefix and
            in_shape[a] == out_shape[b_out]):
          const.add(b_out)
    return [frozenset(const)]
  if name in ("slice", "rev", "dynamic_slice"):
    return [e.consts[0] | outs[0]]
  if name == "split":
    return [e.consts[0] | o for o in outs]
  if name == "concatenate":
    const = set(range(len(out_shape))) - {p["dimension"]}
    for c in e.consts:
      const &= c
    return [frozenset(const) | outs[0]]
  if name in _CUMULATIVE:
    return [(e.consts[0] - {p["axis"]}) | outs[0]]
  if name == "stack":
    const = set(range(len(e.shapes[0])))
    for c in e.consts:
      const &= c
    axis = p["axis"]
    return [frozenset(a if a < axis else a + 1 for a in const) | outs[0]]
  if name == "pad":
    changed = {a for a, cfg in enumerate(p["padding_config"])
               if tuple(cfg) != (0, 0, 0)}
    return [(e.consts[0] - changed) | outs[0]]
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    lconst, rconst = e.consts
    free = [[a for a in range(len(shape)) if a not in c + b]
            for shape, c, b in zip(e.shapes, (lc, rc), (lb, rb))]
    const = ([l in lconst and r in rconst for l, r in zip(lb, rb)] +
             [a in lconst for a in free[0]] + [a in rconst for a in free[1]])
    return [frozenset(a for a, c in enumerate(const) if c) | outs[0]]
  return outs


def _constant_axes_of(value: Any) -> frozenset:
  """The axes along which a concrete array is constant."""
  try:
    value = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return frozenset()
  if value.dtype == object:
    return frozenset()
  return frozenset(a for a in range(value.ndim)
                   if np.array_equal(value, np.take(value, [0] * value.shape[a],
                                                    axis=a)))


class _Result:

  def __init__(self, states, consts, finding):
    self.states, self.consts, self.finding = states, consts, finding


class _Analysis:
  """One propagation over a program (and, recursively, its bodies).

  Attributes:
    strict: per-example evaluation (see the module docstring).
    primal_only: analyse custom-JVP calls by their primal bodies only (for
      values that are never differentiated).
    record: where to record every variable's state by address, or None.
    prefix: the equation indices of the loops this body is inside.
    extras: further sources by body prefix, then variable id.
  """

  def __init__(self, strict: bool = False, primal_only: bool = False,
               record: Optional[dict] = None, prefix: tuple = (),
               extras: Optional[dict] = None):
    self.strict, self.primal_only = strict, primal_only
    self.record, self.prefix = record, prefix
    self.extras = extras or {}
    self.finding: Optional[Finding] = None

  def child(self, primal_only: Optional[bool] = None) -> "_Analysis":
    """An analysis of a sub-program whose variables are not addressable."""
    return _Analysis(self.strict, self.primal_only if primal_only is None
                     else primal_only)

  def nested(self, index: int) -> "_Analysis":
    """An analysis of a loop body, addressed under `(index, ...)`."""
    return _Analysis(self.strict, self.primal_only, self.record,
                     self.prefix + (index,), self.extras)

  def _address(self, var: int) -> Address:
    address: Address = var
    for index in reversed(self.prefix):
      address = (index, address)
    return address

  def run(self, program: ir.FlatProgram, input_states: Sequence[State],
          input_consts: Optional[Sequence[frozenset]] = None) -> _Result:
    states: dict[int, State] = dict(zip(program.inputs, input_states))
    if input_consts is None:
      input_consts = [_size_one(program.shapes[v]) for v in program.inputs]
    consts: dict[int, frozenset] = dict(zip(program.inputs, input_consts))
    extra = self.extras.get(self.prefix, {})
    for var, s in extra.items():
      states[var] = _join(states.get(var), s)
    if self.record is not None:
      for var in program.inputs:
        self.record[self._address(var)] = states[var]

    def read(atom) -> State:
      return None if isinstance(atom, ir.Literal) else states.get(atom)

    def read_consts(atom) -> frozenset:
      if isinstance(atom, ir.Literal):
        return frozenset(range(len(program.shape(atom))))
      if atom not in consts and atom in program.consts:
        consts[atom] = _constant_axes_of(program.consts[atom])
      return consts.get(atom, _size_one(program.shapes[atom]))

    for index, eqn in enumerate(program.equations):
      e = _Eqn(self, program, index, eqn, read, read_consts)
      in_states = e.states
      outs = _rule(e)
      if all(s is None for s in outs) and self.strict:
        for var, c in zip(eqn.outputs, _const_axes(e)):
          consts[var] = c
      for var, out in zip(eqn.outputs, outs):
        if (isinstance(out, Mixed) and
            not any(isinstance(s, Mixed) for s in in_states)):
          self._found(eqn, out)
        states[var] = _join(out, extra.get(var))
        if self.record is not None:
          self.record[self._address(var)] = states[var]
    outs = [read(a) for a in program.outputs]
    return _Result(outs, [read_consts(a) for a in program.outputs],
                   self.finding)

  def _found(self, eqn: ir.Equation, mixed: Mixed) -> None:
    """Records where `mixed` arose (unless inside a body, already known)."""
    if mixed.finding is None:
      where = ""
      if eqn.source_info is not None:
        try:
          where = source_info_util.summarize(eqn.source_info)
        except Exception:  # pylint: disable=broad-except
          where = ""
      mixed.finding = Finding(eqn.name, mixed.reason, where)
    if self.finding is None:
      self.finding = mixed.finding


def _extras_by_prefix(extra: Optional[dict[Address, State]]) -> dict:
  by_prefix: dict[tuple, dict[int, State]] = {}
  for address, state in (extra or {}).items():
    prefix = ()
    while not isinstance(address, int):
      prefix, address = prefix + (address[0],), address[1]
    by_prefix.setdefault(prefix, {})[address] = state
  return by_prefix


class Analysis(NamedTuple):
  """What `analyse` finds.

  Attributes:
    states: the state of each output.
    consts: for each output that does not depend on the sources, the axes
      it is constant along (strict mode).
    finding: where a batch axis was lost first, or None.
    by_address: with `record`, the state of every variable by address.
  """
  states: list[State]
  consts: list[frozenset]
  finding: Optional[Finding]
  by_address: dict[Address, State]


def analyse(program: ir.FlatProgram, input_states: Sequence[State], *,
            input_consts: Optional[Sequence[frozenset]] = None,
            extra: Optional[dict[Address, State]] = None,
            strict: bool = False, record: bool = False) -> Analysis:
  """Batch axes of `program`'s outputs, and where one was lost first.

  Args:
    program: the flat program.
    input_states: the state of each of `program.inputs`.
    input_consts: strict mode: for each input that does not depend on the
      sources, the axes it is constant along (default: its size-one axes).
    extra: states of further sources (perturbed stop variables, possibly
      inside loop bodies), joined with what their equations give.
    strict: also require values that do not depend on the sources to be
      constant along every batch-sized axis they meet (per-example
      evaluation, see the module docstring).
    record: also return the state of every variable, by address.

  Returns:
    An `Analysis`.
  """
  states: Optional[dict[Address, State]] = {} if record else None
  analysis = _Analysis(strict=strict, record=states,
                       extras=_extras_by_prefix(extra))
  result = analysis.run(program, input_states, input_consts)
  return Analysis(result.states, result.consts, result.finding, states or {})


def propagate(program: ir.FlatProgram, input_states: Sequence[State],
              extra: Optional[dict[Address, State]] = None,
              primal_only: bool = False) -> list[State]:
  """Batch axes of `program`'s outputs (see `analyse`)."""
  analysis = _Analysis(primal_only=primal_only,
                       extras=_extras_by_prefix(extra))
  return analysis.run(program, input_states).states


def variable_states(program: ir.FlatProgram,
                    input_states: Sequence[State]) -> dict[Address, State]:
  """The state of every variable (inside loop bodies too), by address."""
  return analyse(program, input_states, record=True).by_address


def _join(a: State, b: State) -> State:
  if a is None:
    return b
  if b is None or a == b:
    return a
  if isinstance(a, Mixed):
    return a
  if isinstance(b, Mixed):
    return b
  return Mixed("a value is batched along different axes on different paths")


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


def describe(state: State) -> Any:
  """A short description of a state, for explanations."""
  if state is None:
    return "independent of the inputs"
  if isinstance(state, Mixed):
    return f"examples mixed ({state.reason})"
  return f"batched along axis {state}"
