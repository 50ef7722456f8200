"""Seconds per empirical-NTK implementation on two reference workloads.

Run: `python benchmarks/empirical.py`. Each entry is the median of several
compiled runs (after a warm-up run that compiles), each ended with
`block_until_ready`. Workloads, float32, `trace_axes=()`, `vmap_axes=0` (both
networks treat examples independently; NT's recommended setting, and the one
its reference timings need), `x1` and `x2` of 16 inputs each:

  fcn: Dense(1024), Relu, Dense(1024), Relu, Dense(8) on inputs of dim 64.
  cnn: Conv(64, (3, 3), 'SAME'), Relu, twice, GlobalAvgPool, Dense(10) on
       16x16x3 images.

Neural Tangents 0.6.5 on the same 2-core CPU: fcn 2.56 s (JC), 0.189 s
(NVP); cnn 0.099 s (JC), 0.73 s (NVP).
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import flax_tangents as ft
from flax_tangents import nn as ftn

IMPLEMENTATIONS = (
    ("JC", ft.NtkImplementation.JACOBIAN_CONTRACTION),
    ("NVP", ft.NtkImplementation.NTK_VECTOR_PRODUCTS),
    ("SD", ft.NtkImplementation.STRUCTURED_DERIVATIVES),
    ("AUTO", ft.NtkImplementation.AUTO),
)
SHORT_NAMES = {impl: name for name, impl in IMPLEMENTATIONS}
NT_SECONDS = {"fcn": {"JC": 2.56, "NVP": 0.189},
              "cnn": {"JC": 0.099, "NVP": 0.73}}


def workloads():
  """`name -> (model, x1, x2)` for the two reference workloads."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  fcn = nn.Sequential([ftn.Dense(1024), ftn.Relu(), ftn.Dense(1024),
                       ftn.Relu(), ftn.Dense(8)])
  cnn = nn.Sequential([ftn.Conv(64, (3, 3), padding="SAME"), ftn.Relu(),
                       ftn.Conv(64, (3, 3), padding="SAME"), ftn.Relu(),
                       ftn.GlobalAvgPool(), ftn.Dense(10)])
  return {
      "fcn": (fcn, jax.random.normal(k1, (16, 64), jnp.float32),
              jax.random.normal(k2, (16, 64), jnp.float32)),
      "cnn": (cnn, jax.random.normal(k3, (16, 16, 16, 3), jnp.float32),
              jax.random.normal(k4, (16, 16, 16, 3), jnp.float32)),
  }


def seconds(fn, *args, repeats: int) -> float:
  """Median seconds of `fn(*args)` after one warm-up (compiling) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(repeats: int, vmap_axes):
  rows = []
  for name, (model, x1, x2) in workloads().items():
    variables = model.init(jax.random.PRNGKey(1), x1)
    variables = jax.tree.map(lambda v: v.astype(jnp.float32), variables)
    row = {"workload": name}
    for short, impl in IMPLEMENTATIONS:
      try:
        ntk_fn = ft.empirical_ntk_fn(model.apply, trace_axes=(),
                                     vmap_axes=vmap_axes,
                                     implementation=impl)
        row[short] = seconds(jax.jit(ntk_fn), x1, x2, variables,
                             repeats=repeats)
      except NotImplementedError:
        row[short] = None
      if short == "AUTO":
        choices = list(ntk_fn.auto_selector.choices.values())
        row["picked"] = SHORT_NAMES[choices[0]] if choices else "?"
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--also-unbatched", action="store_true",
                      help="also time vmap_axes=None (much slower)")
  args = parser.parse_args()
  print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
  settings = [0] + ([None] if args.also_unbatched else [])
  header = (f"{'workload':<10}{'vmap_axes':>10}" +
            "".join(f"{short:>10}" for short, _ in IMPLEMENTATIONS) +
            f"{'picked':>8}{'fastest':>9}{'NT JC':>8}{'NT NVP':>8}")
  print(header)
  for vmap_axes in settings:
    for row in run(args.repeats, vmap_axes):
      cells = "".join(
          f"{'n/a':>10}" if row[s] is None else f"{row[s]:>10.4f}"
          for s, _ in IMPLEMENTATIONS)
      timed = {s: row[s] for s, _ in IMPLEMENTATIONS[:3] if row[s] is not None}
      best = min(timed, key=timed.get)
      nt = NT_SECONDS[row["workload"]]
      print(f"{row['workload']:<10}{str(vmap_axes):>10}{cells}"
            f"{row['picked']:>8}{best:>9}{nt['JC']:>8}{nt['NVP']:>8}")


if __name__ == "__main__":
  main()
