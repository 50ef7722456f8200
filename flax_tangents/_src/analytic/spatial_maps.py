"""Spatial linear maps of covariances as small dense matrices.

Along one spatial dimension, every layer here is linear in its input: output
location `t` of a convolution with filter offset `j` reads input location
`p = S_j[t]` (a 0/1 *offset matrix* `S_j` of shape `(out, in)`, which also
encodes strides, zero or circular padding, and transposed convolutions).
Then, on the pair of axes `(S, S')` of a covariance:

- convolution (i.i.d. weights shared over locations): `T = mean_j S_j (x) S_j`;
- pooling with window matrix `P = sum_j S_j` (rows scaled by the
  normalization): `T = P (x) P`;
- resizing with interpolation matrix `R`: `T = R (x) R`;

and on the single axis of the diagonal layout, the diagonal of `T`.

For small images the matrices are tiny (64 x 64 for an 8 x 8 image) and one
matrix product per dimension is far faster on CPU than convolutions or fused
slices. The product contracts the first spatial axis and appends the output
at the end, so after one product per dimension the layout is restored with
no explicit transposes.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MAX_FULL_SIZE",
    "MAX_COMBINED_SIZE",
    "MAX_DIAGONAL_SIZE",
    "apply_maps",
    "circular_fold_matrix",
    "conv_maps",
    "offset_matrices",
    "pool_maps",
    "transpose_offset_matrices",
    "use_matrices",
]

# Largest input size per dimension for which dense maps beat slicing: a pair
# map is `size**2 x size**2`, applied at `2 size**2` flops per entry.
MAX_FULL_SIZE = 16
MAX_DIAGONAL_SIZE = 64
# Largest number of locations for which the diagonal layout uses one map for
# all dimensions together.
MAX_COMBINED_SIZE = 128


def use_matrices(sizes: Sequence[int], diagonal_spatial: bool) -> bool:
  """Whether dense maps are the fast choice for these input sizes."""
  limit = MAX_DIAGONAL_SIZE if diagonal_spatial else MAX_FULL_SIZE
  return max(sizes, default=0) <= limit


@functools.lru_cache(maxsize=None)
def offset_matrices(size: int, window: int, stride: int,
                    pad: tuple[int, int], circular: bool) -> np.ndarray:
  """`S[j, t, p] = 1` if offset `j` of output `t` reads input `p`.

  Output `t` covers padded positions `stride * t + j`, i.e. input
  `p = stride * t + j - pad[0]` (wrapped around when `circular`, dropped when
  it falls into zero padding).

  Returns:
    `(window, out, size)` float64 array.
  """
  out = (size + pad[0] + pad[1] - window) // stride + 1
  s = np.zeros((window, out, size))
  for j in range(window):
    for t in range(out):
      p = stride * t + j - pad[0]
      if circular:
        s[j, t, p % size] += 1
      elif 0 <= p < size:
        s[j, t, p] = 1
  return s


def circular_fold_matrix(valid_size: int, size: int) -> np.ndarray:
  """Folds a `'VALID'` transposed-convolution output onto a circle.

  Neural Tangents' `'CIRCULAR'` transposed convolution sums the `'VALID'`
  output (length `valid_size`) over positions congruent modulo `size`, after
  centring: output `t` collects positions `p` with
  `p = t + (valid_size - size) // 2 (mod size)`.

  Returns:
    A 0/1 matrix of shape `(size, valid_size)`.

  Raises:
    NotImplementedError: if `valid_size < size` (filters smaller than
      strides).
  """
  if valid_size < size:
    raise NotImplementedError(
        "CIRCULAR transposed convolution with filters smaller than strides "
        "is not supported.")
  offset = (valid_size - size) // 2
  t = np.arange(size)[:, None]
  p = np.arange(valid_size)[None, :]
  return ((p - t - offset) % size == 0).astype(np.float64)


@functools.lru_cache(maxsize=None)
def transpose_offset_matrices(size: int, window: int, stride: int,
                              padding: str,
                              fold_size: Optional[int] = None
                              ) -> np.ndarray:
  """Offset matrices of `lax.conv_transpose` along one dimension.

  Computed by running `lax.conv_transpose` on one-hot inputs and filters, so
  they follow its padding conventions exactly. `fold_size` additionally
  folds the output periodically onto that size (see
  `conv.circular_fold_matrix`).

  Returns:
    `(window, out, size)` float64 array.
  """
  with jax.ensure_compile_time_eval():
    inputs = jnp.eye(size, dtype=jnp.float32)[:, :, None]  # (N=p, W, C=1)
    filters = jnp.eye(window, dtype=jnp.float32)[:, :, None, None]
    rows = [jax.lax.conv_transpose(inputs, filters[j], (stride,), padding,
                                   dimension_numbers=("NWC", "WIO", "NWC"))
            for j in range(window)]
    s = np.stack([np.asarray(r)[:, :, 0].T for r in rows]).astype(np.float64)
  if fold_size is not None:
    f = circular_fold_matrix(s.shape[1], fold_size)
    s = np.einsum("tb,jbp->jtp", f, s)
  return s


def conv_maps(offsets: np.ndarray, diagonal_spatial: bool) -> np.ndarray:
  """The covariance map of a shared-weight convolution from its offsets."""
  window, out, size = offsets.shape
  if diagonal_spatial:
    return np.mean(offsets * offsets, axis=0)
  pair = np.einsum("jtp,jsq->tspq", offsets, offsets) / window
  return pair.reshape(out * out, size * size)


def pool_maps(window_matrix: np.ndarray, diagonal_spatial: bool) -> np.ndarray:
  """The covariance map of `y = P x` along one dimension.

  In the diagonal layout locations are taken to be uncorrelated (Neural
  Tangents' convention), so variances map through `P * P`.
  """
  if diagonal_spatial:
    return window_matrix * window_matrix
  return np.kron(window_matrix, window_matrix)


def apply_maps(cov: jax.Array, n_batch: int, maps: Sequence[np.ndarray],
               diagonal_spatial: bool) -> jax.Array:
  """Applies one map per spatial dimension to a covariance array.

  Args:
    cov: `(..batch.., S1, S1', S2, S2', ...)` or `(..batch.., S1, S2, ...)`.
    n_batch: number of leading batch axes.
    maps: per dimension, `(out**2, in**2)` (full) or `(out, in)` (diagonal).
    diagonal_spatial: layout of `cov`.

  Returns:
    The mapped covariance, in the same layout.
  """
  out_shape = []
  for m in maps:
    if diagonal_spatial:
      out_shape.append(m.shape[0])
    else:
      side = int(round(np.sqrt(m.shape[0])))
      out_shape += [side, side]
  if (diagonal_spatial and len(maps) > 1 and
      np.prod([m.shape[1] for m in maps]) <= MAX_COMBINED_SIZE):
    # One product with the Kronecker map of all dimensions: a longer inner
    # dimension makes a more efficient matrix product (2x on CPU for 8x8).
    maps = [functools.reduce(np.kron, maps)]
  batch_shape = cov.shape[:n_batch]
  x = cov.reshape(batch_shape + tuple(m.shape[1] for m in maps))
  for m in maps:
    # Contract the first spatial axis; the output axis goes last. After one
    # step per dimension the spatial order is back to the original.
    x = jax.lax.dot_general(
        x, jnp.asarray(m, x.dtype), (((n_batch,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST)
  return x.reshape(batch_shape + tuple(out_shape))
