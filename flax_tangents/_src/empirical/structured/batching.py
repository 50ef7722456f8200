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

This module runs the propagation (`analyse`); the rest is split by concept:
`batching_states` (states, `Mixed`, `join`, the `Eqn` a rule sees),
`batching_rules` (array primitives, and `rule`, the dispatch by name),
`batching_loops` (`scan`, `while`, `cond`, `custom_jvp_call`) and
`batching_consts` (constant axes, strict mode only).
"""

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

from jax.extend import source_info_util

from flax_tangents._src.empirical.structured import batching_consts
from flax_tangents._src.empirical.structured import batching_rules
from flax_tangents._src.empirical.structured import ir
from flax_tangents._src.empirical.structured.batching_states import Address
from flax_tangents._src.empirical.structured.batching_states import Eqn
from flax_tangents._src.empirical.structured.batching_states import Finding
from flax_tangents._src.empirical.structured.batching_states import MIXED
from flax_tangents._src.empirical.structured.batching_states import Mixed
from flax_tangents._src.empirical.structured.batching_states import State
from flax_tangents._src.empirical.structured.batching_states import join
from flax_tangents._src.empirical.structured.batching_states import size_one

__all__ = [
    "Analysis", "Finding", "Mixed", "MIXED", "analyse", "describe",
    "input_states", "propagate", "variable_states"
]


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
      input_consts = [size_one(program.shapes[v]) for v in program.inputs]
    consts: dict[int, frozenset] = dict(zip(program.inputs, input_consts))
    extra = self.extras.get(self.prefix, {})
    for var, s in extra.items():
      states[var] = join(states.get(var), s)
    if self.record is not None:
      for var in program.inputs:
        self.record[self._address(var)] = states[var]

    def read(atom) -> State:
      return None if isinstance(atom, ir.Literal) else states.get(atom)

    def read_consts(atom) -> frozenset:
      if isinstance(atom, ir.Literal):
        return frozenset(range(len(program.shape(atom))))
      if atom not in consts and atom in program.consts:
        consts[atom] = batching_consts.constant_axes_of(program.consts[atom])
      return consts.get(atom, size_one(program.shapes[atom]))

    for index, eqn in enumerate(program.equations):
      e = Eqn(self, program, index, eqn, read, read_consts)
      in_states = e.states
      outs = batching_rules.rule(e)
      if all(s is None for s in outs) and self.strict:
        for var, c in zip(eqn.outputs, batching_consts.const_axes(e)):
          consts[var] = c
      for var, out in zip(eqn.outputs, outs):
        if (isinstance(out, Mixed) and
            not any(isinstance(s, Mixed) for s in in_states)):
          self._found(eqn, out)
        states[var] = join(out, extra.get(var))
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


def input_states(program: ir.FlatProgram, n_params: int,
                 n_x: int, x_shapes: Sequence[tuple[int, ...]]
                 ) -> Optional[list[State]]:
  """Sources for the data analysis: the leaves of `x`, batched along 0."""
  if not x_shapes or any(len(s) == 0 for s in x_shapes):
    return None
  if len({s[0] for s in x_shapes}) != 1:
    return None
  n_rest = len(program.inputs) - n_params - n_x
  states: list[State] = [None] * n_params
  states += [0] * n_x + [None] * n_rest
  return states


def describe(state: State) -> Any:
  """A short description of a state, for explanations."""
  if state is None:
    return "independent of the inputs"
  if isinstance(state, Mixed):
    return f"examples mixed ({state.reason})"
  return f"batched along axis {state}"
