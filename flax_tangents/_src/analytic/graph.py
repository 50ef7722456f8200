"""Graph aggregation (`ftn.Aggregate`): the finite pass and the kernel.

A graph per input, given as a dense adjacency tensor or as an edge list
(`jax.ops.segment_sum`), replaces every vertex by the sum of its
predecessors; the layer is linear, so the kernel is `pattern1^T K pattern2`
over the aggregated vertex axes.
"""

from __future__ import annotations

import math
import string
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.typing import Axes

__all__ = ["aggregate_kernel", "aggregate_spatial", "check_dense",
           "dense_forward", "edge_list", "sparse_forward"]

_HIGHEST = jax.lax.Precision.HIGHEST


def aggregate_spatial(axis: Optional[Axes], ndim: int) -> tuple[int, ...]:
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


def aggregate_covariance(cov: jax.Array, p_first: jax.Array,
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


def dense_forward(x: jax.Array, pattern: jax.Array,
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


def check_dense(pattern: jax.Array, shape: tuple[int, ...],
                 agg: tuple[int, ...]) -> None:
  sizes = tuple(shape[1 + a] for a in agg)
  if pattern.shape != (shape[0],) + sizes + sizes:
    raise ValueError(
        f"Aggregate: pattern has shape {pattern.shape}, expected (batch, "
        f"*vertex axes, *vertex axes) = {(shape[0],) + sizes + sizes}.")


# ----------------------------------------------------------- sparse graphs


def edge_list(pattern: jax.Array, shape: tuple[int, ...],
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


def sparse_forward(x: jax.Array, pattern: jax.Array,
                    agg: tuple[int, ...]) -> jax.Array:
  tails, heads = edge_list(pattern, x.shape, agg)
  axes = [1 + a for a in agg]
  moved = jnp.moveaxis(x, axes, list(range(1, 1 + len(agg))))
  flat = moved.reshape((x.shape[0], -1) + moved.shape[1 + len(agg):])
  out = jax.vmap(lambda v, t, h: _sparse_axis(v, t, h, 0))(flat, tails,
                                                            heads)
  return jnp.moveaxis(out.reshape(moved.shape),
                      list(range(1, 1 + len(agg))), axes)


def sparse_covariance(cov: jax.Array, edges_first, edges_second, *,
                       n_batch: int, agg: tuple[int, ...]) -> jax.Array:
  """The sparse counterpart of `aggregate_covariance` (same contract)."""
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


def aggregate_kernel(kernel: Kernel, pattern: Any, *,
                     aggregate_axis: Optional[Axes], dense: bool,
                     densify: Callable[[Any], Any], layer: str) -> Kernel:
  """The kernel after `ftn.Aggregate`: `pattern1^T K pattern2` over vertices.

  Args:
    kernel: the kernel of the inputs.
    pattern: the call's `pattern`: one graph, a pair `(pattern1, pattern2)`
      (one per batch), or `None` (the identity).
    aggregate_axis: the layer's `aggregate_axis`.
    dense: whether patterns are adjacency tensors (else edge lists).
    densify: maps a dense `pattern` to its adjacency tensor.
    layer: the layer's name, for error messages.

  Returns:
    The kernel of the aggregated activations.

  Raises:
    ValueError: for patterns of the wrong shape, or one graph for two
      different batches.
    NotImplementedError: for a pair with exactly one `None`.
  """
  patterns = _patterns(kernel, pattern, layer)
  if patterns is None:
    return kernel
  n_spatial = covariance.spatial_ndim(kernel)
  agg = aggregate_spatial(aggregate_axis, len(kernel.shape1))
  covariance.require_spatial_covariances(kernel, layer)
  if n_spatial == 0 or not agg:
    return kernel
  n_cov = covariance.batch_ndim(kernel, "cov1")
  if dense:
    pattern1, pattern2 = (jnp.asarray(densify(p)) for p in patterns)
    check_dense(pattern1, kernel.shape1, agg)
    check_dense(pattern2, kernel.shape2, agg)
    aggregate = lambda cov, p, q, n_batch: aggregate_covariance(
        cov, p, q, n_batch=n_batch, n_spatial=n_spatial, agg=agg)
  else:
    pattern1 = edge_list(patterns[0], kernel.shape1, agg)
    pattern2 = edge_list(patterns[1], kernel.shape2, agg)
    aggregate = lambda cov, p, q, n_batch: sparse_covariance(
        cov, p, q, n_batch=n_batch, agg=agg)

  def apply(cov, first, second, n_batch):
    return None if cov is None else aggregate(cov, first, second, n_batch)

  return kernel.replace(
      nngp=apply(kernel.nngp, pattern1, pattern2, 2),
      ntk=apply(kernel.ntk, pattern1, pattern2, 2),
      cov1=apply(kernel.cov1, pattern1, pattern1, n_cov),
      cov2=apply(kernel.cov2, pattern2, pattern2, n_cov))
