"""Exact variances of stock Flax (i.e. `jax.nn`) initializers.

Initializers are closures: `variance_scaling(2.0, 'fan_in', 'normal')` returns
a function whose code object is shared by every initializer that factory
builds, and whose free variables hold `scale`, `mode`, `distribution` and the
fan axes. An initializer is recognized by comparing its code object with that
of a reference built by the same public factory (never by probing it with
shapes, which cannot be exact); its parameters are then read from its closure.
Anything else (orthogonal, a user function, a `functools.partial`) is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

from flax.core import meta
from flax.linen import spmd  # noqa: F401  (with_partitioning lives in core)
import jax
import numpy as np

from flax_tangents._src.analytic.errors import KernelRuleError

__all__ = ["InitializerError", "entry_variance"]

# Standard deviation of a standard normal truncated to (-2, 2), exactly as
# written in `jax.nn.initializers.variance_scaling` (which divides by it).
_VARIANCE_SCALING_TRUNCATION_STD = .87962566103423978


class InitializerError(KernelRuleError):
  """An initializer whose variance cannot be known exactly, or not centred."""


def _code_of(fn: Callable[..., Any]) -> Any:
  return getattr(fn, "__code__", None)


# Code objects of the closures built by each public factory.
_FACTORY_CODES = {
    _code_of(jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")):
        "variance_scaling",
    _code_of(jax.nn.initializers.normal()): "normal",
    _code_of(jax.nn.initializers.truncated_normal()): "truncated_normal",
    _code_of(jax.nn.initializers.uniform()): "uniform",
    _code_of(jax.nn.initializers.constant(0.0)): "constant",
    _code_of(jax.nn.initializers.orthogonal()): "orthogonal",
    _code_of(jax.nn.initializers.delta_orthogonal()): "delta_orthogonal",
}
# Wrappers that only attach sharding metadata to the wrapped initializer.
_WRAPPER_CODES = frozenset(
    _code_of(wrap(jax.nn.initializers.zeros, (None,)))
    for wrap in (meta.with_partitioning, spmd.with_logical_partitioning))


def _closure_variables(fn: Callable[..., Any]) -> dict[str, Any]:
  code = _code_of(fn)
  cells = getattr(fn, "__closure__", None) or ()
  if code is None or len(code.co_freevars) != len(cells):
    return {}
  values = {}
  for name, cell in zip(code.co_freevars, cells):
    try:
      values[name] = cell.cell_contents
    except ValueError:  # an empty cell
      pass
  return values


def _truncated_normal_moments(lower: float, upper: float
                              ) -> tuple[float, float]:
  """Mean and variance of a standard normal truncated to `[lower, upper]`."""
  pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
  cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
  mass = cdf(upper) - cdf(lower)
  mean = (pdf(lower) - pdf(upper)) / mass
  variance = 1 + (lower * pdf(lower) - upper * pdf(upper)) / mass - mean**2
  return mean, variance


def _fans(shape: Sequence[int], in_axis: Any, out_axis: Any,
          batch_axis: Any) -> tuple[float, float]:
  """Fan-in and fan-out as `jax.nn.initializers.variance_scaling` counts."""
  size = lambda axes: (shape[axes] if isinstance(axes, int) else
                       math.prod(shape[a] for a in axes))
  receptive_field = (math.prod(shape) / size(in_axis) / size(out_axis) /
                     size(batch_axis))
  return (size(in_axis) * receptive_field, size(out_axis) * receptive_field)


@dataclasses.dataclass(frozen=True)
class _Described:
  """What an initializer is: a name for messages and its entry variance."""
  name: str
  variance: Optional[float]  # None: not centred, or not known exactly
  why: str = ""


def _variance_scaling(params: dict[str, Any], shape: Sequence[int]
                      ) -> _Described:
  scale, mode = params["scale"], params["mode"]
  distribution = params["distribution"]
  name = f"variance_scaling({scale!r}, {mode!r}, {distribution!r})"
  fan_in, fan_out = _fans(shape, params["in_axis"], params["out_axis"],
                          params["batch_axis"])
  denominator = {"fan_in": fan_in, "fan_out": fan_out,
                 "fan_avg": (fan_in + fan_out) / 2,
                 "fan_geo_avg": math.sqrt(fan_in * fan_out)}.get(mode)
  factor = {"normal": 1.0, "uniform": 1.0,
            "truncated_normal": _truncated_normal_moments(-2.0, 2.0)[1] /
                                _VARIANCE_SCALING_TRUNCATION_STD**2,
            }.get(distribution)
  if denominator is None or factor is None:
    return _Described(name, None, "its mode or distribution is unknown")
  return _Described(name, float(scale) / denominator * factor)


def _describe(init: Callable[..., Any], shape: Sequence[int]) -> _Described:
  if init is jax.nn.initializers.zeros:
    return _Described("zeros", 0.0)
  if init is jax.nn.initializers.ones:
    return _Described("ones", None, "its entries have mean 1, not 0")
  code = _code_of(init)
  if code in _WRAPPER_CODES:
    inner = _closure_variables(init).get("fn")
    if inner is not None:
      return _describe(inner, shape)
  factory = _FACTORY_CODES.get(code)
  params = _closure_variables(init)
  try:
    if factory == "variance_scaling":
      return _variance_scaling(params, shape)
    if factory == "normal":
      std = float(params["stddev"])
      return _Described(f"normal({std!r})", std**2)
    if factory == "truncated_normal":
      std = float(params["stddev"])
      lower, upper = float(params["lower"]), float(params["upper"])
      name = f"truncated_normal({std!r}, lower={lower!r}, upper={upper!r})"
      mean, variance = _truncated_normal_moments(lower, upper)
      if abs(mean) > 0 and std != 0:
        return _Described(name, None, "its bounds are not symmetric, so its "
                          "mean is not 0")
      return _Described(name, std**2 * variance)
    if factory == "uniform":
      scale = float(params["scale"])
      return _Described(f"uniform({scale!r})", None if scale else 0.0,
                        "it draws from [0, scale), whose mean is not 0")
    if factory == "constant":
      value = np.asarray(params["value"])
      name = f"constant({params['value']!r})"
      if np.all(value == 0):
        return _Described(name, 0.0)
      return _Described(
          name, None, "a nonzero constant is a deterministic shift of every "
          "unit, which has no centred Gaussian limit")
    if factory in ("orthogonal", "delta_orthogonal"):
      return _Described(f"{factory}()", None, "orthogonal matrices have "
                        "dependent entries, whose limit is not that of i.i.d. "
                        "weights")
  except (KeyError, TypeError, ValueError):
    pass  # A closure of an unexpected form: refuse below.
  label = getattr(init, "__qualname__", None) or repr(init)
  return _Described(label, None, "it is not one of the recognized stock "
                    "initializers")


def entry_variance(init: Callable[..., Any], shape: Sequence[int], *,
                   where: str, param: str, dtype: Any = None) -> float:
  """The exact variance of each entry that `init` draws for `shape`.

  Recognized: `variance_scaling` with any scale, mode and distribution (so
  `lecun_*`, `he_*`/`kaiming_*`, `glorot_*`/`xavier_*`), `normal`,
  `truncated_normal` with symmetric bounds, `zeros`, `constant(0)`, also
  wrapped by `nn.with_partitioning` / `nn.with_logical_partitioning`. Fans
  are counted from `shape` exactly as the initializer counts them.

  Args:
    init: the initializer (e.g. a module's `kernel_init`).
    shape: the shape of the parameter it initializes.
    where: the module, for messages.
    param: the parameter's attribute name (`'kernel_init'`...).
    dtype: the parameter dtype; complex dtypes are refused.

  Returns:
    The variance of one entry (entries are independent and centred).

  Raises:
    InitializerError: for any other initializer, a non-centred one (`ones`,
      `uniform`, a nonzero `constant`), or complex parameters.

  >>> import flax.linen as nn
  >>> entry_variance(nn.initializers.he_uniform(), (4, 3), where='Dense',
  ...                param='kernel_init')
  0.5
  """
  if dtype is not None and np.issubdtype(np.dtype(dtype), np.complexfloating):
    raise InitializerError(
        f"{where} has complex parameters ({param_dtype_name(dtype)}); "
        "infinite-width kernels are implemented for real parameters only.")
  described = _describe(init, tuple(int(s) for s in shape))
  if described.variance is None:
    raise InitializerError(
        f"{where} has {param}={described.name}, whose entry variance cannot "
        f"be used exactly: {described.why}. The infinite-width kernel "
        "needs centred i.i.d. entries of a known variance; use one of "
        "`nn.initializers.variance_scaling` (lecun_/he_/glorot_ normal, "
        "truncated normal or uniform), `normal`, `truncated_normal`, "
        "`zeros`, or a `flax_tangents.nn` layer.")
  return described.variance


def param_dtype_name(dtype: Any) -> str:
  return np.dtype(dtype).name
