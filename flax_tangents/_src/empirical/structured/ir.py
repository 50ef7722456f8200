"""A flat, inlined view of a jaxpr that the structured interpreter walks.

`jax.make_jaxpr` nests the bodies of `jit`, `closed_call` and `remat` calls
inside their equations. Structure rules want to see the primitives that
actually touch a parameter (the `gather` inside `jnp.take`'s `jit`, say), so
those calls are inlined into one flat list of `Equation`s over integer
variable ids. Everything else (`custom_jvp_call`, `custom_vjp_call`, control
flow, ...) stays a single opaque equation that is evaluated with its own
primitive, which keeps its custom derivative rules intact.

Only public APIs are used: `jax.make_jaxpr` and the types of
`jax.extend.core`.
"""

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any, Union

import jax
from jax.extend import core as jex_core
import numpy as np

__all__ = [
    "Equation", "FlatProgram", "Literal", "evaluate", "flatten",
    "from_closed_jaxpr"
]

# Call primitives whose bodies are inlined: they carry no custom derivative,
# so evaluating their bodies equation by equation is exact.
_INLINED_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Literal:
  """A constant operand of an equation."""
  value: Any


Atom = Union[int, Literal]


@dataclasses.dataclass(frozen=True)
class Equation:
  """One primitive application: `outputs = primitive.bind(*inputs, **params)`.

  Attributes:
    primitive: the `jax.extend.core.Primitive`.
    params: its parameters.
    inputs: operand variable ids, or `Literal`s.
    outputs: result variable ids.
  """
  primitive: jex_core.Primitive
  params: dict[str, Any]
  inputs: tuple[Atom, ...]
  outputs: tuple[int, ...]

  @property
  def name(self) -> str:
    return self.primitive.name


@dataclasses.dataclass
class FlatProgram:
  """An inlined jaxpr.

  Attributes:
    equations: equations in evaluation order.
    inputs: variable ids of the program's inputs, in the order of the
      flattened arguments given to `flatten`.
    outputs: atoms of the program's outputs.
    consts: values of constant variables, by id.
    shapes: shape of every variable, by id.
    dtypes: dtype of every variable, by id.
  """
  equations: list[Equation]
  inputs: list[int]
  outputs: list[Atom]
  consts: dict[int, Any]
  shapes: dict[int, tuple[int, ...]]
  dtypes: dict[int, Any]

  def shape(self, atom: Atom) -> tuple[int, ...]:
    if isinstance(atom, Literal):
      return tuple(np.shape(atom.value))
    return self.shapes[atom]

  def dtype(self, atom: Atom) -> Any:
    if isinstance(atom, Literal):
      return getattr(atom.value, "dtype", np.asarray(atom.value).dtype)
    return self.dtypes[atom]

  def consumers(self) -> dict[int, list[tuple[int, int]]]:
    """For each variable, the `(equation index, operand position)` uses."""
    uses: dict[int, list[tuple[int, int]]] = {}
    for i, eqn in enumerate(self.equations):
      for k, atom in enumerate(eqn.inputs):
        if not isinstance(atom, Literal):
          uses.setdefault(atom, []).append((i, k))
    return uses


class _Builder:
  """Accumulates equations while renaming jaxpr variables to integer ids."""

  def __init__(self):
    self.equations: list[Equation] = []
    self.consts: dict[int, Any] = {}
    self.shapes: dict[int, tuple[int, ...]] = {}
    self.dtypes: dict[int, Any] = {}
    self._next_id = 0

  def new_var(self, aval) -> int:
    var_id = self._next_id
    self._next_id += 1
    self.shapes[var_id] = tuple(aval.shape)
    self.dtypes[var_id] = aval.dtype
    return var_id

  def inline(self, jaxpr: jex_core.Jaxpr, consts: Sequence[Any],
             args: Sequence[Atom]) -> list[Atom]:
    """Appends `jaxpr`'s equations with its invars bound to `args`."""
    env: dict[Any, Atom] = {}
    for var, value in zip(jaxpr.constvars, consts):
      var_id = self.new_var(var.aval)
      self.consts[var_id] = value
      env[var] = var_id
    for var, atom in zip(jaxpr.invars, args):
      env[var] = atom

    def read(v) -> Atom:
      if isinstance(v, jex_core.Literal):
        return Literal(v.val)
      return env[v]

    for eqn in jaxpr.eqns:
      inputs = [read(v) for v in eqn.invars]
      body_key = _INLINED_CALLS.get(eqn.primitive.name)
      body = eqn.params.get(body_key) if body_key else None
      if body is not None:
        if isinstance(body, jex_core.ClosedJaxpr):
          outs = self.inline(body.jaxpr, body.consts, inputs)
        else:  # An open jaxpr (remat) has no consts.
          outs = self.inline(body, (), inputs)
        for var, atom in zip(eqn.outvars, outs):
          env[var] = atom
        continue
      outputs = []
      for var in eqn.outvars:
        var_id = self.new_var(var.aval)
        if not isinstance(var, jex_core.DropVar):
          env[var] = var_id
        outputs.append(var_id)
      self.equations.append(
          Equation(eqn.primitive, dict(eqn.params), tuple(inputs),
                   tuple(outputs)))
    return [read(v) for v in jaxpr.outvars]


def flatten(fn: Callable[..., Any], *args: Any
            ) -> tuple[FlatProgram, Any]:
  """Traces `fn(*args)` and inlines its nested calls.

  Args:
    fn: a function of pytrees of arrays.
    *args: example arguments (arrays or `jax.ShapeDtypeStruct`s).

  Returns:
    `(program, out_tree)`: the flat program, whose inputs are the leaves of
    `args` in `jax.tree.leaves(args)` order, and the treedef of `fn`'s
    output.
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  return from_closed_jaxpr(closed), jax.tree.structure(out_shape)


def from_closed_jaxpr(closed: jex_core.ClosedJaxpr) -> FlatProgram:
  """The flat program of a closed jaxpr, its nested calls inlined."""
  builder = _Builder()
  inputs = [builder.new_var(v.aval) for v in closed.jaxpr.invars]
  outputs = builder.inline(closed.jaxpr, closed.consts, inputs)
  return FlatProgram(builder.equations, inputs, outputs, builder.consts,
                     builder.shapes, builder.dtypes)


def evaluate(program: FlatProgram, args: Sequence[Any],
             perturbations: dict[int, Any]) -> dict[int, Any]:
  """Evaluates `program`, adding `perturbations[v]` to variable `v`.

  Args:
    program: the flat program.
    args: values of `program.inputs`.
    perturbations: additive perturbations by variable id; the structured
      NTK differentiates with respect to them to get `d outputs / d v`.

  Returns:
    The value of every variable, by id (perturbed values where perturbed).
  """
  env: dict[int, Any] = dict(program.consts)
  for var_id, value in zip(program.inputs, args):
    env[var_id] = value
  for var_id, delta in perturbations.items():
    if var_id in env:
      env[var_id] = env[var_id] + delta

  def read(atom: Atom) -> Any:
    return atom.value if isinstance(atom, Literal) else env[atom]

  for eqn in program.equations:
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    outs = eqn.primitive.bind(*map(read, eqn.inputs), **bind_params)
    if not eqn.primitive.multiple_results:
      outs = (outs,)
    for var_id, value in zip(eqn.outputs, outs):
      if var_id in perturbations:
        value = value + perturbations[var_id]
      env[var_id] = value
  return env


def read_atom(env: dict[int, Any], atom: Atom) -> Any:
  """The value of `atom` in an environment returned by `evaluate`."""
  return atom.value if isinstance(atom, Literal) else env[atom]
