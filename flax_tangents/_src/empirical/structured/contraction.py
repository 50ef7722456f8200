"""Contracts one parameter's structured Jacobians into its NTK term.

For a parameter `w` with stop variable `y`, the term is

    sum_w  (C1 . S1)[f1, w] (C2 . S2)[f2, w],   C = d f / d y,  S = d y / d w,

and `S` is a tensor network (see `structure`). Everything becomes one
`jnp.einsum`: the parameter's labels get one letter shared by both inputs,
every other label one letter per input, and the einsum's path optimizer
picks the cheap order (for a dense layer: `x1 x2^T` and `C1 C2^T` first).
Pairs of `IndexFactor`s on a parameter axis become a Gram of index
equalities, so lookups never build a one-hot over the vocabulary.
"""

from collections.abc import Sequence
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp
import opt_einsum

from flax_tangents._src.empirical.structured import planner
from flax_tangents._src.empirical.structured import structure

__all__ = ["LetterPool", "term"]


class LetterPool:
  """Hands out distinct einsum letters."""

  def __init__(self):
    self._count = 0

  def new(self) -> str:
    letter = opt_einsum.get_symbol(self._count)
    self._count += 1
    return letter


def _fusable_targets(plan: planner.LeafPlan,
                     chain: planner.Chain) -> set[int]:
  """Parameter labels seen only by one `IndexFactor` of `chain`."""
  counts: dict[int, int] = {}
  for label in chain.stop_labels:
    counts[label] = counts.get(label, 0) + 1
  for factor in chain.factors:
    for label in factor.labels:
      counts[label] = counts.get(label, 0) + 1
    if isinstance(factor, structure.IndexFactor):
      counts[factor.target] = counts.get(factor.target, 0) + 1
  root = set(plan.root_labels)
  return {
      f.target
      for f in chain.factors
      if isinstance(f, structure.IndexFactor) and f.target in root and
      counts[f.target] == 1
  }


def _one_hot(idx, valid, size: int, batched: bool, dtype) -> jax.Array:
  del batched
  hot = idx[..., None] == jnp.arange(size).reshape((1,) * idx.ndim + (-1,))
  if valid is not None:
    hot = hot & valid[..., None]
  return hot.astype(dtype)


def _gram(idx1, valid1, idx2, valid2, dtype) -> jax.Array:
  """`[idx1[a] == idx2[b]] * valid1[a] * valid2[b]` over axes `(a, b)`."""
  n1, n2 = idx1.ndim, idx2.ndim
  a = idx1.reshape(idx1.shape + (1,) * n2)
  b = idx2.reshape((1,) * n1 + idx2.shape)
  gram = a == b
  if valid1 is not None:
    gram = gram & valid1.reshape(valid1.shape + (1,) * n2)
  if valid2 is not None:
    gram = gram & valid2.reshape((1,) * n1 + valid2.shape)
  return gram.astype(dtype)


def term(plan: planner.LeafPlan, chain1: planner.Chain,
         chain2: planner.Chain, c1: jax.Array, c2: jax.Array,
         factors1: Sequence[Any], factors2: Sequence[Any],
         c_letters1: str, c_letters2: str, batch1: str, batch2: str,
         out_letters: str, letters: LetterPool,
         stop_aliases: tuple[Optional[tuple[int, str]], ...] = (None, None)
         ) -> jax.Array:
  """The NTK term of one pair of a parameter's chains, in `out_letters` layout.

  Args:
    plan: the parameter's plan (the same for both inputs).
    chain1: the chain of `x1`'s side.
    chain2: the chain of `x2`'s side.
    c1: `d f(x1) / d stop` of `chain1`: leading output axes, then
      `chain1.stop_labels`.
    c2: the same for `x2` and `chain2`.
    factors1: for each of `chain1.factors`, `(value, batched)`: its value
      for `x1` (an array, or `(idx, valid)` for an index factor) and whether
      it has a leading per-example axis (lettered `batch1`).
    factors2: the same for `x2` and `chain2`.
    c_letters1: letters of `c1`'s output axes.
    c_letters2: letters of `c2`'s output axes.
    batch1: letter of the per-example batch axis of `factors1`, or "".
    batch2: the same for `factors2`.
    out_letters: letters of the result.
    letters: the pool to draw fresh letters from.
    stop_aliases: per input, None, or `(axis, letter)` when `c` holds only
      the examples' diagonal blocks: `c` then lacks the output's batch axis
      (`letter`), and the stop variable's `axis` takes that letter.

  Returns:
    The term, with axes `out_letters`.
  """
  dtype = jnp.result_type(c1.dtype, c2.dtype)
  chains = (chain1, chain2)
  names = _Letters(plan, letters)
  for side, alias in enumerate(stop_aliases):
    if alias is not None:
      axis, batch_letter = alias
      names.tables[side][chains[side].stop_labels[axis]] = batch_letter

  operands, specs = [c1, c2], [
      c_letters1 + names.subscript(chain1.stop_labels, 0),
      c_letters2 + names.subscript(chain2.stop_labels, 1)
  ]
  values = ([v for v, _ in factors1], [v for v, _ in factors2])
  batches = ([batch1 if b else "" for _, b in factors1],
             [batch2 if b else "" for _, b in factors2])
  for operand, spec in _factor_operands(plan, chains, values, batches, names,
                                        dtype):
    operands.append(operand)
    specs.append(spec)

  scale = _unmentioned_size(plan, chains, names, set("".join(specs)))
  spec = ",".join(specs) + "->" + out_letters
  optimize = ("optimal" if len(operands) <= 6 else
              "dp" if len(operands) <= 16 else "greedy")
  result = jnp.einsum(spec, *operands, optimize=optimize,
                      precision=lax.Precision.HIGHEST,
                      preferred_element_type=dtype)
  return result * scale if scale != 1 else result


class _Letters:
  """Einsum letters of labels: parameter labels shared, others per side."""

  def __init__(self, plan: planner.LeafPlan, letters: LetterPool):
    self.letters = letters
    self.shared = {label: letters.new() for label in plan.root_labels}
    self.tables: tuple[dict[int, str], dict[int, str]] = ({}, {})

  def letter(self, label: int, side: int) -> str:
    if label in self.shared:
      return self.shared[label]
    table = self.tables[side]
    if label not in table:
      table[label] = self.letters.new()
    return table[label]

  def subscript(self, labels: Sequence[int], side: int) -> str:
    return "".join(self.letter(l, side) for l in labels)


def _factor_operands(plan: planner.LeafPlan, chains, values, batches,
                     names: _Letters, dtype) -> list[tuple[jax.Array, str]]:
  """`(operand, subscript)` of each factor of both chains.

  An index factor on each side over the same parameter axis becomes one
  Gram of index equalities instead of two one-hot tensors.
  """
  chain1, chain2 = chains
  fusable = _fusable_targets(plan, chain1) & _fusable_targets(plan, chain2)
  fused = [{f.target: i for i, f in enumerate(chain.factors)
            if isinstance(f, structure.IndexFactor) and f.target in fusable}
           for chain in chains]
  out = []
  for target in sorted(fusable):
    i, k = fused[0][target], fused[1][target]
    (idx1, valid1), (idx2, valid2) = values[0][i], values[1][k]
    out.append((_gram(idx1, valid1, idx2, valid2, dtype),
                batches[0][i] + names.subscript(chain1.factors[i].labels, 0) +
                batches[1][k] + names.subscript(chain2.factors[k].labels, 1)))
  for side, chain in enumerate(chains):
    for i, factor in enumerate(chain.factors):
      if i in fused[side].values():
        continue
      if isinstance(factor, structure.IndexFactor):
        idx, valid = values[side][i]
        out.append((_one_hot(idx, valid, plan.sizes[factor.target],
                             bool(batches[side][i]), dtype),
                    batches[side][i] +
                    names.subscript(factor.labels + (factor.target,), side)))
      else:
        value = jnp.asarray(values[side][i])
        out.append((value.astype(dtype),
                    batches[side][i] + names.subscript(factor.labels, side)))
  return out


def _unmentioned_size(plan: planner.LeafPlan, chains, names: _Letters,
                      used: set[str]) -> int:
  """Product of the sizes of labels summed out that no operand mentions.

  Each counts once for a parameter label, once per input otherwise.
  """
  scale = 1
  dropped = chains[0].dropped + chains[1].dropped
  for label in plan.root_labels:
    if label in dropped and names.shared[label] not in used:
      scale *= plan.sizes[label]
  root = set(plan.root_labels)
  for side, chain in enumerate(chains):
    for label in chain.dropped:
      if label not in root and names.letter(label, side) not in used:
        scale *= plan.sizes[label]
  return scale
