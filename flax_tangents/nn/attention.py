"""Global multi-head self-attention with NTK parameterization."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.analytic.attention import ATTENTION_MECHANISMS
from flax_tangents._src.analytic.attention import POSITIONAL_EMBEDDINGS
from flax_tangents._src.analytic.attention import attention_fn
from flax_tangents._src.analytic.attention import attention_kernel
from flax_tangents._src.analytic.enums import AttentionMechanism
from flax_tangents._src.analytic.enums import PositionalEmbedding
from flax_tangents._src.analytic.enums import canonicalize_fields
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents.kernel import Kernel

__all__ = ["GlobalSelfAttention"]


def _check(module: "GlobalSelfAttention") -> None:
  if module.attention_mechanism not in ATTENTION_MECHANISMS:
    raise ValueError(
        f"attention_mechanism={module.attention_mechanism!r} is not one of "
        f"{ATTENTION_MECHANISMS}.")
  if module.pos_emb_type not in POSITIONAL_EMBEDDINGS:
    raise ValueError(f"pos_emb_type={module.pos_emb_type!r} is not one of "
                     f"{POSITIONAL_EMBEDDINGS}.")
  if module.pos_emb_type != "NONE":
    raise NotImplementedError(
        f"GlobalSelfAttention with pos_emb_type={module.pos_emb_type!r}: "
        "positional embeddings are not implemented yet. Use "
        "pos_emb_type='NONE', and add positional information to the inputs "
        "(e.g. concatenate coordinates as channels) before the layer.")


def _attention_rule(module: "GlobalSelfAttention", kernel: Kernel,
                    **kwargs: Any) -> Kernel:
  del kwargs
  _check(module)
  return attention_kernel(
      kernel, n_chan_out=module.n_chan_out,
      QK_std=module.W_query_std * module.W_key_std,
      OV_std=module.W_out_std * module.W_value_std, b_std=module.b_std,
      linear_scaling=module.linear_scaling,
      mechanism=module.attention_mechanism,
      layer=f"GlobalSelfAttention(n_heads={module.n_heads}, "
      f"attention_mechanism={module.attention_mechanism!r})")


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

  The kernel is the limit of infinitely many heads and key, value and
  output channels (Hron et al., 2020, "Infinite attention"). It needs full
  location-location covariances of the inputs (discovered automatically).
  Supported: `linear_scaling=True` with every mechanism, and
  `linear_scaling=False` with `'IDENTITY'`; positional embeddings are not
  implemented.

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
    pos_emb_type: `'NONE'` (the only one implemented), `'SUM'`, `'CONCAT'`.
    pos_emb_p_norm: NT's argument, for positional embeddings (unused).
    pos_emb_decay_fn: NT's argument, for positional embeddings (unused).
    n_chan_pos_emb: NT's argument, for positional embeddings (unused).
    W_pos_emb_std: NT's argument, for positional embeddings (unused).
    val_pos_emb: NT's argument, for positional embeddings (unused).
    param_dtype: dtype of the parameters.

  >>> import jax, jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> layer = ftn.GlobalSelfAttention(8, 4, 4, n_heads=2)
  >>> x = jnp.ones((2, 5, 3))
  >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
  (2, 5, 8)
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
  def __call__(self, x: jax.Array) -> jax.Array:
    _check(self)
    if x.ndim < 3:
      raise ValueError(
          "GlobalSelfAttention needs inputs of shape (N, *spatial, C) with "
          f"at least one spatial (token) axis; got shape {x.shape}.")
    n, spatial, n_in = x.shape[0], x.shape[1:-1], x.shape[-1]
    tokens = x.reshape(n, math.prod(spatial), n_in)
    normal = nn.initializers.normal(1.0)
    qk_shape = (self.n_heads, n_in, self.n_chan_key)
    key_w = self.param("key", normal, qk_shape, self.param_dtype)
    query_w = key_w if self.linear_scaling else self.param(
        "query", normal, qk_shape, self.param_dtype)
    value_w = self.param("value", normal,
                         (self.n_heads, n_in, self.n_chan_val),
                         self.param_dtype)
    out_w = self.param("out", normal,
                       (self.n_heads * self.n_chan_val, self.n_chan_out),
                       self.param_dtype)

    keys = jnp.einsum("npc,hck->hnpk", tokens, key_w)
    queries = jnp.einsum("npc,hck->hnpk", tokens, query_w)
    values = jnp.einsum("npc,hcv->hnpv", tokens, value_w)
    # Linear scaling makes q.k / (C n_key) converge to QK_std times the
    # input covariance; square-root scaling keeps it Gaussian instead.
    power = 1.0 if self.linear_scaling else 0.5
    scale = self.W_query_std * self.W_key_std / (n_in *
                                                 self.n_chan_key**power)
    logits = scale * jnp.einsum("hnpk,hnqk->hnpq", queries, keys)
    weights = attention_fn(self.attention_mechanism)(logits)
    heads = jnp.einsum("hnpq,hnqv->nphv", weights, values)
    heads = heads.reshape(n, tokens.shape[1], -1)
    out_scale = self.W_out_std * self.W_value_std / math.sqrt(
        self.n_heads * self.n_chan_val * n_in)
    y = out_scale * (heads @ out_w)
    if self.b_std is not None:
      bias = self.param("bias", normal, (self.n_chan_out,), self.param_dtype)
      y = y + self.b_std * bias.reshape(1, 1, -1)
    return y.reshape((n,) + spatial + (self.n_chan_out,))
