"""Fingerprints: what a checkpoint directory of kernel tiles was written for.

A fingerprint is a small JSON-able dict of named digests (inputs, tiling,
`get`, the kernel function's identity, its array arguments such as
parameters, its other arguments). Comparing two names the parts that differ,
so a refusal can say why.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any

import jax
import numpy as np

__all__ = ["digest", "function_identity", "mismatches"]

_MAX_DEPTH = 4


def digest(tree: Any) -> str:
  """SHA-256 of a pytree's structure, shapes, dtypes and values."""
  hasher = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(tree)
  hasher.update(str(treedef).encode())
  for leaf in leaves:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)  # Typed keys (e.g. NNX RNG state).
      host = np.ascontiguousarray(np.asarray(leaf))
      hasher.update(f"{host.shape}{host.dtype}".encode())
      hasher.update(host.tobytes())
    else:
      hasher.update(_stable_repr(leaf).encode())
  return hasher.hexdigest()[:32]


def _stable_repr(value: Any) -> str:
  text = repr(value)
  # Reprs holding memory addresses differ from run to run; keep the type.
  return type(value).__qualname__ if " at 0x" in text else text


def _is_array_tree(value: Any) -> bool:
  try:
    leaves = jax.tree.leaves(value)
  except Exception:  # pylint: disable=broad-except
    return False  # E.g. a dict whose keys cannot be sorted: not arrays.
  return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray))
                              for x in leaves)


def _describe(obj: Any, depth: int) -> list[str]:
  if depth > _MAX_DEPTH:
    return []
  if isinstance(obj, functools.partial):
    return (["partial"] + _describe(obj.func, depth + 1)
            + [digest((obj.args, obj.keywords))])
  if inspect.ismethod(obj):
    return _describe(obj.__func__, depth + 1) + [_stable_repr(obj.__self__)]
  parts = [f"{getattr(obj, '__module__', '')}."
           f"{getattr(obj, '__qualname__', type(obj).__qualname__)}"]
  wrapped = getattr(obj, "__wrapped__", None)
  if wrapped is not None and wrapped is not obj:
    parts += _describe(wrapped, depth + 1)
  for cell in getattr(obj, "__closure__", None) or ():
    try:
      value = cell.cell_contents
    except ValueError:  # An empty cell.
      continue
    if (inspect.isfunction(value) or inspect.ismethod(value)
        or isinstance(value, functools.partial)):
      parts += _describe(value, depth + 1)
    elif _is_array_tree(value):
      parts.append(digest(value))
    else:
      parts.append(_stable_repr(value))
  return parts


def function_identity(fn: Any) -> str:
  """A digest naming a kernel function across processes and runs.

  It combines the function's module and qualified name with what its
  closure holds (for `ft.kernel_fn(model)`, the model's configuration, from
  the Flax module's repr) and, recursively, the functions it wraps. Values whose repr holds a memory
  address contribute only their type.
  """
  return hashlib.sha256("|".join(_describe(fn, 0)).encode()).hexdigest()[:32]


def mismatches(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Names of the fingerprint parts that differ."""
  return sorted(name for name in set(stored) | set(current)
                if stored.get(name) != current.get(name))
