"""`C = d f / d y` at every stop variable `y`, and the chains' factor values.

`arrays` does one reverse pass (`jax.jacrev` with respect to additive
perturbations of all stop variables at once) per `Side`, and reads every
chain's factors off the same forward pass (those computed in a `scan` body
through taps, at every iteration). Three ways: per example under
`jax.vmap` (with `vmap_axes`); only the examples' diagonal blocks, when
`Side.plan_diagonal` proved examples independent; the whole batch
otherwise.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from flax_tangents._src.empirical.structured import evaluation
from flax_tangents._src.empirical.structured import ir
from flax_tangents._src.empirical.structured import planner
from flax_tangents._src.empirical.structured.side import Side
from flax_tangents._src.empirical.structured.side import example_structs
from flax_tangents._src.empirical.structured.side import stop_vars

__all__ = ["arrays"]


def arrays(side: Side, plans: list[Optional[planner.LeafPlan]]):
  """`(C, factors)`: `C[out][stop address]`, factor values per chain.

  Args:
    side: the input batch.
    plans: its plans (reconciled with the other side's).

  Returns:
    `C` per output leaf, by stop address; and the factor values, per plan
    (None for unused leaves), one list per chain of `(value, batched)` per
    factor: `batched` when the value has a leading per-example axis (with
    `vmap_axes`).
  """
  program = side.program
  active = [p for p in plans if p is not None]
  chains = [c for p in active for c in p.chains]
  stops = stop_vars(active)
  if not stops:  # No parameter reaches the outputs: the NTK is zero.
    return [{} for _ in program.outputs], [None] * len(plans)
  taps, locate = _factor_taps(chains)

  if side.vmap_axes is None:
    side.plan_diagonal(active, stops)
    if side.diag_outs is not None:
      return _diagonal_arrays(side, side.diag_outs, plans, stops, taps,
                              locate)

  def evaluate(x_value, kw_arrays, deltas):
    args = (list(side.param_leaves) + jax.tree.leaves(x_value) +
            list(kw_arrays))
    env, tapped = evaluation.evaluate_with_taps(program, args,
                                        dict(zip(stops, deltas)), taps)
    read = functools.partial(evaluation.read_atom, env)
    return [read(a) for a in program.outputs], locate(read, tapped)

  if side.vmap_axes is None:
    jac, factor_values = jax.jacrev(
        lambda d: evaluate(side.x, side.kw_arrays, d), has_aux=True)(
            _zeros(program, stops))
    c = [dict(zip(stops, per_out)) for per_out in jac]
    return c, _per_plan(plans, _unbatched(factor_values))

  def one_example(x_value, kw_arrays):
    return jax.jacrev(lambda d: evaluate(x_value, kw_arrays, d)[0])(
        _zeros(program, stops))

  jac = jax.vmap(one_example, in_axes=(side.x_axes, side.kw_axes))(
      side.x, side.kw_arrays)
  c = [dict(zip(stops, per_out)) for per_out in jac]
  factor_values = _example_factors(
      side, lambda x_value, kw_arrays: evaluate(x_value, kw_arrays, [])[1])
  return c, _per_plan(plans, factor_values)


def _example_factors(side: Side, factors):
  """Factor values per example, without a batch axis where they have none.

  A factor that does not depend on the example (a weight, a constant) is
  computed once: under `jax.vmap` it would be copied for every example.

  Returns:
    Per chain, per factor, `(value, batched)`.
  """
  x_structs, kw_structs = example_structs(side.x, side.kw_arrays,
                                          (side.x_axes, side.kw_axes))
  flat = lambda x_value, kw_arrays: jax.tree.leaves(  # noqa: E731
      factors(x_value, kw_arrays))
  program, _ = ir.flatten(flat, x_structs, kw_structs)
  depends = planner.dependents(program, set(program.inputs))
  out_axes = [0 if not isinstance(a, ir.Literal) and a in depends else None
              for a in program.outputs]
  values = jax.vmap(flat, in_axes=(side.x_axes, side.kw_axes),
                    out_axes=out_axes)(side.x, side.kw_arrays)
  tree = jax.tree.structure(jax.eval_shape(factors, x_structs, kw_structs))
  values = jax.tree.unflatten(tree, values)
  batched = jax.tree.unflatten(tree, [a == 0 for a in out_axes])
  per_chain = []
  for chain_values, chain_batched in zip(values, batched):
    per_chain.append([
        _batch_consistently(v, b, side.batch_size())
        for v, b in zip(chain_values, chain_batched)])
  return per_chain


def _diagonal_arrays(side: Side, diag_outs: list[int], plans, stops, taps,
                     locate):
  """`arrays` when `diag_outs` is set: one reverse pass per coordinate."""
  program = side.program
  args = (list(side.param_leaves) + jax.tree.leaves(side.x) +
          list(side.kw_arrays))
  diag = [v for v in stops if v in side.diag_stops]
  full = [v for v in stops if v not in side.diag_stops]

  def forward(diag_deltas, full_deltas):
    env, tapped = evaluation.evaluate_with_taps(program, args, {
        **dict(zip(diag, diag_deltas)), **dict(zip(full, full_deltas))
    }, taps)
    read = functools.partial(evaluation.read_atom, env)
    outs = [read(a) for a in program.outputs]
    return outs, locate(read, tapped)

  def summed(diag_deltas):
    # Seeding every example at once: blocks are diagonal, so the sum over
    # examples of `d out[n] / d y` is `d out[n] / d y[n]` on `y[n]`.
    outs, factor_values = forward(diag_deltas, _zeros(program, full))
    outs = [jnp.sum(o, axis=b) for o, b in zip(outs, diag_outs)]
    return outs, factor_values

  jac_diag, factor_values = jax.jacrev(summed, has_aux=True)(
      _zeros(program, diag))
  factor_values = _unbatched(factor_values)
  c = [dict(zip(diag, per_out)) for per_out in jac_diag]
  if full:
    jac_full = jax.jacrev(lambda d: forward(_zeros(program, diag), d)[0])(
        _zeros(program, full))
    for c_out, per_out in zip(c, jac_full):
      c_out.update(zip(full, per_out))
  return c, _per_plan(plans, factor_values)


def _unbatched(chain_values):
  """Factor values of the whole batch: `(value, False)` per factor."""
  return [[(v, False) for v in values] for values in chain_values]


def _batch_consistently(value, batched, size):
  """`(value, batched)` of one factor; an index factor's arrays agree."""
  if not isinstance(value, tuple):
    return value, bool(batched)
  flags = [b for v, b in zip(value, batched) if v is not None]
  if all(flags) or not any(flags):
    return value, bool(flags and flags[0])
  value = tuple(None if v is None else v if b else
                jnp.broadcast_to(v, (size,) + jnp.shape(v))
                for v, b in zip(value, batched))
  return value, True


def _zeros(program: ir.FlatProgram, addresses) -> list[jax.Array]:
  zeros = []
  for address in addresses:
    shape, dtype = evaluation.address_aval(program, address)
    zeros.append(jnp.zeros(shape, dtype))
  return zeros


def _factor_taps(chains):
  """Factors computed in loop bodies become taps of the evaluation.

  Returns:
    `(taps, locate)`: the taps for `evaluation.evaluate_with_taps`, and
    `locate(read, tapped)` giving one list of factor values per chain.
  """
  taps: dict[tuple[int, ...], list] = {}
  where = []
  for chain in chains:
    places = []
    for factor in chain.factors:
      if factor.scope:
        fns = taps.setdefault(factor.scope, [])
        places.append((factor.scope, len(fns)))
        fns.append(factor.compute)
      else:
        places.append((None, factor))
    where.append(places)

  def locate(read, tapped):
    return [[factor.compute(read) if scope is None else tapped[scope][factor]
             for scope, factor in places] for places in where]

  return taps, locate


def _per_plan(plans, chain_values) -> list[Any]:
  """Groups per-chain factor values by plan (None for unused leaves)."""
  values, it = [], iter(chain_values)
  for p in plans:
    values.append(None if p is None else [next(it) for _ in p.chains])
  return values
