"""The kernel rule shared by all elementwise nonlinearities."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import mixture_units
from flax_tangents._src.analytic import requirements
from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["derivative_in_covariance", "elementwise_kernel"]

# (cov12, var1, var2) -> expectation over a centred bivariate Gaussian.
GaussianExpectation = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def derivative_in_covariance(
    nngp_fn: GaussianExpectation) -> GaussianExpectation:
  """`d nngp_fn / d cov12`, which equals `E[phi'(u) phi'(v)]`.

  By Price's theorem the derivative of `E[phi(u) phi(v)]` in the covariance
  is the expectation of the product of derivatives, so the NTK of any
  nonlinearity with a known `nngp_fn` follows by autodiff.
  """

  def d_nngp_fn(cov12, var1, var2):
    cov12, var1, var2 = jnp.broadcast_arrays(cov12, var1, var2)
    return jax.jvp(lambda c: nngp_fn(c, var1, var2), (cov12,),
                   (jnp.ones_like(cov12),))[1]

  return d_nngp_fn


def elementwise_kernel(kernel: Kernel, nngp_fn: GaussianExpectation,
                       d_nngp_fn: GaussianExpectation, layer: str) -> Kernel:
  """Kernel after a nonlinearity applied elementwise to Gaussian activations.

  Args:
    kernel: kernel of the (Gaussian) pre-activations.
    nngp_fn: `E[phi(u) phi(v)]` as a function of `(cov12, var1, var2)`.
    d_nngp_fn: `E[phi'(u) phi'(v)]`, same arguments.
    layer: the layer's name, for error messages.

  Returns:
    The kernel of `phi` of the activations; the NTK is multiplied by
    `d_nngp_fn` (the nonlinearity has no parameters). For a mixture (after
    `Flatten` or a channel concatenation) `phi` acts on each part.

  Raises:
    ValueError: if the input (or a part of it) is not Gaussian.
  """
  return mixture_units.map_units(
      kernel, lambda k: _gaussian_elementwise(k, nngp_fn, d_nngp_fn, layer))


def _gaussian_elementwise(kernel: Kernel, nngp_fn: GaussianExpectation,
                          d_nngp_fn: GaussianExpectation,
                          layer: str) -> Kernel:
  covariance.check_gaussian(kernel, layer)
  if requirements.is_recording():
    # The requirement pass needs shapes only: user math (which may be
    # written with NumPy, as on NT's Elementwise page) is not traced.
    return kernel.replace(is_gaussian=False, is_input=False)
  var1, var2 = covariance.diagonal_variances(kernel)
  pair = lambda a, b, batch_pair: covariance.paired_variances(
      a, b, batch_pair=batch_pair, diagonal_spatial=kernel.diagonal_spatial)

  v1, v2 = pair(var1, var2, True)
  assert kernel.nngp is not None, "every Kernel has an NNGP"
  nngp = nngp_fn(kernel.nngp, v1, v2)
  ntk = (None if kernel.ntk is None else
         kernel.ntk * d_nngp_fn(kernel.nngp, v1, v2))

  def own_covariance(cov, var):
    if cov is None:
      return None
    a, b = pair(var, var, not kernel.diagonal_batch)
    return nngp_fn(cov, a, b)

  return kernel.replace(
      nngp=nngp, ntk=ntk, cov1=own_covariance(kernel.cov1, var1),
      cov2=own_covariance(kernel.cov2, var2), is_gaussian=False,
      is_input=False)
