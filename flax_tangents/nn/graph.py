"""Graph aggregation (message passing over adjacency tensors or edge lists)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import graph
from flax_tangents._src.analytic.enums import AggregateImplementation
from flax_tangents._src.analytic.enums import canonicalize_fields
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import supports_masking
from flax_tangents._src.typing import Axes

__all__ = ["Aggregate"]


def _aggregate_rule(module: "Aggregate", kernel: Kernel, *,
                    pattern: Any = None, **kwargs: Any) -> Kernel:
  del kwargs
  return graph.aggregate_kernel(
      kernel, pattern, aggregate_axis=module.aggregate_axis,
      dense=module.implementation == AggregateImplementation.DENSE,
      densify=module.densify,
      layer=f"Aggregate(implementation='{module.implementation}')")


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
    agg = graph.aggregate_spatial(self.aggregate_axis, x.ndim)
    if not agg:
      return x
    if self.implementation == AggregateImplementation.SPARSE:
      return graph.sparse_forward(x, pattern, agg)
    pattern = jnp.asarray(self.densify(pattern))
    graph.check_dense(pattern, x.shape, agg)
    return graph.dense_forward(x, pattern, agg)
