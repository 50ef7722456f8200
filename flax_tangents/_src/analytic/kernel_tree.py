"""`Kernel` as a JAX pytree: covariance arrays are leaves, the rest static.

The array fields (and `x1_is_x2` when it is traced, as in NT) are leaves;
the layout fields are auxiliary data, so a `Kernel` passes through `jit`,
`vmap`, sharding and orbax. A mixture's parts (`_parts`) are a leaf too;
`_sources` (`lineage`) is not carried.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

__all__ = ["ARRAY_FIELDS", "STATIC_FIELDS", "register"]

ARRAY_FIELDS = ("nngp", "ntk", "cov1", "cov2", "mask1", "mask2")
STATIC_FIELDS = (
    "x1_is_x2",
    "is_gaussian",
    "is_reversed",
    "is_input",
    "diagonal_batch",
    "diagonal_spatial",
    "shape1",
    "shape2",
    "batch_axis",
    "channel_axis",
)


def _flatten_with_keys(kernel: Any):
  children = [(jax.tree_util.GetAttrKey(name), getattr(kernel, name))
              for name in ARRAY_FIELDS]
  # `x1_is_x2` is static when a Python bool (as every kernel ft builds), and
  # a leaf when traced (NT makes it an array leaf); see `Kernel.__post_init__`.
  traced = not isinstance(kernel.x1_is_x2, bool)
  if traced:
    children.append((jax.tree_util.GetAttrKey("x1_is_x2"), kernel.x1_is_x2))
  children.append((jax.tree_util.GetAttrKey("_parts"), kernel._parts))  # pylint: disable=protected-access
  static = tuple(getattr(kernel, name) for name in STATIC_FIELDS
                 if name != "x1_is_x2")
  aux = (static, None if traced else kernel.x1_is_x2, traced,
         kernel._assembly, kernel._mixed)  # pylint: disable=protected-access
  return children, aux


def _unflatten(cls: type, aux: Any, children: Any) -> Any:
  static, x1_is_x2, traced, assembly, mixed = aux
  children = list(children)
  kernel = object.__new__(cls)
  for name in ARRAY_FIELDS:
    object.__setattr__(kernel, name, children.pop(0))
  object.__setattr__(kernel, "x1_is_x2", children.pop(0) if traced
                     else x1_is_x2)
  for name, value in zip((n for n in STATIC_FIELDS if n != "x1_is_x2"),
                         static):
    object.__setattr__(kernel, name, value)
  parts = children.pop(0)
  if mixed:
    object.__setattr__(kernel, "_mixed", True)
  if parts is not None:
    object.__setattr__(kernel, "_parts", parts)
    object.__setattr__(kernel, "_assembly", assembly)
  return kernel


def _flatten(kernel: Any):
  children, aux = _flatten_with_keys(kernel)
  return [value for _, value in children], aux


def register(cls: type) -> None:
  """Registers the `Kernel` class `cls` as a pytree with keys.

  Args:
    cls: the `Kernel` dataclass.

  >>> import jax, jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> k = ft.Kernel.from_inputs(jnp.ones((2, 3)))
  >>> [str(path[0]) for path, _ in jax.tree_util.tree_leaves_with_path(k)]
  ['.nngp', '.ntk', '.cov1']
  """
  jax.tree_util.register_pytree_with_keys(
      cls, _flatten_with_keys, functools.partial(_unflatten, cls),
      flatten_func=_flatten)
