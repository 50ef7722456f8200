"""Graph aggregation (message passing over a dense adjacency tensor)."""

from __future__ import annotations

import string
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import supports_masking
from flax_tangents.kernel import Kernel

__all__ = ["Aggregate"]

Axes = Union[None, int, Sequence[int]]
_HIGHEST = jax.lax.Precision.HIGHEST


def _aggregate_spatial(axis: Axes, ndim: int) -> tuple[int, ...]:
  """Aggregated dimensions as 0-based indices among the spatial axes."""
  if axis is None:
    return tuple(range(ndim - 2))
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  axes = tuple(sorted({a % ndim for a in axes}))
  if any(a in (0, ndim - 1) for a in axes):
    raise ValueError(
        f"Aggregate: aggregate_axis={axis} includes the batch or channel "
        f"axis of {ndim}-D activations; aggregate over spatial (vertex) axes "
        "only.")
  return tuple(a - 1 for a in axes)


def _check_implementation(implementation: str) -> None:
  if implementation != "DENSE":
    raise NotImplementedError(
        f"Aggregate(implementation={implementation!r}): only 'DENSE' "
        "(a dense adjacency tensor) is implemented; convert edge lists "
        "with e.g. `jnp.zeros((N, V, V)).at[...].add(1)`.")


def _aggregate_covariance(cov: jax.Array, p_first: jax.Array,
                          p_second: jax.Array, *, n_batch: int,
                          n_spatial: int, agg: tuple[int, ...]) -> jax.Array:
  """`p_first^T cov p_second` over the aggregated vertex axes.

  `cov` is `(..batch.., S1, S1', ...)`; with two batch axes `p_first` is
  indexed by the first and `p_second` by the second; with one, both by it.
  """
  letters = iter(string.ascii_letters)
  b1 = next(letters)
  b2 = next(letters) if n_batch == 2 else b1
  cov_idx = [b1] + ([b2] if n_batch == 2 else [])
  out_idx = list(cov_idx)
  tails1, heads1, tails2, heads2 = [], [], [], []
  for i in range(n_spatial):
    u, v = next(letters), next(letters)
    cov_idx += [u, v]
    if i in agg:
      hu, hv = next(letters), next(letters)
      tails1.append(u)
      heads1.append(hu)
      tails2.append(v)
      heads2.append(hv)
      out_idx += [hu, hv]
    else:
      out_idx += [u, v]
  spec = (f"{''.join(cov_idx)},{b1}{''.join(tails1 + heads1)},"
          f"{b2}{''.join(tails2 + heads2)}->{''.join(out_idx)}")
  return jnp.einsum(spec, cov, p_first, p_second, precision=_HIGHEST)


def _aggregate_rule(module: "Aggregate", kernel: Kernel, *,
                    pattern: Any = None, **kwargs: Any) -> Kernel:
  del kwargs
  _check_implementation(module.implementation)
  layer = "Aggregate"
  if pattern is None:
    return kernel
  if isinstance(pattern, (tuple, list)):
    if len(pattern) != 2:
      raise ValueError(f"{layer}: pattern must be one array or a pair "
                       f"(pattern1, pattern2), got {len(pattern)} items.")
    pattern1, pattern2 = pattern
    if pattern1 is None and pattern2 is None:
      return kernel
    if pattern1 is None or pattern2 is None:
      raise NotImplementedError(
          f"{layer}: exactly one of (pattern1, pattern2) is None; pass both "
          "(an identity adjacency leaves a graph unchanged).")
  else:
    if not kernel.x1_is_x2:
      raise ValueError(
          f"{layer}: x1 and x2 are different inputs, so pass "
          "pattern=(pattern1, pattern2), one adjacency tensor per batch.")
    pattern1 = pattern2 = pattern
  n_spatial = covariance.spatial_ndim(kernel)
  agg = _aggregate_spatial(module.aggregate_axis, len(kernel.shape1))
  covariance.require_spatial_covariances(kernel, layer)
  if n_spatial == 0 or not agg:
    return kernel
  pattern1 = jnp.asarray(pattern1)
  pattern2 = jnp.asarray(pattern2)
  for p, shape in ((pattern1, kernel.shape1), (pattern2, kernel.shape2)):
    sizes = tuple(shape[1 + a] for a in agg)
    if p.shape != (shape[0],) + sizes + sizes:
      raise ValueError(
          f"{layer}: pattern has shape {p.shape}, expected (batch, *vertex "
          f"axes, *vertex axes) = {(shape[0],) + sizes + sizes}.")
  n_cov = covariance.batch_ndim(kernel, "cov1")

  def apply(cov, first, second, n_batch):
    if cov is None:
      return None
    return _aggregate_covariance(cov, first, second, n_batch=n_batch,
                                 n_spatial=n_spatial, agg=agg)

  return kernel.replace(
      nngp=apply(kernel.nngp, pattern1, pattern2, 2),
      ntk=apply(kernel.ntk, pattern1, pattern2, 2),
      cov1=apply(kernel.cov1, pattern1, pattern1, n_cov),
      cov2=apply(kernel.cov2, pattern2, pattern2, n_cov))


@kernel_rule(_aggregate_rule)
class Aggregate(nn.Module):
  """Replaces every vertex by the weighted sum of its predecessors.

  Inputs `(N, *vertex_axes, C)` come with a dense adjacency tensor
  `pattern` of shape `(N, *agg_sizes, *agg_sizes)`: `pattern[n, i, j] = w`
  is an arc of weight `w` from vertex `i` to vertex `j` of graph `n`, and
  `out[n, j] = sum_i pattern[n, i, j] x[n, i]` (Neural Tangents'
  `stax.Aggregate` with the `'DENSE'` implementation; see "Graph Neural
  Tangent Kernel", Du et al., 2019). `pattern=None` is the identity.

  The layer has no parameters and is linear, so the kernel is
  `pattern1^T K pattern2` over the vertex axes; it needs full
  vertex-vertex covariances (discovered automatically). For
  `ft.kernel_fn(model)(x1, x2, pattern=(pattern1, pattern2))` pass one
  tensor per batch; a single tensor is accepted when `x2` is `None`.

  Attributes:
    aggregate_axis: axes of the activations holding vertices; `None` means
      all axes but the batch and channel axes.
    implementation: `'DENSE'` (the only one implemented).

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> x = jnp.arange(6.0).reshape(1, 3, 2)        # one graph, 3 vertices
  >>> ring = jnp.roll(jnp.eye(3), 1, axis=1)[None]  # arcs i -> i + 1
  >>> ftn.Aggregate().apply({}, x, pattern=ring)[0, :, 0]
  Array([4., 0., 2.], dtype=float...)
  """

  aggregate_axis: Axes = None
  implementation: str = "DENSE"

  @supports_masking()
  def __call__(self, x: jax.Array,
               pattern: Optional[jax.Array] = None) -> jax.Array:
    _check_implementation(self.implementation)
    if pattern is None:
      return x
    agg = _aggregate_spatial(self.aggregate_axis, x.ndim)
    letters = iter(string.ascii_letters)
    batch, channel = next(letters), next(letters)
    x_idx, tails, heads = [batch], [], []
    out_idx = [batch]
    for i in range(x.ndim - 2):
      u = next(letters)
      x_idx.append(u)
      if i in agg:
        h = next(letters)
        tails.append(u)
        heads.append(h)
        out_idx.append(h)
      else:
        out_idx.append(u)
    spec = (f"{''.join(x_idx)}{channel},{batch}{''.join(tails + heads)}"
            f"->{''.join(out_idx)}{channel}")
    return jnp.einsum(spec, x, pattern)
