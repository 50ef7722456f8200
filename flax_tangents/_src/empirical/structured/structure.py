"""The structure of a parameter's Jacobian, as a small tensor network.

A chain of primitives maps a parameter `w` to a value `y`. Its Jacobian
`dy/dw` is never materialized; it is described by *labels*, one per axis:

* an axis of `y` that carries the same label as an axis of `w` is an identity
  (Kronecker) factor: `dy/dw` is diagonal along that pair of axes, e.g. the
  output features of `x @ w`;
* `DenseFactor`s are arrays over labels, e.g. the inputs `x` of `x @ w`,
  indexed by a row label of `y` and the contracted label of `w`;
* `IndexFactor`s are one-hot selections `[idx[labels] == target]`, e.g. the
  rows an embedding lookup reads; two of them contract into a Gram of index
  equalities, so a vocabulary-sized Jacobian never exists;
* an axis of `y` whose label appears nowhere else is a broadcast: `dy/dw` is
  constant along it.

Labels are small ints drawn from a `LabelAllocator`, which records sizes.
"""

from collections.abc import Callable
import dataclasses
from typing import Any, Optional, Union

import jax

from flax_tangents._src.empirical.structured import ir

__all__ = [
    "DenseFactor", "Factor", "IndexFactor", "LabelAllocator", "Reader",
    "RuleContext", "RuleResult"
]

# Reads the runtime value of an atom of the program being evaluated.
Reader = Callable[[ir.Atom], jax.Array]


@dataclasses.dataclass(frozen=True)
class DenseFactor:
  """An array whose axes are `labels`, computed at run time by `compute`.

  `scope` is empty for a factor computed from the program's variables, and
  the path of `scan` equations for one computed in a loop body: it is then
  stacked over the iterations, its first labels being the loop labels.
  """
  labels: tuple[int, ...]
  compute: Callable[[Reader], jax.Array]
  scope: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class IndexFactor:
  """The one-hot tensor `[idx == target] * valid` over `labels + (target,)`.

  `compute(read)` returns `(idx, valid)`: integer indices with axes `labels`
  and a boolean mask of the same shape (or None when all are valid).
  `scope` is as for `DenseFactor`. A `static` factor's `compute` ignores
  `read` (its indices depend only on shapes, as for `slice` or
  `concatenate`): in a loop body it is the same in every iteration, so it
  is computed once and never stacked over the iterations.
  """
  labels: tuple[int, ...]
  target: int
  compute: Callable[[Reader], tuple[jax.Array, Optional[jax.Array]]]
  scope: tuple[int, ...] = ()
  static: bool = False


Factor = Union[DenseFactor, IndexFactor]


class LabelAllocator:
  """Hands out fresh labels and remembers their sizes."""

  def __init__(self):
    self.sizes: dict[int, int] = {}

  def new(self, size: int) -> int:
    label = len(self.sizes)
    self.sizes[label] = int(size)
    return label

  def new_for(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(self.new(s) for s in shape)


@dataclasses.dataclass(frozen=True)
class RuleContext:
  """What a structure rule sees of the equation it is applied to.

  Attributes:
    equation: the equation.
    position: the operand position of the parameter-dependent value.
    in_labels: labels of that operand's axes.
    program: the program (for operand shapes and dtypes).
    labels: the allocator for new labels.
  """
  equation: ir.Equation
  position: int
  in_labels: tuple[int, ...]
  program: ir.FlatProgram
  labels: LabelAllocator

  @property
  def params(self) -> dict[str, Any]:
    return self.equation.params

  @property
  def operand(self) -> ir.Atom:
    return self.equation.inputs[self.position]

  @property
  def in_shape(self) -> tuple[int, ...]:
    return self.program.shape(self.operand)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return self.program.shapes[self.equation.outputs[0]]

  def shape(self, atom: ir.Atom) -> tuple[int, ...]:
    return self.program.shape(atom)


@dataclasses.dataclass(frozen=True)
class RuleResult:
  """The structure of `d output / d operand` for one equation.

  Attributes:
    out_labels: one label per output axis (reusing an input label makes
      that pair of axes an identity factor).
    factors: factors of the Jacobian.
    dropped: labels of the input that no longer appear (summed out, as by
      `reduce_sum`): each contributes its size where it appears nowhere.
    restart: the output axes are a new coordinate system of the parameter
      (a general `reshape`). Only valid where the chain so far is a scaled
      permutation; the planner checks that.
  """
  out_labels: tuple[int, ...]
  factors: tuple[Factor, ...] = ()
  dropped: tuple[int, ...] = ()
  restart: bool = False


# A rule returns None when it does not apply (the chain then stops before
# the equation, which is always correct, only slower).
Rule = Callable[[RuleContext], Optional[RuleResult]]
