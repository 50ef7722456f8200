"""A cost model of a traced computation: FLOPs, bytes written, largest array.

XLA's own cost analysis of a lowered module counts the body of a loop once,
whatever its trip count, which misjudges NTK_VECTOR_PRODUCTS (a `lax.map`
over examples) by the batch size. This model walks the JAXPR instead, where
`scan` lengths are known, counting the multiply-adds of `dot_general` and
convolutions exactly, one operation per element elsewhere, and the bytes
every equation writes (a proxy for memory traffic, which dominates on CPUs).
`while` loops of unknown trip count are counted once.
"""

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["Cost", "estimate"]


@dataclasses.dataclass(frozen=True)
class Cost:
  """Estimated work of a computation.

  Attributes:
    flops: floating-point operations (a multiply-add counts two).
    bytes: bytes written by all operations.
    largest: bytes of the largest single array (a lower bound on the
      memory the computation needs).
  """
  flops: float
  bytes: float
  largest: float

  def seconds(self, flops_per_second: float = 2e10,
              bytes_per_second: float = 5e9) -> float:
    """A rough time: arithmetic and memory traffic, not overlapped."""
    return self.flops / flops_per_second + self.bytes / bytes_per_second


def _size(aval: Any) -> int:
  return int(math.prod(getattr(aval, "shape", ())))


def _nbytes(aval: Any) -> int:
  dtype = getattr(aval, "dtype", None)
  try:
    itemsize = np.dtype(dtype).itemsize
  except TypeError:
    itemsize = 4
  return _size(aval) * itemsize


def _dot_flops(eqn) -> float:
  (lc, _), (lb, _) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  out = eqn.outvars[0].aval.shape
  contracted = math.prod(lhs[a] for a in lc)
  return 2.0 * math.prod(out) * contracted


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec
  per_output = math.prod(rhs) / rhs[rhs_spec[0]]
  return 2.0 * _size(eqn.outvars[0].aval) * per_output


def _sub_jaxprs(eqn):
  """`(jaxpr, multiplicity)` of the bodies an equation runs."""
  params = eqn.params
  name = eqn.primitive.name
  if name == "scan":
    return [(params["jaxpr"].jaxpr, params["length"])]
  if name == "while":
    return [(params["body_jaxpr"].jaxpr, 1), (params["cond_jaxpr"].jaxpr, 1)]
  if name == "cond":
    return [(max(params["branches"], key=lambda b: len(b.jaxpr.eqns)).jaxpr,
             1)]
  found = []
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    body = params.get(key)
    if body is not None:
      found.append((getattr(body, "jaxpr", body), 1))
      break
  return found


def _walk(jaxpr, multiplicity: float, totals: list[float]) -> None:
  for eqn in jaxpr.eqns:
    bodies = _sub_jaxprs(eqn)
    if bodies:
      for body, times in bodies:
        _walk(body, multiplicity * times, totals)
      continue
    name = eqn.primitive.name
    out_bytes = sum(_nbytes(v.aval) for v in eqn.outvars)
    if name == "dot_general":
      flops = _dot_flops(eqn)
    elif name == "conv_general_dilated":
      flops = _conv_flops(eqn)
    else:
      flops = sum(_size(v.aval) for v in eqn.outvars)
    totals[0] += multiplicity * flops
    totals[1] += multiplicity * out_bytes
    totals[2] = max(totals[2], out_bytes)


def estimate(jaxpr) -> Cost:
  """The estimated cost of a (closed) JAXPR.

  >>> import jax, jax.numpy as jnp
  >>> c = estimate(jax.make_jaxpr(lambda a: a @ a)(jnp.ones((4, 4), "float32")))
  >>> c.flops, c.largest
  (128.0, 64)
  """
  totals = [0.0, 0.0, 0]
  _walk(getattr(jaxpr, "jaxpr", jaxpr), 1, totals)
  return Cost(totals[0], totals[1], totals[2])
