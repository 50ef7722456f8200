"""The covariances of raw inputs, from which `Kernel.from_inputs` starts.

Second moments averaged over channels, `x1 . x2 / C`, in the `Kernel`
layout (see `covariance`): this module knows nothing of `Kernel` itself, so
that `flax_tangents/_src/analytic/kernel.py` can build on it.
"""

from __future__ import annotations

import string
from typing import Any, Optional

import jax
import jax.numpy as jnp

__all__ = ["input_fields", "second_moment"]


def second_moment(x1: jax.Array, x2: jax.Array, *, same_batch: bool,
                  diagonal_spatial: bool) -> jax.Array:
  """Channel-averaged products `x1 . x2 / C` in the `Kernel` layout.

  Args:
    x1: `(N1, *spatial, C)`.
    x2: `(N2, *spatial, C)`.
    same_batch: pair each input only with itself (`x1` is `x2` and only the
      batch diagonal is wanted), giving one leading batch axis.
    diagonal_spatial: pair each location only with itself.

  Returns:
    The covariance array.
  """
  n_spatial = x1.ndim - 2
  letters = iter(string.ascii_letters)
  b1, b2, c = next(letters), next(letters), next(letters)
  spatial1 = [next(letters) for _ in range(n_spatial)]
  spatial2 = spatial1 if diagonal_spatial else [
      next(letters) for _ in range(n_spatial)]
  b2 = b1 if same_batch else b2
  out = [b1] if same_batch else [b1, b2]
  for s1, s2 in zip(spatial1, spatial2):
    out += [s1] if diagonal_spatial else [s1, s2]
  spec = (f"{b1}{''.join(spatial1)}{c},{b2}{''.join(spatial2)}{c}"
          f"->{''.join(out)}")
  # Dividing each input by a power of two near its largest magnitude is
  # exact, and keeps the products and their channel sum from overflowing
  # when the result itself is representable (float32 inputs of 1e19).
  scale1, scale2 = _power_of_two_scale(x1), _power_of_two_scale(x2)
  moment = jnp.einsum(spec, x1 / scale1, x2 / scale2,
                      precision=jax.lax.Precision.HIGHEST) / x1.shape[-1]
  return (moment * scale1) * scale2


def _power_of_two_scale(x: jax.Array) -> jax.Array:
  """A power of two within a factor 2 of `max |x|` (1 for zeros)."""
  largest = jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)
  exponent = jnp.where(largest > 0, jnp.ceil(jnp.log2(
      jnp.where(largest > 0, largest, 1))), 0)
  return jax.lax.stop_gradient(jnp.exp2(exponent).astype(x.dtype))


def input_fields(x1: jax.typing.ArrayLike,
                 x2: Optional[jax.typing.ArrayLike] = None, *,
                 diagonal_batch: bool = True,
                 diagonal_spatial: bool = False,
                 compute_ntk: bool = True) -> dict[str, Any]:
  """The keyword arguments of the `Kernel` constructor for raw inputs.

  The arguments, and the `ValueError`s, are those of `Kernel.from_inputs`,
  which documents them.

  >>> import jax.numpy as jnp
  >>> fields = input_fields(jnp.ones((3, 4)), jnp.ones((2, 4)))
  >>> fields["nngp"].shape, fields["is_input"]
  ((3, 2), True)
  """
  x1 = jnp.asarray(x1)
  x1_is_x2 = x2 is None
  x2 = x1 if x1_is_x2 else jnp.asarray(x2)
  if x1.ndim < 2:
    raise ValueError(
        f"Inputs must have a batch and a channel axis, got shape {x1.shape}; "
        "reshape a single input to `(1, ...)` or vectors to `(N, 1)`.")
  if x1.shape[1:] != x2.shape[1:]:
    raise ValueError(
        f"x1 and x2 may differ only in batch size, got shapes {x1.shape} and "
        f"{x2.shape}.")
  if not (jnp.issubdtype(x1.dtype, jnp.floating) and
          jnp.issubdtype(x2.dtype, jnp.floating)):
    dtype = jnp.result_type(float)
    x1, x2 = x1.astype(dtype), x2.astype(dtype)

  def moment(a, b, same_batch):
    return second_moment(a, b, same_batch=same_batch,
                         diagonal_spatial=diagonal_spatial)

  nngp = moment(x1, x2, False)
  cov1 = moment(x1, x1, diagonal_batch)
  cov2 = None if x1_is_x2 else moment(x2, x2, diagonal_batch)
  return dict(
      nngp=nngp, ntk=jnp.zeros_like(nngp) if compute_ntk else None,
      cov1=cov1, cov2=cov2, x1_is_x2=x1_is_x2, is_gaussian=False,
      is_reversed=False, is_input=True, diagonal_batch=diagonal_batch,
      diagonal_spatial=diagonal_spatial, shape1=tuple(x1.shape),
      shape2=tuple(x2.shape), batch_axis=0, channel_axis=-1)
