"""Monte Carlo NNGP/NTK: averages of empirical kernels of sampled networks.

Sample `s` of a Monte Carlo kernel uses the key `fold_in(key, s)`, split
into an initialization key (for `model.init`) and, when the call passes
`rngs`, keys folded into those (fresh dropout masks per network). Sample
keys do not depend on the total number of samples, so the estimate with
`n` samples is the same whether or not larger counts are asked for too.

Three ways to sum samples, all giving the same estimate:

- Inside a trace (under `jit`, or a tile of `ft.batch`): a `lax.scan` over
  the samples.
- `batch_size=0`: rounds of one sample per device of the mesh (each
  device computes the whole kernel of its own network), summed.
- `batch_size > 0`: one sample at a time, its kernel tiled over the mesh by
  `ft.batch` (for kernels too large for one device).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
from jax import core
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from flax_tangents._src.scale import devices
from flax_tangents._src.scale.batched import BatchedKernelFn

__all__ = ["MonteCarloSampler", "canonicalize_n_samples"]


def canonicalize_n_samples(n_samples: Any) -> tuple[list[int], bool]:
  """Sorted sample counts, and whether the caller wants a generator."""
  if isinstance(n_samples, (int, np.integer)) and not isinstance(
      n_samples, bool):
    counts, generator = [int(n_samples)], False
  elif isinstance(n_samples, (list, tuple, set, frozenset, range)):
    counts, generator = list(n_samples), True
  else:
    raise TypeError("`n_samples` must be an int or a list/tuple of ints, got "
                    f"{type(n_samples).__name__}.")
  if not counts or not all(isinstance(n, (int, np.integer))
                           and not isinstance(n, bool) and n > 0
                           for n in counts):
    raise ValueError(f"`n_samples` must be positive integers, got "
                     f"{n_samples!r}.")
  return sorted({int(n) for n in counts}), generator


def _is_traced(tree: Any) -> bool:
  return any(isinstance(leaf, core.Tracer)
             for leaf in jax.tree.leaves(tree))


def _first_example(x: Any) -> Any:
  return jax.tree.map(lambda leaf: leaf[:1], x)


class MonteCarloSampler:
  """Sums empirical kernels of networks sampled from `model.init`.

  Args:
    model: a Flax module (anything with `init(rngs, x, **kw)` and
      `apply(variables, x, **kw)`).
    key: the random key all samples derive from.
    empirical_kernel_fn: `ft.empirical_kernel_fn(model.apply, ...)`.
    batch_size: 0 for sample-parallel rounds, else the tile size.
    mesh: devices to use (default: all).
    store_on_device: as in `ft.batch`, for `batch_size > 0`.
  """

  def __init__(self, model: Any, key: jax.Array,
               empirical_kernel_fn: Callable[..., Any], batch_size: int,
               mesh: Optional[Mesh], store_on_device: bool,
               trace_axes: Sequence[int], diagonal_axes: Sequence[int]):
    self.model = model
    self.key = key
    self.empirical_kernel_fn = empirical_kernel_fn
    self.batch_size = batch_size
    self.mesh = mesh
    self.store_on_device = store_on_device
    self.trace_axes, self.diagonal_axes = trace_axes, diagonal_axes
    self._parallel_programs: dict[Any, Callable[..., Any]] = {}
    self._init_programs: dict[Any, Callable[..., Any]] = {}

    def layout_aware_kernel_fn(x1, x2=None, get=None, params=None, **kw):
      return empirical_kernel_fn(x1, x2, get, params, **kw)
    # ft.batch reads these to transpose mirror tiles of symmetric kernels.
    layout_aware_kernel_fn.trace_axes = tuple(trace_axes)
    layout_aware_kernel_fn.diagonal_axes = tuple(diagonal_axes)
    self._tiled = (BatchedKernelFn(layout_aware_kernel_fn, batch_size, mesh,
                                   store_on_device, None, False)
                   if batch_size > 0 else None)

  # ------------------------------------------------------------- samples

  def sample_keys(self, start: int, stop: int) -> jax.Array:
    return jax.vmap(lambda s: jax.random.fold_in(self.key, s))(
        jnp.arange(start, stop))

  def _one_sample(self, sample_key, x1, x2, get, kwargs):
    init_key, apply_key = jax.random.split(sample_key)
    init_kwargs = {k: v for k, v in kwargs.items()
                   if k not in ("rngs", "mutable")}
    variables = self.model.init(init_key, _first_example(x1), **init_kwargs)
    if kwargs.get("rngs") is not None:
      kwargs = dict(kwargs, rngs=jax.tree.map(
          lambda k: jax.random.fold_in(k, jax.random.bits(apply_key)),
          kwargs["rngs"]))
    return self.empirical_kernel_fn(x1, x2, get, variables, **kwargs)

  # --------------------------------------------------------------- sums

  def sums(self, counts: list[int], x1: Any, x2: Any, get: Any,
           kwargs: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    """Yields `(n, sum of the first n samples)` for each `n` in `counts`."""
    total, done = None, 0
    for n in counts:
      if _is_traced((x1, x2, kwargs)):
        part = self._sum_scanned(done, n, x1, x2, get, kwargs)
      elif self.batch_size > 0:
        part = self._sum_tiled(done, n, x1, x2, get, kwargs)
      else:
        part = self._sum_parallel(done, n, x1, x2, get, kwargs)
      total = part if total is None else jax.tree.map(jnp.add, total, part)
      done = n
      yield n, total

  def _sum_scanned(self, start, stop, x1, x2, get, kwargs):
    def step(carry, sample_key):
      kernel = self._one_sample(sample_key, x1, x2, get, kwargs)
      return jax.tree.map(jnp.add, carry, kernel), None
    keys = self.sample_keys(start, stop)
    first = self._one_sample(keys[0], x1, x2, get, kwargs)
    total, _ = jax.lax.scan(step, first, keys[1:])
    return total

  def _sum_tiled(self, start, stop, x1, x2, get, kwargs):
    total = None
    one_variables = self._init_program(
        {n: v for n, v in kwargs.items() if n not in ("rngs", "mutable")})
    for s in range(start, stop):
      init_key, apply_key = jax.random.split(jax.random.fold_in(self.key, s))
      variables = one_variables(init_key, _first_example(x1))
      sample_kwargs = kwargs
      if kwargs.get("rngs") is not None:
        sample_kwargs = dict(kwargs, rngs=jax.tree.map(
            lambda k: jax.random.fold_in(k, jax.random.bits(apply_key)),
            kwargs["rngs"]))
      assert self._tiled is not None  # Made for a positive batch size.
      kernel = self._tiled(x1, x2, get, variables, **sample_kwargs)
      total = kernel if total is None else jax.tree.map(
          lambda a, b: a + b, total, kernel)
    return total

  def _init_program(self, init_kwargs: dict[str, Any]) -> Callable[..., Any]:
    try:
      cache_key = tuple(sorted(init_kwargs.items()))
      hash(cache_key)
    except TypeError:
      cache_key = None
    if cache_key is None or cache_key not in self._init_programs:
      program = jax.jit(functools.partial(self.model.init, **init_kwargs))
      if cache_key is None:
        return program
      self._init_programs[cache_key] = program
    return self._init_programs[cache_key]

  def _sum_parallel(self, start, stop, x1, x2, get, kwargs):
    mesh = self.mesh if self.mesh is not None else devices.default_mesh()
    arrays = {k: v for k, v in kwargs.items()
              if isinstance(v, (jax.Array, np.ndarray))}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays
                          and not isinstance(v, dict)))
    dict_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, dict)}
    program = self._parallel_program(mesh, get, static, x2 is None)
    replicated = devices.put_replicated((x1, x2, arrays, dict_kwargs), mesh)
    total = None
    for round_start in range(start, stop, mesh.size):
      n_real = min(mesh.size, stop - round_start)
      keys = jax.random.key_data(self.sample_keys(round_start,
                                                  round_start + mesh.size))
      weights = (np.arange(mesh.size) < n_real).astype(np.float32)
      part = program(*devices.put_sharded((np.asarray(keys), weights), mesh),
                     *replicated)
      total = part if total is None else jax.tree.map(jnp.add, total, part)
    return total

  def _parallel_program(self, mesh, get, static, symmetric):
    cache_key = (mesh, get, static, symmetric)
    if cache_key in self._parallel_programs:
      return self._parallel_programs[cache_key]
    typed = jnp.issubdtype(self.key.dtype, jax.dtypes.prng_key)
    impl = jax.random.key_impl(self.key) if typed else None

    def body(key_data, weights, x1, x2, arrays, dict_kwargs):
      sample_key = (jax.random.wrap_key_data(key_data[0], impl=impl)
                    if typed else key_data[0])
      kwargs = dict(static, **arrays, **dict_kwargs)
      kernel = self._one_sample(sample_key, x1, x2, get, kwargs)
      return jax.tree.map(lambda k: (k * weights[0].astype(k.dtype))[None],
                          kernel)

    spec = devices.tile_axis_spec(mesh)
    per_device = jax.shard_map(
        body, mesh=mesh,
        in_specs=(spec, spec) + (PartitionSpec(),) * 4,
        out_specs=spec, check_vma=False)
    # The sum is replicated: every device (and process) holds the estimate.
    program = jax.jit(lambda *a: jax.tree.map(
        functools.partial(jnp.sum, axis=0), per_device(*a)),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    self._parallel_programs[cache_key] = program
    return program
