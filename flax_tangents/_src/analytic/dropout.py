"""The kernel of dropout in training mode (`ftn.Dropout`, `nn.Dropout`).

A kept unit is scaled by `1 / keep`, so the dropout mask `m` has
`E[m] = 1` and `E[m^2] = 1 / keep`: only covariances between an activation
and itself (same input, same location, or locations sharing the mask) grow.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["dropout_kernel"]


def _coincidence_mask(cov: jax.Array, *, n_batch: int, same_batch: bool,
                      diagonal_spatial: bool, n_spatial: int,
                      shared_spatial: Sequence[int]) -> jax.Array:
  """Boolean mask, broadcastable to `cov`, of entries that see the same mask.

  Two activations see the same dropout mask value exactly when they belong to
  the same input and the same location (or locations that share the mask
  along `shared_spatial`, the broadcast spatial dimensions).
  """
  ndim = cov.ndim
  mask = jnp.ones((1,) * ndim, bool)

  def place(eye: jax.Array, axes: tuple[int, int]) -> jax.Array:
    shape = [1] * ndim
    shape[axes[0]], shape[axes[1]] = eye.shape
    return eye.reshape(shape)

  if n_batch == 2:
    if not same_batch:
      # Different inputs: independent masks everywhere.
      return jnp.zeros((1,) * ndim, bool)
    mask = mask & place(jnp.eye(cov.shape[0], cov.shape[1], dtype=bool),
                        (0, 1))
  if not diagonal_spatial:
    for i in range(n_spatial):
      if i in shared_spatial:
        continue
      a = n_batch + 2 * i
      mask = mask & place(jnp.eye(cov.shape[a], cov.shape[a + 1], dtype=bool),
                          (a, a + 1))
  return mask


def dropout_kernel(kernel: Kernel, keep: float, *, layer: str,
                   shared_spatial: Sequence[int] = ()) -> Kernel:
  """Kernel after dropout that keeps each unit with probability `keep`.

  Kept units are scaled by `1 / keep`, so the mask `m` has `E[m] = 1` and
  `E[m^2] = 1 / keep`. Covariances between an activation and itself (same
  input, same location) are therefore multiplied by `1 / keep`; all others,
  which see independent masks, are unchanged. In `nngp`/`ntk` the first
  applies only when `x1_is_x2` (the same inputs in one forward pass).

  Args:
    kernel: kernel of the layer's inputs.
    keep: probability of keeping a unit, in `(0, 1]`.
    layer: the layer's name, for error messages.
    shared_spatial: spatial dimensions (0-based, among spatial axes only)
      along which the mask is shared.

  Returns:
    The kernel of the outputs, marked non-Gaussian.

  Raises:
    ValueError: if `keep` is not in `(0, 1]` or the kernel is of raw inputs.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> k = ft.Kernel.from_inputs(jnp.ones((2, 3))).replace(is_input=False)
  >>> dropout_kernel(k, 0.5, layer='Dropout').nngp  # x1 is x2: diagonal
  Array([[2., 1.],
         [1., 2.]], dtype=float...)
  """
  if not 0.0 < keep <= 1.0:
    raise ValueError(
        f"{layer}: the keep probability must be in (0, 1], got {keep}; a "
        "dropout rate of 1 drops every unit and has no kernel.")
  if kernel.is_input:
    # As in Neural Tangents: the kernel of raw inputs is deterministic, so
    # dropping input features (finitely many) has no infinite-width limit.
    raise ValueError(
        f"{layer} cannot be applied to the raw inputs; put it after a "
        "`Dense`/`Conv` layer or a nonlinearity.")
  factor = 1.0 / keep
  n_spatial = covariance.spatial_ndim(kernel)

  def scale(cov: Optional[jax.Array], n_batch: int,
            same_batch: bool) -> Optional[jax.Array]:
    if cov is None:
      return None
    mask = _coincidence_mask(
        cov, n_batch=n_batch, same_batch=same_batch,
        diagonal_spatial=kernel.diagonal_spatial, n_spatial=n_spatial,
        shared_spatial=shared_spatial)
    return jnp.where(mask, cov * factor, cov)

  n_cov = covariance.batch_ndim(kernel, "cov1")
  return kernel.replace(
      nngp=scale(kernel.nngp, 2, kernel.x1_is_x2),
      ntk=scale(kernel.ntk, 2, kernel.x1_is_x2),
      cov1=scale(kernel.cov1, n_cov, True),
      cov2=scale(kernel.cov2, n_cov, True),
      is_gaussian=False)
