"""Global multi-head self-attention with NTK parameterization."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import positional
from flax_tangents._src.analytic.attention import ATTENTION_MECHANISMS
from flax_tangents._src.analytic.attention import attention_fn
from flax_tangents._src.analytic.attention import attention_kernel
from flax_tangents._src.analytic.attention import flat_key_mask
from flax_tangents._src.analytic.attention import mask_keys
from flax_tangents._src.analytic.enums import AttentionMechanism
from flax_tangents._src.analytic.enums import PositionalEmbedding
from flax_tangents._src.analytic.enums import canonicalize_fields
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import MaskedArray
from flax_tangents._src.masked_array import MaybeMasked
from flax_tangents._src.masked_array import split

__all__ = ["GlobalSelfAttention"]


def _check(module: "GlobalSelfAttention") -> None:
  if module.attention_mechanism not in ATTENTION_MECHANISMS:
    raise ValueError(
        f"attention_mechanism={module.attention_mechanism!r} is not one of "
        f"{ATTENTION_MECHANISMS}.")
  positional.positional_mix(module.pos_emb_type, 1, None, 1.0, _name(module))


def _name(module: "GlobalSelfAttention") -> str:
  return (f"GlobalSelfAttention(n_heads={module.n_heads}, "
          f"attention_mechanism='{module.attention_mechanism}')")


def _attention_rule(module: "GlobalSelfAttention", kernel: Kernel,
                    **kwargs: Any) -> Kernel:
  del kwargs
  _check(module)
  return attention_kernel(
      kernel, n_chan_out=module.n_chan_out,
      QK_std=module.W_query_std * module.W_key_std,
      OV_std=module.W_out_std * module.W_value_std, b_std=module.b_std,
      linear_scaling=module.linear_scaling,
      mechanism=module.attention_mechanism, layer=_name(module),
      pos_emb_type=module.pos_emb_type, pos_emb_p_norm=module.pos_emb_p_norm,
      pos_emb_decay_fn=module.pos_emb_decay_fn,
      n_chan_pos_emb=module.n_chan_pos_emb,
      W_pos_emb_std=module.W_pos_emb_std, val_pos_emb=module.val_pos_emb)


@kernel_rule(_attention_rule)
class GlobalSelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention over all locations.

  Inputs `(N, *spatial, C)`: every location (token) attends to every other
  location of the same input. For each head `h`, with N(0, 1) weight
  matrices `K_h, Q_h` (`C x n_chan_key`) and `V_h` (`C x n_chan_val`):

  `head_h = A(QK_std / (C * n_chan_key**p) * (x Q_h)(x K_h)^T) (x V_h)`,

  where `A` is the attention mechanism (softmax over keys, identity, abs or
  relu), `QK_std = W_query_std * W_key_std` and `p = 1` with
  `linear_scaling=True` (then `Q_h = K_h`: tied weights, as Neural Tangents,
  which makes the limit tractable) or `p = 1/2` otherwise. The heads are
  concatenated and mixed: `out = OV_std / sqrt(n_heads n_chan_val C)
  concat(heads) W_out + b_std b`, with `OV_std = W_out_std * W_value_std`.

  Positional embeddings (`pos_emb_type='SUM'` or `'CONCAT'`) are a
  trainable parameter `pos_emb` of shape `(*spatial, C_e)`, N(0, 1), used as
  `W_pos_emb_std * L pos_emb` with `L L^T = R` over the flattened locations:
  `R = pos_emb_decay_fn(d)` with `d = sum_a |i_a - j_a|^pos_emb_p_norm` the
  distances between locations, or the identity without a decay function.
  They are added to the inputs (`'SUM'`, `C_e = C`) or appended as extra
  channels (`'CONCAT'`, `C_e = n_chan_pos_emb`, default `C`) for the keys
  and queries, and for the values too when `val_pos_emb`. The fan-in `C`
  above then counts the embedding channels. The layer is thus tied to the
  spatial shape seen at `init`.

  Inputs may be masked arrays (`ft.MaskedArray`: padding, e.g. of
  variable-length sequences): padded keys get no attention weight, padded
  locations no embedding, and a location of the output is padding iff all
  channels of the input location were.

  The kernel is the limit of infinitely many heads and key, value and
  output channels (Hron et al., 2020, "Infinite attention"). It needs full
  location-location covariances of the inputs (discovered automatically).
  Supported: `linear_scaling=True` with every mechanism, and
  `linear_scaling=False` with `'IDENTITY'`, each with every kind of
  positional embedding.

  Attributes:
    n_chan_out: output channels.
    n_chan_key: key / query channels per head.
    n_chan_val: value channels per head.
    n_heads: number of heads.
    linear_scaling: scale products by `1 / n_chan_key` and tie queries to
      keys (`True`), or scale by `1 / sqrt(n_chan_key)` with independent
      queries (`False`).
    W_key_std: key weight scale (enters through `W_key_std * W_query_std`).
    W_value_std: value weight scale (through `W_value_std * W_out_std`).
    W_query_std: query weight scale.
    W_out_std: output weight scale.
    b_std: bias scale; `None` means no bias.
    attention_mechanism: an `ftn.AttentionMechanism`, or its name in any
      case: `'SOFTMAX'`, `'IDENTITY'`, `'ABS'` or `'RELU'`.
    pos_emb_type: an `ftn.PositionalEmbedding`, or its name in any case:
      `'NONE'`, `'SUM'` or `'CONCAT'`.
    pos_emb_p_norm: the power `p` of the distances between locations.
    pos_emb_decay_fn: the covariance of embeddings as a function of the
      distance (applied to a NumPy array of distances; must give a positive
      semi-definite matrix, e.g. `lambda d: jnp.exp(-d)`); `None` for
      independent (one-hot) embeddings per location.
    n_chan_pos_emb: embedding channels for `'CONCAT'` (`None`: as many as
      the inputs); must be `None` or `C` for `'SUM'`.
    W_pos_emb_std: embedding scale.
    val_pos_emb: whether the values see the embeddings too.
    param_dtype: dtype of the parameters.

  >>> import jax, jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> layer = ftn.GlobalSelfAttention(8, 4, 4, n_heads=2)
  >>> x = jnp.ones((2, 5, 3))
  >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
  (2, 5, 8)
  >>> layer = ftn.GlobalSelfAttention(
  ...     8, 4, 4, n_heads=2, pos_emb_type='CONCAT', n_chan_pos_emb=2,
  ...     pos_emb_decay_fn=lambda d: jnp.exp(-d))
  >>> jax.tree.map(jnp.shape, layer.init(jax.random.key(0), x))['params']
  {'key': (2, 5, 4), 'out': (8, 8), 'pos_emb': (5, 2), 'value': (2, 3, 4)}
  """

  n_chan_out: int
  n_chan_key: int
  n_chan_val: int
  n_heads: int
  linear_scaling: bool = True
  W_key_std: float = 1.0
  W_value_std: float = 1.0
  W_query_std: float = 1.0
  W_out_std: float = 1.0
  b_std: Optional[float] = None
  attention_mechanism: str = "SOFTMAX"
  pos_emb_type: str = "NONE"
  pos_emb_p_norm: float = 2
  pos_emb_decay_fn: Optional[Callable[[float], float]] = None
  n_chan_pos_emb: Optional[int] = None
  W_pos_emb_std: float = 1.0
  val_pos_emb: bool = False
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    # Strings in any case (or NT's enum members) become enum members.
    canonicalize_fields(self, attention_mechanism=AttentionMechanism,
                        pos_emb_type=PositionalEmbedding)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: MaybeMasked) -> MaybeMasked:
    _check(self)
    value, mask, was_masked = split(x)
    if value.ndim < 3:
      raise ValueError(
          "GlobalSelfAttention needs inputs of shape (N, *spatial, C) with "
          f"at least one spatial (token) axis; got shape {value.shape}.")
    n, spatial, n_in = value.shape[0], value.shape[1:-1], value.shape[-1]
    tokens = value.reshape(n, math.prod(spatial), n_in)
    key_inputs, value_inputs = self._embed(tokens, spatial, mask)
    normal = nn.initializers.normal(1.0)
    qk_shape = (self.n_heads, key_inputs.shape[-1], self.n_chan_key)
    key_w = self.param("key", normal, qk_shape, self.param_dtype)
    query_w = key_w if self.linear_scaling else self.param(
        "query", normal, qk_shape, self.param_dtype)
    value_w = self.param(
        "value", normal, (self.n_heads, value_inputs.shape[-1],
                          self.n_chan_val), self.param_dtype)
    out_w = self.param("out", normal,
                       (self.n_heads * self.n_chan_val, self.n_chan_out),
                       self.param_dtype)

    keys = jnp.einsum("npc,hck->hnpk", key_inputs, key_w)
    queries = jnp.einsum("npc,hck->hnpk", key_inputs, query_w)
    values = jnp.einsum("npc,hcv->hnpv", value_inputs, value_w)
    # Linear scaling makes q.k / (C n_key) converge to QK_std times the
    # input covariance; square-root scaling keeps it Gaussian instead.
    power = 1.0 if self.linear_scaling else 0.5
    scale = self.W_query_std * self.W_key_std / (
        key_inputs.shape[-1] * self.n_chan_key**power)
    logits = scale * jnp.einsum("hnpk,hnqk->hnpq", queries, keys)
    key_mask = flat_key_mask(mask)
    logits = mask_keys(logits, None if key_mask is None else key_mask[None],
                       self.attention_mechanism)
    weights = attention_fn(self.attention_mechanism)(logits)
    heads = jnp.einsum("hnpq,hnqv->nphv", weights, values)
    heads = heads.reshape(n, tokens.shape[1], -1)
    out_scale = self.W_out_std * self.W_value_std / math.sqrt(
        self.n_heads * self.n_chan_val * value_inputs.shape[-1])
    y = out_scale * (heads @ out_w)
    if self.b_std is not None:
      bias = self.param("bias", normal, (self.n_chan_out,), self.param_dtype)
      y = y + self.b_std * bias.reshape(1, 1, -1)
    y = y.reshape((n,) + spatial + (self.n_chan_out,))
    if not was_masked:
      return y
    return MaskedArray(y, mask_arrays.collapse_channels(mask))

  def _embed(self, tokens: jax.Array, spatial: tuple[int, ...],
             mask: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Inputs of keys/queries and of values: tokens with embeddings."""
    mix = positional.positional_mix(self.pos_emb_type, tokens.shape[-1],
                                    self.n_chan_pos_emb, self.W_pos_emb_std,
                                    _name(self))
    if mix.kind == "NONE":
      return tokens, tokens
    # N(0, 1) per location and channel, correlated across locations by
    # L L^T = R (one-hot embeddings without a decay function).
    emb = self.param("pos_emb", nn.initializers.normal(1.0),
                     tuple(spatial) + (mix.n_chan,), self.param_dtype)
    emb = emb.reshape(-1, mix.n_chan).astype(tokens.dtype)
    if self.pos_emb_decay_fn is not None:
      factor = positional.embedding_factor(spatial, self.pos_emb_p_norm,
                                           self.pos_emb_decay_fn)
      emb = jnp.asarray(factor, tokens.dtype) @ emb
    emb = jnp.broadcast_to(self.W_pos_emb_std * emb,
                           tokens.shape[:1] + emb.shape)
    if mask is not None:
      # Padded locations get no embedding either (as Neural Tangents).
      locations = mask_arrays.collapse_channels(mask).reshape(
          tokens.shape[0], -1, 1)
      emb = mask_arrays.zero_masked(emb, locations)
    if mix.kind == "SUM":
      embedded = tokens + emb
    else:
      embedded = jnp.concatenate([tokens, emb], axis=-1)
    return embedded, embedded if self.val_pos_emb else tokens
