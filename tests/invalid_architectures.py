"""Seeded networks with one defect that the analytic kernel must refuse.

`invalid_network(seed)` puts one of `DEFECTS` on the raw inputs, after an
affine layer or after a nonlinearity of `architecture_generator`, or makes
a bad call.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np

from flax_tangents import nn as ftn
from architecture_generator import Concat
from architecture_generator import Factory
from architecture_generator import Network
from architecture_generator import Residual
from architecture_generator import nonlinearities
from architecture_generator import pick


class _ReluOnInputs(nn.Module):
  def __call__(self, x):
    return nn.relu(x)


class _OwnParameter(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x @ self.param("w", nn.initializers.normal(), (4, 3))


class _ShiftAfterNonlinearity(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.Relu()(x) + 1.0


class _SquareOfBranch(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.FanInProd()([x, x])


class _MismatchedSum(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ftn.Dense(3)(x) + ftn.Dense(4)(x)


# Defects: (name, where it can go, factory, call kwargs). `where` is
# "start" (on the raw inputs), "gauss" (after an affine layer), "free"
# (after a nonlinearity) or "call" (a bad call on any network).
DEFECTS = [
    ("nonlinearity on inputs", "start", lambda w: ftn.Erf(), {}),
    ("plain relu on inputs", "start", lambda w: _ReluOnInputs(), {}),
    ("dropout on inputs", "start",
     lambda w: ftn.Dropout(0.2, deterministic=False), {}),
    ("product of inputs", "start", lambda w: _SquareOfBranch(), {}),
    ("flatten then nonlinearity of inputs", "start",
     lambda w: nn.Sequential([ftn.Flatten(), ftn.Relu()]), {}),
    ("nonlinearity after nonlinearity", "free", lambda w: ftn.Gelu(), {}),
    ("layer norm after nonlinearity", "free", lambda w: ftn.LayerNorm(), {}),
    ("residual of a nonlinearity", "free",
     lambda w: Residual([ftn.Dense(w)]), {}),
    ("shift after nonlinearity", "gauss", lambda w: _ShiftAfterNonlinearity(),
     {}),
    ("square of a branch", "gauss", lambda w: _SquareOfBranch(), {}),
    ("mismatched branches", "gauss", lambda w: _MismatchedSum(), {}),
    ("own parameter", "gauss", lambda w: _OwnParameter(), {}),
    ("mixture mixed then nonlinearity", "gauss",
     lambda w: nn.Sequential([Concat([[ftn.Identity()], [ftn.Dense(w)]]),
                              ftn.LayerNorm(), ftn.Erf()]), {}),
    ("unknown keyword", "call", None, {"foo": 1}),
    ("misspelt diagonal argument", "call", None, {"diagonal_spatal": True}),
]


def invalid_network(seed: int) -> tuple[Network, dict[str, Any], str]:
  """A network with one defect, its call keyword arguments, the defect."""
  rng = np.random.RandomState(10_000 + seed)
  name, where, factory, kwargs = DEFECTS[seed % len(DEFECTS)]
  width = int(rng.randint(2, 5))
  prefix: list[Factory] = []
  names: list[str] = []
  if where in ("gauss", "free"):
    prefix.append(lambda w, b=pick(rng, [None, 0.2]): ftn.Dense(
        width, b_std=b))
    names.append("Dense")
  if where == "free":
    act_name, act = pick(rng, nonlinearities(rng))
    prefix.append(act)
    names.append(act_name)
  layers = prefix + ([factory] if factory is not None else [])
  layers.append(lambda w: ftn.Dense(1))
  return (Network(layers, (3,), names + [name, "Dense"]), kwargs, name)
