"""Throughput of ft.batch as devices are added; tiling and checkpoint costs.

Usage:
  python benchmarks/scaling.py                # 1, 2, 4, 8 simulated CPU devices
  python benchmarks/scaling.py --devices 1 2  # a subset
  python benchmarks/scaling.py --n 512 --batch-size 128 --width 256

Each device count runs in its own subprocess (the count is fixed when JAX
is imported: `XLA_FLAGS=--xla_force_host_platform_device_count=D` on CPU;
on a GPU machine the subprocess sees its real devices and the CPU flag is
ignored). The kernel is the empirical NTK of a 3-layer ReLU network
(`--kernel analytic`: its infinite-width NTK) on `n` inputs, symmetric
(`x2=None`) and with `x2` given. Reported per
device count, after a warm-up call (compilation excluded):

- kernel entries per second of the batched computation;
- tiling overhead: batched time / one unbatched jitted call (1 device only;
  tiles do redundant `cov1`/`cov2` work and stitching costs copies);
- checkpoint cost: batched time with `checkpoint_dir` (a new `ft.batch`
  wrapper and a new directory each run) / without, measured interleaved
  (best of `--repeats` each), and the compute time per tile.

Checkpoint cost at a size where tiles take seconds (issue 12, item 4;
`--width 1024 --batch-size 512` needs over 40 GB for the whole-batch
Jacobians of the default JACOBIAN_CONTRACTION, `vmap_axes=None`):
  python benchmarks/scaling.py --devices 1 --checkpoint-only \
      --n 512 --batch-size 256 --width 256 --repeats 2

Simulated CPU devices share the machine's cores, so their speed-up is bounded
by the core count (`nproc`).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time


def _measure(args):
  """Runs in the subprocess: prints one JSON line of timings."""
  import flax.linen as nn
  import jax
  import numpy as np

  import flax_tangents as ft
  from flax_tangents import nn as ftn

  jax.config.update("jax_enable_x64", False)
  x1 = np.random.RandomState(0).randn(args.n, 32).astype(np.float32)
  x2 = np.random.RandomState(1).randn(args.n, 32).astype(np.float32)
  if args.kernel == "analytic":
    model = nn.Sequential([ftn.Dense(args.width, W_std=1.5, b_std=0.05),
                           ftn.Relu(), ftn.Dense(args.width, W_std=1.5),
                           ftn.Relu(), ftn.Dense(1)])
    analytic = ft.kernel_fn(model)
    kernel_fn = lambda a, b=None, get=None: analytic(a, b, get)
    extra = ()
  else:  # The empirical NTK of a finite network: compute-bound.
    model = nn.Sequential([nn.Dense(args.width), nn.relu,
                           nn.Dense(args.width), nn.relu, nn.Dense(4)])
    kernel_fn = ft.empirical_kernel_fn(model.apply)
    extra = (model.init(jax.random.PRNGKey(0), x1[:1]),)

  def best_time(fn, repeats=args.repeats):
    jax.block_until_ready(fn())  # Warm-up: compilation.
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
    return min(times)

  batched = ft.batch(kernel_fn, args.batch_size, progress=False)
  result = {"devices": jax.device_count(), "n": args.n,
            "kernel": args.kernel, "batch_size": args.batch_size}
  general = lambda: batched(x1, x2, "ntk", *extra)

  def checkpointed():
    # A new wrapper and a new directory each time, as a user's run has.
    with tempfile.TemporaryDirectory() as directory:
      return jax.block_until_ready(
          ft.batch(kernel_fn, args.batch_size, checkpoint_dir=directory,
                   progress=False)(x1, x2, "ntk", *extra))

  # Interleaved, so that load from other processes hits both alike.
  jax.block_until_ready(general())
  jax.block_until_ready(checkpointed())
  plain_times, checkpoint_times = [], []
  for _ in range(args.repeats):
    for fn, times in ((general, plain_times),
                      (checkpointed, checkpoint_times)):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
  result["general_s"] = min(plain_times)
  result["checkpointed_s"] = min(checkpoint_times)
  result["tiles"] = math.ceil(args.n / args.batch_size) ** 2
  if args.checkpoint_only:
    result["symmetric_s"] = float("nan")
    print("RESULT " + json.dumps(result), flush=True)
    return
  result["symmetric_s"] = best_time(lambda: batched(x1, None, "ntk", *extra))
  if jax.device_count() == 1:
    exact = jax.jit(lambda a, b, *e: kernel_fn(a, b, "ntk", *e))
    exact_symmetric = jax.jit(lambda a, *e: kernel_fn(a, None, "ntk", *e))
    result["unbatched_s"] = best_time(lambda: exact(x1, x2, *extra))
    result["unbatched_symmetric_s"] = best_time(
        lambda: exact_symmetric(x1, *extra))
  print("RESULT " + json.dumps(result), flush=True)


def _table(rows):
  n = rows[0]["n"]
  lines = [
      f"ft.batch scaling: {rows[0]['kernel']} NTK, {n}x{n} kernel, "
      f"{rows[0]['batch_size']}x{rows[0]['batch_size']} tiles",
      "| devices | symmetric (s) | general (s) | kentries/s (general) | "
      "speed-up | checkpointed (s) | checkpoint cost | s per tile |",
      "|---|---|---|---|---|---|---|---|",
  ]
  base = rows[0]["general_s"]
  for row in rows:
    lines.append(
        f"| {row['devices']} | {row['symmetric_s']:.3f} | "
        f"{row['general_s']:.3f} | {n * n / row['general_s'] / 1e3:.1f} | "
        f"{base / row['general_s']:.2f}x | {row['checkpointed_s']:.3f} | "
        f"{row['checkpointed_s'] / row['general_s'] - 1:+.1%} | "
        f"{row['general_s'] * row['devices'] / row['tiles']:.2f} |")
  one = [r for r in rows if "unbatched_s" in r]
  if one:
    r = one[0]
    lines.append("")
    lines.append(
        f"Tiling overhead (1 device): general {r['general_s']:.3f}s vs one "
        f"unbatched call {r['unbatched_s']:.3f}s "
        f"({r['general_s'] / r['unbatched_s']:.2f}x); symmetric "
        f"{r['symmetric_s']:.3f}s vs {r['unbatched_symmetric_s']:.3f}s "
        f"({r['symmetric_s'] / r['unbatched_symmetric_s']:.2f}x).")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--kernel", choices=("empirical", "analytic"),
                      default="empirical")
  parser.add_argument("--checkpoint-only", action="store_true",
                      help="measure only the general kernel with and "
                      "without checkpoint_dir")
  parser.add_argument("--measure", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    _measure(args)
    return
  rows = []
  for count in args.devices:
    env = dict(os.environ,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
    if "JAX_PLATFORMS" not in os.environ and count > 1:
      env["JAX_PLATFORMS"] = "cpu"  # Simulated devices are CPU devices.
    command = [sys.executable, os.path.abspath(__file__), "--measure",
               "--n", str(args.n), "--batch-size", str(args.batch_size),
               "--width", str(args.width), "--repeats", str(args.repeats),
               "--kernel", args.kernel] + (
                   ["--checkpoint-only"] if args.checkpoint_only else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          check=False)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode or not lines:
      sys.exit(f"{count} devices failed:\n{done.stderr[-3000:]}")
    rows.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"measured {count} device(s)", file=sys.stderr, flush=True)
  print(_table(rows))


if __name__ == "__main__":
  main()
