"""Seeded generators of small networks from the whole layer set.

`valid_network(seed)` draws a network that the analytic kernel must compute
exactly; `linear_network(seed)` one whose parameters enter linearly (its
NTK is `J J^T` exactly, at any width). `invalid_architectures.py` draws
networks with a defect that must be refused. Each network is built by
`build(width)`, so the same architecture serves the analytic kernel (any
width) and Monte Carlo (wide).

The generator tracks what the next layer may be from the state of the
activations: raw inputs, centred Gaussian (after an affine layer, or a
linear map of one), a mixture of Gaussian parts (after `Flatten` or a
channel concatenation), or free (anything else: after a nonlinearity,
dropout, a product, or a mixture's parts mixed), and their spatial shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents import nn as ftn

INPUT, GAUSS, MIX, FREE = "input", "gauss", "mixture", "free"
Factory = Callable[[int], nn.Module]


@dataclasses.dataclass
class Network:
  """A generated architecture.

  Attributes:
    layers: factories `width -> module`, applied in order.
    input_shape: `(*spatial, channels)` of one input.
    description: the layer names, for test ids and failure messages.
    dropout: whether a layer is in training-mode dropout (then `x2=None`
      and `x2=x1` differ on the batch diagonal, by design).
    swapped: the network with a nonlinearity and `Flatten` swapped (the
      same kernel), if it has such a pair.
    monte_carlo: whether Monte Carlo estimates converge quickly enough to
      test it (no attention, few layers).
    nonlinear_depth: number of nonlinearities, for the finite-width bias.
  """
  layers: list[Factory]
  input_shape: tuple[int, ...]
  description: list[str]
  dropout: bool = False
  swapped: Optional["Network"] = None
  monte_carlo: bool = True
  nonlinear_depth: int = 0

  def build(self, width: int) -> nn.Module:
    return nn.Sequential([make(width) for make in self.layers])


# ------------------------------------------------------------- components


class Residual(nn.Module):
  """`x + affine(nonlinearity(x))`, as users write a residual block."""
  branch: Sequence[nn.Module]

  def __call__(self, x):
    y = x
    for layer in self.branch:
      y = layer(y)
    return x + y


class Concat(nn.Module):
  """Branches on the same input, concatenated along channels."""
  branches: Sequence[Sequence[nn.Module]]

  @nn.compact
  def __call__(self, x):
    outputs = []
    for branch in self.branches:
      y = x
      for layer in branch:
        y = layer(y)
      outputs.append(y)
    return ftn.FanInConcat()(outputs)


class Product(nn.Module):
  """The product of two affine branches."""
  first: nn.Module
  second: nn.Module

  @nn.compact
  def __call__(self, x):
    return ftn.FanInProd()([self.first(x), self.second(x)])


def _erf_nngp(cov12, var1, var2):
  prod = (1 + 2 * var1) * (1 + 2 * var2)
  return jnp.arcsin(2 * cov12 / jnp.sqrt(prod)) * 2 / np.pi


# Nonlinearities with a closed form (or quadrature), each with random
# parameters of moderate size.
def nonlinearities(rng: np.random.RandomState) -> list[tuple[str, Factory]]:
  u = lambda lo, hi: float(np.round(rng.uniform(lo, hi), 2))
  return [
      ("Relu", lambda w: ftn.Relu()),
      ("LeakyRelu", lambda w, a=u(0.05, 0.3): ftn.LeakyRelu(a)),
      ("ABRelu", lambda w, a=u(-1, 0), b=u(0.5, 1.5): ftn.ABRelu(a, b)),
      ("Abs", lambda w: ftn.Abs()),
      ("Erf", lambda w, a=u(0.5, 1.5), b=u(0.5, 1.5), c=u(-0.3, 0.3):
       ftn.Erf(a, b, c)),
      ("Gelu", lambda w: ftn.Gelu()),
      ("Sigmoid_like", lambda w: ftn.Sigmoid_like()),
      ("Sin", lambda w, b=u(0.5, 1.5), c=u(-1, 1): ftn.Sin(b=b, c=c)),
      ("Cos", lambda w, b=u(0.5, 1.5): ftn.Cos(b=b)),
      ("Rbf", lambda w, g=u(0.2, 1.0): ftn.Rbf(g)),
      ("Gaussian", lambda w: ftn.Gaussian()),
      ("Monomial", lambda w: ftn.Monomial(2)),
      ("RectifiedMonomial", lambda w: ftn.RectifiedMonomial(1)),
      ("Polynomial", lambda w, c=(u(-.5, .5), u(.5, 1), u(-.3, .3)):
       ftn.Polynomial(c)),
      ("Hermite", lambda w: ftn.Hermite(2)),
      ("Sign", lambda w: ftn.Sign()),
      # sin: quadrature converges fast, so the invariants hold to rounding
      # (NT's grid, used for golden parity, is not symmetric in u and v;
      # for slowly converging functions the kernel is only approximately
      # symmetric).
      ("ElementwiseNumerical", lambda w: ftn.ElementwiseNumerical(
          jnp.sin, 32)),
      ("Elementwise", lambda w: ftn.Elementwise(jax.scipy.special.erf,
                                                _erf_nngp)),
  ]


def pick(rng: np.random.RandomState, options: Sequence[Any]) -> Any:
  return options[rng.randint(len(options))]


@dataclasses.dataclass
class _State:
  kind: str
  spatial: tuple[int, ...]


def _affine(rng, state: _State, stock_ok: bool = True, prefer: str = ""
            ) -> tuple[str, Factory, tuple[int, ...]]:
  """An affine layer for the current state, and the new spatial shape."""
  w_std = float(np.round(rng.uniform(0.7, 1.6), 2))
  b_std = pick(rng, [None, 0.1, 0.4])
  s = len(state.spatial)
  if s == 0:
    if stock_ok and (rng.rand() < 0.25 or prefer == "stock"):
      return "nn.Dense", lambda w: nn.Dense(w), ()
    return "Dense", lambda w: ftn.Dense(w, W_std=w_std, b_std=b_std), ()
  k = tuple(int(rng.randint(1, 3)) for _ in range(s))
  valid_ok = all(size > kk + 1 for size, kk in zip(state.spatial, k))
  padding = pick(rng, ["SAME", "CIRCULAR"] + (["VALID"] if valid_ok else []))
  out = tuple(size - kk + 1 if padding == "VALID" else size
              for size, kk in zip(state.spatial, k))
  choice = {"stock": 0.0, "ConvLocal": 0.25}.get(prefer, rng.rand())
  if stock_ok and choice < 0.2:
    return "nn.Conv", lambda w: nn.Conv(w, k, padding="SAME"), state.spatial
  if choice < 0.3 and valid_ok:
    return "ConvLocal", lambda w: ftn.ConvLocal(
        w, k, W_std=w_std, b_std=b_std), tuple(
            size - kk + 1 for size, kk in zip(state.spatial, k))
  return "Conv", lambda w: ftn.Conv(w, k, padding=padding, W_std=w_std,
                                    b_std=b_std), out


def _linear_map(rng, state: _State) -> tuple[str, Factory, tuple[int, ...]]:
  """A parameter-free linear map over locations (keeps Gaussianity)."""
  s = len(state.spatial)
  options = ["Identity"]
  if s:
    options += ["AvgPool", "SumPool", "GlobalAvgPool", "GlobalSumPool",
                "ImageResize"]
    if state.spatial[0] > 2:
      options.append("Index")
  name = pick(rng, options)
  if name == "Identity":
    return name, lambda w: ftn.Identity(), state.spatial
  if name in ("AvgPool", "SumPool"):
    cls = getattr(ftn, name)
    return name, lambda w: cls((2,) * s, padding="SAME"), state.spatial
  if name in ("GlobalAvgPool", "GlobalSumPool"):
    cls = getattr(ftn, name)
    return name, lambda w: cls(), ()
  if name == "Index":
    idx = (slice(None), slice(1, None)) + (slice(None),) * s
    return name, lambda w: ftn.Index(idx), (state.spatial[0] - 1,) + tuple(
        state.spatial[1:])
  method = pick(rng, ["nearest", "linear"])
  new = (state.spatial[0] + 1,) + tuple(state.spatial[1:])
  return name, lambda w: ftn.ImageResize((-1,) + new + (-1,), method), new


# Each seed favours one feature (cycling), so that a few dozen seeds cover
# the layer set; the rest of the network is drawn freely.
FOCUS = ("Flatten", "Product", "ConvLocal", "Index", "Residual", "Concat",
         "GlobalSelfAttention", "Dropout", "LayerNorm", "SumPool",
         "ImageResize", "stock")


def valid_network(seed: int) -> Network:
  """A random valid network: its kernel must be exact."""
  rng = np.random.RandomState(seed)
  focus = FOCUS[seed % len(FOCUS)]
  spatial = () if focus in ("Product", "stock") and seed % 2 else pick(
      rng, [(5,), (3, 4)] if focus not in ("Residual", "Dropout", "LayerNorm")
      else [(), (5,), (3, 4)])
  state = _State(INPUT, spatial)
  layers, names = [], []
  flags = dict(dropout=False, attention=False, depth=0, swap_at=None)
  options = nonlinearities(rng)
  drawn = iter(range(seed, seed + 100))

  def nonlinearity():
    # Cycles through the list with the seed, so that every nonlinearity is
    # drawn by the first few dozen seeds.
    return options[next(drawn) % len(options)]

  def add(name, factory):
    layers.append(factory)
    names.append(name)

  def act_step():
    name, make = nonlinearity()
    if names and names[-1] == "Flatten":
      flags["swap_at"] = len(layers)
    add(name, make)
    state.kind = FREE
    flags["depth"] += 1

  def affine_step():
    name, make, state.spatial = _affine(rng, state, prefer=focus)
    add(name, make)
    state.kind = GAUSS

  def linear_step():
    name, make, state.spatial = _linear_map(rng, state)
    add(name, make)

  def flatten_step():
    add("Flatten", lambda w: ftn.Flatten())
    state.kind, state.spatial = MIX, ()

  def dropout_step():
    add("Dropout", lambda w: ftn.Dropout(0.3, deterministic=False))
    flags["dropout"], state.kind = True, FREE

  def residual_step():
    act_name, act = nonlinearity()
    w_std = float(np.round(rng.uniform(0.5, 1.5), 2))
    n = len(state.spatial)
    # The branch keeps the shape: a SAME convolution or a dense layer.
    aff = (lambda w: ftn.Conv(w, (2,) * n, padding="SAME", W_std=w_std)
           ) if n else (lambda w: ftn.Dense(w, W_std=w_std, b_std=0.1))
    add(f"Residual[{act_name}]", lambda w: Residual([act(w), aff(w)]))
    flags["depth"] += 1

  def concat_step():
    act_name, act = nonlinearity()
    add(f"Concat[id,{act_name}]", lambda w: Concat(
        [[ftn.Identity()], [act(w)]]))
    state.kind = FREE
    flags["depth"] += 1

  def product_step():
    n = len(state.spatial)
    add("Product", lambda w: Product(*[ftn.Conv(w, (1,) * n) if n else
                                       ftn.Dense(w) for _ in range(2)]))
    state.kind = FREE
    flags["depth"] += 1  # Finite-width products are biased, as a layer.

  def attention_step():
    add("GlobalSelfAttention", lambda w: ftn.GlobalSelfAttention(
        w, w, w, 2, attention_mechanism="SOFTMAX"))
    flags["attention"] = True

  def layer_norm_step():
    add("LayerNorm", lambda w: ftn.LayerNorm())
    flags["depth"] += 1  # Finite-width normalization is biased, as a layer.

  if focus == "Flatten":  # A nonlinearity right after Flatten: swappable.
    affine_step()
    flatten_step()
    act_step()
  for _ in range(rng.randint(1 if focus == "Flatten" else 2, 6)):
    has_space = bool(state.spatial)
    if state.kind in (INPUT, FREE):
      steps = [(affine_step, 3.0, "")]
      if has_space:
        steps.append((linear_step, 0.8, "SumPool ImageResize Index"))
      if state.kind == FREE:
        steps.append((dropout_step, 0.3, "Dropout"))
    elif state.kind == GAUSS:
      steps = [(act_step, 2.5, ""), (affine_step, 0.3, "ConvLocal stock"),
               (residual_step, 0.4, "Residual"), (concat_step, 0.4, "Concat"),
               (product_step, 0.3, "Product"),
               (layer_norm_step, 0.2, "LayerNorm")]
      if has_space:
        steps += [(linear_step, 0.5, "SumPool ImageResize Index"),
                  (flatten_step, 0.5, "Flatten"),
                  (attention_step, 0.3, "GlobalSelfAttention")]
    else:  # MIX: Gaussian parts, after Flatten.
      steps = [(act_step, 2.0, "Flatten"), (dropout_step, 0.5, "Dropout"),
               (affine_step, 0.5, "")]
    weights = np.array([w * (8.0 if focus in tags.split() else 1.0)
                        for _, w, tags in steps])
    steps[rng.choice(len(steps), p=weights / weights.sum())][0]()
  if state.kind == MIX and rng.rand() < 0.8:
    act_step()  # Most often a nonlinearity right after Flatten.
  if state.spatial:
    name = pick(rng, ["Flatten", "GlobalAvgPool"])
    add(name, lambda w, cls=getattr(ftn, name): cls())
  add("Dense", lambda w: ftn.Dense(w, W_std=1.2))
  network = Network(layers, spatial + (2,), names, dropout=flags["dropout"],
                    monte_carlo=not flags["attention"] and flags["depth"] <= 2,
                    nonlinear_depth=flags["depth"])
  swap_at = flags["swap_at"]
  if swap_at is not None:
    swapped = list(layers)
    swapped[swap_at - 1], swapped[swap_at] = layers[swap_at], layers[
        swap_at - 1]
    swapped_names = list(names)
    swapped_names[swap_at - 1], swapped_names[swap_at] = (
        names[swap_at], names[swap_at - 1])
    network.swapped = dataclasses.replace(network, layers=swapped,
                                          description=swapped_names)
  return network


def linear_network(seed: int) -> Network:
  """An affine layer (or a sum of two) and parameter-free linear maps."""
  rng = np.random.RandomState(seed)
  spatial = pick(rng, [(), (5,), (3, 4)])
  state = _State(INPUT, spatial)
  names, layers = [], []
  name, first, state.spatial = _affine(rng, state)
  if rng.rand() < 0.3:
    name2, second, spatial2 = _affine(rng, _State(INPUT, spatial))
    if spatial2 == state.spatial:
      name = f"Sum[{name},{name2}]"
      first = functools.partial(
          lambda w, a, b: _Sum(a(w), b(w)), a=first, b=second)
  layers.append(first)
  names.append(name)
  for _ in range(rng.randint(0, 3)):
    if state.spatial and rng.rand() < 0.2:
      layers.append(lambda w: ftn.Flatten())
      names.append("Flatten")
      state.spatial = ()
      continue
    name, make, state.spatial = _linear_map(rng, state)
    layers.append(make)
    names.append(name)
  return Network(layers, spatial + (2,), names)


class _Sum(nn.Module):
  first: nn.Module
  second: nn.Module

  def __call__(self, x):
    return self.first(x) + self.second(x)
