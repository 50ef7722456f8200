"""Conventions of call arguments shared by every entry point, written once.

* An **array leaf** is what `jax.jit` traces: a JAX or NumPy array or a
  NumPy scalar. Everything else in a call (Python numbers, strings, enums)
  is a setting.
* A keyword argument given as a 2-tuple is a **pair `(for_x1, for_x2)`**:
  the first value goes with `x1`, the second with `x2` (NT's convention for
  masks, graph patterns and random keys). A few keywords take tuples that
  are settings, never pairs (`SETTING_KEYWORDS`).
"""

from typing import Any

import jax
import numpy as np

__all__ = ["SETTING_KEYWORDS", "is_array", "is_pair"]

# Keywords whose tuple values are settings (Flax's `mutable=('stats',
# 'cache')`), not `(for_x1, for_x2)` pairs.
SETTING_KEYWORDS = frozenset({"mutable"})


def is_array(leaf: Any) -> bool:
  """Whether `jax.jit` traces `leaf`: a JAX or NumPy array (or scalar).

  >>> is_array(np.ones(2)), is_array(np.float32(1)), is_array(False)
  (True, True, False)
  """
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def is_pair(name: str, value: Any) -> bool:
  """Whether keyword `name=value` is a pair `(for_x1, for_x2)`.

  >>> is_pair('pattern', (1, 2)), is_pair('mutable', ('a', 'b'))
  (True, False)
  """
  return (isinstance(value, tuple) and len(value) == 2 and
          name not in SETTING_KEYWORDS)
