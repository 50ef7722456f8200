"""Infinite-width kernel of global self-attention (Hron et al., 2020).

Reference: "Infinite attention: NNGP and NTK for deep attention networks",
https://arxiv.org/abs/2006.10540. Covariances are handled with all spatial
axes flattened into one axis of `P` locations: `(..batch.., P, P)`.
Positional embeddings (see `positional`) and padding masks (see `masking`)
follow Neural Tangents 0.6.5.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import lineage
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic import positional
from flax_tangents._src.analytic.enums import AttentionMechanism
from flax_tangents._src.analytic.enums import attention_fn
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.positional import POSITIONAL_EMBEDDINGS

__all__ = ["ATTENTION_MECHANISMS", "POSITIONAL_EMBEDDINGS", "attention_fn",
           "attention_kernel", "flat_key_mask", "mask_keys"]

ATTENTION_MECHANISMS = ("SOFTMAX", "IDENTITY", "ABS", "RELU")
_HIGHEST = jax.lax.Precision.HIGHEST


def mask_keys(logits: jax.Array, key_mask: Optional[jax.Array],
              mechanism: str) -> jax.Array:
  """Gives padded keys (last axis) no weight after `attention_fn`.

  Softmax logits become a huge negative number rather than `-inf`, so that
  a query whose keys are all padding gets uniform weights, not NaNs (as
  Neural Tangents); the other mechanisms map 0 to 0.
  """
  if key_mask is None:
    return logits
  fill = (0.5 * jnp.finfo(logits.dtype).min if mechanism == "SOFTMAX"
          else 0.0)
  return jnp.where(key_mask, jnp.asarray(fill, logits.dtype), logits)


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


def _batch_diagonal(cov: jax.Array, n_batch: int) -> jax.Array:
  """`(N, P, P)` per-input covariances from `cov1`/`cov2` (flat layout)."""
  if n_batch == 1:
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


def flat_key_mask(mask: Optional[jax.Array]) -> Optional[jax.Array]:
  """`(N, 1, P)`: padded keys of each input, from a mask `(N, *S, C|1)`."""
  if mask is None:
    return None
  mask = mask_arrays.collapse_channels(mask)
  return mask.reshape(mask.shape[0], 1, -1)


def _embedded(kernel: Kernel, mix: positional.PositionalMix,
              R: Optional[np.ndarray], layer: str) -> dict[str, Any]:
  """Flat covariances of the inputs with embeddings (keys and queries).

  Covariances of padded locations are zero, and so are the embeddings'
  there (the finite layer zeroes them too).
  """
  n_spatial = covariance.spatial_ndim(kernel)
  spatial = tuple(kernel.shape1[1:-1])
  out = {}
  if R is None:
    for name in ("nngp", "ntk", "cov1", "cov2"):
      value = getattr(kernel, name)
      out[name] = (None if value is None else
                   _to_flat(value, covariance.batch_ndim(kernel, name),
                            n_spatial))
    return out
  masks1, masks2 = masking.kernel_masks(kernel)
  mask11, mask12, mask22 = masking.pair_masks(
      kernel, mask_arrays.collapse_channels(masks1),
      mask_arrays.collapse_channels(masks2), layer)
  pair_mask = {"nngp": mask12, "ntk": mask12, "cov1": mask11, "cov2": mask22}
  dtype = jnp.result_type(*(getattr(kernel, name) for name in
                            ("nngp", "cov1") if getattr(kernel, name)
                            is not None))
  zipped_R = _from_flat(jnp.asarray(R, dtype), 0, spatial)
  for name in ("nngp", "ntk", "cov1", "cov2"):
    value = getattr(kernel, name)
    if value is None:
      out[name] = None
      continue
    n_batch = covariance.batch_ndim(kernel, name)
    emb = mask_arrays.zero_masked(
        jnp.broadcast_to(zipped_R, (1,) * n_batch + zipped_R.shape),
        pair_mask[name])
    out[name] = _to_flat(
        mix.input_weight * value + mix.embedding_weight * emb, n_batch,
        n_spatial)
  return out


def attention_kernel(kernel: Kernel, *, n_chan_out: int, QK_std: float,
                     OV_std: float, b_std: Optional[float],
                     linear_scaling: bool, mechanism: str, layer: str,
                     pos_emb_type: str = "NONE", pos_emb_p_norm: float = 2,
                     pos_emb_decay_fn: Optional[Callable[[Any], Any]] = None,
                     n_chan_pos_emb: Optional[int] = None,
                     W_pos_emb_std: float = 1.0,
                     val_pos_emb: bool = False) -> Kernel:
  """Kernel after global self-attention, as heads and widths go to infinity.

  Keys and queries see the inputs with positional embeddings: covariances
  `K_e = w_x K + w_e R` (see `positional.positional_mix`); values see `K_e`
  with `val_pos_emb`, `K` otherwise (`K_v`).

  `linear_scaling=True` (query-key products scaled by `1 / n_chan_key`, key
  and query weights tied): the attention weights converge to the
  deterministic `G = mechanism(QK_std * K_e)`, with `K_e` each input's own
  location-location covariance (softmax over keys; padded keys get no
  weight). The output is then Gaussian with `nngp' = OV_std^2 G1 K_v G2^T +
  b_std^2`; the NTK gains the gradients of the value and output weights
  (twice the weighted NNGP), while those of the key weights vanish.

  `linear_scaling=False` is implemented for `'IDENTITY'` only: the weights
  are then Gaussian themselves and `nngp' = (QK OV)^2 <K_e, K_v> K_e + b^2`,
  with `<.,.>` the sum over all location pairs.

  Args:
    kernel: kernel of the inputs, with full spatial covariances.
    n_chan_out: output channels (for the output shape).
    QK_std: `W_query_std * W_key_std`.
    OV_std: `W_out_std * W_value_std`.
    b_std: bias standard deviation, or `None`.
    linear_scaling: see above.
    mechanism: one of `ATTENTION_MECHANISMS`.
    layer: the layer's name, for error messages.
    pos_emb_type: `'NONE'`, `'SUM'` or `'CONCAT'`.
    pos_emb_p_norm: `p` of the distances between locations.
    pos_emb_decay_fn: covariance of embeddings as a function of distance;
      `None` for one-hot embeddings.
    n_chan_pos_emb: embedding channels (`None`: the input channels).
    W_pos_emb_std: embedding scale.
    val_pos_emb: whether values see the embeddings too.

  Returns:
    The (Gaussian) output kernel.

  Raises:
    ValueError: for inputs without spatial axes, an unknown mechanism or
      embedding, or inconsistent embedding arguments.
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
  mix = positional.positional_mix(pos_emb_type, kernel.shape1[-1],
                                  n_chan_pos_emb, W_pos_emb_std, layer)
  R = None if mix.kind == "NONE" else positional.location_covariance(
      kernel.shape1[1:-1], pos_emb_p_norm, pos_emb_decay_fn)
  n_cov = covariance.batch_ndim(kernel, "cov1")
  embedded = _embedded(kernel, mix, R, layer)
  raw = _embedded(kernel, mix, None, layer) if R is not None else embedded
  values = embedded if val_pos_emb else raw
  b_var = 0.0 if b_std is None else b_std**2
  if linear_scaling:
    masks = masking.kernel_masks(kernel)

    def weights(cov, mask):
      logits = QK_std * _batch_diagonal(cov, n_cov)
      return fn(mask_keys(logits, flat_key_mask(mask), mechanism))

    g1 = weights(embedded["cov1"], masks[0])
    g2 = (g1 if embedded["cov2"] is None else
          weights(embedded["cov2"], masks[1]))
    out = _linear_scaling(values, g1, g2, n_cov, OV_std**2, b_var)
  else:
    out = _sqrt_scaling_identity(embedded, values, (QK_std * OV_std)**2,
                                 b_var)
  spatial = tuple(kernel.shape1[1:-1])
  unflat = lambda x, n: None if x is None else _from_flat(x, n, spatial)
  result = kernel.replace(
      nngp=unflat(out["nngp"], 2), ntk=unflat(out["ntk"], 2),
      cov1=unflat(out["cov1"], n_cov), cov2=unflat(out["cov2"], n_cov),
      is_gaussian=True, is_input=False,
      shape1=kernel.shape1[:-1] + (n_chan_out,),
      shape2=kernel.shape2[:-1] + (n_chan_out,))
  # The output projection is a fresh affine layer: a new Gaussian source.
  return lineage.fresh(masking.map_masks(
      result, kernel, lambda mask, shape: mask_arrays.collapse_channels(mask)))


def _linear_scaling(values: dict[str, Any], g1: jax.Array, g2: jax.Array,
                    n_cov: int, out_var: float, b_var: float
                    ) -> dict[str, Any]:
  """`OV^2 G1 K_v G2^T + b^2`; the NTK adds twice the weighted NNGP."""
  weighted = _weigh(values["nngp"], g1, g2, 2)
  ntk = values["ntk"]
  return dict(
      nngp=out_var * weighted + b_var,
      ntk=None if ntk is None else out_var * (
          _weigh(ntk, g1, g2, 2) + 2 * weighted) + b_var,
      cov1=out_var * _weigh(values["cov1"], g1, g1, n_cov) + b_var,
      cov2=None if values["cov2"] is None else
      out_var * _weigh(values["cov2"], g2, g2, n_cov) + b_var)


def _sqrt_scaling_identity(embedded: dict[str, Any], values: dict[str, Any],
                           out_var: float, b_var: float) -> dict[str, Any]:
  """Square-root scaling, identity mechanism: Gaussian attention weights.

  With `E = K_e` (keys, queries) and `V = K_v` (values), `nngp' = out_var
  <E, V> E + b^2`. The NTK sums the gradients through the query, key, value
  and output weights (`4 <E, V> E`), through the queries' inputs
  (`<E, V> Theta_e`), and through the keys' and values' inputs
  (`(<Theta_e, V> + <E, Theta_v>) E`).
  """
  e, v = embedded["nngp"], values["nngp"]
  dot12 = _sum_of_products(e, v)
  out = dict(nngp=out_var * dot12 * e + b_var)
  for name in ("cov1", "cov2"):
    if embedded[name] is None:
      out[name] = None
    else:
      out[name] = out_var * _sum_of_products(
          embedded[name], values[name]) * embedded[name] + b_var
  theta_e, theta_v = embedded["ntk"], values["ntk"]
  if theta_e is None:
    out["ntk"] = None
  else:
    through_inputs = (_sum_of_products(theta_e, v) +
                      _sum_of_products(e, theta_v))
    out["ntk"] = out_var * (through_inputs * e +
                            dot12 * (theta_e + 4 * e)) + b_var
  return out
