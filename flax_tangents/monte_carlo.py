"""`ft.monte_carlo_kernel_fn`: NNGP/NTK estimates from sampled finite networks.

The estimate averages, over networks drawn with `model.init`, the empirical
NNGP (outputs' second moment, averaged over `trace_axes`) and the empirical
NTK. As the width grows and samples accumulate it converges to the analytic
kernel of `ft.kernel_fn(model)`.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

import jax
from jax.sharding import Mesh

from flax_tangents._src import nnx_adapter
from flax_tangents._src.empirical.api import empirical_kernel_fn
from flax_tangents._src.empirical.implementation import NtkImplementation
from flax_tangents._src.scale.sampling import MonteCarloSampler
from flax_tangents._src.scale.sampling import canonicalize_n_samples

__all__ = ["monte_carlo_kernel_fn"]


def monte_carlo_kernel_fn(
    model: Any,
    key: jax.Array,
    n_samples: Union[int, Sequence[int]],
    batch_size: int = 0,
    mesh: Optional[Mesh] = None,
    store_on_device: bool = True,
    trace_axes: Sequence[int] = (-1,),
    diagonal_axes: Sequence[int] = (),
    implementation: Union[int, NtkImplementation] = (
        NtkImplementation.JACOBIAN_CONTRACTION),
    vmap_axes: Any = None,
):
  """Returns a Monte Carlo estimator of the NNGP and NTK of a Flax model.

  Sample `s` is the network `model.init(k_s, x1[:1])` with
  `k_s = split(fold_in(key, s))[0]`; its empirical kernels come from
  `ft.empirical_kernel_fn(model.apply, trace_axes, diagonal_axes, vmap_axes,
  implementation)` and are averaged. A call's `rngs` (e.g. for dropout) are
  folded with a per-sample key, so each network also draws its own masks.

  Args:
    model: a Flax Linen module (anything with `init` and `apply`), or for
      Flax NNX a factory `make(rngs) -> nnx.Module` such as
      `lambda rngs: MyModel(..., rngs=rngs)`: sample `s` is
      `make(rngs=nnx.Rngs(k_s))`, and only its `nnx.Param` variables are
      differentiated. (An `nnx.Module` instance is refused: it is one
      network, and the distribution of networks is its constructor's.)
    key: the random key the samples derive from.
    n_samples: number of networks; or a list/tuple of counts, in which case
      the kernel function returns a generator yielding the estimate after
      each count (in increasing order; samples are shared, so asking for
      `[1, 10, 100]` costs 100 samples).
    batch_size: `0` computes each network's whole kernel on one device,
      one network per device at a time; a positive value tiles each
      network's kernel over the mesh with `ft.batch` (for large kernels).
    mesh: devices to use; default all (of all processes).
    store_on_device: as in `ft.batch` (used when `batch_size > 0`).
    trace_axes: output axes averaged over (as in `ft.empirical_kernel_fn`).
    diagonal_axes: output axes of which only the diagonal is kept.
    implementation: the empirical NTK algorithm (`ft.NtkImplementation`).
    vmap_axes: as in `ft.empirical_ntk_fn`.

  Returns:
    `kernel_fn(x1, x2=None, get=None, **apply_kwargs)` returning the
    estimate: one array for `get='nngp'` or `'ntk'`, a namedtuple for a tuple
    or `None` (both); or, when `n_samples` is a list, a generator of them.
    It can be wrapped by `ft.batch` and traced by `jax.jit`.

  Raises:
    TypeError, ValueError: for an `n_samples` that is not positive
      integers; TypeError for an `nnx.Module` instance.

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> model = nn.Dense(3)
  >>> kernel_fn = ft.monte_carlo_kernel_fn(model, jax.random.PRNGKey(0), 4)
  >>> kernel_fn(jnp.ones((5, 2)), None, 'nngp').shape
  (5, 5)
  """
  model = nnx_adapter.as_sampler_model(model)
  counts, generator = canonicalize_n_samples(n_samples)
  if (isinstance(batch_size, bool) or not isinstance(batch_size, int)
      or batch_size < 0):
    raise ValueError(f"`batch_size` must be a non-negative integer, got "
                     f"{batch_size!r}.")
  sampler = MonteCarloSampler(
      model, key,
      empirical_kernel_fn(model.apply, trace_axes=trace_axes,
                          diagonal_axes=diagonal_axes, vmap_axes=vmap_axes,
                          implementation=implementation),
      batch_size, mesh, store_on_device, trace_axes, diagonal_axes)

  def estimates(x1, x2, get, apply_kwargs) -> Iterator[Any]:
    for n, total in sampler.sums(counts, x1, x2, get, apply_kwargs):
      yield jax.tree.map(lambda k, n=n: k / n, total)

  def kernel_fn(x1: Any, x2: Any = None, get: Any = None,
                **apply_kwargs: Any) -> Any:
    if generator:
      return estimates(x1, x2, get, apply_kwargs)
    estimate = None
    for estimate in estimates(x1, x2, get, apply_kwargs):
      pass
    return estimate

  # ft.batch reads these to lay out mirrored tiles of symmetric kernels.
  kernel_fn.trace_axes = tuple(trace_axes)
  kernel_fn.diagonal_axes = tuple(diagonal_axes)
  return kernel_fn
