"""Constant axes: along which a value independent of the sources is constant.

Only strict mode (per-example evaluation, see `batching`) needs them: a
value that does not depend on the inputs but has a batch-sized axis must be
constant along it (a broadcast), or it differs from example to example.
"""

import math
from typing import Any

import numpy as np

from flax_tangents._src.empirical.structured.batching_states import CUMULATIVE
from flax_tangents._src.empirical.structured.batching_states import ELEMENTWISE
from flax_tangents._src.empirical.structured.batching_states import Eqn
from flax_tangents._src.empirical.structured.batching_states import REDUCTIONS
from flax_tangents._src.empirical.structured.batching_states import size_one

__all__ = ["const_axes", "constant_axes_of"]


# Each rule takes the equation, the size-one axes of each output (always
# constant) and the first output's shape; it returns the constant axes of
# each output. A primitive without a rule keeps only the size-one axes.


def _broadcast_in_dim(e: Eqn, outs, out_shape) -> list[frozenset]:
  del outs  # Size-one output axes are all covered below.
  in_shape, dims = e.shapes[0], e.p["broadcast_dimensions"]
  const = set(range(len(out_shape))) - set(dims)
  for a, d in enumerate(dims):
    if in_shape[a] == 1 or a in e.consts[0]:
      const.add(d)
  return [frozenset(const)]


def _iota(e: Eqn, outs, out_shape) -> list[frozenset]:
  del outs
  return [frozenset(range(len(out_shape))) - {e.p["dimension"]}]


def _elementwise(e: Eqn, outs, out_shape) -> list[frozenset]:
  const = set(range(len(out_shape)))
  for shape, c in zip(e.shapes, e.consts):
    if shape:
      const &= {a for a in range(len(shape)) if shape[a] == 1 or a in c}
  return [frozenset(const) | o for o in outs]


def _transpose(e: Eqn, outs, out_shape) -> list[frozenset]:
  del outs, out_shape
  perm = e.p["permutation"]
  return [frozenset(a for a, q in enumerate(perm) if q in e.consts[0])]


def _kept_axes(e: Eqn, kept: list[int], outs) -> list[frozenset]:
  """Constant axes of an output made of the operand's axes `kept`."""
  return [frozenset(i for i, a in enumerate(kept) if a in e.consts[0])
          | outs[0]]


def _squeeze(e: Eqn, outs, out_shape) -> list[frozenset]:
  del out_shape
  dims = sorted(d % len(e.shapes[0]) for d in e.p["dimensions"])
  return _kept_axes(e, [a for a in range(len(e.shapes[0])) if a not in dims],
                    outs)


def _reduction(e: Eqn, outs, out_shape) -> list[frozenset]:
  del out_shape
  return _kept_axes(e, [a for a in range(len(e.shapes[0]))
                        if a not in e.p["axes"]], outs)


def _reshape(e: Eqn, outs, out_shape) -> list[frozenset]:
  in_shape = e.shapes[0]
  const = set(outs[0])
  for b_out in range(len(out_shape)):
    prefix = math.prod(out_shape[:b_out])
    for a in e.consts[0]:
      if (math.prod(in_shape[:a]) == prefix and
          in_shape[a] == out_shape[b_out]):
        const.add(b_out)
  return [frozenset(const)]


def _same_axes(e: Eqn, outs, out_shape) -> list[frozenset]:
  del out_shape
  return [e.consts[0] | outs[0]]


def _split(e: Eqn, outs, out_shape) -> list[frozenset]:
  del out_shape
  return [e.consts[0] | o for o in outs]


def _concatenate(e: Eqn, outs, out_shape) -> list[frozenset]:
  const = set(range(len(out_shape))) - {e.p["dimension"]}
  for c in e.consts:
    const &= c
  return [frozenset(const) | outs[0]]


def _cumulative(e: Eqn, outs, out_shape) -> list[frozenset]:
  del out_shape
  return [(e.consts[0] - {e.p["axis"]}) | outs[0]]


def _stack(e: Eqn, outs, out_shape) -> list[frozenset]:
  del out_shape
  const = set(range(len(e.shapes[0])))
  for c in e.consts:
    const &= c
  axis = e.p["axis"]
  return [frozenset(a if a < axis else a + 1 for a in const) | outs[0]]


def _pad(e: Eqn, outs, out_shape) -> list[frozenset]:
  del out_shape
  changed = {a for a, cfg in enumerate(e.p["padding_config"])
             if tuple(cfg) != (0, 0, 0)}
  return [(e.consts[0] - changed) | outs[0]]


def _dot_general(e: Eqn, outs, out_shape) -> list[frozenset]:
  del out_shape
  (lc, rc), (lb, rb) = e.p["dimension_numbers"]
  lconst, rconst = e.consts
  free = [[a for a in range(len(shape)) if a not in c + b]
          for shape, c, b in zip(e.shapes, (lc, rc), (lb, rb))]
  const = ([l in lconst and r in rconst for l, r in zip(lb, rb)] +
           [a in lconst for a in free[0]] + [a in rconst for a in free[1]])
  return [frozenset(a for a, c in enumerate(const) if c) | outs[0]]


_RULES = {
    "broadcast_in_dim": _broadcast_in_dim,
    "iota": _iota,
    **{name: _elementwise for name in ELEMENTWISE},
    "transpose": _transpose,
    "squeeze": _squeeze,
    **{name: _reduction for name in REDUCTIONS},
    "reshape": _reshape,
    "slice": _same_axes,
    "rev": _same_axes,
    "dynamic_slice": _same_axes,
    "split": _split,
    "concatenate": _concatenate,
    **{name: _cumulative for name in CUMULATIVE},
    "stack": _stack,
    "pad": _pad,
    "dot_general": _dot_general,
}


def const_axes(e: Eqn) -> list[frozenset]:
  """Per output, the axes it is constant along, from the operands' (`e.consts`).

  Called for equations whose outputs do not depend on the sources.
  """
  outs = [size_one(s) for s in e.out_shapes]
  out_shape = e.out_shapes[0] if e.out_shapes else ()
  rule = _RULES.get(e.eqn.name)
  return outs if rule is None else rule(e, outs, out_shape)


def constant_axes_of(value: Any) -> frozenset:
  """The axes along which a concrete array is constant."""
  try:
    value = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return frozenset()
  if value.dtype == object:
    return frozenset()
  return frozenset(a for a in range(value.ndim)
                   if np.array_equal(value, np.take(value, [0] * value.shape[a],
                                                    axis=a)))
