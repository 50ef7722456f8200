"""Structure rules for primitives that move, copy, select or sum elements.

These Jacobians are 0/1 tensors: permutations keep labels in a new order,
broadcasts add labels nothing else refers to, sums drop labels, and
re-indexings (`rev`, `pad`, `slice`, `concatenate`) add one `IndexFactor`
per affected axis, mapping each output position to the operand position it
copies (or to none).
"""

import jax.numpy as jnp

from flax_tangents._src.empirical.structured import structure

__all__ = ["RULES"]


def _index_factor(out_label: int, in_label: int, index_fn, out_size: int,
                  in_size: int) -> structure.IndexFactor:
  """One axis re-indexed: output position `i` copies operand `index_fn(i)`.

  `index_fn` maps `arange(out_size)` to `(idx, valid)`; positions outside
  `[0, in_size)` are invalid.
  """

  def compute(read):
    del read
    idx, valid = index_fn(jnp.arange(out_size))
    in_range = (idx >= 0) & (idx < in_size)
    valid = in_range if valid is None else valid & in_range
    return idx, valid

  return structure.IndexFactor((out_label,), in_label, compute, static=True)


def _broadcast_in_dim(ctx):
  if ctx.position != 0:
    return None
  in_shape, out_shape = ctx.in_shape, ctx.out_shape
  dims = ctx.params["broadcast_dimensions"]
  labels = list(ctx.labels.new_for(out_shape))
  for in_axis, out_axis in enumerate(dims):
    if in_shape[in_axis] == out_shape[out_axis]:
      labels[out_axis] = ctx.in_labels[in_axis]
  return structure.RuleResult(tuple(labels))


def _reshape(ctx):
  if ctx.position != 0 or ctx.params.get("dimensions") is not None:
    return None
  in_shape, out_shape = ctx.in_shape, ctx.out_shape
  in_big = [(l, s) for l, s in zip(ctx.in_labels, in_shape) if s != 1]
  out_big = [a for a, s in enumerate(out_shape) if s != 1]
  if [s for _, s in in_big] == [out_shape[a] for a in out_big]:
    # Only size-one axes come or go: keep the other labels.
    labels = list(ctx.labels.new_for(out_shape))
    for (label, _), axis in zip(in_big, out_big):
      labels[axis] = label
    return structure.RuleResult(tuple(labels))
  # Axes merge or split: a new coordinate system of the same elements.
  return structure.RuleResult(ctx.labels.new_for(out_shape), restart=True)


def _transpose(ctx):
  perm = ctx.params["permutation"]
  return structure.RuleResult(tuple(ctx.in_labels[p] for p in perm))


def _squeeze(ctx):
  dims = {d % len(ctx.in_shape) for d in ctx.params["dimensions"]}
  return structure.RuleResult(
      tuple(l for a, l in enumerate(ctx.in_labels) if a not in dims))


def _expand_dims(ctx):
  return _reshape(ctx)


def _reduce_sum(ctx):
  axes = set(ctx.params["axes"])
  kept = tuple(l for a, l in enumerate(ctx.in_labels) if a not in axes)
  dropped = tuple(l for a, l in enumerate(ctx.in_labels) if a in axes)
  return structure.RuleResult(kept, dropped=dropped)


def _rev(ctx):
  dims = set(ctx.params["dimensions"])
  labels, factors = list(ctx.in_labels), []
  for axis in dims:
    size = ctx.in_shape[axis]
    labels[axis] = ctx.labels.new(size)
    factors.append(
        _index_factor(labels[axis], ctx.in_labels[axis],
                      lambda i, n=size: (n - 1 - i, None), size, size))
  return structure.RuleResult(tuple(labels), tuple(factors))


def _slice(ctx):
  starts = ctx.params["start_indices"]
  strides = ctx.params["strides"] or (1,) * len(starts)
  labels, factors = list(ctx.in_labels), []
  for axis, (start, stride) in enumerate(zip(starts, strides)):
    in_size, out_size = ctx.in_shape[axis], ctx.out_shape[axis]
    if in_size == out_size:
      continue
    labels[axis] = ctx.labels.new(out_size)
    factors.append(
        _index_factor(labels[axis], ctx.in_labels[axis],
                      lambda i, a=start, b=stride: (a + b * i, None),
                      out_size, in_size))
  return structure.RuleResult(tuple(labels), tuple(factors))


def _concatenate(ctx):
  axis = ctx.params["dimension"]
  offset = sum(ctx.shape(a)[axis] for a in ctx.equation.inputs[:ctx.position])
  in_size, out_size = ctx.in_shape[axis], ctx.out_shape[axis]
  labels = list(ctx.in_labels)
  labels[axis] = ctx.labels.new(out_size)
  factor = _index_factor(labels[axis], ctx.in_labels[axis],
                         lambda i: (i - offset, None), out_size, in_size)
  return structure.RuleResult(tuple(labels), (factor,))


def _pad(ctx):
  if ctx.position != 0:  # The padding value.
    return None
  labels, factors = list(ctx.in_labels), []
  for axis, (low, high, interior) in enumerate(ctx.params["padding_config"]):
    if (low, high, interior) == (0, 0, 0):
      continue
    in_size, out_size = ctx.in_shape[axis], ctx.out_shape[axis]
    labels[axis] = ctx.labels.new(out_size)
    step = interior + 1

    def index_fn(i, low=low, step=step):
      shifted = i - low
      return shifted // step, shifted % step == 0

    factors.append(_index_factor(labels[axis], ctx.in_labels[axis], index_fn,
                                 out_size, in_size))
  return structure.RuleResult(tuple(labels), tuple(factors))


RULES: dict[str, structure.Rule] = {
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "expand_dims": _expand_dims,
    "reduce_sum": _reduce_sum,
    "rev": _rev,
    "slice": _slice,
    "concatenate": _concatenate,
    "pad": _pad,
}
