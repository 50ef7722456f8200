"""Builds `flax_tangents.nn` models from the neutral form of golden cases.

A layer is `[Name, {arguments}]` with Flax-style names (features,
kernel_size, strides, padding) and NT names otherwise; composites are
`Residual`, `Concat`, `Prod` and `Serial` (see tests/golden/README.md).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents import nn as ftn

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
CASES_PATH = os.path.join(GOLDEN_DIR, "cases.json")


def load_golden(name: str) -> dict[str, np.ndarray]:
  """The arrays of `tests/golden/<name>.npz` (computed by NT 0.6.5)."""
  with np.load(os.path.join(GOLDEN_DIR, f"{name}.npz")) as data:
    return {k: data[k] for k in data.files}


def load_cases() -> list[dict[str, Any]]:
  with open(CASES_PATH) as f:
    return json.load(f)


class Residual(nn.Module):
  """`main(x) + shortcut(x)`, written as a user would write it."""
  main: Sequence[nn.Module]
  shortcut: Sequence[nn.Module]

  def __call__(self, x):
    y = x
    for layer in self.main:
      y = layer(y)
    z = x
    for layer in self.shortcut:
      z = layer(z)
    return y + z


class Concat(nn.Module):
  """Branches applied to the same input, concatenated."""
  branches: Sequence[Sequence[nn.Module]]
  axis: int = -1

  @nn.compact
  def __call__(self, x):
    outputs = []
    for branch in self.branches:
      y = x
      for layer in branch:
        y = layer(y)
      outputs.append(y)
    return ftn.FanInConcat(axis=self.axis)(outputs)


class Prod(nn.Module):
  """Branches applied to the same input, multiplied (NT's FanInProd)."""
  branches: Sequence[Sequence[nn.Module]]

  @nn.compact
  def __call__(self, x):
    outputs = []
    for branch in self.branches:
      y = x
      for layer in branch:
        y = layer(y)
      outputs.append(y)
    return ftn.FanInProd()(outputs)


_TUPLE_ARGS = ("kernel_size", "strides", "window_shape", "s", "shape",
               "aggregate_axis")

# Functions the neutral form names by a string (tests/golden/README.md).
_FUNCTIONS = {
    "erf": jax.scipy.special.erf,
    "tanh": jnp.tanh,
}
_NNGP_FUNCTIONS = {
    # E[erf(u) erf(v)] for a centred Gaussian pair (Williams, 1997).
    "erf": lambda c12, v1, v2: (2 / np.pi) * jnp.arcsin(
        2 * c12 / jnp.sqrt((1 + 2 * v1) * (1 + 2 * v2))),
}
_DECAY_FUNCTIONS = {
    "exp_neg": lambda d: jnp.exp(-d),
    "exp_neg_half": lambda d: jnp.exp(-d / 2),
    "inv_1p": lambda d: 1 / (1 + d),
}


def _index_item(item: Any) -> Any:
  """One entry of the neutral `idx`: int, "...", or [start, stop, step]."""
  if item == "...":
    return Ellipsis
  if isinstance(item, list):
    return slice(*item)
  return item


def build_layer(spec: Sequence[Any]) -> nn.Module:
  name, args = spec
  args = dict(args)
  if name == "Residual":
    return Residual(main=build_layers(args["main"]),
                    shortcut=build_layers(args["shortcut"]))
  if name == "Concat":
    return Concat(branches=[build_layers(b) for b in args["branches"]],
                  axis=args.get("axis", -1))
  if name == "Prod":
    return Prod(branches=[build_layers(b) for b in args["branches"]])
  if name == "Serial":
    return nn.Sequential(build_layers(args["layers"]))
  for key in _TUPLE_ARGS:
    if key in args and args[key] is not None:
      args[key] = tuple(args[key])
  if "coef" in args:
    args["coef"] = tuple(args["coef"])
  if name == "Index":
    args["idx"] = tuple(_index_item(i) for i in args["idx"])
  if name in ("Elementwise", "ElementwiseNumerical"):
    args["fn"] = _FUNCTIONS[args["fn"]]
    if "nngp_fn" in args:
      args["nngp_fn"] = _NNGP_FUNCTIONS[args["nngp_fn"]]
  if name == "GlobalSelfAttention" and "pos_emb_decay_fn" in args:
    args["pos_emb_decay_fn"] = _DECAY_FUNCTIONS[args["pos_emb_decay_fn"]]
  if name == "GlobalAvgPool" and "batch_axis" in args:
    # After a DotGeneral with dot batch dimensions NT's activations are in
    # lax's layout ((H, N, C) in the golden case); ftn.DotGeneral moves the
    # batch axis first and channels last, so the pool needs no axes.
    assert (args.pop("batch_axis"), args.pop("channel_axis")) == (1, 2)
  if name == "DotGeneral":
    for side in ("lhs", "rhs"):
      if side in args:
        args[side] = np.asarray(args[side], np.float64)
    if "dimension_numbers" in args:
      (lc, rc), (lb, rb) = args["dimension_numbers"]
      args["dimension_numbers"] = ((tuple(lc), tuple(rc)),
                                   (tuple(lb), tuple(rb)))
  if name == "Dropout":
    args.setdefault("mode", "train")
    # NT's `rate` is the probability of KEEPING a unit; Flax's (and
    # ftn.Dropout's) `rate` is the probability of dropping one.
    args["keep_rate"] = args.pop("rate")
  return getattr(ftn, name)(**args)


def build_layers(specs: Sequence[Sequence[Any]]) -> list[nn.Module]:
  return [build_layer(s) for s in specs]


class GraphSerial(nn.Module):
  """Layers in sequence, the call's `pattern` going to every Aggregate.

  (`nn.Sequential` passes call keywords to its first layer only.)
  """
  layers: Sequence[nn.Module]

  def __call__(self, x, pattern=None):
    for layer in self.layers:
      x = (layer(x, pattern=pattern) if isinstance(layer, ftn.Aggregate)
           else layer(x))
    return x


def build_model(case: dict[str, Any]) -> nn.Module:
  layers = build_layers(case["layers"])
  if any(isinstance(layer, ftn.Aggregate) for layer in layers):
    return GraphSerial(layers)
  return nn.Sequential(layers)
