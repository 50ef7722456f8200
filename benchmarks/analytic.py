"""Seconds per analytic kernel computation, next to Neural Tangents 0.6.5.

Workloads (from NT's README and issue 2), float32 on the default backend:

- `cnn21_flatten`: 21 x [Conv(1, (3, 3), (1, 1), 'SAME'), Relu] + Flatten on
  64 inputs of shape 8x8x3 (a 64x64 NTK; only spatial diagonals are needed);
- `cnn21_gap`: the same topped with GlobalAvgPool on 16 inputs (16x16 NTK,
  full spatial covariances);
- `fcn10`: 10 x [Dense(512, W_std=1.5, b_std=0.05), Relu] + Dense on 1000
  points of dimension 100 (1000x1000 NNGP and NTK).

Each timing is the median of several runs of the jit-compiled kernel_fn (with
`get` static) after a warm-up call, blocking until ready.

Run: `python benchmarks/analytic.py`.
"""

from __future__ import annotations

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import flax_tangents as ft
from flax_tangents import nn as ftn

# NT 0.6.5 on the project's 2-core CPU (seconds), from issue 2.
NT_SECONDS = {"cnn21_flatten": 0.072, "cnn21_gap": 2.14, "fcn10": 0.148}


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


def time_kernel_fn(model: nn.Module, x: jax.Array, repeats: int) -> float:
  kernel_fn = jax.jit(ft.kernel_fn(model), static_argnames="get")
  jax.block_until_ready(kernel_fn(x, None, ("nngp", "ntk")))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(kernel_fn(x, None, ("nngp", "ntk")))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
  workloads = {
      "cnn21_flatten": (cnn21(ftn.Flatten()),
                        jax.random.normal(key1, (64, 8, 8, 3)), 20),
      "cnn21_gap": (cnn21(ftn.GlobalAvgPool()),
                    jax.random.normal(key2, (16, 8, 8, 3)), 5),
      "fcn10": (fcn10(), jax.random.normal(key3, (1000, 100)), 10),
  }
  print(f"backend: {jax.default_backend()}, dtype: {jnp.zeros(()).dtype}")
  print(f"{'workload':<16}{'flax_tangents s':>17}{'NT 0.6.5 s':>13}"
        f"{'ours/NT':>10}")
  for name, (model, x, repeats) in workloads.items():
    seconds = time_kernel_fn(model, x, repeats)
    print(f"{name:<16}{seconds:>17.4f}{NT_SECONDS[name]:>13.3f}"
          f"{seconds / NT_SECONDS[name]:>10.2f}")


if __name__ == "__main__":
  main()
