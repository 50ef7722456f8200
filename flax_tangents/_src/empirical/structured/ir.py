"""A flat, inlined view of a jaxpr that the structured interpreter walks.

`jax.make_jaxpr` nests the bodies of `jit`, `closed_call` and `remat` calls
inside their equations. Structure rules want to see the primitives that
actually touch a parameter (the `gather` inside `jnp.take`'s `jit`, say), so
those calls are inlined into one flat list of `Equation`s over integer
variable ids. Everything else (`custom_jvp_call`, `custom_vjp_call`, control
flow, ...) stays a single opaque equation that is evaluated with its own
primitive, which keeps its custom derivative rules intact.

Only public APIs are used: `jax.make_jaxpr` and the types of
`jax.extend.core`. Running a flat program: `evaluation`.
"""

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any, Optional, Union

import jax
from jax.extend import core as jex_core
import numpy as np

__all__ = ["Atom", "Equation", "FlatProgram", "Literal", "flatten",
           "from_closed_jaxpr"]

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


# Primitives never folded into constants (random, effects, calls).
_NOT_FOLDED = frozenset({
    "random_bits", "random_seed", "random_wrap", "random_unwrap",
    "random_fold_in", "random_split", "threefry2x32", "rng_bit_generator",
    "rng_uniform", "custom_jvp_call", "custom_vjp_call", "scan", "while",
    "cond",
})


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
    source_info: where the user's code bound it (for explanations).
  """
  primitive: jex_core.Primitive
  params: dict[str, Any]
  inputs: tuple[Atom, ...]
  outputs: tuple[int, ...]
  source_info: Any = dataclasses.field(default=None, compare=False,
                                       repr=False)

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
  _bodies: dict[tuple, "FlatProgram"] = dataclasses.field(
      default_factory=dict, repr=False)
  _cache: dict[str, Any] = dataclasses.field(default_factory=dict,
                                             repr=False)

  def body(self, index: int, key: str = "jaxpr",
           branch: Optional[int] = None) -> "FlatProgram":
    """The flat program of a body of equation `index` (a loop, a `cond`).

    Args:
      index: the equation's index in `equations`.
      key: the parameter holding the body (`'jaxpr'` for `scan`,
        `'body_jaxpr'`/`'cond_jaxpr'` for `while`, `'branches'` for `cond`).
      branch: for `cond`, which branch.
    """
    cache_key = (index, key, branch)
    if cache_key not in self._bodies:
      closed = self.equations[index].params[key]
      if branch is not None:
        closed = closed[branch]
      self._bodies[cache_key] = from_closed_jaxpr(closed)
    return self._bodies[cache_key]

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
    if "consumers" not in self._cache:
      uses: dict[int, list[tuple[int, int]]] = {}
      for i, eqn in enumerate(self.equations):
        for k, atom in enumerate(eqn.inputs):
          if not isinstance(atom, Literal):
            uses.setdefault(atom, []).append((i, k))
      self._cache["consumers"] = uses
    return self._cache["consumers"]

  def producer(self, atom: Atom) -> Optional[int]:
    """The index of the equation computing `atom` (None for inputs)."""
    if "producers" not in self._cache:
      self._cache["producers"] = {
          v: i for i, eqn in enumerate(self.equations) for v in eqn.outputs
      }
    if isinstance(atom, Literal):
      return None
    return self._cache["producers"].get(atom)

  def known_value(self, atom: Atom, max_size: int = 1 << 16
                  ) -> Optional[np.ndarray]:
    """The value of `atom` if it is computed from constants alone.

    Only small integer and boolean values are folded (index arrays such as
    `jnp.arange(batch)`); anything else gives None.
    """
    if isinstance(atom, Literal):
      return np.asarray(atom.value)
    known = self._cache.setdefault("known", {})
    if atom not in known:
      known[atom] = self._fold(atom, max_size)
    return known[atom]

  def _fold(self, var: int, max_size: int) -> Optional[np.ndarray]:
    if var in self.consts:
      value = self.consts[var]
      return None if np.size(value) > max_size else np.asarray(value)
    index = self.producer(var)
    if index is None or np.prod(self.shapes[var]) > max_size:
      return None
    if not (np.issubdtype(self.dtypes[var], np.integer) or
            np.issubdtype(self.dtypes[var], np.bool_)):
      return None
    eqn = self.equations[index]
    if eqn.primitive.multiple_results or eqn.name in _NOT_FOLDED:
      return None
    values = [self.known_value(a, max_size) for a in eqn.inputs]
    if any(v is None for v in values):
      return None
    try:
      with jax.ensure_compile_time_eval():
        out = eqn.primitive.bind(
            *values, **eqn.primitive.get_bind_params(eqn.params))
      return np.asarray(out)
    except Exception:  # pylint: disable=broad-except
      return None


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
                   tuple(outputs), eqn.source_info))
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
