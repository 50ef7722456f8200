"""AUTO: pick the fastest NTK implementation by timing them.

Cost models from compiled FLOP counts mislead on CPU and GPU (NT's AUTO was
only right on TPU), because memory traffic, not arithmetic, often dominates.
So AUTO measures: on the first call for a given function, shapes, dtypes,
settings and backend, it compiles every available implementation, runs each
on the actual shapes (the actual inputs when they are concrete, stand-ins of
the same shapes under a trace) and keeps the fastest. The choice is cached;
later calls only run the chosen implementation. Nothing is printed.
"""

from collections.abc import Callable, Hashable, Mapping, Sequence
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AutoSelector", "fastest", "signature"]

# Timing budget per candidate, after its compile-and-warm-up call.
_MAX_TIMED_RUNS = 5
_TIME_BUDGET_S = 1.0
# A candidate this many times slower than the best so far is not re-timed.
_CLEARLY_SLOWER = 2.0


def signature(tree: Any) -> Hashable:
  """A hashable key for `tree`'s structure, shapes and dtypes.

  >>> signature({'a': jnp.zeros((2,), jnp.float32)})
  (PyTreeDef({'a': *}), (((2,), 'float32'),))
  """
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(jnp.shape(leaf)), str(jnp.result_type(leaf)))
                        for leaf in leaves)


def _is_tracer(leaf: Any) -> bool:
  return isinstance(leaf, jax.core.Tracer)


def _stand_in(leaf: Any, key: jax.Array) -> Any:
  """A concrete array shaped like `leaf` (which may be a tracer)."""
  if not _is_tracer(leaf):
    return leaf
  shape, dtype = jnp.shape(leaf), leaf.dtype
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    keys = jax.random.split(key, int(np.prod(shape, dtype=int)))
    return keys.reshape(shape)
  if jnp.issubdtype(dtype, jnp.inexact):
    return jax.random.normal(key, shape, dtype)
  # Integers (token ids, ...) and booleans: zeros are always valid.
  return jnp.zeros(shape, dtype)


def concrete_args(args: Sequence[Any]) -> tuple[Any, ...]:
  """`args`, with every tracer replaced by a concrete stand-in."""
  leaves, treedef = jax.tree.flatten(tuple(args))
  if not any(_is_tracer(leaf) for leaf in leaves):
    return tuple(args)
  keys = jax.random.split(jax.random.key(0), max(len(leaves), 1))
  return jax.tree.unflatten(
      treedef, [_stand_in(leaf, k) for leaf, k in zip(leaves, keys)])


def _time(fn: Callable[..., Any], args: Sequence[Any],
          best_so_far: float) -> float:
  """Seconds for one compiled run of `fn(*args)` (best of a few)."""
  out = jax.block_until_ready(fn(*args))  # Compiles and warms up.
  if any(_is_tracer(leaf) for leaf in jax.tree.leaves(out)):
    raise RuntimeError("AUTO could not run the candidate outside a trace.")
  best = np.inf
  spent = 0.0
  for _ in range(_MAX_TIMED_RUNS):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    elapsed = time.perf_counter() - start
    best = min(best, elapsed)
    spent += elapsed
    if spent > _TIME_BUDGET_S or best > _CLEARLY_SLOWER * best_so_far:
      break
  return best


def fastest(candidates: Mapping[Any, Callable[..., Any]],
            args: Sequence[Any]) -> Any:
  """The key of the fastest candidate on `args`.

  Args:
    candidates: name to a jit-compiled function; all compute the same thing.
    args: the arguments (may contain tracers: then stand-ins of the same
      shapes and dtypes are timed).

  Returns:
    The key of the fastest candidate that ran. Candidates that fail (an
    unsupported primitive, out of memory) are skipped.

  Raises:
    Exception: the first candidate's error, if every candidate fails.

  >>> fastest({'a': jax.jit(jnp.sin), 'b': jax.jit(jnp.sin)}, (1.,))
  '...'
  """
  best_key, best_time, first_error = None, np.inf, None
  # Under an outer `jax.jit` every operation would be staged into the outer
  # computation instead of running: evaluate now, on concrete values.
  with jax.ensure_compile_time_eval():
    args = concrete_args(args)
    for key, fn in candidates.items():
      try:
        elapsed = _time(fn, args, best_time)
      except Exception as e:  # pylint: disable=broad-except
        first_error = first_error or e
        continue
      if elapsed < best_time:
        best_key, best_time = key, elapsed
  if best_key is None:
    raise first_error
  return best_key


class AutoSelector:
  """Caches the fastest candidate per call signature.

  >>> selector = AutoSelector()
  >>> selector.choose('k', lambda: {'sin': jax.jit(jnp.sin)}, (1.,))
  'sin'
  """

  def __init__(self):
    self._choices: dict[Hashable, Any] = {}

  @property
  def choices(self) -> dict[Hashable, Any]:
    """The cached choice per call signature."""
    return dict(self._choices)

  def choose(self, key: Hashable,
             candidates: Callable[[], Mapping[Any, Callable[..., Any]]],
             args: Sequence[Any]) -> Any:
    """The cached choice for `key`, timing `candidates()` on a miss.

    `candidates` is called only on a miss, so that a cached call costs one
    dictionary look-up (AUTO must stay as fast as the algorithm it picked).
    """
    if key not in self._choices:
      candidates = candidates()
      if len(candidates) == 1:
        self._choices[key] = next(iter(candidates))
      else:
        self._choices[key] = fastest(candidates, args)
    return self._choices[key]
