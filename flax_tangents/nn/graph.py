"""Graph aggregation (message passing over adjacency tensors or edge lists)."""

from __future__ import annotations

import math
import string
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic.enums import AggregateImplementation
from flax_tangents._src.analytic.enums import canonicalize_fields
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import supports_masking
from flax_tangents.kernel import Kernel
from flax_tangents.typing import Axes

__all__ = ["Aggregate"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _aggregate_spatial(axis: Optional[Axes], ndim: int) -> tuple[int, ...]:
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


# ------------------------------------------------------------ dense graphs


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


def _dense_forward(x: jax.Array, pattern: jax.Array,
                   agg: tuple[int, ...]) -> jax.Array:
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
  return jnp.einsum(spec, x, pattern.astype(x.dtype))


def _check_dense(pattern: jax.Array, shape: tuple[int, ...],
                 agg: tuple[int, ...]) -> None:
  sizes = tuple(shape[1 + a] for a in agg)
  if pattern.shape != (shape[0],) + sizes + sizes:
    raise ValueError(
        f"Aggregate: pattern has shape {pattern.shape}, expected (batch, "
        f"*vertex axes, *vertex axes) = {(shape[0],) + sizes + sizes}.")


# ----------------------------------------------------------- sparse graphs


def _edge_list(pattern: jax.Array, shape: tuple[int, ...],
               agg: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Flat `(tails, heads)`, each `(batch, n_edges)`; padding edges' heads
  are set to the vertex count (out of range, so `segment_sum` drops them).

  Raises:
    ValueError: for a pattern of the wrong shape or dtype, or (when its
      values are known) a coordinate past the end of its axis.
  """
  sizes = tuple(shape[1 + a] for a in agg)
  pattern = jnp.asarray(pattern)
  if pattern.ndim == 3 and len(agg) == 1:
    pattern = pattern[:, :, None, :]
  if (pattern.ndim != 4 or pattern.shape[0] != shape[0] or
      pattern.shape[2:] != (len(agg), 2)):
    raise ValueError(
        f"Aggregate(implementation='SPARSE'): pattern has shape "
        f"{pattern.shape}, expected (batch, n_edges, K, 2) = ({shape[0]}, "
        f"n_edges, {len(agg)}, 2) (or (batch, n_edges, 2) when K == 1).")
  if not jnp.issubdtype(pattern.dtype, jnp.integer):
    raise ValueError("Aggregate(implementation='SPARSE'): pattern must hold "
                     f"integer vertex coordinates, got {pattern.dtype}.")
  try:
    values = np.asarray(pattern)
  except jax.errors.TracerArrayConversionError:
    values = None
  if values is not None and np.any(values >= np.asarray(sizes)[:, None]):
    raise ValueError(
        "Aggregate(implementation='SPARSE'): a vertex coordinate is past the "
        f"end of its axis (sizes {sizes}); negative coordinates mark "
        "padding edges.")
  tails, heads = pattern[..., 0], pattern[..., 1]
  valid = jnp.all((tails >= 0) & (heads >= 0), axis=-1)
  strides = np.cumprod((1,) + sizes[:0:-1])[::-1]
  flat = lambda c: jnp.sum(
      jnp.maximum(c, 0) * strides.reshape((1, 1, -1)).astype(c.dtype),
      axis=-1)
  n_vertices = math.prod(sizes)
  return flat(tails), jnp.where(valid, flat(heads), n_vertices)


def _sparse_axis(x: jax.Array, tails: jax.Array, heads: jax.Array,
                 axis: int) -> jax.Array:
  """`out[h] = sum over edges (t, h) of x[t]` along `axis` of one sample."""
  n_vertices = x.shape[axis]
  messages = jnp.moveaxis(jnp.take(x, tails, axis=axis), axis, 0)
  out = jax.ops.segment_sum(messages, heads, num_segments=n_vertices)
  return jnp.moveaxis(out, 0, axis)


def _sparse_forward(x: jax.Array, pattern: jax.Array,
                    agg: tuple[int, ...]) -> jax.Array:
  tails, heads = _edge_list(pattern, x.shape, agg)
  axes = [1 + a for a in agg]
  moved = jnp.moveaxis(x, axes, list(range(1, 1 + len(agg))))
  flat = moved.reshape((x.shape[0], -1) + moved.shape[1 + len(agg):])
  out = jax.vmap(lambda v, t, h: _sparse_axis(v, t, h, 0))(flat, tails,
                                                            heads)
  return jnp.moveaxis(out.reshape(moved.shape),
                      list(range(1, 1 + len(agg))), axes)


def _sparse_covariance(cov: jax.Array, edges_first, edges_second, *,
                       n_batch: int, agg: tuple[int, ...]) -> jax.Array:
  """The sparse counterpart of `_aggregate_covariance` (same contract)."""
  # Order the axes (batch, left vertex axes, right vertex axes, the rest)
  # and flatten each group of vertex axes into one.
  left = [n_batch + 2 * a for a in agg]
  right = [n_batch + 2 * a + 1 for a in agg]
  rest = [i for i in range(n_batch, cov.ndim) if i not in left + right]
  perm = list(range(n_batch)) + left + right + rest
  moved = jnp.transpose(cov, perm)
  batch, sizes = moved.shape[:n_batch], moved.shape[n_batch:n_batch + len(agg)]
  n_vertices = math.prod(sizes)
  flat = moved.reshape(batch + (n_vertices, n_vertices) +
                       moved.shape[n_batch + 2 * len(agg):])
  (tails1, heads1), (tails2, heads2) = edges_first, edges_second
  if n_batch == 2:
    # Rows with the first input's graph, then columns with the second's.
    flat = jax.vmap(lambda c, t, h: _sparse_axis(c, t, h, 1))(
        flat, tails1, heads1)
    flat = jax.vmap(lambda c, t, h: _sparse_axis(c, t, h, 2),
                    in_axes=(1, 0, 0), out_axes=1)(flat, tails2, heads2)
  else:
    flat = jax.vmap(lambda c, t, h: _sparse_axis(
        _sparse_axis(c, t, h, 0), t, h, 1))(flat, tails1, heads1)
  return jnp.transpose(flat.reshape(moved.shape),
                       tuple(int(i) for i in np.argsort(perm)))


# -------------------------------------------------------------- the layer


def _patterns(kernel: Kernel, pattern: Any,
              layer: str) -> Optional[tuple[Any, Any]]:
  """`(pattern1, pattern2)` from the call's `pattern`, or `None`."""
  if pattern is None:
    return None
  if isinstance(pattern, (tuple, list)):
    if len(pattern) != 2:
      raise ValueError(f"{layer}: pattern must be one array or a pair "
                       f"(pattern1, pattern2), got {len(pattern)} items.")
    pattern1, pattern2 = pattern
    if pattern1 is None and pattern2 is None:
      return None
    if pattern1 is None or pattern2 is None:
      raise NotImplementedError(
          f"{layer}: exactly one of (pattern1, pattern2) is None; pass both "
          "(an identity adjacency leaves a graph unchanged).")
    return pattern1, pattern2
  if not kernel.x1_is_x2:
    raise ValueError(
        f"{layer}: x1 and x2 are different inputs, so pass "
        "pattern=(pattern1, pattern2), one graph per batch.")
  return pattern, pattern


def _aggregate_rule(module: "Aggregate", kernel: Kernel, *,
                    pattern: Any = None, **kwargs: Any) -> Kernel:
  del kwargs
  layer = f"Aggregate(implementation='{module.implementation}')"
  patterns = _patterns(kernel, pattern, layer)
  if patterns is None:
    return kernel
  n_spatial = covariance.spatial_ndim(kernel)
  agg = _aggregate_spatial(module.aggregate_axis, len(kernel.shape1))
  covariance.require_spatial_covariances(kernel, layer)
  if n_spatial == 0 or not agg:
    return kernel
  n_cov = covariance.batch_ndim(kernel, "cov1")
  if module.implementation == AggregateImplementation.DENSE:
    pattern1, pattern2 = (jnp.asarray(module.densify(p)) for p in patterns)
    _check_dense(pattern1, kernel.shape1, agg)
    _check_dense(pattern2, kernel.shape2, agg)
    aggregate = lambda cov, p, q, n_batch: _aggregate_covariance(
        cov, p, q, n_batch=n_batch, n_spatial=n_spatial, agg=agg)
  else:
    pattern1 = _edge_list(patterns[0], kernel.shape1, agg)
    pattern2 = _edge_list(patterns[1], kernel.shape2, agg)
    aggregate = lambda cov, p, q, n_batch: _sparse_covariance(
        cov, p, q, n_batch=n_batch, agg=agg)

  def apply(cov, first, second, n_batch):
    return None if cov is None else aggregate(cov, first, second, n_batch)

  return kernel.replace(
      nngp=apply(kernel.nngp, pattern1, pattern2, 2),
      ntk=apply(kernel.ntk, pattern1, pattern2, 2),
      cov1=apply(kernel.cov1, pattern1, pattern1, n_cov),
      cov2=apply(kernel.cov2, pattern2, pattern2, n_cov))


@kernel_rule(_aggregate_rule)
class Aggregate(nn.Module):
  """Replaces every vertex by the sum of its predecessors (NT's Aggregate).

  Inputs `(N, *vertex_axes, C)` come with a graph per input, passed at call
  time as `pattern` ("Graph Neural Tangent Kernel", Du et al., 2019):

  - `implementation='DENSE'`: an adjacency tensor of shape
    `(N, *agg_sizes, *agg_sizes)`; `pattern[n, i, j] = w` is an arc of
    weight `w` from vertex `i` to vertex `j` of graph `n`, and
    `out[n, j] = sum_i pattern[n, i, j] x[n, i]`. With `to_dense`, the
    pattern is first converted by `to_dense(pattern)` (any format you like).
  - `implementation='SPARSE'`: an integer edge list of shape
    `(N, n_edges, K, 2)` (or `(N, n_edges, 2)` when `K = 1`), `K` the number
    of aggregated axes: `pattern[n, e, :, 0]` are the coordinates of edge
    `e`'s tail, `pattern[n, e, :, 1]` of its head; repeated edges add up.
    An edge with a negative coordinate is padding and ignored (graphs of
    different sizes share one array). The forward pass costs O(V + E)
    (`jax.ops.segment_sum`), the kernel O(V^2 + V E) per pair of inputs, and
    both equal the DENSE result on the same graph.

  `pattern=None` is the identity. The layer has no parameters and is linear,
  so the kernel is `pattern1^T K pattern2` over the vertex axes; it needs
  full vertex-vertex covariances (discovered automatically). For
  `ft.kernel_fn(model)(x1, x2, pattern=(pattern1, pattern2))` pass one graph
  per batch; a single one is accepted when `x2` is `None`.

  Differences from NT: an edge with a negative tail coordinate is padding
  too (NT reads the last vertex there), and a coordinate past the end of its
  axis is an error when the pattern's values are known (NT wraps it around).

  Attributes:
    aggregate_axis: axes of the activations holding vertices; `None` means
      all axes but the batch and channel axes.
    implementation: an `ftn.AggregateImplementation` or its name in any
      case, `'DENSE'` or `'SPARSE'`.
    to_dense: for `'DENSE'`, a function converting the call's `pattern` to
      the dense adjacency tensor; `None` means it already is one.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> x = jnp.arange(6.0).reshape(1, 3, 2)        # one graph, 3 vertices
  >>> ring = jnp.roll(jnp.eye(3), 1, axis=1)[None]  # arcs i -> i + 1
  >>> ftn.Aggregate().apply({}, x, pattern=ring)[0, :, 0]
  Array([4., 0., 2.], dtype=float...)
  >>> edges = jnp.array([[[0, 1], [1, 2], [2, 0]]])  # the same ring
  >>> ftn.Aggregate(implementation='sparse').apply(
  ...     {}, x, pattern=edges)[0, :, 0]
  Array([4., 0., 2.], dtype=float...)
  """

  aggregate_axis: Optional[Axes] = None
  implementation: Union[str, AggregateImplementation] = "DENSE"
  to_dense: Optional[Callable[[Any], jax.Array]] = None

  def __post_init__(self):
    canonicalize_fields(self, implementation=AggregateImplementation)
    if (self.to_dense is not None and
        self.implementation != AggregateImplementation.DENSE):
      raise ValueError("Aggregate: `to_dense` applies to the 'DENSE' "
                       "implementation only; SPARSE takes edge lists.")
    super().__post_init__()

  def densify(self, pattern: Any) -> Any:
    """The dense adjacency tensor of a DENSE `pattern` (via `to_dense`)."""
    return pattern if self.to_dense is None else self.to_dense(pattern)

  @supports_masking()
  def __call__(self, x: jax.Array,
               pattern: Optional[jax.Array] = None) -> jax.Array:
    if pattern is None:
      return x
    agg = _aggregate_spatial(self.aggregate_axis, x.ndim)
    if not agg:
      return x
    if self.implementation == AggregateImplementation.SPARSE:
      return _sparse_forward(x, pattern, agg)
    pattern = jnp.asarray(self.densify(pattern))
    _check_dense(pattern, x.shape, agg)
    return _dense_forward(x, pattern, agg)
