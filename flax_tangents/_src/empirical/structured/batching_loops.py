"""Batching rules of control flow and custom-JVP calls (see `batching`).

Bodies of `scan`, `while` and `cond` are analysed by the running analysis
(`Eqn.analysis`), loop carries to a fixed point; a `custom_jvp_call` is
analysed through its primal body and the JAXPR of its JVP (traced with the
public `jax.jvp`), so its custom derivative rule is what is checked.
"""

from collections.abc import Sequence

import jax

from flax_tangents._src.empirical.structured import ir
from flax_tangents._src.empirical.structured.batching_states import Eqn
from flax_tangents._src.empirical.structured.batching_states import Mixed
from flax_tangents._src.empirical.structured.batching_states import State
from flax_tangents._src.empirical.structured.batching_states import join

__all__ = ["cond_rule", "custom_jvp_rule", "scan_rule", "while_rule"]


def custom_jvp_rule(e: Eqn) -> State:
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


def scan_rule(e: Eqn) -> list[State]:
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


def _fixed_point(e: Eqn, body, const_states, const_consts, carry,
                 carry_consts, xs_states, xs_consts, n_carry=None):
  """Runs a loop body until its carries' states are stable."""
  n_carry = len(carry) if n_carry is None else n_carry
  carry, carry_consts = list(carry), list(carry_consts)
  for _ in range(8):
    result = e.analysis.nested(e.index).run(
        body, list(const_states) + carry + list(xs_states),
        list(const_consts) + carry_consts + list(xs_consts))
    new = [join(a, b) for a, b in zip(carry, result.states[:n_carry])]
    new_consts = [a & b for a, b in zip(carry_consts,
                                        result.consts[:n_carry])]
    if new == carry and new_consts == carry_consts and all(
        type(a) is type(b) for a, b in zip(new, carry)):
      return result
    carry, carry_consts = new, new_consts
  return result


def while_rule(e: Eqn) -> list[State]:
  p = e.p
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  states, consts = list(e.states), list(e.consts)
  carry = states[nc + nb:]
  carry_consts = consts[nc + nb:]
  body = e.program.body(e.index, "body_jaxpr")
  result = _fixed_point(e, body, states[nc:nc + nb], consts[nc:nc + nb],
                        carry, carry_consts, [], [])
  cond = e.program.body(e.index, "cond_jaxpr")
  final = [join(a, b) for a, b in zip(carry, result.states)]
  predicate = e.analysis.child().run(cond, states[:nc] + final,
                                     consts[:nc] + carry_consts).states
  if any(s is not None for s in predicate):
    return [Mixed("the loop's stopping condition depends on the examples")
            ] * len(e.out_shapes)
  return final


def cond_rule(e: Eqn) -> list[State]:
  if e.states[0] is not None:
    return [Mixed("the branch taken depends on the examples")] * len(
        e.out_shapes)
  outs: list[State] = []
  for k in range(len(e.p["branches"])):  # A `cond` has at least one branch.
    body = e.program.body(e.index, "branches", k)
    states = e.analysis.nested(e.index).run(body, e.states[1:],
                                            e.consts[1:]).states
    outs = states if k == 0 else [join(a, b) for a, b in zip(outs, states)]
  return outs
