"""STRUCTURED_DERIVATIVES: the empirical NTK from structured Jacobians.

For each input batch (`x1`, `x2`), `f` is traced once into a flat program
(`ir`), every parameter leaf gets a plan (`planner`): one or more chains of
structure rules, each ending at a stop variable `y` (possibly inside the body
of a `scan`, stacked over its iterations). One reverse pass (`jax.jacrev`
with respect to additive perturbations of all stop variables at once) gives
every `C = d f / d y`; the factors of each chain are read off the same
forward pass (those computed in a loop body, at every iteration). Each pair
of a parameter's chains contributes `(C1 S1)(C2 S2)^T`, one einsum
(`contraction`), summed over pairs and parameters, in NT's output layout.

With `vmap_axes`, all of this runs per example under `jax.vmap` (the
Jacobians of independent examples are block-diagonal, so only the diagonal
blocks are formed), which is what makes wide networks cheap.

Without `vmap_axes`, the same saving is made whenever it can be proven from
the program (`batching`): if every output slice `out[n]` depends on each stop
variable only through its slice `n`, one reverse pass per output coordinate,
seeded at all examples at once, yields all diagonal blocks, and the cost is
linear in the batch instead of quadratic. Programs that mix examples
(BatchNorm in training, batch statistics, a primitive the analysis does not
know) keep the general whole-batch path, which is always correct.

Modules: `side` (one input batch: its program, plans and independence
proof), `jacobians` (`C` and the factor values), `contraction` (one term as
an einsum); this module pairs the two sides and sums the terms per output.
"""

from collections.abc import Callable, Mapping
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import layout
from flax_tangents._src.empirical.structured import contraction
from flax_tangents._src.empirical.structured import jacobians
from flax_tangents._src.empirical.structured import planner
from flax_tangents._src.empirical.structured.side import Side

__all__ = ["ntk"]


def _reconcile(side1: Side, side2: Side):
  """Pairs the plans of both inputs; mismatched ones fall back to Jacobians."""
  plans1, plans2 = list(side1.plans), list(side2.plans)
  for i, (p1, p2) in enumerate(zip(plans1, plans2)):
    if p1 is None and p2 is None:
      continue
    if p1 is None or p2 is None or p1.signature() != p2.signature():
      reason = "the plans for x1 and x2 differ"
      leaf1 = side1.program.inputs[i]
      leaf2 = side2.program.inputs[i]
      plans1[i] = planner.root_plan(side1.program, leaf1, reason)
      plans2[i] = planner.root_plan(side2.program, leaf2, reason)
  return plans1, plans2


class _LeafLetters:
  """Einsum letters of one output leaf.

  Attributes:
    pool: the letter pool (terms take further letters from it).
    axes: per output axis, its letters on the `x1` and `x2` sides (one
      shared letter for a traced or diagonal axis).
    out: the kernel's letters, in NT layout.
    order: the output axes with the vmapped batch axis (if any) first.
    c: per side, the letters of `C`'s output axes (in `order`).
    batch: per side, the vmapped batch axis' letter, or `''`.
  """

  def __init__(self, ndim: int, trace, diagonal, batch_axis: Optional[int]):
    self.pool = contraction.LetterPool()
    self.axes: list[tuple[str, str]] = []
    self.out = ""
    for axis in range(ndim):
      a = self.pool.new()
      b = a if (axis in trace or axis in diagonal) else self.pool.new()
      self.axes.append((a, b))
      if axis in diagonal:
        self.out += a
      elif axis not in trace:
        self.out += a + b
    self.order = list(range(ndim))
    if batch_axis is not None:
      self.order = [batch_axis] + [a for a in self.order if a != batch_axis]
    self.c = ["".join(self.axes[a][side] for a in self.order)
              for side in (0, 1)]
    self.batch = (("", "") if batch_axis is None else self.axes[batch_axis])

  def c_without(self, side: int, axis: int) -> str:
    """`c[side]` without output axis `axis` (held as diagonal blocks)."""
    return "".join(self.axes[x][side] for x in self.order if x != axis)


def _leaf_terms(j: int, sides: tuple[Side, Side], plans, cs, factors,
                letters: _LeafLetters) -> list[jax.Array]:
  """The terms of output leaf `j`: one per parameter and pair of chains."""
  # Sides holding only diagonal blocks: `C` lacks the output's batch axis,
  # and the stop variable's batch axis takes its letter.
  diag: list[Optional[tuple[int, str]]] = []
  for side, s in enumerate(sides):
    diag.append(None if s.diag_outs is None else
                (s.diag_outs[j], letters.axes[s.diag_outs[j]][side]))
  terms = []
  for i, (p1, p2) in enumerate(zip(*plans)):
    if p1 is None:
      continue
    for a, chain1 in enumerate(p1.chains):
      for b, chain2 in enumerate(p2.chains):
        cl = list(letters.c)
        aliases: list[Optional[tuple[int, str]]] = [None, None]
        for side, (s, ch) in enumerate(zip(sides, (chain1, chain2))):
          d = diag[side]
          if d is not None and ch.stop_var in s.diag_stops:
            cl[side] = letters.c_without(side, d[0])
            aliases[side] = (s.diag_stops[ch.stop_var], d[1])
        terms.append(
            contraction.term(p1, chain1, chain2, cs[0][j][chain1.stop_var],
                             cs[1][j][chain2.stop_var], factors[0][i][a],
                             factors[1][i][b], cl[0], cl[1],
                             letters.batch[0], letters.batch[1], letters.out,
                             letters.pool, stop_aliases=tuple(aliases)))
  return terms


def ntk(f: Callable[..., Any], params: Any, x1: Any, x2: Optional[Any],
        kwargs1: Mapping[str, Any], kwargs2: Mapping[str, Any], *,
        trace_axes: layout.Axes, diagonal_axes: layout.Axes,
        vmap_axes: example_axes.VmapAxes) -> Any:
  """Empirical NTK by structured derivatives.

  Args and returns as `implementation.NtkAlgorithm.__call__`. With
  `vmap_axes=None`, `f` runs on the whole batch; where the program provably
  keeps examples independent (batch axis 0 of `x` to some axis of every
  output), only the per-example Jacobian blocks are formed, otherwise the
  cost grows with the square of the batch size.

  Raises:
    ValueError: if the outputs for `x1` and `x2` cannot be paired along
      `trace_axes` or `diagonal_axes`.

  >>> import jax.numpy as jnp
  >>> w = jnp.arange(6.).reshape(2, 3)
  >>> k = ntk(lambda p, x: x @ p, w, jnp.ones((4, 2)), None, {}, {},
  ...         trace_axes=(), diagonal_axes=(), vmap_axes=None)
  >>> k.shape
  (4, 4, 3, 3)
  >>> float(k[0, 0, 1, 1])  # sum of squared inputs, 1 + 1
  2.0
  """
  side1 = Side(f, params, x1, kwargs1, vmap_axes)
  side2 = side1 if x2 is None else Side(f, params, x2, kwargs2, vmap_axes)
  plans = _reconcile(side1, side2)
  c1, factors1 = jacobians.arrays(side1, plans[0])
  c2, factors2 = ((c1, factors1) if x2 is None else
                  jacobians.arrays(side2, plans[1]))

  kernels = []
  out_axes = (jax.tree.leaves(vmap_axes[1]) if vmap_axes is not None else
              [None] * len(side1.out_shapes))
  for j, (shape1, shape2) in enumerate(zip(side1.out_shapes,
                                           side2.out_shapes)):
    trace, diagonal = layout.check_trace_and_diagonal(
        trace_axes, diagonal_axes, shape1, shape2)
    letters = _LeafLetters(len(shape1), trace, diagonal, out_axes[j])
    terms = _leaf_terms(j, (side1, side2), plans, (c1, c2),
                        (factors1, factors2), letters)
    if terms:
      kernel = functools.reduce(jnp.add, terms)
    else:
      kernel = jnp.zeros(
          layout.kernel_shape(shape1, shape2, trace, diagonal),
          side1.out_dtypes[j])
    kernels.append(kernel / layout.traced_size(shape1, trace))
  return jax.tree.unflatten(side1.out_tree, kernels)
