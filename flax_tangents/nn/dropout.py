"""Dropout, and its infinite-width kernel in training mode."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from flax_tangents._src.analytic.dropout import dropout_kernel
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import supports_masking

__all__ = ["Dropout", "dropout_kernel"]


def dropout_rule(module: nn.Dropout, kernel: Kernel, *,
                 deterministic: Optional[bool] = None,
                 **kwargs: Any) -> Kernel:
  """Kernel rule for `ftn.Dropout` and stock `flax.linen.Dropout`.

  `deterministic` comes from the layer's call or, failing that, from the
  kernel function's call (offered to every layer, as in NT).
  """
  del kwargs  # `rng`: the finite network's only.
  deterministic = nn.merge_param("deterministic", module.deterministic,
                                 deterministic)
  layer = f"Dropout(rate={module.rate})"
  if deterministic or module.rate == 0.0:
    return kernel
  ndim = len(kernel.shape1)
  shared = []
  for dim in module.broadcast_dims:
    d = dim % ndim
    if d in (0, ndim - 1):
      raise NotImplementedError(
          f"{layer} with broadcast_dims={tuple(module.broadcast_dims)} shares "
          "its mask across the batch or channel axis; its infinite-width "
          "kernel is not implemented. Broadcast only over spatial axes.")
    shared.append(d - 1)
  return dropout_kernel(kernel, 1.0 - module.rate, layer=layer,
                        shared_spatial=tuple(shared))


@kernel_rule(dropout_rule)
class Dropout(nn.Dropout):
  """Dropout, Flax-style (`rate` DROPS units), with its infinite-width kernel.

  WARNING for Neural Tangents code: NT's `stax.Dropout(rate)` takes the
  probability of KEEPING a unit; here, as in `flax.linen.Dropout`, `rate` is
  the probability of DROPPING one. NT's `Dropout(0.9)` is `Dropout(0.1)`
  here, or, saying what is meant, `Dropout(keep_rate=0.9)`. NT's
  `mode='train'` / `'test'` is accepted too (`deterministic=False` /
  `True`).

  Kept units are scaled by `1 / (1 - rate)`. In training mode
  (`deterministic=False`, as an attribute or a call argument) the forward
  pass needs a `'dropout'` rng; the kernel multiplies the covariance of every
  activation with itself by `1 / (1 - rate)` and leaves the others unchanged
  (the `nngp` diagonal only when `x2 is None`). With `deterministic=True`
  both are the identity.

  Attributes:
    rate: probability of dropping a unit, in `[0, 1)`; give this or
      `keep_rate`.
    broadcast_dims: axes along which the mask is shared (spatial axes only,
      for the kernel).
    deterministic: `True` for evaluation (identity), `False` for training;
      `None` means it must be given when calling (or by `mode`).
    rng_collection: the rng stream of the masks.
    keep_rate: probability of keeping a unit, in `(0, 1]` (NT's `rate`);
      sets `rate = 1 - keep_rate`.
    mode: NT's `'train'` (`deterministic=False`) or `'test'`
      (`deterministic=True`), any case.

  Raises:
    TypeError: if neither `rate` nor `keep_rate` is given.
    ValueError: if both are given and disagree, `keep_rate` is out of range,
      or `mode` is unknown or contradicts `deterministic`.

  >>> import jax, jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> layer = ftn.Dropout(rate=0.5)
  >>> y = layer.apply({}, jnp.ones((2, 4)), deterministic=False,
  ...                 rngs={'dropout': jax.random.key(0)})
  >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [0.0], [2.0])
  True
  >>> ftn.Dropout(keep_rate=0.9, mode='train').rate   # NT's Dropout(0.9)
  0.09999999999999998
  """

  rate: Optional[float] = None
  keep_rate: Optional[float] = None
  mode: Optional[str] = None

  def __post_init__(self):
    if self.keep_rate is not None:
      if not 0.0 < self.keep_rate <= 1.0:
        raise ValueError(f"Dropout: keep_rate={self.keep_rate} must be in "
                         "(0, 1].")
      if self.rate is not None and self.rate != 1.0 - self.keep_rate:
        raise ValueError(
            f"Dropout: rate={self.rate} (drop probability) and keep_rate="
            f"{self.keep_rate} disagree; give one of them.")
      object.__setattr__(self, "rate", 1.0 - self.keep_rate)
    elif self.rate is None:
      raise TypeError(
          "Dropout needs `rate`, the probability of DROPPING a unit (Flax), "
          "or `keep_rate`, the probability of keeping one (NT's `rate`).")
    if self.mode is not None:
      mode = str(self.mode).lower()
      if mode not in ("train", "test"):
        raise ValueError(f"Dropout: mode={self.mode!r} is not 'train' or "
                         "'test'.")
      deterministic = mode == "test"
      if self.deterministic not in (None, deterministic):
        raise ValueError(f"Dropout: mode={self.mode!r} contradicts "
                         f"deterministic={self.deterministic}.")
      object.__setattr__(self, "deterministic", deterministic)
    super().__post_init__()

  @supports_masking()
  def __call__(self, inputs: jax.Array, deterministic: Optional[bool] = None,
               rng: Optional[jax.Array] = None) -> jax.Array:
    # Only adds `MaskedArray` inputs (padding stays zero, masks unchanged).
    return super().__call__(inputs, deterministic=deterministic, rng=rng)
