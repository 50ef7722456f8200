"""The kernel rule shared by affine layers (dense, convolutional, ...)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax

from flax_tangents._src.analytic import lineage
from flax_tangents._src.analytic import mask_arrays
from flax_tangents._src.analytic import masking
from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["PARAMETERIZATIONS", "affine_kernel", "check_parameterization",
           "check_width_scale"]

PARAMETERIZATIONS = ("ntk", "standard")


def check_parameterization(parameterization: str) -> str:
  """The parameterization in lower case; a clear error for an unknown one.

  Raises:
    ValueError: unless `parameterization` is `'ntk'` or `'standard'` (any
      case).
  """
  if (not isinstance(parameterization, str) or
      parameterization.lower() not in PARAMETERIZATIONS):
    raise ValueError(
        f"parameterization={parameterization!r} is not one of "
        f"{PARAMETERIZATIONS}.")
  return parameterization.lower()


def check_width_scale(s: Sequence[int], parameterization: str,
                      layer: str) -> tuple[int, int]:
  """Validates NT's `s = (s_in, s_out)` width scales of an affine layer.

  Under the standard parameterization a layer's finite input has
  `s_in * fan_in` channels and its output `s_out * features` (Sohl-Dickstein
  et al., 2020, "On the infinite width limit of neural networks with a
  standard parameterization"); the kernel divides the fan-in by `s_in`.

  Returns:
    `(s_in, s_out)` as ints.

  Raises:
    ValueError: if `s` is not two positive integers, or is not `(1, 1)`
      under the NTK parameterization (where it has no meaning; Neural
      Tangents ignores it there, which would hide a mistake).
  """
  try:
    s_in, s_out = s
    ok = all(int(v) == v and v >= 1 for v in (s_in, s_out))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{layer}: s={s!r} must be two positive integers "
                     "(s_in, s_out).")
  s_in, s_out = int(s_in), int(s_out)
  if (s_in, s_out) != (1, 1) and check_parameterization(
      parameterization) != "standard":
    raise ValueError(
        f"{layer}: s={tuple(s)} applies only to parameterization="
        "'standard'; the NTK parameterization has no width scales. Use "
        "s=(1, 1), or parameterization='standard'.")
  return s_in, s_out


def affine_kernel(kernel: Kernel, *, W_std: float, b_std: Optional[float],
                  parameterization: str, fan_in: float,
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
    fan_in: inputs per output unit (channels times receptive field size,
      divided by the width scale `s_in` under the standard
      parameterization).
    spatial_map: averaging over the receptive field; `None` for identity.
    shape1: shape of the layer's outputs on the first batch.
    shape2: shape on the second batch.
    mask_map: maps a padding mask of whole input locations `(N, *spatial,
      1)` to that of the outputs (the identity for a dense layer; see
      `mask_arrays.window_mask`). Input masks are first collapsed over channels.

  Returns:
    The kernel of the (Gaussian) outputs.
  """
  parameterization = check_parameterization(parameterization)
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
    assert nngp is not None, "a Kernel with an NTK has an NNGP"
    ntk = nngp + w_var * ntk_in
  else:
    assert nngp_in is not None, "a Kernel with an NTK has an NNGP"
    bias_grad = 0.0 if b_std is None else 1.0
    ntk = fan_in * nngp_in + bias_grad + w_var * ntk_in

  def out_mask(mask, shape):
    del shape
    mask = mask_arrays.collapse_channels(mask)
    return mask if mask_map is None else mask_map(mask)

  out = kernel.replace(
      nngp=nngp, ntk=ntk, cov1=affine(mapped("cov1")),
      cov2=affine(mapped("cov2")), is_gaussian=True, is_input=False,
      shape1=shape1, shape2=shape2)
  return lineage.fresh(masking.map_masks(out, kernel, out_mask))
