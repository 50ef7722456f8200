"""Builds `flax_tangents.nn` models from the neutral form of golden cases.

A layer is `[Name, {arguments}]` with Flax-style names (features,
kernel_size, strides, padding) and NT names otherwise; composites are
`Residual`, `Concat` and `Serial` (see tests/golden/README.md).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax.linen as nn
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


_TUPLE_ARGS = ("kernel_size", "strides", "window_shape")

# GlobalSelfAttention's pos_emb_decay_fn, named in cases.json (README).
DECAY_FNS = {
    "exp_neg": lambda d: np.exp(-d),
    "exp_neg_half": lambda d: np.exp(-d / 2),
    "inv_1p": lambda d: 1 / (1 + d),
}


def build_layer(spec: Sequence[Any]) -> nn.Module:
  name, args = spec
  args = dict(args)
  if name == "Residual":
    return Residual(main=build_layers(args["main"]),
                    shortcut=build_layers(args["shortcut"]))
  if name == "Concat":
    return Concat(branches=[build_layers(b) for b in args["branches"]],
                  axis=args.get("axis", -1))
  if name == "Serial":
    return nn.Sequential(build_layers(args["layers"]))
  for key in _TUPLE_ARGS:
    if key in args and args[key] is not None:
      args[key] = tuple(args[key])
  if isinstance(args.get("pos_emb_decay_fn"), str):
    args["pos_emb_decay_fn"] = DECAY_FNS[args["pos_emb_decay_fn"]]
  if "coef" in args:
    args["coef"] = tuple(args["coef"])
  if name == "Dropout":
    mode = args.pop("mode", "train")
    args["deterministic"] = mode != "train"
    # NT's `rate` is the probability of KEEPING a unit; Flax's (and
    # ftn.Dropout's) is the probability of dropping one.
    args["rate"] = 1.0 - args["rate"]
  return getattr(ftn, name)(**args)


def build_layers(specs: Sequence[Sequence[Any]]) -> list[nn.Module]:
  return [build_layer(s) for s in specs]


def build_model(case: dict[str, Any]) -> nn.Module:
  return nn.Sequential(build_layers(case["layers"]))
