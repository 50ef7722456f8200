"""Positional embeddings of global self-attention (NT's `pos_emb_*` arguments).

A `GlobalSelfAttention` layer may add (`'SUM'`) or append (`'CONCAT'`)
trainable embeddings `e = W_pos_emb_std * L z` to its inputs, with `z`
i.i.d. N(0, 1) per location and channel and `L L^T = R` over the `P`
locations. `R` is the identity (one-hot embeddings) without a decay function;
with `pos_emb_decay_fn` it is `decay(sum_a |i_a - j_a|^p)` over the spatial
axes `a` (`p = pos_emb_p_norm`, no p-th root, as Neural Tangents). The
embeddings are shared by all inputs, so in the infinite-width limit they add
`R` to every covariance of the inputs, nngp included, weighted as below.
The finite layer and the kernel rule both take `R` from here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import numpy as np

from flax_tangents._src.analytic.enums import PositionalEmbedding

__all__ = ["POSITIONAL_EMBEDDINGS", "PositionalMix", "embedding_factor",
           "location_covariance", "positional_mix"]

POSITIONAL_EMBEDDINGS = ("NONE", "SUM", "CONCAT")


def _canonical(pos_emb_type: Any) -> str:
  return PositionalEmbedding.parse(pos_emb_type, "pos_emb_type").value


@functools.lru_cache(maxsize=64)
def _covariance(spatial: tuple[int, ...], p_norm: float,
                decay_fn: Optional[Callable[[Any], Any]]) -> np.ndarray:
  size = math.prod(spatial)
  if decay_fn is None:
    return np.eye(size)
  coords = np.stack(np.meshgrid(*[np.arange(s) for s in spatial],
                                indexing="ij"), -1).reshape(size, -1)
  distance = np.sum(
      np.abs(coords[:, None, :] - coords[None, :, :]).astype(np.float64)
      ** p_norm, axis=-1)
  with jax.ensure_compile_time_eval():
    cov = np.asarray(decay_fn(distance), np.float64)
  if cov.shape != (size, size) or not np.all(np.isfinite(cov)):
    raise ValueError(
        f"pos_emb_decay_fn must map the ({size}, {size}) distances between "
        "locations to finite numbers of the same shape; got shape "
        f"{cov.shape}.")
  eigenvalues = np.linalg.eigvalsh((cov + cov.T) / 2)
  if (np.abs(cov - cov.T).max() > 1e-12 * max(1.0, np.abs(cov).max())
      or eigenvalues[0] < -1e-8 * max(1.0, eigenvalues[-1])):
    raise ValueError(
        f"pos_emb_decay_fn={decay_fn!r} with pos_emb_p_norm={p_norm} gives "
        f"a location covariance that is not positive semi-definite on "
        f"spatial shape {spatial} (smallest eigenvalue {eigenvalues[0]:.3g})"
        ", so no positional embeddings have it. Use a positive-definite "
        "decay, e.g. `lambda d: jnp.exp(-d)` (p_norm 1 or 2) or "
        "`lambda d: 1 / (1 + d)` with p_norm=2.")
  cov.setflags(write=False)
  return cov


def location_covariance(spatial: tuple[int, ...], p_norm: float,
                        decay_fn: Optional[Callable[[Any], Any]]
                        ) -> np.ndarray:
  """`R`: the `(P, P)` covariance of the embeddings over flattened locations.

  Locations are flattened in row-major order (as `reshape`).

  Raises:
    ValueError: if `decay_fn` gives a non-finite or non-positive
      semi-definite matrix.
  """
  return _covariance(tuple(int(s) for s in spatial), float(p_norm), decay_fn)


@functools.lru_cache(maxsize=64)
def _factor(spatial: tuple[int, ...], p_norm: float,
            decay_fn: Optional[Callable[[Any], Any]]) -> np.ndarray:
  cov = _covariance(spatial, p_norm, decay_fn)
  eigenvalues, vectors = np.linalg.eigh(cov)
  factor = vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))
  factor.setflags(write=False)
  return factor


def embedding_factor(spatial: tuple[int, ...], p_norm: float,
                     decay_fn: Optional[Callable[[Any], Any]]) -> np.ndarray:
  """`L` with `L L^T = R`, mapping i.i.d. embeddings to correlated ones."""
  return _factor(tuple(int(s) for s in spatial), float(p_norm), decay_fn)


@dataclasses.dataclass(frozen=True)
class PositionalMix:
  """How embeddings enter the keys/queries (and values) of attention.

  The covariance of the (embedded) inputs is `input_weight * K +
  embedding_weight * R`.

  Attributes:
    kind: `'NONE'`, `'SUM'` or `'CONCAT'`.
    n_chan: channels of the embeddings.
    input_weight: weight of the inputs' covariance `K`.
    embedding_weight: weight of `R`.
  """
  kind: str
  n_chan: int
  input_weight: float
  embedding_weight: float


def positional_mix(pos_emb_type: Any, n_chan_in: int,
                   n_chan_pos_emb: Optional[int], W_pos_emb_std: float,
                   layer: str) -> PositionalMix:
  """The weights of inputs and embeddings for `n_chan_in` input channels.

  `'SUM'`: `1` and `W_pos_emb_std^2`. `'CONCAT'`: the fractions of
  channels, `C / (C + C_e)` and `W_pos_emb_std^2 C_e / (C + C_e)`, as every
  weight's variance is divided by its fan-in.

  Raises:
    ValueError: for an unknown type, or `'SUM'` with `n_chan_pos_emb`
      different from the input channels.
  """
  kind = _canonical(pos_emb_type)
  n_emb = n_chan_in if n_chan_pos_emb is None else int(n_chan_pos_emb)
  if kind == "NONE":
    return PositionalMix(kind, 0, 1.0, 0.0)
  if kind == "SUM":
    if n_emb != n_chan_in:
      raise ValueError(
          f"{layer}: pos_emb_type='SUM' adds embeddings to the inputs, so "
          f"n_chan_pos_emb={n_chan_pos_emb} must be None or the number of "
          f"input channels, {n_chan_in}.")
    return PositionalMix(kind, n_emb, 1.0, W_pos_emb_std**2)
  if n_emb < 1:
    raise ValueError(f"{layer}: n_chan_pos_emb must be positive, got "
                     f"{n_chan_pos_emb}.")
  total = n_chan_in + n_emb
  return PositionalMix(kind, n_emb, n_chan_in / total,
                       W_pos_emb_std**2 * n_emb / total)
