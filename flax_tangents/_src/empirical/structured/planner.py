"""Plans, for each parameter, where its structured Jacobian chain stops.

Starting from a parameter, the planner follows the single consumer of the
current value through primitives with structure rules, composing their
structures (threading labels), for as long as the value does not yet depend
on the inputs. The first primitive that mixes in the inputs (`x @ w`, a
lookup by token ids, a bias added to activations) ends the chain: its output
is the *stop variable*, where the interpreter measures `d f / d stop`.

Stopping early is always correct, only slower: the chain stops before a
primitive without a rule, a value with several consumers, or a primitive
that sees the parameter twice. With no rule at all, the stop variable is
the parameter itself and the term is a plain Jacobian contraction.
"""

import dataclasses
from typing import Optional

import jax.numpy as jnp

from flax_tangents._src.empirical.structured import ir
from flax_tangents._src.empirical.structured import structure
from flax_tangents._src.empirical.structured.rules import RULES

__all__ = ["LeafPlan", "plan_program", "root_plan"]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one parameter leaf's NTK term is computed.

  Attributes:
    stop_var: variable id where `d f / d stop` is measured.
    stop_labels: labels of `stop_var`'s axes.
    root_labels: labels of the parameter's coordinates (shared by both
      inputs of the NTK); all other labels are per input.
    factors: the factors of `d stop / d parameter`.
    dropped: labels summed out along the chain.
    sizes: size of every label.
  """
  stop_var: int
  stop_labels: tuple[int, ...]
  root_labels: tuple[int, ...]
  factors: tuple[structure.Factor, ...]
  dropped: tuple[int, ...]
  sizes: dict[int, int]

  def signature(self) -> tuple:
    """What must agree between the `x1` and `x2` plans to pair them."""
    factors = tuple((type(f).__name__, f.labels, getattr(f, "target", None))
                    for f in self.factors)
    return (self.stop_labels, self.root_labels, factors, self.dropped,
            tuple(self.sizes[l] for l in self.root_labels))


def root_plan(program: ir.FlatProgram, leaf_var: int) -> LeafPlan:
  """The unstructured plan: `d f / d parameter`, a Jacobian contraction."""
  labels = structure.LabelAllocator()
  root = labels.new_for(program.shapes[leaf_var])
  return LeafPlan(leaf_var, root, root, (), (), labels.sizes)


def _dependents(program: ir.FlatProgram, sources: set[int]) -> set[int]:
  """Variables computed from any of `sources`."""
  reached = set(sources)
  for eqn in program.equations:
    if any(not isinstance(a, ir.Literal) and a in reached
           for a in eqn.inputs):
      reached.update(eqn.outputs)
  return reached


def _is_scaled_permutation(labels: tuple[int, ...], root: tuple[int, ...],
                           factors, dropped) -> bool:
  return (not dropped and sorted(labels) == sorted(root) and
          len(set(labels)) == len(labels) and
          all(isinstance(f, structure.DenseFactor) and not f.labels
              for f in factors))


def _plan_leaf(program: ir.FlatProgram, leaf_var: int, data_vars: set[int],
               consumers, output_vars: set[int]) -> Optional[LeafPlan]:
  """Follows `leaf_var`'s chain; None if the parameter is unused."""
  if not consumers.get(leaf_var) and leaf_var not in output_vars:
    return None
  if not jnp.issubdtype(program.dtypes[leaf_var], jnp.inexact):
    return None
  depends_on_leaf = _dependents(program, {leaf_var})
  labels = structure.LabelAllocator()
  root = labels.new_for(program.shapes[leaf_var])
  current, current_labels = leaf_var, root
  factors: list[structure.Factor] = []
  dropped: list[int] = []
  while current not in data_vars and current not in output_vars:
    uses = consumers.get(current, [])
    if len(uses) != 1:
      break
    eqn_index, position = uses[0]
    eqn = program.equations[eqn_index]
    rule = RULES.get(eqn.name)
    if rule is None or len(eqn.outputs) != 1:
      break
    others = [a for k, a in enumerate(eqn.inputs) if k != position]
    if any(not isinstance(a, ir.Literal) and a in depends_on_leaf
           for a in others):
      break  # The parameter reaches this primitive twice.
    out_var = eqn.outputs[0]
    if not jnp.issubdtype(program.dtypes[out_var], jnp.inexact):
      break
    result = rule(
        structure.RuleContext(eqn, position, current_labels, program, labels))
    if result is None:
      break
    if result.restart:
      if not _is_scaled_permutation(current_labels, root, factors, dropped):
        break
      root = result.out_labels
    factors.extend(result.factors)
    dropped.extend(result.dropped)
    current, current_labels = out_var, result.out_labels
  return LeafPlan(current, tuple(current_labels), tuple(root), tuple(factors),
                  tuple(dropped), labels.sizes)


def plan_program(program: ir.FlatProgram, n_params: int
                 ) -> list[Optional[LeafPlan]]:
  """Plans every parameter leaf of `program`.

  Args:
    program: a flat program whose first `n_params` inputs are the parameter
      leaves and whose other inputs are data (inputs, keyword arguments).
    n_params: number of parameter leaves.

  Returns:
    One plan per parameter leaf, None for unused or non-float leaves.
  """
  param_vars = program.inputs[:n_params]
  data_vars = _dependents(program, set(program.inputs[n_params:]))
  consumers = program.consumers()
  output_vars = {a for a in program.outputs if not isinstance(a, ir.Literal)}
  return [
      _plan_leaf(program, v, data_vars, consumers, output_vars)
      for v in param_vars
  ]
