"""Rules for primitives that move, select or sum locations of network values.

Every rule keeps the batch axis first and the channel axis last: operations
that mix examples, or treat channels differently from one another, have no
kernel and are refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flax_tangents._src.analytic import combinators
from flax_tangents._src.analytic import covariance
from flax_tangents._src.analytic import mixtures
from flax_tangents._src.analytic import pooling as pooling_math
from flax_tangents._src.analytic import resize
from flax_tangents._src.analytic.lifting import provenance as prov
from flax_tangents._src.analytic.lifting import spatial_ops
from flax_tangents._src.analytic.lifting.interpreter import Interpreter
from flax_tangents._src.analytic.lifting.interpreter import register
from flax_tangents._src.analytic.lifting.program import Equation
from flax_tangents._src.analytic.lifting.values import Const
from flax_tangents._src.analytic.lifting.values import Net
from flax_tangents._src.analytic.lifting.values import Value
from flax_tangents._src.analytic.lifting.values import uniform_value

__all__: list[str] = []

_BATCH = ("it mixes the batch axis (examples), so the kernel of one pair of "
          "inputs would depend on the others")
_CHANNEL = ("it acts on the channel axis, which is taken to infinity; only "
            "operations on locations (the axes between batch and channels) "
            "have kernels")


def _shapes(interp: Interpreter, eqn: Equation) -> tuple[tuple[int, ...],
                                                          tuple[int, ...]]:
  return (interp.program.shape(eqn.inputs[0]),
          tuple(interp.program.avals[eqn.outputs[0]].shape))


def _operand(interp: Interpreter, eqn: Equation, value: Value) -> Net:
  if isinstance(value, Const):
    raise interp.refuse(eqn, "internal: expected a network value")
  return interp.net(value, eqn)


@register("reshape")
def reshape(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  (batch, *spatial, channels), out = _shapes(interp, eqn)
  if not out or out[0] != batch:
    raise interp.refuse(eqn, _BATCH)
  kernel = net.kernel
  if out[-1] == channels and math.prod(out[1:-1]) == math.prod(spatial):
    return [Net(spatial_ops.spatial_reshape(kernel, out[1:-1]),
                net.provenance)]
  for first_merged in range(len(spatial) - 1, -1, -1):
    merged = math.prod(spatial[first_merged:])
    if (out[-1] == channels * merged and
        math.prod(out[1:-1]) == math.prod(spatial[:first_merged])):
      kernel = spatial_ops.merge_into_channels(
          kernel, len(spatial) - first_merged)
      kernel = spatial_ops.spatial_reshape(kernel, out[1:-1])
      return [Net(kernel, net.provenance)]
  raise interp.refuse(
      eqn, f"this reshape of {(batch, *spatial, channels)} to {out} splits or "
      "reorders the channel axis; lifted reshapes keep the batch axis first "
      "and either keep the channel axis last or merge trailing locations "
      "into it (flattening)")


@register("squeeze")
def squeeze(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  in_shape, out = _shapes(interp, eqn)
  dims = {d % len(in_shape) for d in eqn.params["dimensions"]}
  if 0 in dims:
    raise interp.refuse(eqn, _BATCH)
  if len(in_shape) - 1 in dims:
    raise interp.refuse(eqn, _CHANNEL)
  return [Net(spatial_ops.spatial_reshape(net.kernel, out[1:-1]),
              net.provenance)]


@register("broadcast_in_dim")
def broadcast_in_dim(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  in_shape, out = _shapes(interp, eqn)
  dims = tuple(eqn.params["broadcast_dimensions"])
  if not dims or dims[0] != 0 or out[0] != in_shape[0]:
    raise interp.refuse(eqn, _BATCH)
  if dims[-1] != len(out) - 1 or out[-1] != in_shape[-1]:
    raise interp.refuse(eqn, _CHANNEL + " (broadcasting channels copies "
                        "units, which are then not independent)")
  unit = [in_shape[dims.index(j)] if j in dims else 1
          for j in range(1, len(out) - 1)]
  kernel = spatial_ops.spatial_reshape(net.kernel, unit)
  if tuple(unit) != tuple(out[1:-1]):
    matrices = [np.ones((n, 1)) if u == 1 and n != 1 else np.eye(n)
                for u, n in zip(unit, out[1:-1])]
    kernel = spatial_ops.axis_maps(kernel, matrices, "broadcast")
  return [Net(kernel, net.provenance)]


@register("tile")
def tile(interp, eqn, values):
  """`jnp.tile` over locations: each output location reads one input."""
  net = _operand(interp, eqn, values[0])
  in_shape, _ = _shapes(interp, eqn)
  reps = tuple(eqn.params["reps"])
  if reps[0] != 1:
    raise interp.refuse(eqn, _BATCH + " (it tiles that axis)")
  if reps[-1] != 1:
    raise interp.refuse(eqn, _CHANNEL + " (tiling channels copies units, "
                        "which are then not independent)")
  matrices = [np.tile(np.eye(n), (r, 1))
              for n, r in zip(in_shape[1:-1], reps[1:-1])]
  return [Net(spatial_ops.axis_maps(net.kernel, matrices, "tile"),
              net.provenance)]


@register("transpose")
def transpose(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  perm = tuple(eqn.params["permutation"])
  last = len(perm) - 1
  if perm[0] != 0:
    raise interp.refuse(eqn, _BATCH + " (it moves the batch axis, as "
                        "`nn.scan` over an axis of a network value does: only "
                        "the carry of a scan may be one)")
  if perm[-1] != last:
    raise interp.refuse(eqn, _CHANNEL + " (it moves the channel axis; a "
                        "dense layer over locations treats them as "
                        "channels, which are not infinitely many)")
  spatial = tuple(p - 1 for p in perm[1:-1])
  if spatial == tuple(range(len(spatial))):
    return [net]
  return [Net(net.kernel.transpose(spatial), net.provenance)]


@register("reduce_sum")
def reduce_sum(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  in_shape, _ = _shapes(interp, eqn)
  axes = {a % len(in_shape) for a in eqn.params["axes"]}
  if 0 in axes:
    raise interp.refuse(eqn, _BATCH)
  if len(in_shape) - 1 in axes:
    raise interp.refuse(
        eqn, _CHANNEL + " (a sum or mean over channels converges to a "
        "constant, not a Gaussian process)")
  kernel = spatial_ops.sum_axes(net.kernel, sorted(a - 1 for a in axes),
                                f"sum over axes {sorted(axes)}")
  return [Net(kernel, net.provenance)]


@register("reduce_window_sum")
def reduce_window_sum(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  p = eqn.params
  window, strides = p["window_dimensions"], p["window_strides"]
  pads = tuple((int(low), int(high)) for low, high in p["padding"])
  if any(d != 1 for d in tuple(p["base_dilation"]) + tuple(
      p["window_dilation"])):
    raise interp.refuse(eqn, "dilated pooling windows are not supported")
  for axis, reason in ((0, _BATCH), (len(window) - 1, _CHANNEL)):
    if window[axis] != 1 or strides[axis] != 1 or pads[axis] != (0, 0):
      raise interp.refuse(eqn, reason)
  kernel = net.kernel
  layer = "sum pooling (reduce_window_sum)"
  covariance.require_spatial_covariances(kernel, layer)

  def pooled(cov, n_batch):
    return pooling_math.pool_covariance(
        cov, n_batch, diagonal_spatial=kernel.diagonal_spatial,
        window_shape=tuple(window[1:-1]), strides=tuple(strides[1:-1]),
        pads=pads[1:-1], circular=False, normalize=None)

  _, out = _shapes(interp, eqn)
  out_kernel = covariance.map_covariances(kernel, pooled)
  out_kernel = out_kernel.replace(
      shape1=(kernel.shape1[0],) + tuple(out[1:-1]) + (kernel.shape1[-1],),
      shape2=(kernel.shape2[0],) + tuple(out[1:-1]) + (kernel.shape2[-1],))
  return [Net(out_kernel, net.provenance)]


def _index(interp, eqn, net: Net, spatial_index: list[Any]) -> Net:
  idx = (slice(None),) + tuple(spatial_index) + (slice(None),)
  return Net(resize.index_kernel(net.kernel, idx, "indexing"),
             net.provenance)


def _full(eqn, interp, in_shape, starts, limits, steps):
  if (starts[0], limits[0], steps[0]) != (0, in_shape[0], 1):
    raise interp.refuse(eqn, _BATCH + " (it selects part of that axis)")


def _channels(interp, eqn, net: Net, in_shape, start, limit, step) -> Net:
  """A subset of channels: the same kernel, if all channels have it."""
  last = len(in_shape) - 1
  if (start, limit, step) == (0, in_shape[last], 1):
    return net
  if not mixtures.identically_distributed(net.kernel):
    raise interp.refuse(
        eqn, "it selects some channels of a value whose channels differ in "
        "distribution (the raw inputs, a flattening, or a concatenation of "
        "different branches), whose kernel then depends on which channels "
        "are kept")
  count = len(range(start, limit, step))
  kernel = net.kernel
  return Net(kernel.replace(shape1=kernel.shape1[:-1] + (count,),
                            shape2=kernel.shape2[:-1] + (count,)),
             net.provenance)


@register("slice")
def slice_(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  in_shape, _ = _shapes(interp, eqn)
  starts = tuple(eqn.params["start_indices"])
  limits = tuple(eqn.params["limit_indices"])
  steps = tuple(eqn.params["strides"] or (1,) * len(in_shape))
  _full(eqn, interp, in_shape, starts, limits, steps)
  net = _channels(interp, eqn, net, in_shape, starts[-1], limits[-1],
                  steps[-1])
  return [_index(interp, eqn, net, [
      slice(s, l, k) for s, l, k in zip(starts[1:-1], limits[1:-1],
                                        steps[1:-1])])]


@register("rev")
def rev(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  in_shape, _ = _shapes(interp, eqn)
  dims = {d % len(in_shape) for d in eqn.params["dimensions"]}
  if 0 in dims:
    raise interp.refuse(eqn, _BATCH)
  if len(in_shape) - 1 in dims:
    raise interp.refuse(eqn, _CHANNEL)
  return [_index(interp, eqn, net, [
      slice(None, None, -1) if axis in dims else slice(None)
      for axis in range(1, len(in_shape) - 1)])]


@register("dynamic_slice")
def dynamic_slice(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  in_shape, _ = _shapes(interp, eqn)
  starts = []
  for value in values[1:]:
    start = uniform_value(value.value) if isinstance(value, Const) else None
    if start is None:
      raise interp.refuse(eqn, "its start indices depend on values not "
                          "known when the kernel function is traced")
    starts.append(int(start))
  sizes = tuple(eqn.params["slice_sizes"])
  starts = [min(max(s, 0), n - k) for s, n, k in zip(starts, in_shape,
                                                     sizes)]
  limits = [s + k for s, k in zip(starts, sizes)]
  _full(eqn, interp, in_shape, starts, limits, (1,) * len(in_shape))
  net = _channels(interp, eqn, net, in_shape, starts[-1], limits[-1], 1)
  return [_index(interp, eqn, net, [
      slice(s, l) for s, l in zip(starts[1:-1], limits[1:-1])])]


@register("split")
def split(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  in_shape, _ = _shapes(interp, eqn)
  axis = eqn.params["axis"] % len(in_shape)
  if axis == 0:
    raise interp.refuse(eqn, _BATCH)
  outs, start = [], 0
  if axis == len(in_shape) - 1:
    for size in eqn.params["sizes"]:
      outs.append(_channels(interp, eqn, net, in_shape, start, start + size,
                            1))
      start += size
    return outs
  for size in eqn.params["sizes"]:
    index = [slice(None)] * (len(in_shape) - 2)
    index[axis - 1] = slice(start, start + size)
    outs.append(_index(interp, eqn, net, index))
    start += size
  return outs


@register("pad")
def pad(interp, eqn, values):
  net = _operand(interp, eqn, values[0])
  fill = values[1]
  fill_value = uniform_value(fill.value) if isinstance(fill, Const) else None
  if fill_value is None or float(fill_value) != 0.0:
    raise interp.refuse(eqn, "padding with a nonzero value is a "
                        "deterministic shift, which has no centred kernel")
  in_shape, out = _shapes(interp, eqn)
  config = [tuple(int(c) for c in axis) for axis in
            eqn.params["padding_config"]]
  for axis, reason in ((0, _BATCH), (len(config) - 1, _CHANNEL)):
    if config[axis] != (0, 0, 0):
      raise interp.refuse(eqn, reason + " (it pads that axis)")
  matrices = []
  for (lo, _, interior), n, m in zip(config[1:-1], in_shape[1:-1],
                                     out[1:-1]):
    matrix = np.zeros((m, n))
    for i in range(n):
      row = lo + i * (interior + 1)
      if 0 <= row < m:
        matrix[row, i] = 1.0
    matrices.append(matrix)
  return [Net(spatial_ops.axis_maps(net.kernel, matrices, "padding"),
              net.provenance)]


def _concatenated(interp, eqn, nets: list[Net], axis: int, ndim: int) -> Net:
  """The kernel of `nets` concatenated along `axis` (of `ndim` axes)."""
  if axis == 0:
    raise interp.refuse(eqn, _BATCH)
  if axis != ndim - 1:
    for i, a in enumerate(nets):
      for b in nets[i + 1:]:
        if not prov.uncorrelated(a.provenance, b.provenance):
          raise interp.refuse(
              eqn, "concatenating possibly correlated values along a spatial "
              "axis needs their cross-covariance, which is not tracked")
  try:
    kernel = combinators.fan_in_concat([n.kernel for n in nets], axis=axis)
  except (NotImplementedError, ValueError) as e:
    raise interp.refuse(eqn, str(e)) from e
  return Net(kernel, prov.opaque([n.provenance for n in nets]))


def _network_operands(interp, eqn, values) -> list[Net]:
  if any(isinstance(v, Const) for v in values):
    raise interp.refuse(
        eqn, "it concatenates a network value with a constant, whose units "
        "are not random")
  return [interp.net(v, eqn) for v in values]


@register("concatenate")
def concatenate(interp, eqn, values):
  nets = _network_operands(interp, eqn, values)
  ndim = len(interp.program.shape(eqn.inputs[0]))
  axis = eqn.params["dimension"] % ndim
  return [_concatenated(interp, eqn, nets, axis, ndim)]


@register("stack")
def stack(interp, eqn, values):
  """`jnp.stack` along a new spatial axis: a concatenation of the values,
  each given a location axis of size 1 there."""
  nets = _network_operands(interp, eqn, values)
  out = tuple(interp.program.avals[eqn.outputs[0]].shape)
  axis = eqn.params["axis"] % len(out)
  if axis == len(out) - 1:
    raise interp.refuse(eqn, _CHANNEL + " (stacking along a new last axis "
                        "moves the channels off the last axis)")
  if axis == 0:
    raise interp.refuse(eqn, _BATCH)
  unit = out[1:axis] + (1,) + out[axis + 1:-1]
  nets = [Net(spatial_ops.spatial_reshape(n.kernel, unit), n.provenance)
          for n in nets]
  return [_concatenated(interp, eqn, nets, axis, len(out))]
