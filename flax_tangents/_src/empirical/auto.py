"""AUTO: pick the fastest NTK implementation, cheaply and safely.

On the first call for given shapes, dtypes, settings and backend:

1. Every available implementation is traced (not compiled) and its JAXPR
   costed (`cost`: exact multiply-adds of contractions, bytes written, scan
   lengths included). A candidate whose largest array alone would not fit
   in the device's free memory is dropped without compiling it.
2. Candidates whose estimated time is within `_CLOSE` of the cheapest are
   compiled, each once (ahead of time), and dropped if XLA's memory
   analysis of the executable does not fit; the others never are.
3. With one candidate left, it is taken as is; with several, each runs a
   few times (on the actual inputs, or on stand-ins of the same shapes under
   an outer trace) and the fastest wins.

The choice and the compiled executable are cached: later calls run that
executable (or, under an outer `jax.jit`, stage the chosen implementation),
so no candidate is ever compiled twice. `AutoSelector.choices` holds, per
call signature, an `AutoChoice` saying which implementation and why
(estimates, measured seconds, what was skipped). Nothing is printed.

Cost models from compiled FLOP counts alone misjudge CPUs and GPUs, where
memory traffic often dominates, and XLA's own analysis counts a loop's body
once: hence the JAXPR cost model for ranking, and timing when it is not
decisive.
"""

from collections.abc import Callable, Hashable, Mapping, Sequence
import dataclasses
import os
import time
from typing import Any, Optional

import jax
from jax import core
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.empirical import cost

__all__ = ["AutoChoice", "AutoSelector", "available_bytes", "signature"]

# Candidates estimated within this factor of the cheapest are timed.
_CLOSE = 1.5
# Timing: runs per candidate after its first, and a budget per candidate.
_MAX_TIMED_RUNS = 3
_TIME_BUDGET_S = 0.5


@dataclasses.dataclass(frozen=True)
class AutoChoice:
  """What AUTO chose for one call signature, and why.

  Attributes:
    implementation: the chosen implementation.
    reason: a sentence saying why.
    estimated_seconds: the cost model's estimate per candidate.
    measured_seconds: the best measured run per timed candidate.
    skipped: per candidate not chosen without timing, why.
    executable: the compiled chosen implementation for this signature.
  """
  implementation: Any
  reason: str
  estimated_seconds: dict
  measured_seconds: dict
  skipped: dict
  executable: Any = dataclasses.field(default=None, repr=False,
                                      compare=False)


def signature(tree: Any) -> Hashable:
  """A hashable key for `tree`'s structure, shapes and dtypes.

  >>> signature({'a': jnp.zeros((2,), jnp.float32)})
  (PyTreeDef({'a': *}), (((2,), 'float32'),))
  """
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(_leaf_signature(leaf) for leaf in leaves)


def _leaf_signature(leaf: Any) -> tuple[tuple[int, ...], str]:
  # Reading `.shape`/`.dtype` is ~30x cheaper than `jnp.result_type`; this
  # runs on every call, and AUTO must cost what its pick costs.
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:  # Python scalars.
    return tuple(jnp.shape(leaf)), str(jnp.result_type(leaf))
  return tuple(shape), str(jax.dtypes.canonicalize_dtype(dtype))


def available_bytes() -> Optional[int]:
  """Free memory of the default device (host memory for CPUs), or None."""
  device = jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    return None


def _is_tracer(leaf: Any) -> bool:
  return isinstance(leaf, core.Tracer)


def _stand_in(leaf: Any, key: jax.Array) -> Any:
  """A concrete array shaped like `leaf` (which may be a tracer)."""
  if not _is_tracer(leaf):
    return leaf
  shape, dtype = jnp.shape(leaf), leaf.dtype
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
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
  with jax.ensure_compile_time_eval():
    keys = jax.random.split(jax.random.key(0), max(len(leaves), 1))
    return jax.tree.unflatten(
        treedef, [_stand_in(leaf, k) for leaf, k in zip(leaves, keys)])


def _best_seconds(executable, args) -> float:
  """Best of a few runs of a compiled executable (after a first run).

  A first run over the budget is the measurement: repeating a slow
  candidate would cost more than the choice can save.
  """
  start = time.perf_counter()
  jax.block_until_ready(executable(*args))
  first = time.perf_counter() - start
  if first > _TIME_BUDGET_S:
    return first
  best, spent = np.inf, 0.0
  for _ in range(_MAX_TIMED_RUNS):
    start = time.perf_counter()
    jax.block_until_ready(executable(*args))
    elapsed = time.perf_counter() - start
    best, spent = min(best, elapsed), spent + elapsed
    if spent > _TIME_BUDGET_S:
      break
  return best


def _executable_bytes(executable) -> Optional[int]:
  try:
    analysis = executable.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def _name(implementation: Any) -> str:
  return getattr(implementation, "name", str(implementation))


def choose(traces: Mapping[Any, Callable[[], Any]], args: Sequence[Any]
           ) -> AutoChoice:
  """Chooses among candidates given as `implementation -> trace()`.

  Args:
    traces: for each candidate, a function returning its `jax.stages.Traced`
      for `args` (`jax.jit(...).trace(...)`).
    args: the dynamic arguments the executables take (may contain tracers:
      stand-ins of the same shapes and dtypes are then timed).

  Returns:
    The `AutoChoice`.

  Raises:
    Exception: the first candidate's error, if every candidate fails.

  >>> f = jax.jit(lambda x: jnp.sin(x) @ x)
  >>> g = jax.jit(lambda x: jnp.sin(x) @ x @ jnp.eye(64) @ jnp.eye(64))
  >>> x = jnp.ones((64, 64))
  >>> choice = choose({'f': lambda: f.trace(x), 'g': lambda: g.trace(x)},
  ...                 (x,))
  >>> choice.implementation, sorted(choice.skipped)
  ('f', ['g'])
  """
  free = available_bytes()
  traced, estimates, skipped, errors = _trace_and_estimate(traces, free)
  if not traced:
    raise _nothing_fits(errors, skipped)
  cheapest = min(estimates[k] for k in traced)
  close = [k for k in traced if estimates[k] <= _CLOSE * cheapest]
  for k in traced:
    if k not in close:
      skipped[k] = (f"estimated {estimates[k]:.3g} s, over {_CLOSE}x the "
                    f"cheapest ({cheapest:.3g} s)")
  close.sort(key=lambda k: estimates[k])
  executables, measured = _compile_and_time(
      {k: traced[k] for k in close}, args, free, skipped, errors)
  if not executables:
    raise _nothing_fits(errors, skipped)
  if measured:
    best = min(measured, key=lambda k: measured[k])
    reason = (f"fastest of {len(measured)} timed candidates "
              f"({measured[best]:.3g} s)")
  else:
    best = next(iter(executables))
    reason = (f"cheapest estimate ({estimates[best]:.3g} s); no other "
              f"candidate within {_CLOSE}x")
  for k in measured:
    if k != best:
      skipped[k] = f"measured {measured[k]:.3g} s"
  return AutoChoice(best, reason, estimates, measured, skipped,
                    executables[best])


def _trace_and_estimate(traces: Mapping[Any, Callable[[], Any]],
                        free: Optional[int]):
  """Traces each candidate and costs it; drops those too large to fit.

  Returns:
    `(traced, estimates, skipped, errors)`: the kept `Traced` objects, the
    estimated seconds of every traced candidate, why the others were
    dropped, and the exceptions met (in order).
  """
  traced, estimates, skipped, errors = {}, {}, {}, []
  for implementation, trace in traces.items():
    try:
      traced[implementation] = trace()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
      skipped[implementation] = f"failed to trace: {e!r:.200}"
      continue
    estimate = cost.estimate(traced[implementation].jaxpr)
    estimates[implementation] = estimate.seconds()
    if free is not None and estimate.largest > free:
      del traced[implementation]
      skipped[implementation] = (
          f"an array of {estimate.largest / 2**20:.0f} MiB would not fit in "
          f"the {free / 2**20:.0f} MiB free")
  return traced, estimates, skipped, errors


def _compile_and_time(traced: Mapping[Any, Any], args: Sequence[Any],
                      free: Optional[int], skipped: dict, errors: list):
  """Compiles each candidate once; times them when there are several.

  Candidates that fail, or whose executable would not fit in `free` bytes,
  are recorded in `skipped` (and their exceptions in `errors`).

  Returns:
    `(executables, measured)`: compiled candidates in `traced`'s order, and
    the best measured seconds of each timed one.
  """
  concrete = None
  executables, measured = {}, {}
  for k, candidate in traced.items():
    try:
      executable = candidate.lower().compile()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
      skipped[k] = f"failed to compile: {e!r:.200}"
      continue
    need = _executable_bytes(executable)
    if free is not None and need is not None and need > free:
      skipped[k] = (f"needs {need / 2**20:.0f} MiB, over the "
                    f"{free / 2**20:.0f} MiB free")
      continue
    executables[k] = executable
    if len(traced) == 1:
      break
    if concrete is None:
      concrete = concrete_args(args)
    try:
      measured[k] = _best_seconds(executable, concrete)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
      skipped[k] = f"failed to run: {e!r:.200}"
      del executables[k]
  return executables, measured


def _nothing_fits(errors: list, skipped: Mapping[Any, str]) -> Exception:
  """The first candidate's error, or a `MemoryError` naming each reason."""
  if errors:
    return errors[0]
  return MemoryError("AUTO: no NTK implementation fits in memory: " +
                     "; ".join(f"{_name(k)}: {v}" for k, v in skipped.items()))


class AutoSelector:
  """Caches AUTO's choice (and executable) per call signature.

  >>> selector = AutoSelector()
  >>> f = jax.jit(jnp.sin)
  >>> selector.choose('k', lambda: {'sin': lambda: f.trace(1.)},
  ...                 (1.,)).implementation
  'sin'
  """

  def __init__(self):
    self._choices: dict[Hashable, AutoChoice] = {}

  @property
  def choices(self) -> dict[Hashable, AutoChoice]:
    """The `AutoChoice` per call signature."""
    return dict(self._choices)

  def choose(self, key: Hashable,
             candidates: Callable[[], Mapping[Any, Callable[[], Any]]],
             args: Sequence[Any]) -> AutoChoice:
    """The cached choice for `key`, choosing among `candidates()` on a miss.

    `candidates` is called only on a miss, so that a cached call costs one
    dictionary look-up (AUTO must stay as fast as the algorithm it picked).
    """
    if key not in self._choices:
      self._choices[key] = choose(candidates(), args)
    return self._choices[key]
