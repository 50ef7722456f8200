"""Flax lifted transforms under ft.kernel_fn: scan, remat, jit; the rest
refused by name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from testing import assert_mc_close
from testing import sample_kernels

RS = np.random.RandomState(0)
X1, X2 = RS.randn(3, 4), RS.randn(2, 4)
TRACES = {"block": 0}


class Block(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, h, _):
    TRACES["block"] += 1
    return nn.Dense(self.width, bias_init=nn.initializers.normal(0.2))(
        nn.gelu(h, approximate=False)), None


class ScanNet(nn.Module):
  length: int
  width: int = 8
  scan_kwargs: tuple = (("variable_axes", {"params": 0}),
                        ("split_rngs", {"params": True}))

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.width)(x)
    stack = nn.scan(Block, length=self.length, **dict(self.scan_kwargs))
    h, _ = stack(self.width, name="stack")(h, None)
    return nn.Dense(1)(h)


def _unrolled(length, width=8):
  layers = [nn.Dense(width)]
  for _ in range(length):
    layers += [lambda h: nn.gelu(h, approximate=False), nn.Dense(width,
                                 bias_init=nn.initializers.normal(0.2))]
  return nn.Sequential(layers + [nn.Dense(1)])


@pytest.mark.parametrize("length", [1, 5])
def test_scan_equals_unrolled_layers(length):
  got = ft.kernel_fn(ScanNet(length))(X1, X2, ("nngp", "ntk"))
  want = ft.kernel_fn(_unrolled(length))(X1, X2, ("nngp", "ntk"))
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


def test_scan_traces_its_step_a_fixed_number_of_times():
  # The step is peeled until the kernel's structure is stable, then run in
  # one `lax.scan`: the number of traces does not grow with the length.
  counts = []
  for length in (3, 12):
    TRACES["block"] = 0
    ft.kernel_fn(ScanNet(length))(X1, X2, "nngp")
    counts.append(TRACES["block"])
  assert counts[0] == counts[1] and counts[0] <= 12, counts


def test_scan_monte_carlo():
  model = ScanNet(2, width=128)
  nngp = ft.kernel_fn(model)(X1, X2, "nngp")
  samples, _ = sample_kernels(model, X1, X2, jax.random.key(3), 128,
                              ntk=None)
  # Three hidden layers of width 128: a finite-width bias of a few percent.
  assert_mc_close(samples, np.asarray(nngp), n_se=5.0, bias=0.05)


@pytest.mark.parametrize("kwargs, message", [
    ((("variable_broadcast", "params"), ("split_rngs", {"params": False})),
     r"nn.scan\(Block\) \(module 'stack'\) broadcasts its 'params'.*same "
     r"weights"),
    # Flax then initializes every step with the same weights.
    ((("variable_axes", {"params": 0}), ("split_rngs", {"params": False})),
     r"does not split the 'params' RNG.*split_rngs=\{'params': True\}"),
])
def test_scan_with_shared_or_identical_weights_is_refused(kwargs, message):
  with pytest.raises(ft.KernelRuleError, match=message):
    ft.kernel_fn(ScanNet(2, scan_kwargs=kwargs))(X1, X2)


class Inner(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


class Transformed(nn.Module):
  transform: str

  @nn.compact
  def __call__(self, x):
    wrap = {"remat": nn.remat, "checkpoint": nn.checkpoint, "jit": nn.jit,
            "none": lambda c: c}[self.transform]
    return wrap(Inner)(name="inner")(x)


class DecoratedRemat(nn.Module):
  @nn.remat
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


@pytest.mark.parametrize("transform", ["remat", "checkpoint", "jit",
                                       "decorator"])
def test_semantics_preserving_transforms(transform):
  model = DecoratedRemat() if transform == "decorator" else Transformed(
      transform)
  got = ft.kernel_fn(model)(X1, X2, ("nngp", "ntk"))
  want = ft.kernel_fn(Transformed("none"))(X1, X2, ("nngp", "ntk"))
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


class Vmapped(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6)(x)[:, None, :]
    dense = nn.vmap(nn.Dense, in_axes=1, out_axes=1,
                    variable_axes={"params": 0},
                    split_rngs={"params": True})
    return dense(3, name="per_slice")(h)


class MappedVariables(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.map_variables(nn.Dense, "params", lambda p: p, init=True)
    return dense(3, name="mapped")(x)


@pytest.mark.parametrize("model, message", [
    (Vmapped(), r"nn.vmap\(Dense\) \(module 'per_slice'\) has no "
     r"infinite-width kernel rule"),
    (MappedVariables(), r"nn.map_variables\(Dense\) \(module 'mapped'\).*"
     r"`nn.map_variables` has no infinite-width kernel rule"),
])
def test_other_transforms_are_refused_by_name(model, message):
  with pytest.raises(ft.KernelRuleError, match=message):
    ft.kernel_fn(model)(X1, X2)


class Cell(nn.Module):
  @nn.compact
  def __call__(self, h, x):
    return nn.Dense(4)(jnp.tanh(h)) + nn.Dense(4)(x), None


class Emit(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    h = nn.Dense(4)(jnp.tanh(h))
    return h, h


class Recurrent(nn.Module):
  case: str

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x)
    kw = dict(variable_axes={"params": 0}, split_rngs={"params": True})
    if self.case == "xs":
      seq = jnp.stack([nn.Dense(4)(x), nn.Dense(4)(x)], axis=1)
      return nn.scan(Cell, in_axes=1, **kw)()(h, seq)[0]  # refused: xs
    return nn.scan(Emit, length=2, **kw)()(h, None)[1][0]  # refused: ys


@pytest.mark.parametrize("case, message", [
    ("xs", r"cannot lift `transpose`.*batch axis.*`nn.scan` over an axis"),
    ("ys", r"cannot lift `scan`.*step of nn.scan\(Emit\).*returns network "
     r"values as outputs"),
])
def test_scan_over_network_values_is_refused_with_its_line(case, message):
  with open(__file__) as source:
    line = next(i + 1 for i, s in enumerate(source)
                if f"# refused: {case}" in s)
  with pytest.raises(ft.KernelRuleError, match=message) as info:
    ft.kernel_fn(Recurrent(case))(X1, X2)
  assert f"test_lifted_transforms.py:{line}:" in str(info.value)


def test_scan_as_the_whole_model_is_refused_with_advice():
  model = nn.scan(Emit, length=2, variable_axes={"params": 0},
                  split_rngs={"params": True})()
  with pytest.raises(ft.KernelRuleError, match=r"nn.scan\(Emit\).*is the "
                     r"whole model.*wrap it"):
    ft.kernel_fn(model)(X1, X2)
