"""Structure rules for `gather` and `dynamic_slice` (embedding lookups).

A lookup copies a few rows of a table. Its Jacobian with respect to the
table is one-hot along each indexed axis, described by an `IndexFactor`
holding the (clamped) row index of every output position. Two such factors
contract into a small Gram matrix of index equalities, so the NTK of an
embedding never forms a `vocabulary x width` Jacobian per input.
"""

from jax import lax
import jax.numpy as jnp

from flax_tangents._src.empirical.structured import structure

__all__ = ["RULES"]


def _gather(ctx):
  if ctx.position != 0:
    return None
  p = ctx.params
  dnums = p["dimension_numbers"]
  if dnums.operand_batching_dims or dnums.start_indices_batching_dims:
    return None
  w_shape, out_shape = ctx.in_shape, ctx.out_shape
  slice_sizes = p["slice_sizes"]
  offset_dims = tuple(dnums.offset_dims)
  collapsed = set(dnums.collapsed_slice_dims)
  start_map = tuple(dnums.start_index_map)
  batch_positions = [a for a in range(len(out_shape)) if a not in offset_dims]
  sliced_axes = [j for j in range(len(w_shape)) if j not in collapsed]
  offset_of = dict(zip(sliced_axes, offset_dims))

  out_labels = list(ctx.labels.new_for(out_shape))
  for j, position in offset_of.items():
    if j not in start_map and slice_sizes[j] == w_shape[j]:
      out_labels[position] = ctx.in_labels[j]  # Whole axis copied.
  batch_labels = tuple(out_labels[a] for a in batch_positions)
  starts_and_valid = _clamped_starts(ctx, start_map)
  factors = []
  for j in range(len(w_shape)):
    if j in start_map:
      labels = batch_labels + ((out_labels[offset_of[j]],)
                               if j in offset_of else ())
      factors.append(structure.IndexFactor(
          labels, ctx.in_labels[j],
          _looked_up_rows(starts_and_valid, start_map.index(j),
                          slice_sizes[j] if j in offset_of else None)))
    elif j in offset_of and slice_sizes[j] != w_shape[j]:
      size = slice_sizes[j]
      factors.append(
          structure.IndexFactor((out_labels[offset_of[j]],), ctx.in_labels[j],
                                lambda read, n=size: (jnp.arange(n), None),
                                static=True))
    elif j in collapsed and w_shape[j] != 1:
      factors.append(
          structure.IndexFactor((), ctx.in_labels[j],
                                lambda read: (jnp.asarray(0), None),
                                static=True))
  return structure.RuleResult(tuple(out_labels), tuple(factors))


def _clamped_starts(ctx, start_map):
  """`read -> (starts, valid)`: the gather's start indices, clamped as XLA
  clamps them; `valid` (FILL_OR_DROP mode only) marks in-range starts."""
  p, w_shape, indices_atom = ctx.params, ctx.in_shape, ctx.equation.inputs[1]
  fill = p["mode"] == lax.GatherScatterMode.FILL_OR_DROP
  limits = jnp.asarray(
      [w_shape[j] - p["slice_sizes"][j] for j in start_map])

  def starts_and_valid(read):
    starts = read(indices_atom)
    bound = jnp.reshape(limits, (1,) * (starts.ndim - 1) + (-1,))
    valid = None
    if fill:
      valid = jnp.all((starts >= 0) & (starts <= bound), axis=-1)
    starts = jnp.clip(starts, 0, bound)
    return starts, valid

  return starts_and_valid


def _looked_up_rows(starts_and_valid, k, slice_size):
  """The index factor's `compute` for the `k`-th indexed axis; with a
  `slice_size`, each start reads that many consecutive rows."""

  def compute(read):
    starts, valid = starts_and_valid(read)
    idx = starts[..., k]
    if slice_size is not None:
      offsets = jnp.arange(slice_size)
      idx = idx[..., None] + offsets.reshape((1,) * idx.ndim + (-1,))
      valid = None if valid is None else jnp.broadcast_to(
          valid[..., None], idx.shape)
    return idx, valid

  return compute


def _dynamic_slice(ctx):
  if ctx.position != 0:
    return None
  w_shape = ctx.in_shape
  sizes = ctx.params["slice_sizes"]
  starts = ctx.equation.inputs[1:]
  labels, factors = list(ctx.in_labels), []
  for j, (size, start) in enumerate(zip(sizes, starts)):
    if size == w_shape[j]:
      continue
    labels[j] = ctx.labels.new(size)

    def compute(read, start=start, size=size, limit=w_shape[j] - size):
      first = jnp.clip(read(start), 0, limit)
      return first + jnp.arange(size), None

    factors.append(structure.IndexFactor((labels[j],), ctx.in_labels[j],
                                         compute))
  return structure.RuleResult(tuple(labels), tuple(factors))


RULES: dict[str, structure.Rule] = {
    "gather": _gather,
    "dynamic_slice": _dynamic_slice,
}
