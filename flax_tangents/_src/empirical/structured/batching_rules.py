"""Batching rules of the array primitives (see `batching`).

Each rule takes an `Eqn` (an equation with the states, constant axes and
shapes of its operands) and returns the batch axis of its output, or a
`Mixed` naming why none is known; `rule` dispatches by primitive name and
sends control flow and custom-JVP calls to `batching_loops`. Rules are
conservative: a case a rule does not understand gives `Mixed`.
"""

import math
from typing import Any, Optional

import numpy as np

from flax_tangents._src.empirical.structured import batching_loops
from flax_tangents._src.empirical.structured.batching_states import CUMULATIVE
from flax_tangents._src.empirical.structured.batching_states import ELEMENTWISE
from flax_tangents._src.empirical.structured.batching_states import Eqn
from flax_tangents._src.empirical.structured.batching_states import Mixed
from flax_tangents._src.empirical.structured.batching_states import REDUCTIONS
from flax_tangents._src.empirical.structured.batching_states import State
from flax_tangents._src.empirical.structured.batching_states import VARYING
from flax_tangents._src.empirical.structured.batching_states import WINDOWED

__all__ = ["rule"]


def _elementwise(e: Eqn) -> State:
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
      return Mixed(f"an operand of shape {e.shapes[k]} {VARYING}")
  return b


def _reshape(in_shape, out_shape, b) -> State:
  prefix = math.prod(in_shape[:b])
  for b_out in range(len(out_shape)):
    if (math.prod(out_shape[:b_out]) == prefix and
        out_shape[b_out] == in_shape[b]):
      return b_out
  return Mixed("the batch axis is merged with or split into other axes")


def _dot_general(e: Eqn) -> State:
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


def _conv(e: Eqn) -> State:
  lhs_spec, _, out_spec = e.p["dimension_numbers"]
  ls, rs = e.states
  if rs is not None:
    return Mixed("the filter depends on the examples")
  if ls == lhs_spec[0] and e.p["batch_group_count"] == 1:
    return out_spec[0]
  return Mixed("the batch axis is convolved over")


def _windowed(e: Eqn) -> State:
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


def _index_components(e: Eqn) -> list[tuple[State, frozenset, Any]]:
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


def _gather_paired(e: Eqn, b: int) -> State:
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
      return Mixed(f"the indices {VARYING}")
  if e.states[1] is not None and e.states[1] != i_b:
    return Mixed("the indices are batched along another axis")
  index_dims = list(range(len(e.shapes[1]) - 1))
  batch_out = [a for a in range(len(e.out_shape))
               if a not in e.p["dimension_numbers"].offset_dims]
  return batch_out[index_dims.index(i_b)]


def _gather(e: Eqn) -> State:
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
      return Mixed(f"the indices {VARYING}")
    return batch_out[index_dims.index(paired)]
  if is_ not in index_dims:
    return Mixed("the batch axis holds index coordinates")
  return batch_out[index_dims.index(is_)]


def _feeds_gather_indices_only(e: Eqn) -> bool:
  uses = e.program.consumers().get(e.eqn.outputs[0], [])
  return bool(uses) and all(
      e.program.equations[i].name == "gather" and k == 1 for i, k in uses)


def _concatenate(e: Eqn) -> State:
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
      return Mixed(f"an operand of shape {e.shapes[k]} {VARYING}")
  return b


def _stack(e: Eqn) -> State:
  axes = {s for s in e.states if s is not None}
  if len(axes) != 1:
    return Mixed("operands are batched along different axes")
  b = axes.pop()
  for k in range(len(e.states)):
    if e.varying(k, b, e.shapes[k][b]):
      return Mixed(f"an operand of shape {e.shapes[k]} {VARYING}")
  return b if b < e.p["axis"] else b + 1


def _only_first(e: Eqn, what: str) -> Optional[Mixed]:
  if e.batched() != [0]:
    return Mixed(f"the {what} depends on the examples")
  return None


def _shape_rule(e: Eqn) -> State:
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
  if name in REDUCTIONS:
    if b in p["axes"]:
      return Mixed("reduces over the batch axis (a batch statistic)")
    return b - sum(a < b for a in p["axes"])
  if name in CUMULATIVE:
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


def _dynamic_update_slice(e: Eqn) -> State:
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
      return Mixed(f"an operand {VARYING}")
  return b


def _sort_like(e: Eqn, axis: int) -> State:
  axes = {s for s in e.states if s is not None}
  if len(axes) != 1:
    return Mixed("operands are batched along different axes")
  b = axes.pop()
  if b == axis % len(e.shapes[0]):
    return Mixed("sorts along the batch axis")
  for k in range(len(e.states)):
    if e.varying(k, b, e.shapes[0][b]):
      return Mixed(f"an operand {VARYING}")
  return b


def rule(e: Eqn) -> list[State]:
  """The batch axis of each of the equation's outputs."""
  n_out = len(e.out_shapes)
  if all(s is None for s in e.states):
    return [None] * n_out
  mixed = [s for s in e.states if isinstance(s, Mixed)]
  if mixed:
    return [mixed[0]] * n_out
  name = e.eqn.name
  if name in ELEMENTWISE:
    return [_elementwise(e)] * n_out
  if name == "scan":
    return batching_loops.scan_rule(e)
  if name == "while":
    return batching_loops.while_rule(e)
  if name == "cond":
    return batching_loops.cond_rule(e)
  if name == "split":
    b = e.states[0]
    return [Mixed("splits the batch axis") if b == e.p["axis"] else b
            ] * n_out
  if name == "sort":
    return [_sort_like(e, e.p["dimension"])] * n_out
  if name == "top_k":
    return [_sort_like(e, e.p.get("axis", -1))] * n_out
  if name == "custom_jvp_call":
    return [batching_loops.custom_jvp_rule(e)] * n_out
  if n_out != 1:
    return [Mixed("a primitive with several outputs and no rule")] * n_out
  if name == "dot_general":
    return [_dot_general(e)]
  if name == "conv_general_dilated":
    return [_conv(e)]
  if name in WINDOWED:
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
