"""Infinite-width kernel of global self-attention (Hron et al., 2020).

Reference: "Infinite attention: NNGP and NTK for deep attention networks",
https://arxiv.org/abs/2006.10540. Covariances are handled with all spatial
axes flattened into one axis of `P` locations: `(..batch.., P, P)`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic.enums import AttentionMechanism
from flax_tangents.kernel import Kernel

__all__ = ["ATTENTION_MECHANISMS", "POSITIONAL_EMBEDDINGS", "attention_fn",
           "attention_kernel"]

ATTENTION_MECHANISMS = ("SOFTMAX", "IDENTITY", "ABS", "RELU")
POSITIONAL_EMBEDDINGS = ("NONE", "SUM", "CONCAT")
_HIGHEST = jax.lax.Precision.HIGHEST


def attention_fn(mechanism: str) -> Callable[[jax.Array], jax.Array]:
  """The map from query-key products to attention weights (last axis: keys).

  Raises:
    ValueError: for an unknown mechanism.
  """
  fns = {
      "SOFTMAX": lambda x: jax.nn.softmax(x, axis=-1),
      "IDENTITY": lambda x: x,
      "ABS": jnp.abs,
      "RELU": jax.nn.relu,
  }
  return fns[AttentionMechanism.parse(mechanism, "attention_mechanism")]


def _to_flat(cov: jax.Array, n_batch: int, n_spatial: int) -> jax.Array:
  """`(..b.., S1, S1', S2, S2', ...)` -> `(..b.., P, P')`."""
  first = [n_batch + 2 * i for i in range(n_spatial)]
  second = [n_batch + 2 * i + 1 for i in range(n_spatial)]
  cov = jnp.transpose(cov, list(range(n_batch)) + first + second)
  size = math.prod(cov.shape[n_batch:n_batch + n_spatial])
  return cov.reshape(cov.shape[:n_batch] + (size, size))


def _from_flat(cov: jax.Array, n_batch: int,
               spatial: tuple[int, ...]) -> jax.Array:
  """Inverse of `_to_flat` for spatial shape `spatial`."""
  n_spatial = len(spatial)
  cov = cov.reshape(cov.shape[:n_batch] + spatial + spatial)
  order = list(range(n_batch))
  for i in range(n_spatial):
    order += [n_batch + i, n_batch + n_spatial + i]
  return jnp.transpose(cov, order)


def _batch_diagonal(cov: jax.Array, diagonal_batch: bool) -> jax.Array:
  """`(N, P, P)` per-input covariances from `cov1`/`cov2` (flat layout)."""
  if diagonal_batch:
    return cov
  return jnp.moveaxis(jnp.diagonal(cov, axis1=0, axis2=1), -1, 0)


def _weigh(cov: jax.Array, g1: jax.Array, g2: jax.Array,
           n_batch: int) -> jax.Array:
  """`g1[a] @ cov[a, b] @ g2[b]^T` over locations (batch diagonal if 1)."""
  if n_batch == 1:
    return jnp.einsum("asp,apq,atq->ast", g1, cov, g2, precision=_HIGHEST)
  return jnp.einsum("asp,abpq,btq->abst", g1, cov, g2, precision=_HIGHEST)


def _sum_of_products(a: jax.Array, b: jax.Array) -> jax.Array:
  """`sum_{p, q} a[.., p, q] b[.., p, q]`, keeping two trailing unit axes."""
  return jnp.sum(a * b, axis=(-2, -1), keepdims=True)


def attention_kernel(kernel: Kernel, *, n_chan_out: int, QK_std: float,
                     OV_std: float, b_std: Optional[float],
                     linear_scaling: bool, mechanism: str,
                     layer: str) -> Kernel:
  """Kernel after global self-attention, as heads and widths go to infinity.

  `linear_scaling=True` (query-key products scaled by `1 / n_chan_key`, key
  and query weights tied): the attention weights converge to the
  deterministic `G = mechanism(QK_std * C)`, with `C` each input's own
  location-location covariance (softmax over keys). The output is then
  Gaussian with `nngp' = OV_std^2 G1 nngp G2^T + b_std^2`; the NTK gains the
  gradients of the value and output weights (twice the weighted NNGP), while
  those of the key weights vanish in the limit.

  `linear_scaling=False` is implemented for `'IDENTITY'` only: the weights
  are then Gaussian themselves and
  `nngp' = (QK OV)^2 <nngp, nngp> nngp + b^2`, with `<.,.>` the sum over all
  location pairs.

  Args:
    kernel: kernel of the inputs, with full spatial covariances.
    n_chan_out: output channels (for the output shape).
    QK_std: `W_query_std * W_key_std`.
    OV_std: `W_out_std * W_value_std`.
    b_std: bias standard deviation, or `None`.
    linear_scaling: see above.
    mechanism: one of `ATTENTION_MECHANISMS`.
    layer: the layer's name, for error messages.

  Returns:
    The (Gaussian) output kernel.

  Raises:
    ValueError: for inputs without spatial axes or an unknown mechanism.
    NotImplementedError: for square-root scaling with a mechanism other than
      `'IDENTITY'` (no closed form is known).
  """
  fn = attention_fn(mechanism)
  mechanism = AttentionMechanism.parse(mechanism, "attention_mechanism")
  n_spatial = covariance.spatial_ndim(kernel)
  if n_spatial < 1:
    raise ValueError(
        f"{layer} needs inputs with at least one spatial (token) axis, "
        f"shape (N, *spatial, C); got activations of shape {kernel.shape1}.")
  if not linear_scaling and mechanism != "IDENTITY":
    raise NotImplementedError(
        f"{layer}: with linear_scaling=False the kernel has a closed form "
        f"only for attention_mechanism='IDENTITY', not {mechanism!r}. Use "
        "linear_scaling=True.")
  covariance.require_spatial_covariances(kernel, layer)
  spatial = tuple(kernel.shape1[1:-1])
  n_cov = covariance.batch_ndim(kernel, "cov1")
  flat = lambda x, n: None if x is None else _to_flat(x, n, n_spatial)
  unflat = lambda x, n: None if x is None else _from_flat(x, n, spatial)
  nngp, ntk = flat(kernel.nngp, 2), flat(kernel.ntk, 2)
  cov1, cov2 = flat(kernel.cov1, n_cov), flat(kernel.cov2, n_cov)
  b_var = 0.0 if b_std is None else b_std**2

  if linear_scaling:
    def weights(cov):
      return fn(QK_std * _batch_diagonal(cov, kernel.diagonal_batch))

    g1 = weights(cov1)
    g2 = g1 if cov2 is None else weights(cov2)
    out_var = OV_std**2
    new_nngp = _weigh(nngp, g1, g2, 2)
    new_cov1 = out_var * _weigh(cov1, g1, g1, n_cov) + b_var
    new_cov2 = (None if cov2 is None else
                out_var * _weigh(cov2, g2, g2, n_cov) + b_var)
    new_ntk = (None if ntk is None else
               out_var * (_weigh(ntk, g1, g2, 2) + 2 * new_nngp) + b_var)
    new_nngp = out_var * new_nngp + b_var
  else:
    out_var = (QK_std * OV_std)**2
    dot12 = _sum_of_products(nngp, nngp)
    new_nngp = out_var * dot12 * nngp + b_var
    new_cov1 = out_var * _sum_of_products(cov1, cov1) * cov1 + b_var
    new_cov2 = (None if cov2 is None else
                out_var * _sum_of_products(cov2, cov2) * cov2 + b_var)
    # Gradients through the (now random) attention weights add the term in
    # `<nngp, ntk>`; those of the query, key, value and output weights each
    # add `dot12 * nngp`.
    new_ntk = (None if ntk is None else out_var * (
        2 * _sum_of_products(nngp, ntk) * nngp + dot12 * (ntk + 4 * nngp))
               + b_var)

  return kernel.replace(
      nngp=unflat(new_nngp, 2), ntk=unflat(new_ntk, 2),
      cov1=unflat(new_cov1, n_cov), cov2=unflat(new_cov2, n_cov),
      is_gaussian=True, is_input=False,
      shape1=kernel.shape1[:-1] + (n_chan_out,),
      shape2=kernel.shape2[:-1] + (n_chan_out,))
