"""Seconds and peak memory per analytic kernel computation, beside NT 0.6.5.

Run: `python benchmarks/analytic.py [--only NAMES] [--rounds 2]
[--nt-python DIR/bin/python]`.

Workloads (float32, NNGP and NTK of `x` against itself, `get` static):

- `cnn21_flatten`: 21 x [Conv(1, (3, 3), (1, 1), 'SAME'), Relu] + Flatten on
  64 inputs of shape 8x8x3 (a 64x64 NTK; only spatial diagonals needed);
- `cnn21_gap`: the same topped with GlobalAvgPool on 16 inputs (16x16 NTK,
  full spatial covariances);
- `fcn10`: 10 x [Dense(512, W_std=1.5, b_std=0.05), Relu] + Dense on 1000
  points of dimension 100 (1000x1000 NNGP and NTK);
- `myrtle5`: the Myrtle kernel of NT's notebook (depth 5: [Conv, Relu] x 2,
  AvgPool, [Conv, Relu], AvgPool, [Conv, Relu], AvgPool x 3, Flatten,
  Dense(10); W_std=sqrt(2), b_std=0) on 8 CIFAR-sized 32x32x3 inputs: full
  spatial covariances, 1024 x 1024 positions per pair at the first layers;
- `wrn`: NT's README WideResNet, 3 groups of 2 residual blocks (the first
  of each group with a convolutional shortcut, strides 1, 2, 2), global
  average pooling, Dense(10), on 8 inputs of 16x16x3;
- `attention`: Dense, 2 x [GlobalSelfAttention(linear_scaling=True,
  softmax), Relu], GlobalAvgPool, Dense on 32 sequences of 64 tokens of 8
  features (full covariances over token pairs: 32^2 x 64^2 entries; a
  smaller size ran in 5 ms, where call overheads decide the ratio).

Seconds: median of several runs of the jit-compiled `kernel_fn` after a
warm-up call, blocking until ready. Peak memory: XLA's compiled memory
analysis (temporaries plus outputs) of the same function. With
`--nt-python`, NT 0.6.5 runs the same networks in its own virtualenv
(`nt_side_by_side.py`), alternating with ours for `--rounds` rounds; each
side keeps its best; `NT/ours` above 1 means we are faster.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import flax_tangents as ft
from flax_tangents import nn as ftn


def cnn21(top: nn.Module) -> nn.Module:
  layers = []
  for _ in range(21):
    # NT's stax.Conv(1, (3, 3), (1, 1), 'SAME'): W_std=1, no bias.
    layers += [ftn.Conv(1, (3, 3), strides=(1, 1), padding="SAME"),
               ftn.Relu()]
  return nn.Sequential(layers + [top])


def fcn10() -> nn.Module:
  layers = []
  for _ in range(10):
    layers += [ftn.Dense(512, W_std=1.5, b_std=0.05), ftn.Relu()]
  return nn.Sequential(layers + [ftn.Dense(1, W_std=1.5, b_std=0.05)])


def myrtle5() -> nn.Module:
  """NT's Myrtle kernel notebook, depth 5."""
  w, b = math.sqrt(2.), 0.

  def conv():
    return ftn.Conv(1, (3, 3), W_std=w, b_std=b, padding="SAME")

  def pool():
    return ftn.AvgPool((2, 2), strides=(2, 2))

  return nn.Sequential([
      conv(), ftn.Relu(), conv(), ftn.Relu(), pool(),
      conv(), ftn.Relu(), pool(),
      conv(), ftn.Relu(), pool(), pool(), pool(),
      ftn.Flatten(), ftn.Dense(10, W_std=w, b_std=b)])


class WideResnetBlock(nn.Module):
  """NT's README block: Relu, Conv, Relu, Conv, plus a shortcut."""
  channels: int
  strides: tuple[int, int] = (1, 1)
  channel_mismatch: bool = False

  @nn.compact
  def __call__(self, x):
    y = ftn.Conv(self.channels, (3, 3), self.strides, padding="SAME")(
        ftn.Relu()(x))
    y = ftn.Conv(self.channels, (3, 3), padding="SAME")(ftn.Relu()(y))
    if self.channel_mismatch:
      x = ftn.Conv(self.channels, (3, 3), self.strides, padding="SAME")(x)
    return x + y


def wide_resnet(block_size: int = 2, channels: int = 1) -> nn.Module:
  layers = [ftn.Conv(channels, (3, 3), padding="SAME")]
  for strides in ((1, 1), (2, 2), (2, 2)):
    layers.append(WideResnetBlock(channels, strides, True))
    for _ in range(block_size - 1):
      layers.append(WideResnetBlock(channels))
  return nn.Sequential(layers + [ftn.GlobalAvgPool(),
                                 ftn.Dense(10, W_std=1., b_std=0.)])


def attention(depth: int = 2) -> nn.Module:
  layers = [ftn.Dense(1)]
  for _ in range(depth):
    layers += [ftn.GlobalSelfAttention(n_chan_out=1, n_chan_key=1,
                                       n_chan_val=1, n_heads=1,
                                       linear_scaling=True),
               ftn.Relu()]
  return nn.Sequential(layers + [ftn.GlobalAvgPool(), ftn.Dense(1)])


def workloads():
  """`name -> (model, x, repeats)`; inputs as in `nt_side_by_side.py`."""
  keys = jax.random.split(jax.random.key(0), 6)
  return {
      "cnn21_flatten": (cnn21(ftn.Flatten()),
                        jax.random.normal(keys[0], (64, 8, 8, 3)), 20),
      "cnn21_gap": (cnn21(ftn.GlobalAvgPool()),
                    jax.random.normal(keys[1], (16, 8, 8, 3)), 5),
      "fcn10": (fcn10(), jax.random.normal(keys[2], (1000, 100)), 10),
      "myrtle5": (myrtle5(), jax.random.normal(keys[3], (8, 32, 32, 3)), 3),
      "wrn": (wide_resnet(), jax.random.normal(keys[4], (8, 16, 16, 3)), 3),
      "attention": (attention(), jax.random.normal(keys[5], (32, 64, 8)), 5),
  }


def measure(model: nn.Module, x: jax.Array, repeats: int
            ) -> tuple[float, float | None]:
  """`(seconds, peak MiB)` of the jitted NNGP and NTK of `x` with itself."""
  kernel_fn = ft.kernel_fn(model)
  fn = jax.jit(lambda a: kernel_fn(a, None, ("nngp", "ntk")))
  compiled = fn.lower(x).compile()
  analysis = compiled.memory_analysis()
  peak = None if analysis is None else (
      analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / 2**20
  jax.block_until_ready(compiled(x))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x))
    times.append(time.perf_counter() - start)
  return statistics.median(times), peak


def run_nt(python: str, names, repeats: int) -> dict:
  script = __file__.replace("analytic.py", "nt_side_by_side.py")
  command = [python, script, "analytic", "--repeats", str(repeats)]
  if names:
    command += ["--only", *names]
  out = subprocess.run(command, check=True, capture_output=True, text=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", default=())
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--nt-python", default=None,
                      help="python of a virtualenv with neural-tangents")
  args = parser.parse_args()
  print(f"backend: {jax.default_backend()}, jax {jax.__version__}, "
        f"dtype: {jnp.zeros(()).dtype}")
  ours, nt = {}, {}
  for _ in range(args.rounds):
    for name, (model, x, repeats) in workloads().items():
      if args.only and name not in args.only:
        continue
      seconds, peak = measure(model, x, repeats)
      best = ours.get(name, (float("inf"), peak))[0]
      ours[name] = (min(seconds, best), peak)
    if args.nt_python:
      for name, row in run_nt(args.nt_python, args.only, 5).items():
        if name.startswith("_"):
          continue
        if name not in nt or row["kernel"] < nt[name]["kernel"]:
          nt[name] = row
  header = f"{'workload':<15}{'ours s':>10}{'ours MiB':>10}"
  if nt:
    header += f"{'NT s':>10}{'NT MiB':>10}{'NT/ours':>9}"
  print(header)
  for name, (seconds, peak) in ours.items():
    line = f"{name:<15}{seconds:>10.4f}{peak or float('nan'):>10.1f}"
    if name in nt:
      nt_s, nt_peak = nt[name]["kernel"], nt[name]["peak_mib"]
      line += (f"{nt_s:>10.4f}{nt_peak or float('nan'):>10.1f}"
               f"{nt_s / seconds:>9.2f}")
    print(line, flush=True)


if __name__ == "__main__":
  main()
