"""Elementwise functions of one pre-activation, as expression trees.

A chain of elementwise primitives applied to one Gaussian value `x` and to
scalar constants (`max(x, 0)`, `0.5 * x * erfc(-x / sqrt(2))`, ...) is kept
as a tree of `Apply` nodes over `Root` (the value) and `Constant` leaves. The
tree can be evaluated on any array (for quadrature) and tested for
smoothness; `normal_form` rewrites it into a linear combination of basis
functions, from which `activations` recognizes closed-form kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Apply",
    "Constant",
    "ELEMENTWISE",
    "Expr",
    "Root",
    "evaluate",
    "is_smooth",
    "walk",
]

# Elementwise primitives (operands and result of one shape, or scalars).
ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan",
    "atan2", "atanh", "cbrt", "ceil", "clamp", "convert_element_type",
    "copy", "copy_p", "cos", "cosh", "div", "eq", "erf", "erf_inv", "erfc",
    "exp", "exp2", "expm1", "floor", "ge", "gt", "integer_pow",
    "is_finite", "le", "lgamma", "digamma", "log", "log1p", "logistic", "lt",
    "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow",
    "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign", "sin",
    "sinh", "sqrt", "square", "sub", "tan", "tanh", "xor",
})

# Analytic on the whole real line (quadrature converges quickly).
_SMOOTH = frozenset({
    "add", "add_any", "asinh", "atan", "convert_element_type", "copy",
    "copy_p", "cos", "cosh", "erf", "erfc", "exp", "exp2", "expm1",
    "integer_pow", "logistic", "mul", "neg", "reduce_precision", "sin",
    "sinh", "square", "sub", "tanh",
})

# Calls known to compute smooth functions although their bodies contain
# `max`, `abs` or `select_n` (for numerical stability).
SMOOTH_CALLS = frozenset({"logaddexp", "softplus", "log_sigmoid"})


class Expr:
  """A node of an elementwise expression."""


@dataclasses.dataclass(frozen=True, eq=False)
class Root(Expr):
  """The Gaussian pre-activation the expression is a function of."""


@dataclasses.dataclass(frozen=True, eq=False)
class Constant(Expr):
  """A scalar constant (a literal, or an array with one value everywhere)."""
  value: np.ndarray  # 0-d


@dataclasses.dataclass(frozen=True, eq=False)
class Apply(Expr):
  """`primitive.bind(*args, **params)`, applied elementwise."""
  primitive: Any
  params: dict[str, Any]
  args: tuple[Expr, ...]
  calls: tuple[str, ...] = ()

  @property
  def name(self) -> str:
    return self.primitive.name


ROOT = Root()


def evaluate(expr: Expr, x: jax.Array) -> jax.Array:
  """The expression's value at `x` (any shape), computed in `x`'s dtype."""
  cache: dict[int, jax.Array] = {}

  def value(e: Expr) -> jax.Array:
    if id(e) in cache:
      return cache[id(e)]
    if isinstance(e, Root):
      out = x
    elif isinstance(e, Constant):
      dtype = e.value.dtype
      if jnp.issubdtype(dtype, jnp.floating):
        dtype = x.dtype
      out = jnp.full(x.shape, e.value, dtype)
    else:
      assert isinstance(e, Apply), e
      args = [value(a) for a in e.args]
      out = _bind(e, args, x.dtype)
    cache[id(e)] = out
    return out

  return value(expr)


def _bind(e: Apply, args: list[jax.Array], float_dtype: Any) -> jax.Array:
  params = dict(e.params)
  if e.name == "convert_element_type":
    target = np.dtype(params["new_dtype"])
    if jnp.issubdtype(target, jnp.floating):
      # Computations run in the kernel's dtype, not the traced one.
      return args[0].astype(float_dtype)
    return args[0].astype(target)
  if e.name == "reduce_precision":
    return args[0]
  floating = [a for a in args if jnp.issubdtype(a.dtype, jnp.floating)]
  if floating:
    args = [a.astype(float_dtype) if jnp.issubdtype(a.dtype, jnp.floating)
            else a for a in args]
  return e.primitive.bind(*args, **params)


def walk(expr: Expr):
  """All nodes of the expression, each once."""
  seen, stack = set(), [expr]
  while stack:
    e = stack.pop()
    if id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    if isinstance(e, Apply):
      stack.extend(e.args)


def is_smooth(expr: Expr) -> bool:
  """Whether the function is analytic everywhere (no kinks or poles).

  Kinks (`max`, `abs`, comparisons) are accepted inside calls known to be
  smooth (`logaddexp`, used by `softplus`).
  """
  for e in walk(expr):
    if isinstance(e, Apply) and e.name not in _SMOOTH:
      if e.name == "div" and isinstance(e.args[1], Constant):
        continue
      if any(c in SMOOTH_CALLS for c in e.calls):
        continue
      return False
  return True
