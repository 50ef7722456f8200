"""Seconds per empirical-NTK implementation on two reference workloads.

Run: `python benchmarks/empirical.py [--repeats 5] [--rounds 2]
[--nt-python DIR/bin/python]`. Each entry is the median of `--repeats`
compiled runs (after a warm-up run that compiles), each ended with
`block_until_ready`. Workloads, float32, `trace_axes=()`, `vmap_axes=0`
(both networks treat examples independently; NT's recommended setting, and
the one its reference timings need), `x1` and `x2` of 16 inputs each:

  fcn: Dense(1024), Relu, Dense(1024), Relu, Dense(8) on inputs of dim 64.
  cnn: Conv(64, (3, 3), 'SAME'), Relu, twice, GlobalAvgPool, Dense(10) on
       16x16x3 images.

With `--nt-python`, Neural Tangents 0.6.5 runs the same workloads
(`nt_side_by_side.py`, in its own virtualenv, see there) in a subprocess,
alternating with ours for `--rounds` rounds; each side keeps its best
median, and `NT/ours` (above 1: we are faster) compares them. Ratios from
one run are what to quote: this 2-core machine is shared and its absolute
timings move by 10x with the load.

Why each implementation is at least as fast as NT's:

* fcn (1.06M parameters, 8 outputs). JACOBIAN_CONTRACTION forms the
  per-example Jacobians (16 x 8 x 1.06M floats per input, 2 x 68 MB) in the
  cheaper autodiff mode and contracts them in one `dot_general` per
  parameter (2 x 16 x 16 x 64 x 1.06M = 35 GFLOP): memory traffic bound. NT
  does the same work. NTK_VECTOR_PRODUCTS linearizes `f` on `x1` once and
  pushes the 8 pulled-back basis vectors of each `x2` example through it
  (16 x 8 JVPs over the whole `x1` batch), not one VJP-JVP pair per pair of
  examples as NT does. STRUCTURED_DERIVATIVES never forms a dense layer's
  Jacobian: its term is `(x1 x2^T) * (C1 C2^T)`, a few MFLOP, where NT's
  structured rules are about as cheap.
* cnn (38.6k parameters, 10 outputs, 16x16 spatial). Per-example filter
  gradients are what XLA:CPU handles worst: under `jax.vmap` the gradient
  of a convolution with respect to its filter becomes a grouped
  convolution (`feature_group_count` = batch), which XLA:CPU runs as a
  naive loop, about 5x slower than the same FLOPs in one ordinary
  convolution. So here JACOBIAN_CONTRACTION computes the Jacobian of the
  whole batch in reverse mode through a sum over examples (each example's
  output depends only on its own input under `vmap_axes`, so the sum's
  gradient separates by example): the filter gradient is an ordinary
  convolution over the batch, 10 reverse passes instead of 160.
  STRUCTURED_DERIVATIVES needs no filter gradient at all: a convolution's
  Jacobian is the image patches (im2col) times an identity over output
  channels, so its term is `C1 P1 P2^T C2^T` with `C = d f / d y` taken
  at the convolution's output, 10 reverse passes through the cheap top of
  the network, and one patch Gram per layer (16 x 16 x 256 x 256 x 27 and
  x 576 multiply-adds for the two layers), computed as batched matrix
  products with contiguous operands.
"""

import argparse
import json
import statistics
import subprocess
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
)
SHORT_NAMES = {impl: name for name, impl in IMPLEMENTATIONS}


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


def seconds(fn, *args, repeats: int, first: list | None = None
            ) -> float:
  """Median seconds of `fn(*args)` after one warm-up (compiling) call.

  The warm-up call's seconds (compile and run) are appended to `first`.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  if first is not None:
    first.append(time.perf_counter() - start)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def first_call_auto(model, x1, x2, variables, vmap_axes):
  """`(seconds, pick, reason)` of AUTO's first call, its choice included."""
  ntk_fn = ft.empirical_ntk_fn(model.apply, trace_axes=(),
                               vmap_axes=vmap_axes,
                               implementation=ft.NtkImplementation.AUTO)
  start = time.perf_counter()
  jax.block_until_ready(ntk_fn(x1, x2, variables))
  elapsed = time.perf_counter() - start
  (choice,) = ntk_fn.auto_selector.choices.values()
  return elapsed, SHORT_NAMES[choice.implementation], choice.reason


def run(repeats: int, vmap_axes, names=(), auto=False):
  """`{workload: {implementation: seconds}}` for flax_tangents.

  With `auto`, also `'1st ' + implementation`: the first (compiling) call
  of each, and `'AUTO'`: `first_call_auto`'s result, measured first so that
  no cache of the other calls helps it.
  """
  results = {}
  for name, (model, x1, x2) in workloads().items():
    if names and name not in names:
      continue
    variables = model.init(jax.random.PRNGKey(1), x1)
    variables = jax.tree.map(lambda v: v.astype(jnp.float32), variables)
    row = {}
    if auto:
      row["AUTO"] = first_call_auto(model, x1, x2, variables, vmap_axes)
    for short, impl in IMPLEMENTATIONS:
      ntk_fn = ft.empirical_ntk_fn(model.apply, trace_axes=(),
                                   vmap_axes=vmap_axes, implementation=impl)
      first = []
      row[short] = seconds(jax.jit(ntk_fn), x1, x2, variables,
                           repeats=repeats, first=first)
      row["1st " + short] = first[0]
    results[name] = row
  return results


def print_auto(ours: dict) -> None:
  """AUTO's first call beside each implementation's first call."""
  print(f"{'workload':<9}" + "".join(f"{s + ' 1st s':>11}" for s, _ in
                                     IMPLEMENTATIONS) +
        f"{'sum 1st s':>11}{'AUTO 1st s':>11}{'pick':>6}"
        f"{'AUTO/pick 1st':>15}  reason")
  for name, row in ours.items():
    auto_s, pick, reason = row["AUTO"]
    firsts = [row["1st " + s] for s, _ in IMPLEMENTATIONS]
    print(f"{name:<9}" + "".join(f"{t:>11.3f}" for t in firsts) +
          f"{sum(firsts):>11.3f}{auto_s:>11.3f}{pick:>6}"
          f"{auto_s / row['1st ' + pick]:>15.2f}  {reason}", flush=True)


def run_nt(python: str, repeats: int, names=()) -> dict:
  """NT 0.6.5's seconds from `nt_side_by_side.py` in its own virtualenv."""
  script = __file__.replace("empirical.py", "nt_side_by_side.py")
  command = [python, script, "empirical", "--repeats", str(repeats)]
  if names:
    command += ["--only", *names]
  out = subprocess.run(command, check=True, capture_output=True, text=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  return json.loads(out.stdout.strip().splitlines()[-1])


def _best(a: dict, b: dict) -> dict:
  return {w: {k: min(v, b.get(w, {}).get(k, v)) for k, v in row.items()}
          for w, row in a.items()} if b else a


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=1,
                      help="alternate ours and NT this many times")
  parser.add_argument("--only", nargs="*", default=())
  parser.add_argument("--nt-python", default=None,
                      help="python of a virtualenv with neural-tangents")
  parser.add_argument("--auto", action="store_true",
                      help="also time AUTO's first call (first round)")
  args = parser.parse_args()
  print(f"backend: {jax.default_backend()}, jax {jax.__version__}")
  ours, nt = {}, {}
  first_round = None
  for _ in range(args.rounds):
    ours = _best(run(args.repeats, 0, args.only, args.auto), ours)
    first_round = first_round or ours
    if args.nt_python:
      nt = _best(run_nt(args.nt_python, args.repeats, args.only), nt)
  header = f"{'workload':<9}" + "".join(f"{s + ' s':>10}" for s, _ in
                                        IMPLEMENTATIONS)
  if nt:
    header += "".join(f"{'NT ' + s + ' s':>11}" for s, _ in IMPLEMENTATIONS)
    header += "".join(f"{'NT/ours ' + s:>12}" for s, _ in IMPLEMENTATIONS)
  print(header)
  for name, row in ours.items():
    line = f"{name:<9}" + "".join(f"{row[s]:>10.4f}" for s, _ in
                                  IMPLEMENTATIONS)
    if nt:
      line += "".join(f"{nt[name][s]:>11.4f}" for s, _ in IMPLEMENTATIONS)
      line += "".join(f"{nt[name][s] / row[s]:>12.2f}" for s, _ in
                      IMPLEMENTATIONS)
    print(line, flush=True)
  if args.auto:
    print_auto(first_round)


if __name__ == "__main__":
  main()
