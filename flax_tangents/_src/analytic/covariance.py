"""Covariance bookkeeping shared by every kernel rule.

Activations have shape `(N, S_1, ..., S_k, C)`; channels `C` are taken to
infinity, so a `Kernel` stores covariances averaged over channels:

- `nngp`/`ntk`: `(N1, N2, S_1, S_1', ..., S_k, S_k')`, or
  `(N1, N2, S_1, ..., S_k)` when `diagonal_spatial`;
- `cov1`: as `nngp` with `N1` in place of `N1, N2` when `diagonal_batch`.

Everything that knows this layout lives here, so rules stay short.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import requirements
from flax_tangents._src.analytic.kernel import Kernel

__all__ = [
    "batch_ndim",
    "check_gaussian",
    "diagonal_variances",
    "map_covariances",
    "paired_variances",
    "require_batch_covariances",
    "require_spatial_covariances",
    "spatial_diagonal",
    "spatial_ndim",
]


def spatial_ndim(kernel: Kernel) -> int:
  """Number of spatial dimensions of the activations the kernel describes."""
  return len(kernel.shape1) - 2


def batch_ndim(kernel: Kernel, field: str) -> int:
  """Number of leading batch axes of a covariance field of `kernel`."""
  if field in ("nngp", "ntk"):
    return 2
  return 1 if kernel.diagonal_batch else 2


def map_covariances(kernel: Kernel,
                    fn: Callable[[jax.Array, int], jax.Array],
                    ntk_fn: Optional[Callable[[jax.Array, int],
                                              jax.Array]] = None) -> Kernel:
  """Applies a linear map over spatial axes to every covariance.

  Args:
    kernel: the input kernel.
    fn: `fn(array, n_batch_axes) -> array`, applied to `nngp`, `cov1`, `cov2`.
    ntk_fn: applied to `ntk`; defaults to `fn`.

  Returns:
    The kernel with mapped arrays (static fields unchanged).
  """
  ntk_fn = fn if ntk_fn is None else ntk_fn

  def apply(f, x, name):
    return None if x is None else f(x, batch_ndim(kernel, name))

  return kernel.replace(
      nngp=apply(fn, kernel.nngp, "nngp"), ntk=apply(ntk_fn, kernel.ntk, "ntk"),
      cov1=apply(fn, kernel.cov1, "cov1"), cov2=apply(fn, kernel.cov2, "cov2"))


def spatial_diagonal(cov: jax.Array, n_batch: int, n_spatial: int,
                      diagonal_spatial: bool) -> jax.Array:
  """Location-location diagonal `(..batch.., S_1, ..., S_k)` of `cov`."""
  if diagonal_spatial:
    return cov
  for i in range(n_spatial):
    # Axes n_batch + i and n_batch + i + 1 are the i-th pair (after earlier
    # pairs were collapsed to single axes, at the end of the array).
    cov = jnp.moveaxis(
        jnp.diagonal(cov, axis1=n_batch + i, axis2=n_batch + i + 1), -1,
        n_batch + i)
  return cov


def diagonal_variances(kernel: Kernel) -> tuple[jax.Array, jax.Array]:
  """Per-input, per-location variances `(N, S_1, ..., S_k)` of both batches.

  Returns:
    `(var1, var2)`; `var2` is `var1` when `x1_is_x2`.
  """
  n_spatial = spatial_ndim(kernel)

  def variances(cov):
    if not kernel.diagonal_batch:
      cov = jnp.moveaxis(jnp.diagonal(cov, axis1=0, axis2=1), -1, 0)
    return spatial_diagonal(cov, 1, n_spatial, kernel.diagonal_spatial)

  var1 = variances(kernel.cov1)
  var2 = var1 if kernel.cov2 is None else variances(kernel.cov2)
  return var1, var2


def paired_variances(var_a: jax.Array, var_b: jax.Array, *, batch_pair: bool,
                     diagonal_spatial: bool) -> tuple[jax.Array, jax.Array]:
  """Broadcasts per-location variances against a covariance array.

  Args:
    var_a: `(Na, S_1, ..., S_k)`, variances of the first operand.
    var_b: `(Nb, S_1, ..., S_k)`, variances of the second operand.
    batch_pair: the covariance has two batch axes `(Na, Nb)`; otherwise one
      shared batch axis (then `Na == Nb`).
    diagonal_spatial: the covariance has one axis per spatial dimension.

  Returns:
    `(va, vb)`, broadcastable to the covariance of the two operands.
  """
  n_spatial = var_a.ndim - 1
  shape_a = [var_a.shape[0]] + ([1] if batch_pair else [])
  shape_b = [1, var_b.shape[0]] if batch_pair else [var_b.shape[0]]
  for i in range(n_spatial):
    size = var_a.shape[1 + i]
    if diagonal_spatial:
      shape_a.append(size)
      shape_b.append(size)
    else:
      shape_a += [size, 1]
      shape_b += [1, size]
  return var_a.reshape(shape_a), var_b.reshape(shape_b)


def require_spatial_covariances(kernel: Kernel, layer: str) -> None:
  """Declares that a rule needs full location-location covariances.

  Called by rules that mix locations (pooling, attention). During the
  requirement pass it records the need; afterwards it checks that the kernel
  indeed carries full covariances.

  Raises:
    ValueError: if a kernel with only spatial diagonals reaches such a layer
      (possible only when a user passes such a `Kernel` in directly).
  """
  if spatial_ndim(kernel) <= 0:
    return
  requirements.record_full_spatial(layer)
  if kernel.diagonal_spatial:
    raise ValueError(
        f"{layer} needs full spatial covariances, but the kernel passed in "
        "has `diagonal_spatial=True`. Build the input kernel with "
        "`diagonal_spatial=False`, or let `ft.kernel_fn` build it from "
        "arrays.")


def require_batch_covariances(kernel: Kernel, layer: str) -> None:
  """Declares that a rule needs full batch-batch covariances in `cov1`/`cov2`.

  Raises:
    ValueError: if the kernel passed in keeps only batch diagonals.
  """
  requirements.record_full_batch(layer)
  if kernel.diagonal_batch:
    raise ValueError(
        f"{layer} needs full batch covariances, but the kernel passed in has "
        "`diagonal_batch=True`.")


def check_gaussian(kernel: Kernel, layer: str) -> None:
  """Raises unless the layer's input is Gaussian (needed by nonlinearities).

  Raises:
    ValueError: naming the layer and the fix.
  """
  if not kernel.is_gaussian:
    if kernel.is_input:
      where = "the raw inputs"
    elif kernel._mixed:  # pylint: disable=protected-access
      where = ("units of different distributions (the output of Flatten or "
               "FanInConcat, then of a layer that mixes them, e.g. pooling "
               "or LayerNorm)")
    else:
      where = ("the output of a nonlinearity (or of a layer fed by one), "
               "or a sum with the raw inputs")
    raise ValueError(
        f"{layer} is applied to {where}, which is not Gaussian or not "
        "centred (zero-mean); its "
        "infinite-width kernel has no closed form there. Put an affine "
        "layer (`Dense` or `Conv`) in front of it.")
