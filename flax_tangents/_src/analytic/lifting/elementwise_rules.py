"""Rules for elementwise primitives met by network values.

With one pre-activation among the operands (and scalar constants), the
result stays symbolic (`Elem`) until its kernel is needed. With two
different network values, only sums (of uncorrelated branches) and products
(of independent branches) have kernels. A constant that varies over
locations may scale a value (`count_include_pad=False` average pooling).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from flax_tangents._src.analytic import combinators
from flax_tangents._src.analytic.lifting import expressions as ex
from flax_tangents._src.analytic.lifting import normal_form as nf
from flax_tangents._src.analytic.lifting import provenance as prov
from flax_tangents._src.analytic.lifting import spatial_ops
from flax_tangents._src.analytic.lifting.interpreter import Interpreter
from flax_tangents._src.analytic.lifting.interpreter import register
from flax_tangents._src.analytic.lifting.program import Equation
from flax_tangents._src.analytic.lifting.values import Const
from flax_tangents._src.analytic.lifting.values import Elem
from flax_tangents._src.analytic.lifting.values import Net
from flax_tangents._src.analytic.lifting.values import Value
from flax_tangents._src.analytic.lifting.values import uniform_value

__all__: list[str] = []


def _root_of(value: Value) -> Optional[Net]:
  if isinstance(value, Net):
    return value
  if isinstance(value, Elem):
    return value.root
  return None


def _expr_of(value: Value) -> ex.Expr:
  if isinstance(value, Net):
    return ex.ROOT
  assert isinstance(value, Elem), value
  return value.expr


@register(*sorted(ex.ELEMENTWISE))
def elementwise(interp: Interpreter, eqn: Equation,
                values: list[Value]) -> list[Value]:
  roots = []
  for value in values:
    root = _root_of(value)
    if root is not None and all(root is not r for r in roots):
      roots.append(root)
  if len(roots) > 1:
    return [_two_branches(interp, eqn, values)]
  (root,) = roots
  args = []
  for value in values:
    if isinstance(value, Const):
      scalar = uniform_value(value.value)
      if scalar is None:
        return [_varying_constant(interp, eqn, values, root)]
      args.append(ex.Constant(scalar))
    else:
      args.append(_expr_of(value))
  expr = ex.Apply(eqn.primitive, dict(eqn.params), tuple(args), eqn.calls)
  origin = next((v.origin for v in values if isinstance(v, Elem)), eqn)
  return [Elem(root, expr, origin)]


def _linear_net(interp: Interpreter, eqn: Equation, value: Value
                ) -> Optional[Net]:
  """The value as a (scaled) kernel, if it is linear in its root."""
  if isinstance(value, Net):
    return value
  if isinstance(value, Elem) and nf.linear_scale(value.expr) is not None:
    return interp.materialize(value)
  return None


def _two_branches(interp: Interpreter, eqn: Equation,
                  values: list[Value]) -> Value:
  name = eqn.name
  if name in ("add", "add_any", "sub") and not any(
      isinstance(v, Const) for v in values):
    a, b = (interp.net(v, eqn) for v in values)
    if not prov.uncorrelated(a.provenance, b.provenance):
      raise interp.refuse(
          eqn, "the two summands may be correlated or not centred (e.g. "
          "`x + relu(x)`, `relu(a) - relu(b)`, or one layer called twice), "
          "so the kernel of their sum is not the sum of their kernels. A sum "
          "is lifted when one summand is the "
          "output of an affine layer (`nn.Dense`, `nn.Conv`, ...) that the "
          "other does not depend on, as in a residual block `x + "
          "Dense(relu(x))`.")
    if name == "sub":
      b = Net(spatial_ops.scale(b.kernel, -1.0), b.provenance)
    if a.kernel.shape1 != b.kernel.shape1:
      raise interp.refuse(eqn, f"the summands have shapes {a.kernel.shape1} "
                          f"and {b.kernel.shape1}")
    kernel = spatial_ops.add(a.kernel, b.kernel)
    return Net(kernel, prov.sum_of(a.provenance, b.provenance))
  if name == "mul" and not any(isinstance(v, Const) for v in values):
    a, b = (interp.net(v, eqn) for v in values)
    if not prov.independent(a.provenance, b.provenance):
      raise interp.refuse(
          eqn, "the two factors may be dependent, so the kernel of their "
          "product is not the product of their kernels. A product is lifted "
          "when one factor is the output of an affine layer (`nn.Dense`, "
          "`nn.Conv`, ...) that the other does not depend on.")
    kernel = combinators.fan_in_prod([a.kernel, b.kernel])
    return Net(kernel, prov.opaque([a.provenance, b.provenance]))
  raise interp.refuse(
      eqn, "it combines two different network values nonlinearly; only sums "
      "of uncorrelated branches and products of independent ones have "
      "kernels")


def _varying_constant(interp: Interpreter, eqn: Equation,
                      values: list[Value], root: Net) -> Value:
  """`x * c` or `x / c` with `c` varying over locations only."""
  out_shape = tuple(interp.program.avals[eqn.outputs[0]].shape)
  const_index = next(i for i, v in enumerate(values) if isinstance(v, Const))
  const = values[const_index]
  assert isinstance(const, Const), const
  other = values[1 - const_index] if len(values) == 2 else None
  try:
    factors = np.broadcast_to(np.asarray(const.value), out_shape)
  except Exception:  # pylint: disable=broad-except  (a tracer)
    raise interp.refuse(
        eqn, "it combines a network value with an array whose values are "
        "not known when the kernel function is traced") from None
  varies = lambda axis: not np.all(factors == np.take(factors[...], [0],
                                                       axis=axis))
  if varies(0):
    raise interp.refuse(eqn, "it uses a constant that differs between "
                        "examples (the batch axis)")
  if varies(factors.ndim - 1):
    raise interp.refuse(
        eqn, "it uses a constant that differs between channels; channels are "
        "taken to infinity and must be treated alike")
  linear = other is not None and _linear_net(interp, eqn, other)
  if eqn.name not in ("mul", "div") or not linear or (
      eqn.name == "div" and const_index == 0):
    raise interp.refuse(
        eqn, "a constant that varies over locations may only multiply (or "
        "divide) a network value; added to it, or inside a nonlinearity, it "
        "has no kernel rule")
  spatial = factors[(0,) + (slice(None),) * (factors.ndim - 2) + (0,)]
  if eqn.name == "div":
    spatial = 1.0 / spatial
  return Net(spatial_ops.scale_locations(linear.kernel, spatial),
             linear.provenance)
