"""`ft.kernel_fn`: a model's own `__call__`, run on kernels.

The model is applied to a `Kernel` inside `flax.linen.intercept_methods`.
Every module call that receives a kernel is intercepted: a module with a
registered rule is replaced by its rule; any other user module is entered, so
modules composed of ruled modules need nothing. No parameters are created.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import requirements
from flax_tangents._src.analytic.lifting import dispatch
from flax_tangents.kernel import Kernel

__all__ = ["kernel_fn"]

Get = Union[None, str, Sequence[str]]
_KERNEL_FIELDS = tuple(Kernel.__dataclass_fields__)

def _is_kernel(x: Any) -> bool:
  return isinstance(x, Kernel)


def _kernels_in(tree: Any) -> list[Kernel]:
  return [x for x in jax.tree.leaves(tree, is_leaf=_is_kernel)
          if isinstance(x, Kernel)]


def _interceptor(next_fun: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any],
                 context: nn.module.InterceptorContext) -> Any:
  # Per-module dispatch (rules, lifted transforms, lifting of plain code).
  return dispatch.intercept(next_fun, args, kwargs, context)


def _run_model(model: nn.Module, kernel: Kernel,
               call_kwargs: dict[str, Any]) -> Any:
  with nn.intercept_methods(_interceptor):
    return model.apply({}, kernel, **call_kwargs)


def _check_inputs(x1: jax.Array, x2: Optional[jax.Array]) -> None:
  """Refuses NaN or infinite inputs when their values are known."""
  for name, x in (("x1", x1), ("x2", x2)):
    if x is None:
      continue
    try:
      values = np.asarray(x)
    except jax.errors.TracerArrayConversionError:
      return  # Under jit: values are unknown here.
    if not np.all(np.isfinite(values)):
      raise ValueError(
          f"{name} contains NaN or infinite values; kernels of such inputs "
          "are meaningless. Clean or impute the inputs first.")


@functools.lru_cache(maxsize=None)
def _namedtuple(fields: tuple[str, ...]) -> type:
  return collections.namedtuple("Kernel", fields)


def _canonical_get(get: Get) -> Optional[tuple[str, ...]]:
  if get is None:
    return None
  fields = (get,) if isinstance(get, str) else tuple(get)
  for field in fields:
    if field not in _KERNEL_FIELDS:
      raise ValueError(
          f"`get` names unknown field {field!r}; choose from "
          f"{_KERNEL_FIELDS}, e.g. get=('nngp', 'ntk').")
  return fields


def _select(output: Any, get: Get) -> Any:
  fields = _canonical_get(get)
  if fields is None:
    return output

  def pick(k: Any) -> Any:
    if not isinstance(k, Kernel):
      return k
    if isinstance(get, str):
      return getattr(k, get)
    return _namedtuple(fields)(*(getattr(k, f) for f in fields))

  return jax.tree.map(pick, output, is_leaf=_is_kernel)


def _hashable(kwargs: dict[str, Any]) -> Optional[tuple[Any, ...]]:
  try:
    key = tuple(sorted(kwargs.items()))
    hash(key)
    return key
  except TypeError:
    return None


def kernel_fn(model: nn.Module, **apply_kwargs: Any) -> Callable[..., Any]:
  """The analytic NNGP / NTK function of `model`'s infinite-width limit.

  The model's own `__call__` runs on kernels instead of arrays: each module
  with a kernel rule (every layer of `flax_tangents.nn`, stock `nn.Dense`,
  `nn.Conv`, ...) is replaced by its rule; other modules are entered. Which
  covariances to store is discovered from the whole model: if no layer mixes
  spatial locations and the output has no spatial axes (a CNN ending in
  `Flatten`), only spatial diagonals are computed.

  Args:
    model: a Linen module built from layers with kernel rules.
    **apply_kwargs: keyword arguments for every call of the model's
      `__call__` (for example `deterministic=False`).

  Returns:
    `kernel_fn(x1_or_kernel, x2=None, get=None, **kwargs)`. `x1` and `x2` are
    arrays of shape `(N, *spatial, C)`; `x2=None` means `x2 = x1`. Passing an
    `ft.Kernel` instead of `x1` continues from that kernel (composition).
    `get` is a field name (returns an array), a tuple of names (returns a
    namedtuple), or `None` (returns the `ft.Kernel`). `kwargs` are passed to
    the model's `__call__` as well. The function is jit-able (mark `get`
    static) and differentiable in the inputs.

  Raises:
    KernelRuleError: a module without a rule, or a plain function such as
      `nn.relu`, receives a kernel.
    ValueError: inputs of mismatched shapes or with NaNs; a nonlinearity
      applied to a non-Gaussian input; branches of mismatched shapes.

  >>> import flax.linen as nn
  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> model = nn.Sequential([ftn.Dense(512, W_std=1.5, b_std=0.05),
  ...                        ftn.Relu(), ftn.Dense(1)])
  >>> kernel_fn = ft.kernel_fn(model)
  >>> x1, x2 = jnp.ones((3, 4)), jnp.ones((2, 4))
  >>> nngp, ntk = kernel_fn(x1, x2, ('nngp', 'ntk'))
  >>> nngp.shape, ntk.shape
  ((3, 2), (3, 2))
  """
  layout_cache: dict[Any, tuple[bool, bool]] = {}

  def layout(x1, x2, call_kwargs, compute_ntk) -> tuple[bool, bool]:
    spec = lambda x: None if x is None else jax.ShapeDtypeStruct(
        jnp.shape(x), jnp.result_type(x))
    kwargs_key = _hashable(call_kwargs)
    key = (spec(x1), spec(x2), compute_ntk, kwargs_key)
    if kwargs_key is not None and key in layout_cache:
      return layout_cache[key]

    def probe(a, b):
      kernel = covariance.inputs_to_kernel(
          a, b, diagonal_batch=False, diagonal_spatial=False,
          compute_ntk=compute_ntk)
      return _run_model(model, kernel, call_kwargs)

    with requirements.recording() as recorded:
      output = jax.eval_shape(probe, spec(x1), spec(x2))
    spatial_output = any(len(k.shape1) > 2 for k in _kernels_in(output))
    result = (not recorded.full_batch,
              not recorded.full_spatial and not spatial_output)
    if kwargs_key is not None:
      layout_cache[key] = result
    return result

  def kernel_fn_(x1_or_kernel: Union[jax.typing.ArrayLike, Kernel],
                 x2: Optional[jax.typing.ArrayLike] = None,
                 get: Get = None, **kwargs: Any) -> Any:
    call_kwargs = {**apply_kwargs, **kwargs}
    fields = _canonical_get(get)
    compute_ntk = fields is None or "ntk" in fields
    if isinstance(x1_or_kernel, Kernel):
      if x2 is not None:
        raise ValueError("Pass either a Kernel or inputs x1 (and x2), not "
                         "a Kernel and x2.")
      kernel = x1_or_kernel
      if compute_ntk and kernel.ntk is None:
        kernel = kernel.replace(ntk=jnp.zeros_like(kernel.nngp))
    else:
      x1 = jnp.asarray(x1_or_kernel)
      x2 = None if x2 is None else jnp.asarray(x2)
      _check_inputs(x1, x2)
      diagonal_batch, diagonal_spatial = layout(x1, x2, call_kwargs,
                                                compute_ntk)
      kernel = covariance.inputs_to_kernel(
          x1, x2, diagonal_batch=diagonal_batch,
          diagonal_spatial=diagonal_spatial, compute_ntk=compute_ntk)
    return _select(_run_model(model, kernel, call_kwargs), get)

  return kernel_fn_
