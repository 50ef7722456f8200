"""The kernel of layer normalization (`ftn.LayerNorm`, `nn.LayerNorm`).

With infinitely many channels, normalizing a centred Gaussian layer divides
its covariances by the square roots of its variances (averaged over the
normalized spatial and batch axes).
"""

from __future__ import annotations

import jax.numpy as jnp

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic import mixtures
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.typing import Axes

__all__ = ["canonical_axes", "layer_norm_kernel"]


def canonical_axes(axis: Axes, ndim: int) -> tuple[int, ...]:
  """`axis` as sorted, non-negative axes of an array of `ndim` axes.

  >>> canonical_axes(-1, 3), canonical_axes((2, 0, -1), 3)
  ((2,), (0, 2))
  """
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted({a % ndim for a in axes}))


def layer_norm_kernel(kernel: Kernel, axis: Axes, eps: float,
                      layer: str) -> Kernel:
  """Kernel after normalizing activations by their variance over `axis`.

  With infinitely many channels the mean over channels of a centred Gaussian
  layer vanishes and its variance concentrates on the kernel's diagonal, so
  normalization divides each covariance `cov[x1, x2, s1, s2]` by
  `sqrt(v1[x1, s1] v2[x2, s2])`, where `v` is `eps` plus the per-location
  variance averaged over the spatial (and batch) axes in `axis`. Only the
  variances are needed, so spatial diagonals suffice. The NTK is divided
  likewise: the normalizer's own gradient vanishes in the limit.

  Args:
    kernel: kernel of the (Gaussian) inputs.
    axis: axes of the activations `(N, *spatial, C)` normalized over; must
      include the channel axis.
    eps: added to the variances.
    layer: the layer's name, for error messages.

  Returns:
    The normalized kernel (still Gaussian).

  Raises:
    ValueError: if `axis` omits the channel axis, or the input is not
      Gaussian.

  >>> import jax.numpy as jnp
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> k = ft.kernel_fn(ftn.Dense(4, W_std=2.0))(jnp.ones((2, 3)))
  >>> k.cov1, layer_norm_kernel(k, -1, 0.0, 'LayerNorm').cov1
  (Array([4., 4.], dtype=float...), Array([1., 1.], dtype=float...))
  """
  ndim = len(kernel.shape1)
  axes = canonical_axes(axis, ndim)
  if ndim - 1 not in axes:
    raise ValueError(
        f"{layer} normalizes over axes {axes} of activations with {ndim} "
        "axes; the channel axis (-1) must be among them for the "
        "infinite-width kernel to exist. Use e.g. axis=-1.")
  if not (kernel.is_gaussian or mixtures.is_centred_mixture(kernel)):
    # The channel mean of a non-centred layer (e.g. after ReLU) does not
    # vanish; as Neural Tangents, only Gaussian inputs are supported (or a
    # mixture of Gaussian parts, whose channel mean vanishes too; the
    # output is then still a mixture, with its parts dropped).
    where = "raw inputs" if kernel.is_input else "a non-Gaussian input"
    raise ValueError(
        f"{layer} is applied to {where}; its infinite-width kernel is "
        "implemented only for Gaussian inputs. Put it right after a "
        "`Dense`/`Conv` (or attention) layer.")
  # Averaged axes of the variance arrays `(N, *spatial)`; padded locations
  # are skipped (their variances are zero).
  reduce = tuple(a for a in axes if a != ndim - 1)
  var1, var2 = covariance.diagonal_variances(kernel)
  mask1, mask2 = masking.kernel_masks(kernel)

  def normalizer(v, mask):
    if not reduce:
      return eps + v
    loc = mask_arrays.location_mask(mask, layer)
    return eps + mask_arrays.masked_mean(v, loc, reduce, keepdims=True)

  var1 = normalizer(var1, mask1)
  var2 = var1 if kernel.cov2 is None else normalizer(var2, mask2)

  def divide(cov, va, vb, batch_pair):
    if cov is None:
      return None
    a, b = covariance.paired_variances(
        va, vb, batch_pair=batch_pair,
        diagonal_spatial=kernel.diagonal_spatial)
    return cov / jnp.sqrt(a * b)

  full_batch = not kernel.diagonal_batch
  return kernel.replace(
      nngp=divide(kernel.nngp, var1, var2, True),
      ntk=divide(kernel.ntk, var1, var2, True),
      cov1=divide(kernel.cov1, var1, var1, full_batch),
      cov2=divide(kernel.cov2, var2, var2, full_batch))
