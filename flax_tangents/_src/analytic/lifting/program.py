"""A flat view of a jaxpr, with each equation's source line kept.

`jax.make_jaxpr` nests the bodies of `jit`, `closed_call`, `remat` and
custom-derivative calls inside their equations. Lifting only needs what a
function computes, so every such body is inlined into one flat list of
`Equation`s. Each equation keeps its `source_info` (for messages) and the
names of the calls it was inlined from (`custom_jvp_call[name=logaddexp]`
tells that a `max` inside is part of a smooth function).

Only public APIs: `jax.make_jaxpr` and `jax.extend.core`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

from jax.extend import core as jex_core
import numpy as np

__all__ = ["Equation", "Literal", "Program", "from_closed_jaxpr"]

# Call primitives and the parameter that holds their body.
_INLINED_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Literal:
  """A constant operand written in the jaxpr."""
  value: Any


Atom = Union[int, Literal]


@dataclasses.dataclass(frozen=True)
class Equation:
  """`outputs = primitive.bind(*inputs, **params)`.

  Attributes:
    primitive: the `jax.extend.core.Primitive`.
    params: its parameters.
    inputs: operand variable ids, or `Literal`s.
    outputs: result variable ids.
    source_info: where the user's code made it: for an equation inlined
      from a call (`jax.nn.relu`'s `jit`), the call's own site, since JAX
      caches the traces of such bodies with the first caller's frames.
    calls: names of the calls it was inlined from, outermost first.
  """
  primitive: jex_core.Primitive
  params: dict[str, Any]
  inputs: tuple[Atom, ...]
  outputs: tuple[int, ...]
  source_info: Any
  calls: tuple[str, ...]

  @property
  def name(self) -> str:
    return self.primitive.name


@dataclasses.dataclass
class Program:
  """An inlined jaxpr.

  Attributes:
    equations: equations in evaluation order.
    inputs: variable ids of the inputs.
    outputs: atoms of the outputs.
    consts: values of constant variables, by id.
    avals: abstract value (shape, dtype) of every variable, by id.
    producer: index of the equation that defines each variable, by id.
  """
  equations: list[Equation]
  inputs: list[int]
  outputs: list[Atom]
  consts: dict[int, Any]
  avals: dict[int, Any]
  producer: dict[int, int]

  def shape(self, atom: Atom) -> tuple[int, ...]:
    if isinstance(atom, Literal):
      return tuple(np.shape(atom.value))
    return tuple(self.avals[atom].shape)


class _Builder:
  """Accumulates equations, renaming jaxpr variables to integer ids."""

  def __init__(self):
    self.equations: list[Equation] = []
    self.consts: dict[int, Any] = {}
    self.avals: dict[int, Any] = {}
    self.producer: dict[int, int] = {}

  def new_var(self, aval: Any) -> int:
    var_id = len(self.avals)
    self.avals[var_id] = aval
    return var_id

  def inline(self, jaxpr: jex_core.Jaxpr, consts: Sequence[Any],
             args: Sequence[Atom], calls: tuple[str, ...],
             call_site: Any = None) -> list[Atom]:
    env: dict[Any, Atom] = {}
    for var, value in zip(jaxpr.constvars, consts):
      var_id = self.new_var(var.aval)
      self.consts[var_id] = value
      env[var] = var_id
    for var, atom in zip(jaxpr.invars, args):
      env[var] = atom

    def read(v: Any) -> Atom:
      if isinstance(v, jex_core.Literal):
        return Literal(v.val)
      return env[v]

    for eqn in jaxpr.eqns:
      inputs = [read(v) for v in eqn.invars]
      body_key = _INLINED_CALLS.get(eqn.primitive.name)
      body = eqn.params.get(body_key) if body_key else None
      if body is not None:
        name = str(eqn.params.get("name", eqn.primitive.name))
        inner_calls = calls + (name,)
        if eqn.primitive.name.startswith("custom_vjp"):
          # The forward function's operands come first; extra operands
          # (residual functions) are not used by it.
          inputs = inputs[:len(_jaxpr_of(body).invars)]
        site = eqn.source_info if call_site is None else call_site
        if isinstance(body, jex_core.ClosedJaxpr):
          outs = self.inline(body.jaxpr, body.consts, inputs, inner_calls,
                             site)
        else:
          outs = self.inline(body, (), inputs, inner_calls, site)
        for var, atom in zip(eqn.outvars, outs):
          env[var] = atom
        continue
      outputs = []
      for var in eqn.outvars:
        var_id = self.new_var(var.aval)
        if not isinstance(var, jex_core.DropVar):
          env[var] = var_id
        self.producer[var_id] = len(self.equations)
        outputs.append(var_id)
      self.equations.append(Equation(
          eqn.primitive, dict(eqn.params), tuple(inputs), tuple(outputs),
          eqn.source_info if call_site is None else call_site, calls))
    return [read(v) for v in jaxpr.outvars]


def _jaxpr_of(body: Any) -> jex_core.Jaxpr:
  return body.jaxpr if isinstance(body, jex_core.ClosedJaxpr) else body


def from_closed_jaxpr(closed: jex_core.ClosedJaxpr) -> Program:
  """The flat program of a closed jaxpr, nested calls inlined."""
  builder = _Builder()
  inputs = [builder.new_var(v.aval) for v in closed.jaxpr.invars]
  outputs = builder.inline(closed.jaxpr, closed.consts, inputs, ())
  return Program(builder.equations, inputs, outputs, builder.consts,
                 builder.avals, builder.producer)
