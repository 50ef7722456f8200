"""The arguments of one `ft.batch` call, sorted by how tiles treat them.

Inputs (`x1`, `x2` and 2-tuple keyword arguments `(for_x1, for_x2)` whose
leading axes are the batch sizes) are tiled; arrays (parameters, keys) are
copied to every device; everything else (`get`, flags) is fixed when the
per-tile program is compiled.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from flax_tangents._src import conventions
from flax_tangents._src.scale.tile_plan import leading_size

__all__ = ["Call"]

# Keyword arguments never split between x1 and x2 (Flax settings, keys).
# Pairs that are not tiled: random keys belong to a call, not to examples.
_UNTILED_KWARGS = frozenset({"rng", "rngs", "get"})


def _hashable(values: tuple) -> Optional[tuple]:
  try:
    hash(values)
    return values
  except TypeError:
    return None


class Call:
  """The arguments of one call, sorted into tiled, array and static parts.

  Args:
    x1: the first inputs.
    x2: the second inputs, or None (a symmetric kernel).
    args: the other positional arguments (`get` first, if any).
    kwargs: the keyword arguments; a pair `(for_x1, for_x2)` whose leading
      sizes are those of `x1` and `x2` is tiled like the inputs.

  >>> import numpy as np
  >>> call = Call(np.ones((4, 2)), None, ('ntk',),
  ...             {'mask': (np.ones(4), np.ones(4)), 'params': np.ones(3)})
  >>> call.n1, call.n2, sorted(call.tiled), call.static, len(call.dynamic)
  (4, 4, ['mask'], ('ntk',), 1)
  """

  def __init__(self, x1: Any, x2: Any, args: tuple, kwargs: dict):
    self.symmetric = x2 is None
    self.n1 = leading_size(x1, "x1")
    self.n2 = self.n1 if self.symmetric else leading_size(x2, "x2")
    self.get = args[0] if args else kwargs.get("get")
    self.tiled: dict[str, tuple[Any, Any]] = {}
    rest = {}
    for name, value in kwargs.items():
      if self._is_tiled_pair(name, value):
        self.tiled[name] = value
      else:
        rest[name] = value
    leaves, self.treedef = jax.tree.flatten((args, rest))
    self.is_dynamic = tuple(conventions.is_array(leaf) for leaf in leaves)
    self.dynamic = [l for l, d in zip(leaves, self.is_dynamic) if d]
    self.static = tuple(l for l, d in zip(leaves, self.is_dynamic) if not d)

  def _is_tiled_pair(self, name: str, value: Any) -> bool:
    if (name in _UNTILED_KWARGS or not conventions.is_pair(name, value)
        or any(v is None for v in value)):
      return False
    try:
      return (leading_size(value[0], name) == self.n1
              and leading_size(value[1], name) == self.n2)
    except ValueError:
      return False

  def rebuild(self, dynamic: list[Any]) -> tuple[tuple, dict]:
    dynamic_iter, static_iter = iter(dynamic), iter(self.static)
    leaves = [next(dynamic_iter) if is_dyn else next(static_iter)
              for is_dyn in self.is_dynamic]
    return jax.tree.unflatten(self.treedef, leaves)

  def program_key(self, kind: str) -> Optional[tuple]:
    static = _hashable(self.static)
    if static is None:
      return None
    return (kind, self.treedef, static, self.is_dynamic,
            tuple(sorted(self.tiled)), self.symmetric)
