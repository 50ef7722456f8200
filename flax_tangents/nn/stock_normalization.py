"""Kernel rules for stock `flax.linen` normalization layers.

`nn.LayerNorm` (default scale 1, bias 0) and `nn.BatchNorm` in inference
mode (`use_running_average=True`): an affine map with the fixed statistics
Flax initializes (mean 0, variance 1). `nn.BatchNorm` in training mode mixes
the examples of a batch and is refused.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import numpy as np

from flax_tangents._src.analytic.kernel import Kernel
from flax_tangents._src.analytic.lifting import paths
from flax_tangents._src.analytic.lifting.initializers import InitializerError
from flax_tangents._src.analytic.lifting.initializers import entry_variance
from flax_tangents._src.analytic.normalization import layer_norm_kernel
from flax_tangents._src.analytic.registry import register_kernel_rule

__all__: list[str] = []


def _where(module: nn.Module) -> str:
  path = paths.path_string(module)
  return f"stock nn.{type(module).__name__} (module '{path}')"


def _add_scale_and_bias_gradients(out: Kernel, normalized_nngp,
                                  use_scale: bool, use_bias: bool) -> Kernel:
  """Adds the NTK of a trained per-channel scale and bias.

  The gradient of output channel `c` in `scale_c` is the normalized activation
  `y_c` and in `bias_c` it is 1, which adds `E[y_c(x1) y_c(x2)]` and 1 to the
  NTK. The scale's contribution is random per channel and correlated with the
  outputs themselves, so a nonlinearity `phi` applied next would need
  `E[phi'(u) phi'(v) u v]`, which the kernel cannot carry: with a scale the
  output is marked non-Gaussian (an affine layer, which averages the
  contribution over channels exactly, must come next). Without an NTK
  (`get='nngp'`) the scale's gradient plays no role and the output stays
  Gaussian.
  """
  if out.ntk is not None:
    ntk = out.ntk
    if use_scale:
      ntk = ntk + normalized_nngp
    if use_bias:
      ntk = ntk + 1.0
    out = out.replace(ntk=ntk)
  if use_scale and out.ntk is not None:
    out = out.replace(is_gaussian=False)
  return out


def _stock_layer_norm_rule(module: nn.LayerNorm, kernel: Kernel,
                           **kwargs: Any) -> Kernel:
  """`nn.LayerNorm`: normalization, then `scale * y + bias` per channel."""
  del kwargs
  layer = f"nn.LayerNorm(reduction_axes={module.reduction_axes})"
  ndim = len(kernel.shape1)
  features = module.feature_axes
  features = (features,) if isinstance(features, int) else tuple(features)
  if tuple(sorted({a % ndim for a in features})) != (ndim - 1,):
    raise NotImplementedError(
        f"{layer} with feature_axes={module.feature_axes}: only per-channel "
        "scale and bias (feature_axes=-1) have an infinite-width kernel "
        "here.")
  if module.axis_name is not None:
    raise NotImplementedError(
        f"{layer} with axis_name={module.axis_name!r} (cross-device "
        "statistics) has no kernel rule.")
  if ((module.use_scale and module.scale_init is not nn.initializers.ones)
      or (module.use_bias and module.bias_init is not nn.initializers.zeros)):
    raise NotImplementedError(
        f"{layer} with custom scale_init/bias_init: only the default "
        "initializers (scale 1, bias 0) are supported; use "
        "`ftn.LayerNorm` followed by an explicit affine layer instead.")
  out = layer_norm_kernel(kernel, module.reduction_axes, module.epsilon,
                          layer)
  return _add_scale_and_bias_gradients(out, out.nngp, module.use_scale,
                                       module.use_bias)


register_kernel_rule(nn.LayerNorm, _stock_layer_norm_rule)


def _constant_scale(init: Any, where: str) -> float:
  """The value of a deterministic scale initializer (`ones`, `constant`)."""
  if init is nn.initializers.ones:
    return 1.0
  if getattr(init, "__code__", None) is getattr(
      nn.initializers.constant(1.0), "__code__", None):
    cells = dict(zip(init.__code__.co_freevars,
                     (c.cell_contents for c in init.__closure__)))
    value = np.asarray(cells.get("value"))
    if value.ndim == 0:
      return float(value)
  raise InitializerError(
      f"{where} has scale_init={getattr(init, '__qualname__', init)!r}; the "
      "kernel rule supports a deterministic scale (`ones`, or `constant` "
      "with a scalar). A random per-channel scale multiplies each unit by a "
      "random factor, which is not Gaussian.")


def _stock_batch_norm_rule(module: nn.BatchNorm, kernel: Kernel,
                           use_running_average: Optional[bool] = None,
                           **kwargs: Any) -> Kernel:
  """`nn.BatchNorm` with fixed statistics: `scale * x / sqrt(1 + eps) + bias`.

  With `use_running_average=True` the layer normalizes by its stored
  statistics, which at initialization (where NNGP and NTK are defined) are
  mean 0 and variance 1: an affine map of each unit, applied to Gaussian or
  non-Gaussian inputs alike.
  """
  where = _where(module)
  if kwargs.get("mask") is not None:
    raise NotImplementedError(f"{where} was called with a mask; not "
                              "supported.")
  running = nn.merge_param("use_running_average", module.use_running_average,
                           use_running_average)
  if not running:
    raise NotImplementedError(
        f"{where} in training mode (use_running_average=False) normalizes "
        "by statistics of the batch, which mixes the examples: the kernel of "
        "one pair of inputs then depends on the whole batch, and has no "
        "infinite-width rule here. Use `use_running_average=True` "
        "(inference mode), or `nn.LayerNorm`.")
  ndim = len(kernel.shape1)
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(
      module.axis)
  if tuple(sorted({a % ndim for a in axes})) != (ndim - 1,):
    raise NotImplementedError(
        f"{where} has axis={module.axis!r}; only per-channel statistics "
        "(axis=-1) are supported.")
  scale = _constant_scale(module.scale_init, where) if module.use_scale else 1
  b_var = (entry_variance(module.bias_init, (kernel.shape1[-1],), where=where,
                          param="bias_init", dtype=module.param_dtype)
           if module.use_bias else 0.0)
  factor = scale**2 / (1.0 + module.epsilon)
  affine = lambda c: None if c is None else factor * c + b_var
  out = kernel.replace(
      nngp=affine(kernel.nngp), cov1=affine(kernel.cov1),
      cov2=affine(kernel.cov2),
      ntk=None if kernel.ntk is None else factor * kernel.ntk,
      is_input=False,
      is_gaussian=kernel.is_gaussian)
  normalized = None if kernel.nngp is None else kernel.nngp / (
      1.0 + module.epsilon)
  return _add_scale_and_bias_gradients(out, normalized, module.use_scale,
                                       module.use_bias)


register_kernel_rule(nn.BatchNorm, _stock_batch_norm_rule)
