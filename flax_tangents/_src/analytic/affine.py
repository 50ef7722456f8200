"""The kernel rule shared by affine layers (dense, convolutional, ...)."""

from __future__ import annotations

from typing import Callable, Optional

import jax

from flax_tangents._src.analytic import masking
from flax_tangents.kernel import Kernel

__all__ = ["PARAMETERIZATIONS", "affine_kernel", "check_parameterization"]

PARAMETERIZATIONS = ("ntk", "standard")


def check_parameterization(parameterization: str) -> None:
  """Raises a clear error for an unknown parameterization."""
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(
        f"parameterization={parameterization!r} is not one of "
        f"{PARAMETERIZATIONS}.")


def affine_kernel(kernel: Kernel, *, W_std: float, b_std: Optional[float],
                  parameterization: str, fan_in: int,
                  spatial_map: Optional[Callable[[jax.Array, int],
                                                 jax.Array]] = None,
                  shape1: tuple[int, ...], shape2: tuple[int, ...],
                  mask_map: Optional[Callable[[jax.Array],
                                              Optional[jax.Array]]] = None
                  ) -> Kernel:
  """Kernel after `W x + b` with i.i.d. Gaussian `W`, `b`.

  `spatial_map(cov, n_batch_axes)` is the average over a weight's receptive
  field (the identity for a dense layer). With `T` that map,
  `nngp' = W_std^2 T(nngp) + b_std^2`, and

  - NTK parameterization: `ntk' = nngp' + W_std^2 T(ntk)`;
  - standard parameterization: `ntk' = fan_in T(nngp) + [bias] + W_std^2
    T(ntk)`, where `fan_in` counts the weights feeding one output and
    `[bias]` is 1 when there is a bias (its gradient is 1 whatever `b_std`).

  Args:
    kernel: kernel of the layer's inputs.
    W_std: weight standard deviation (times `1/sqrt(fan_in)`).
    b_std: bias standard deviation, or `None` for no bias.
    parameterization: `'ntk'` or `'standard'`.
    fan_in: inputs per output unit (channels times receptive field size).
    spatial_map: averaging over the receptive field; `None` for identity.
    shape1: shape of the layer's outputs on the first batch.
    shape2: shape on the second batch.
    mask_map: maps a padding mask of whole input locations `(N, *spatial,
      1)` to that of the outputs (the identity for a dense layer; see
      `masking.window_mask`). Input masks are first collapsed over channels.

  Returns:
    The kernel of the (Gaussian) outputs.
  """
  check_parameterization(parameterization)
  w_var = W_std**2
  b_var = 0.0 if b_std is None else b_std**2
  n_batch = {"nngp": 2, "ntk": 2, "cov1": 1 if kernel.diagonal_batch else 2}
  n_batch["cov2"] = n_batch["cov1"]

  def mapped(field: str) -> Optional[jax.Array]:
    value = getattr(kernel, field)
    if value is None or spatial_map is None:
      return value
    return spatial_map(value, n_batch[field])

  nngp_in = mapped("nngp")
  affine = lambda x: None if x is None else w_var * x + b_var
  nngp = affine(nngp_in)
  ntk_in = mapped("ntk")
  if ntk_in is None:
    ntk = None
  elif parameterization == "ntk":
    ntk = nngp + w_var * ntk_in
  else:
    bias_grad = 0.0 if b_std is None else 1.0
    ntk = fan_in * nngp_in + bias_grad + w_var * ntk_in
  def out_mask(mask, shape):
    del shape
    mask = masking.collapse_channels(mask)
    return mask if mask_map is None else mask_map(mask)

  out = kernel.replace(
      nngp=nngp, ntk=ntk, cov1=affine(mapped("cov1")),
      cov2=affine(mapped("cov2")), is_gaussian=True, is_input=False,
      shape1=shape1, shape2=shape2)
  return masking.map_masks(out, kernel, out_mask)
