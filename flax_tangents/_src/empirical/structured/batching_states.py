"""States of the independence analysis (see `batching`), and what a rule sees.

A *state* is the batch axis of a variable: an int `b` ("slice `n` along `b`
depends on the sources only through their slice `n`"), None ("independent
of the sources"), or a `Mixed` (with the reason) when no such axis is known.
`join` combines the states a variable gets from several paths; `Eqn` is the
view of one equation that every per-primitive rule receives; the primitive
families below are shared by the batching rules (`batching_rules`) and the
constant-axes analysis (`batching_consts`).
"""

import dataclasses
from typing import Any, Optional, Union

from flax_tangents._src.empirical.structured import ir

__all__ = [
    "Address", "CUMULATIVE", "ELEMENTWISE", "Eqn", "Finding", "MIXED", "Mixed",
    "REDUCTIONS", "State", "VARYING", "WINDOWED", "join", "size_one"
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


# Primitive families, by name.
ELEMENTWISE = frozenset({
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
REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
    "reduce_or", "reduce_xor", "argmax", "argmin",
})
CUMULATIVE = frozenset(
    {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
WINDOWED = frozenset({"reduce_window_max", "reduce_window_min",
                      "reduce_window_sum", "reduce_window"})
# The end of the reason given when an unbatched value varies (strict mode).
VARYING = ("differs from example to example although it does not depend on "
           "the inputs (random numbers drawn for the whole batch, an index "
           "over the batch, or a keyword argument with a batch axis that "
           "vmap_axes does not name)")


def join(a: State, b: State) -> State:
  """The state of a variable reached with states `a` and `b`.

  >>> join(None, 1), join(1, 1), join(0, 1)
  (1, 1, MIXED)
  """
  if a is None:
    return b
  if b is None or a == b:
    return a
  if isinstance(a, Mixed):
    return a
  if isinstance(b, Mixed):
    return b
  return Mixed("a value is batched along different axes on different paths")


def size_one(shape) -> frozenset:
  """The axes of size one of `shape` (a value is constant along them)."""
  return frozenset(a for a, s in enumerate(shape) if s == 1)


class Eqn:
  """What a rule sees: an equation, its operands' states and shapes."""

  def __init__(self, analysis: Any, program: ir.FlatProgram,
               index: int, eqn: ir.Equation, read_state, read_consts):
    # `analysis` is the `batching._Analysis` running this equation (it runs
    # the bodies of loops); typed `Any` so that this module does not import
    # `batching`, which imports it.
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
