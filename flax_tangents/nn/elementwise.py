"""Elementwise nonlinearities: the common base and user-defined ones."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax

from flax_tangents._src.analytic.elementwise import GaussianExpectation
from flax_tangents._src.analytic.elementwise import derivative_in_covariance
from flax_tangents._src.analytic.elementwise import elementwise_kernel
from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.registry import kernel_rule
from flax_tangents._src.masked_array import supports_masking

__all__ = ["Elementwise", "ElementwiseBase"]


def _elementwise_rule(module: "ElementwiseBase", kernel: Kernel,
                      **kwargs: Any) -> Kernel:
  del kwargs
  nngp_fn, d_nngp_fn = module.kernel_fns()
  try:
    return elementwise_kernel(kernel, nngp_fn, d_nngp_fn,
                              type(module).__name__)
  except jax.errors.TracerArrayConversionError as e:
    raise TypeError(
        f"{type(module).__name__}: its `nngp_fn` (or `d_nngp_fn`) calls "
        "NumPy on traced values. NumPy works in an eager call when it only "
        "touches the variances (as on NT's Elementwise page); under "
        "`jax.jit`/`grad`/`vmap`, and for the covariance argument (which "
        "autodiff traces to derive the NTK), write it with `jax.numpy`.") from e


@kernel_rule(_elementwise_rule)
class ElementwiseBase(nn.Module):
  """Base class of nonlinearities applied elementwise.

  Subclasses define `activation(x)` (the finite forward pass) and `kernel_fns()`
  returning `(nngp_fn, d_nngp_fn)`, both functions of `(cov12, var1, var2)`
  giving `E[phi(u) phi(v)]` and `E[phi'(u) phi'(v)]` for a centred Gaussian
  pair, `phi` being the activation.
  """

  def activation(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def kernel_fns(self) -> tuple[GaussianExpectation, GaussianExpectation]:
    raise NotImplementedError

  @supports_masking()
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.activation(x)


class Elementwise(ElementwiseBase):
  """A nonlinearity given by its function and its Gaussian expectation.

  The NTK is derived from `nngp_fn` by autodiff (Price's theorem) unless
  `d_nngp_fn` is given.

  Attributes:
    fn: the scalar nonlinearity, applied elementwise.
    nngp_fn: `(cov12, var1, var2) -> E[fn(u) fn(v)]` for centred Gaussian
      `(u, v)` with those variances and covariance.
    d_nngp_fn: optional `E[fn'(u) fn'(v)]`, same arguments.

  >>> import jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import flax_tangents as ft
  >>> from flax_tangents import nn as ftn
  >>> identity = ftn.Elementwise(lambda x: x, lambda c, v1, v2: c)
  >>> model = nn.Sequential([ftn.Dense(4), identity])
  >>> x = jnp.array([[1., 0.], [0., 1.]])
  >>> ft.kernel_fn(model)(x, get='ntk')  # x x^T / 2, as for Dense alone
  Array([[0.5, 0. ],
         [0. , 0.5]], dtype=float...)
  """

  fn: Optional[Callable[[jax.Array], jax.Array]] = None
  nngp_fn: Optional[GaussianExpectation] = None
  d_nngp_fn: Optional[GaussianExpectation] = None

  def activation(self, x: jax.Array) -> jax.Array:
    if self.fn is None:
      raise ValueError("Elementwise(fn=None) has no finite forward pass.")
    return self.fn(x)

  def kernel_fns(self) -> tuple[GaussianExpectation, GaussianExpectation]:
    if self.nngp_fn is None:
      raise ValueError("Elementwise(nngp_fn=None) has no kernel; give "
                       "`nngp_fn`, or use `ElementwiseNumerical`.")
    d_nngp_fn = self.d_nngp_fn or derivative_in_covariance(self.nngp_fn)
    return self.nngp_fn, d_nngp_fn
