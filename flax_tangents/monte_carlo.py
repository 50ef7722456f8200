"""`ft.monte_carlo_kernel_fn`: NNGP/NTK estimates from sampled finite networks.

The estimate averages, over networks drawn with `model.init`, the empirical
NNGP (outputs' second moment, averaged over `trace_axes`) and the empirical
NTK. As the width grows and samples accumulate it converges to the analytic
kernel of `ft.kernel_fn(model)`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
from jax.sharding import Mesh

from flax_tangents._src import nnx_adapter
from flax_tangents._src.empirical.api import empirical_kernel_fn
from flax_tangents._src.empirical.implementation import NtkImplementation
from flax_tangents._src.scale.sampling import MonteCarloSampler
from flax_tangents._src.scale.sampling import canonicalize_n_samples
from flax_tangents.batching import _mesh_from_device_count
from flax_tangents.typing import MonteCarloKernelFn
from flax_tangents.typing import VMapAxes

__all__ = ["monte_carlo_kernel_fn"]

_DEFAULT_IMPLEMENTATION = NtkImplementation.JACOBIAN_CONTRACTION
# Positional arguments after `n_samples`, in this library's order and NT's.
_FT_ORDER = ("batch_size", "mesh", "store_on_device", "trace_axes",
             "diagonal_axes", "implementation", "vmap_axes")
_NT_ORDER = ("n_samples", "batch_size", "device_count", "store_on_device",
             "trace_axes", "diagonal_axes", "vmap_axes", "implementation")


_MASK_CONSTANT_FIX = (
    "monte_carlo_kernel_fn(...)(x1, x2, get, mask_constant=c): the finite "
    "networks take padding as `ft.MaskedArray` inputs, not as a keyword "
    "(NT passes it to apply_fn and needs `unmask_fn` for the outputs). Sample "
    "a model that masks its own inputs and unmasks its outputs, e.g. a Linen "
    "module whose __call__ is `return model(ft.MaskedArray.from_mask_constant("
    "x, c)).unmask()`; its Monte Carlo kernel converges to "
    "`ft.kernel_fn(model)(x1, x2, get, mask_constant=c)`.")


class _StaxNetwork:
  """NT's `(init_fn, apply_fn)` pair with a Flax-like `init`/`apply`."""

  def __init__(self, init_fn: Callable[..., Any],
               apply_fn: Callable[..., Any]):
    self.init_fn, self.apply_fn = init_fn, apply_fn

  def init(self, key: jax.Array, x: Any, **kwargs: Any) -> Any:
    del kwargs  # NT's init_fn(rng, input_shape) takes none.
    return self.init_fn(key, jax.tree.map(lambda a: a.shape, x))[1]

  def apply(self, params: Any, x: Any, **kwargs: Any) -> Any:
    return self.apply_fn(params, x, **kwargs)


def _is_nt_form(model: Any, key: Any) -> bool:
  return callable(key) and not hasattr(model, "apply")


def monte_carlo_kernel_fn(
    model: Any,
    key: Any,
    n_samples: Any,
    *args: Any,
    batch_size: int = 0,
    mesh: Optional[Mesh] = None,
    store_on_device: bool = True,
    trace_axes: Sequence[int] = (-1,),
    diagonal_axes: Sequence[int] = (),
    implementation: Union[int, NtkImplementation] = _DEFAULT_IMPLEMENTATION,
    vmap_axes: VMapAxes = None,
    device_count: Optional[int] = None,
) -> MonteCarloKernelFn:
  """Returns a Monte Carlo estimator of the NNGP and NTK of a Flax model.

  Sample `s` is the network `model.init(k_s, x1[:1])` with
  `k_s = split(fold_in(key, s))[0]`; its empirical kernels come from
  `ft.empirical_kernel_fn(model.apply, trace_axes, diagonal_axes, vmap_axes,
  implementation)` and are averaged. A call's `rngs` (e.g. for dropout) are
  folded with a per-sample key, so each network also draws its own masks.

  Neural Tangents' form `monte_carlo_kernel_fn(init_fn, apply_fn, key,
  n_samples, batch_size=0, device_count=-1, store_on_device=True,
  trace_axes=(-1,), diagonal_axes=(), vmap_axes=None, implementation=1)`
  works too, positionally or by keyword: networks are then
  `init_fn(k_s, x1[:1].shape)[1]` applied with `apply_fn`. NT's private
  `_j_rules`, `_s_rules`, `_fwd` are not accepted.

  Args:
    model: a Flax Linen module (anything with `init` and `apply`), or for
      Flax NNX a factory `make(rngs) -> nnx.Module` such as
      `lambda rngs: MyModel(..., rngs=rngs)`: sample `s` is
      `make(rngs=nnx.Rngs(k_s))`, and only its `nnx.Param` variables are
      differentiated. (An `nnx.Module` instance is refused: it is one
      network, and the distribution of networks is its constructor's.) Or
      NT's `init_fn`, followed by `apply_fn` in place of `key`.
    key: the random key the samples derive from.
    n_samples: number of networks; or a list/tuple of counts, in which case
      the kernel function returns a generator yielding the estimate after
      each count (in increasing order; samples are shared, so asking for
      `[1, 10, 100]` costs 100 samples).
    *args: the following arguments given positionally, in the order of this
      signature (`batch_size, mesh, store_on_device, trace_axes,
      diagonal_axes, implementation, vmap_axes`), or in NT's order for NT's
      form (`n_samples, batch_size, device_count, store_on_device,
      trace_axes, diagonal_axes, vmap_axes, implementation`).
    batch_size: `0` computes each network's whole kernel on one device,
      one network per device at a time; a positive value tiles each
      network's kernel over the mesh with `ft.batch` (for large kernels).
    mesh: devices to use; default all (of all processes).
    store_on_device: as in `ft.batch` (used when `batch_size > 0`).
    trace_axes: output axes averaged over (as in `ft.empirical_kernel_fn`).
    diagonal_axes: output axes of which only the diagonal is kept.
    implementation: the empirical NTK algorithm (`ft.NtkImplementation`).
    vmap_axes: as in `ft.empirical_ntk_fn`.
    device_count: NT's argument, instead of `mesh` (as in `ft.batch`).

  Returns:
    `kernel_fn(x1, x2=None, get=None, **apply_kwargs)` returning the
    estimate: one array for `get='nngp'` or `'ntk'`, a namedtuple for a tuple
    or `None` (both); or, when `n_samples` is a list, a generator of them.
    It can be wrapped by `ft.batch` and traced by `jax.jit`.

  Raises:
    TypeError, ValueError: for an `n_samples` that is not positive
      integers, too many or repeated arguments, or both `mesh` and
      `device_count`; TypeError for an `nnx.Module` instance.

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> model = nn.Dense(3)
  >>> kernel_fn = ft.monte_carlo_kernel_fn(model, jax.random.PRNGKey(0), 4)
  >>> kernel_fn(jnp.ones((5, 2)), None, 'nngp').shape
  (5, 5)
  """
  given: dict[str, Any] = dict(
      batch_size=batch_size, mesh=mesh, store_on_device=store_on_device,
      trace_axes=trace_axes, diagonal_axes=diagonal_axes,
      implementation=implementation, vmap_axes=vmap_axes,
      device_count=device_count)
  if _is_nt_form(model, key):
    model, key, n_samples, order = (_StaxNetwork(model, key), n_samples,
                                    None, _NT_ORDER)
    given["n_samples"] = None
  else:
    order = _FT_ORDER
  defaults = dict(batch_size=0, mesh=None, store_on_device=True,
                  trace_axes=(-1,), diagonal_axes=(),
                  implementation=_DEFAULT_IMPLEMENTATION, vmap_axes=None,
                  device_count=None, n_samples=None)
  if len(args) > len(order):
    raise TypeError(f"monte_carlo_kernel_fn takes at most {len(order)} "
                    f"positional arguments after the first three, got "
                    f"{len(args)}.")
  for name, value in zip(order, args):
    if given[name] is not defaults[name] and given[name] != defaults[name]:
      raise TypeError(f"monte_carlo_kernel_fn got `{name}` both "
                      "positionally and by keyword.")
    given[name] = value
  if order is _NT_ORDER:
    n_samples = given.pop("n_samples")
    if n_samples is None:
      raise TypeError("NT's form needs `n_samples` after the key: "
                      "monte_carlo_kernel_fn(init_fn, apply_fn, key, "
                      "n_samples, ...).")
  if given["device_count"] is not None:
    if given["mesh"] is not None:
      raise ValueError("monte_carlo_kernel_fn: pass either `mesh` or "
                       "`device_count`, not both.")
    given["mesh"] = _mesh_from_device_count(given["device_count"])
  return _monte_carlo_kernel_fn(
      model, key, n_samples, given["batch_size"], given["mesh"],
      given["store_on_device"], given["trace_axes"], given["diagonal_axes"],
      given["implementation"], given["vmap_axes"])


def _monte_carlo_kernel_fn(model, key, n_samples, batch_size, mesh,
                           store_on_device, trace_axes, diagonal_axes,
                           implementation, vmap_axes):
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
    if "mask_constant" in apply_kwargs:
      raise TypeError(_MASK_CONSTANT_FIX)
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
