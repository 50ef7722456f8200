"""Elementwise expressions as linear combinations of basis functions.

`normal_form` rewrites an expression (see `expressions`) into a dict from
basis functions to coefficients: `x**k`, `max(x, 0)**k`, `erf(b x)`,
`x erf(b x)`, `tanh(c1 x + c3 x**3 + ...)` and `x` times it, `sin(b x + c)`,
`exp(b x)`, `exp(b x**2)`, `sign(x)`. Piecewise-linear functions through 0
(`max`, `min`, `abs`, `jnp.where(x > 0, a x, b x)`) become `x` and
`max(x, 0)` terms. Odd functions keep positive slopes. Anything else has no
normal form (`None`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from flax_tangents._src.analytic.lifting.expressions import Apply
from flax_tangents._src.analytic.lifting.expressions import Constant
from flax_tangents._src.analytic.lifting.expressions import Expr
from flax_tangents._src.analytic.lifting.expressions import Root

__all__ = ["Form", "linear_scale", "normal_form", "polynomial_of"]


Basis = tuple  # ('x', k), ('1',), ('relu', k), ('erf', b), ...
Form = dict  # Basis -> coefficient


def _const(c: float) -> Form:
  return {("1",): float(c)} if c else {}


def _add(a: Form, b: Form, sign: float = 1.0) -> Form:
  out = dict(a)
  for k, v in b.items():
    out[k] = out.get(k, 0.0) + sign * v
  return {k: v for k, v in out.items() if v != 0.0}


def _scale(a: Form, c: float) -> Form:
  return {k: v * c for k, v in a.items()} if c else {}


def _constant_of(a: Form) -> Optional[float]:
  if not a:
    return 0.0
  if set(a) == {("1",)}:
    return a[("1",)]
  return None


def _affine_of(a: Form) -> Optional[tuple[float, float]]:
  """`(slope, intercept)` if the form is `slope * x + intercept`."""
  if not set(a) <= {("1",), ("x", 1)}:
    return None
  return a.get(("x", 1), 0.0), a.get(("1",), 0.0)


def polynomial_of(a: Form) -> Optional[tuple[float, ...]]:
  if not all(k[0] in ("1", "x") for k in a):
    return None
  degree = max((k[1] for k in a if k[0] == "x"), default=0)
  coef = [0.0] * (degree + 1)
  for k, v in a.items():
    coef[0 if k[0] == "1" else k[1]] += v
  return tuple(coef)


def _poly_form(coef: tuple[float, ...]) -> Form:
  out: Form = {}
  for k, c in enumerate(coef):
    if c:
      out[("1",) if k == 0 else ("x", k)] = float(c)
  return out


def _mul(a: Form, b: Form) -> Optional[Form]:
  ca, cb = _constant_of(a), _constant_of(b)
  if ca is not None:
    return _scale(b, ca)
  if cb is not None:
    return _scale(a, cb)
  pa, pb = polynomial_of(a), polynomial_of(b)
  if pa is not None and pb is not None:
    return _poly_form(tuple(
        float(c) for c in np.polynomial.polynomial.polymul(pa, pb)))
  # x * f(x) for f = erf(b x) or tanh(poly): GELU-like products.
  for x_side, other in ((a, b), (b, a)):
    if set(x_side) == {("x", 1)}:
      slope = x_side[("x", 1)]
      out: Form = {}
      for k, v in other.items():
        if k == ("1",):
          out[("x", 1)] = out.get(("x", 1), 0.0) + slope * v
        elif k[0] in ("erf", "tanh"):
          out[("x_" + k[0],) + k[1:]] = slope * v
        elif k[0] == "x":
          out[("x", k[1] + 1)] = out.get(("x", k[1] + 1), 0.0) + slope * v
        else:
          return None
      return out
  return None


def _piecewise_linear(pred: Apply, when_false: Form, when_true: Form
                      ) -> Optional[Form]:
  """`select_n(x cmp 0, f, t)` with both branches linear through 0."""
  lhs, rhs = pred.args
  if not (isinstance(rhs, Constant) and float(rhs.value) == 0.0):
    if isinstance(lhs, Constant) and float(lhs.value) == 0.0:
      # 0 < x is x > 0.
      flipped = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}
      lhs, rhs, name = rhs, lhs, flipped.get(pred.name)
    else:
      return None
  else:
    name = pred.name
  inner = normal_form(lhs)
  affine = inner and _affine_of(inner)
  if not affine or affine[1] != 0.0 or affine[0] == 0.0:
    return None
  if affine[0] < 0:  # a x > 0 with a < 0 is x < 0.
    swapped: dict[Optional[str], str] = {
        "lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}
    name = swapped.get(name)
  if name not in ("gt", "ge", "lt", "le"):
    return None
  if name in ("lt", "le"):
    when_false, when_true = when_true, when_false
  # Now: `when_true` for x > 0, `when_false` for x < 0.
  pos, neg = _affine_of(when_true), _affine_of(when_false)
  if pos is None or neg is None or pos[1] != 0.0 or neg[1] != 0.0:
    return None
  return _add({("x", 1): neg[0]} if neg[0] else {},
              {("relu", 1): pos[0] - neg[0]} if pos[0] != neg[0] else {})


def _max_of(a: Form, b: Form) -> Optional[Form]:
  """`max(a x, b x)`, or `max(a x, 0)`: piecewise linear through 0."""
  la, lb = _affine_of(a), _affine_of(b)
  if la is None or lb is None or la[1] != 0.0 or lb[1] != 0.0:
    return None
  lo, hi = sorted((la[0], lb[0]))
  # For x > 0 the max is hi x, for x < 0 it is lo x.
  return _add({("x", 1): lo} if lo else {},
              {("relu", 1): hi - lo} if hi != lo else {})


def _unary(name: str, inner: Form, params: dict[str, Any]) -> Optional[Form]:
  affine = _affine_of(inner)
  if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
    return inner
  if name == "neg":
    return _scale(inner, -1.0)
  if name in ("integer_pow", "square"):
    power = params.get("y", 2)
    if power < 0:
      return None
    if set(inner) == {("relu", 1)}:
      return {("relu", power): inner[("relu", 1)]**power}
    result: Optional[Form] = _const(1.0)
    for _ in range(power):
      result = result and _mul(result, inner)
      if result is None:
        return None
    return result
  if affine is None:
    polynomial = polynomial_of(inner)
    if (name == "tanh" and polynomial is not None and polynomial[0] == 0
        and not any(polynomial[2::2])):  # odd: keep the slope positive
      sign = math.copysign(1.0, polynomial[1])
      return {("tanh",) + tuple(sign * c for c in polynomial[1:]): sign}
    if name == "exp" and set(inner) == {("x", 2)}:
      return {("gauss", inner[("x", 2)]): 1.0}
    return None
  slope, intercept = affine
  if name == "abs" and intercept == 0.0:
    return _scale({("relu", 1): 2.0, ("x", 1): -1.0}, abs(slope))
  if name == "sign" and intercept == 0.0:
    return {("sign",): math.copysign(1.0, slope)} if slope else {}
  # erf and tanh are odd: keep their slopes positive.
  odd = lambda kind: {(kind, abs(slope)): math.copysign(1.0, slope)} if (
      slope) else {}
  if name == "erf" and intercept == 0.0:
    return odd("erf")
  if name == "erfc" and intercept == 0.0:
    return _add(_const(1.0), _scale(odd("erf"), -1.0))
  if name == "tanh" and intercept == 0.0:
    return odd("tanh")
  if name == "logistic" and intercept == 0.0:
    # logistic(s x) = (1 + tanh(s x / 2)) / 2.
    return _add(_const(0.5), {("tanh", slope / 2): 0.5} if slope else {})
  if name == "sin":
    return {("sin", slope, intercept): 1.0} if slope else _const(
        math.sin(intercept))
  if name == "cos":
    return {("sin", slope, intercept + math.pi / 2): 1.0} if slope else (
        _const(math.cos(intercept)))
  if name == "exp" and intercept == 0.0:
    return {("exp", slope): 1.0}
  return None


def normal_form(expr: Expr) -> Optional[Form]:
  """The expression as a linear combination of basis functions, if it is one.

  Returns:
    A dict from basis key to coefficient: `('1',)`, `('x', k)` for `x**k`,
    `('relu', k)` for `max(x, 0)**k`, `('erf', b)`, `('x_erf', b)` for
    `x erf(b x)`, `('tanh', c1, c2, ...)` for `tanh(c1 x + c2 x**2 + ...)`
    and `('x_tanh', ...)` for `x` times it, `('sin', b, c)` for
    `sin(b x + c)`, `('exp', b)`, `('gauss', b)` for `exp(b x**2)`,
    `('sign',)`; or `None` when it is none of these.
  """
  memo: dict[int, Optional[Form]] = {}

  def form(e: Expr) -> Optional[Form]:
    if id(e) in memo:
      return memo[id(e)]
    result = _form(e)
    memo[id(e)] = result
    return result

  def _form(e: Expr) -> Optional[Form]:
    if isinstance(e, Root):
      return {("x", 1): 1.0}
    if isinstance(e, Constant):
      if e.value.dtype == bool:
        return None
      return _const(float(e.value))
    assert isinstance(e, Apply), e
    name = e.name
    if name == "select_n" and len(e.args) == 3:
      pred = e.args[0]
      if isinstance(pred, Apply) and len(pred.args) == 2:
        f, t = form(e.args[1]), form(e.args[2])
        return None if f is None or t is None else _piecewise_linear(
            pred, f, t)
      return None
    maybe_args = [form(a) for a in e.args]
    if any(a is None for a in maybe_args):
      return None
    args = [a for a in maybe_args if a is not None]
    if name in ("add", "add_any"):
      return _add(args[0], args[1])
    if name == "sub":
      return _add(args[0], args[1], -1.0)
    if name == "mul":
      return _mul(args[0], args[1])
    if name == "div":
      denominator = _constant_of(args[1])
      return None if not denominator else _scale(args[0], 1 / denominator)
    if name == "max":
      return _max_of(args[0], args[1])
    if name == "min":
      out = _max_of(_scale(args[0], -1.0), _scale(args[1], -1.0))
      return None if out is None else _scale(out, -1.0)
    if len(args) == 1:
      return _unary(name, args[0], e.params)
    return None

  return form(expr)


def linear_scale(expr: Expr) -> Optional[float]:
  """`c` if the expression is exactly `c * x`, else `None`."""
  if isinstance(expr, Root):
    return 1.0
  found = normal_form(expr)
  if found is not None and set(found) <= {("x", 1)}:
    return found.get(("x", 1), 0.0)
  return None
