"""Kernel regression at scale: ft.batch kernel + ft.predict CG solve.

Usage:
  python benchmarks/regression_scale.py            # N = 2,000 ... 20,000
  python benchmarks/regression_scale.py --sizes 2000 5000 10000 20000 50000
  python benchmarks/regression_scale.py --small    # N = 300: a smoke test
  python benchmarks/regression_scale.py --sizes 2000 10000 --dense-max 5000

Each N runs in its own subprocess with 8 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set before JAX is
imported), so that its peak memory is its own. The problem:

- data: a synthetic 10-class "digits-like" set in 64 dimensions (class
  means on a 16-dimensional manifold, anisotropic noise, inputs scaled to
  the unit sphere), N train points, `--n-test` test points;
- kernel: the infinite-width NTK of a 3-layer ReLU FCN (`ft.kernel_fn`),
  `(N, N)` train kernel and `(n_test, N)` test-train kernel, both computed
  by `ft.batch` over the 8 devices (the train kernel stays sharded by rows);
- solve: `ft.predict.gp_inference(..., solver=CG(rank=...))` mean of the
  NTK posterior (infinite-time gradient descent on MSE) for the 10 one-hot
  targets, with `diag_reg` relative to the mean diagonal;
- dense: the same with `solver='dense'` (float64 Cholesky on one device)
  where `N <= --dense-max`, and the relative difference of the predictions.

Columns: N; dtype; where the train kernel lives (`sharded`: a jax.Array
split by rows over 8 devices; `streamed`: ft.batch checkpoint tiles on
disk, `--streamed-at`); kernel seconds (train + test-train); CG seconds
(preconditioner included); CG iterations; the kernel's bytes per device
(from its shards); the subprocess's peak RSS (CPU devices share one
process, so per-device peak memory is not reported by JAX on CPU:
`memory_stats()` is None); dense seconds and agreement; test accuracy.

Rows from `--float32-from` (default 40,000) on are computed in float32 by
`ft.batch(..., store_on_device=False, checkpoint_dir=...)` (the host holds
the kernel once: 10 GB at N = 50,000) and solved from the tiles on disk in
float32 (`--float32-tol`, default 1e-4 on the residual): in float64, or
assembled on the devices (about three times the kernel while stitching),
they do not fit in 24 GiB. A failed subprocess (out of memory, ...) prints
its error in the table instead of numbers.

Simulated CPU devices share the machine's cores: times are CPU times of 2
shared cores, not of 8 devices.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

N_DEVICES = 8


def _data(n, n_test, dtype, seed=0):
  """A synthetic 10-class set: x (n, 64), one-hot y (n, 10), and test."""
  import numpy as np
  rng = np.random.RandomState(seed)
  basis = rng.randn(16, 64) / 4.
  means = rng.randn(10, 16)
  scales = np.exp(rng.randn(64) / 2.)

  def draw(m):
    labels = rng.randint(0, 10, m)
    latent = means[labels] + 0.8 * rng.randn(m, 16)
    x = latent @ basis + 0.3 * scales * rng.randn(m, 64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.eye(10)[labels] - 0.1
    return x.astype(dtype), y.astype(dtype), labels
  return draw(n), draw(n_test)


def _peak_rss_gib():
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _measure(args):
  """Runs in the subprocess: prints one JSON line."""
  import flax.linen as nn
  import jax
  import numpy as np

  jax.config.update("jax_enable_x64", True)
  import flax_tangents as ft
  from flax_tangents import nn as ftn

  assert jax.device_count() == N_DEVICES, jax.devices()
  dtype = np.dtype(args.dtype)
  (x, y, _), (x_test, _, labels_test) = _data(args.n, args.n_test, dtype)
  model = nn.Sequential([ftn.Dense(512, W_std=1.5, b_std=0.05), ftn.Relu(),
                         ftn.Dense(512, W_std=1.5, b_std=0.05), ftn.Relu(),
                         ftn.Dense(1, W_std=1.5, b_std=0.05)])
  kernel_fn = ft.kernel_fn(model)
  row = {"n": args.n, "dtype": dtype.name, "store": args.store}

  start = time.perf_counter()
  if args.store == "streamed":
    directory = tempfile.mkdtemp(prefix="regression_scale_")
    train = ft.batch(kernel_fn, args.batch_size, store_on_device=False,
                     checkpoint_dir=directory)(x, None, "ntk")
    del train  # Solved from the tiles on disk, never loaded whole.
    k_train = ft.predict.TiledKernel(directory)
    row["kernel_bytes_per_device"] = None
  else:
    k_train = ft.batch(kernel_fn, args.batch_size)(x, None, "ntk")
    k_train = jax.block_until_ready(k_train)
    row["kernel_bytes_per_device"] = max(
        s.data.nbytes for s in k_train.addressable_shards)
    row["sharding"] = str(k_train.sharding.spec)
  k_test = np.asarray(ft.batch(kernel_fn, args.batch_size,
                               store_on_device=False)(x_test, x, "ntk"))
  row["kernel_s"] = time.perf_counter() - start

  tol = args.float32_tol if dtype == np.float32 else None
  solver = ft.predict.CG(rank=args.rank, progress=args.progress, tol=tol,
                         state_dir="" if args.store == "streamed" else None)
  start = time.perf_counter()
  predict_fn = ft.predict.gp_inference(k_train, y, args.diag_reg,
                                       solver=solver)
  mean = np.asarray(predict_fn("ntk", k_test))
  row["solve_s"] = time.perf_counter() - start
  info = predict_fn.solve_info["ntk"]
  row.update(iterations=info.iterations, residual=info.residual,
             tol=info.tol, preconditioner=info.preconditioner,
             accuracy=float(np.mean(mean.argmax(1) == labels_test)))

  if args.n <= args.dense_max:
    dense_kernel = (k_train.to_array() if args.store == "streamed"
                    else np.asarray(k_train))
    start = time.perf_counter()
    want = np.asarray(ft.predict.gp_inference(
        dense_kernel, y, args.diag_reg, solver="dense")("ntk", k_test))
    row["dense_s"] = time.perf_counter() - start
    row["agreement"] = float(np.max(np.abs(mean - want)) /
                             np.max(np.abs(want)))
  row["peak_rss_gib"] = _peak_rss_gib()
  print("RESULT " + json.dumps(row), flush=True)


def _run_one(args, n, dtype, store):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={N_DEVICES}")
  command = [sys.executable, os.path.abspath(__file__), "--one", str(n),
             "--dtype", dtype, "--store", store, "--n-test",
             str(args.n_test), "--batch-size", str(args.batch_size),
             "--rank", str(args.rank), "--diag-reg", str(args.diag_reg),
             "--dense-max", str(args.dense_max),
             "--float32-tol", str(args.float32_tol)]
  if args.progress:
    command.append("--progress")
  start = time.perf_counter()
  log = os.path.join(args.log_dir, f"n{n}_{dtype}_{store}.log")
  with open(log, "w") as stderr:  # Progress and errors: tail -f it.
    result = subprocess.run(command, check=False, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env)
  for line in result.stdout.splitlines():
    if line.startswith("RESULT "):
      row = json.loads(line[len("RESULT "):])
      row["wall_s"] = time.perf_counter() - start
      return row
  with open(log) as f:
    tail = [line for line in f.read().splitlines() if line.strip()]
  return {"n": n, "dtype": dtype, "store": store,
          "error": f"exit {result.returncode}: " + (tail[-1] if tail else "")}


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def _table(rows):
  header = ("| N | dtype | kernel held | kernel s | CG s | CG iters | "
            "residual | kernel MiB/device | peak RSS GiB | dense s | "
            "CG vs dense | test acc |")
  lines = [header, "|" + "---|" * 12]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['n']} | {r['dtype']} | {r['store']} | "
                   f"failed: {r['error']} |" + " |" * 8)
      continue
    per_device = r.get("kernel_bytes_per_device")
    lines.append(
        f"| {r['n']} | {r['dtype']} | {r['store']} | "
        f"{r['kernel_s']:.1f} | {r['solve_s']:.1f} | {r['iterations']} | "
        f"{r['residual']:.1e} | "
        f"{_fmt(None if per_device is None else per_device / 2**20, '.0f')}"
        f" | {r['peak_rss_gib']:.2f} | {_fmt(r.get('dense_s'), '.1f')} | "
        f"{_fmt(r.get('agreement'), '.1e')} | {r['accuracy']:.3f} |")
  return "\n".join(lines)


def _plan(args):
  """(n, dtype, store) of every row."""
  rows = []
  for n in args.sizes:
    if n >= args.float32_from:  # Too large for float64 or for the device
      rows.append((n, "float32", "streamed"))  # assembly (3x the kernel).
      continue
    dtype = "float64"
    rows.append((n, dtype, "sharded"))
    if n in args.streamed_at:
      rows.append((n, dtype, "streamed"))
    if n in args.float32_at and dtype == "float64":
      rows.append((n, "float32", "sharded"))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true",
                      help="N = 300 only (about a minute): a smoke test")
  parser.add_argument("--sizes", type=int, nargs="+",
                      default=[2000, 5000, 10000, 20000])
  parser.add_argument("--dense-max", type=int, default=5000)
  parser.add_argument("--streamed-at", type=int, nargs="*", default=[5000],
                      help="sizes also solved from ft.batch tiles on disk")
  parser.add_argument("--float32-from", type=int, default=40000)
  parser.add_argument("--float32-at", type=int, nargs="*", default=[5000],
                      help="sizes also solved in float32 (vs the dense "
                      "float64 solve)")
  parser.add_argument("--float32-tol", type=float, default=1e-4,
                      help="CG tolerance of float32 rows (the library's "
                      "default 1e-5 is not reached at N=5000 with "
                      "diag_reg=1e-3: 3e-5 measured)")
  parser.add_argument("--n-test", type=int, default=1000)
  parser.add_argument("--batch-size", type=int, default=1000)
  parser.add_argument("--rank", type=int, default=300)
  parser.add_argument("--diag-reg", type=float, default=1e-3)
  parser.add_argument("--progress", action="store_true",
                      help="CG progress in each row's log file")
  parser.add_argument("--log-dir", default=None,
                      help="where each row's stderr goes (default: a new "
                      "temporary directory)")
  parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
  parser.add_argument("--store", default="sharded", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one is not None:
    args.n = args.one
    _measure(args)
    return
  if args.small:
    args.sizes, args.n_test, args.batch_size = [300], 50, 100
    args.rank, args.dense_max, args.streamed_at = 30, 300, [300]
    args.float32_at = []
  args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="regression_scale_")
  print(f"{N_DEVICES} simulated CPU devices on {os.cpu_count()} cores; "
        f"rank {args.rank} Nystrom, diag_reg {args.diag_reg:g} (relative), "
        f"{args.n_test} test points, batch_size {args.batch_size}; "
        f"logs in {args.log_dir}",
        flush=True)
  rows = []
  for n, dtype, store in _plan(args):
    rows.append(_run_one(args, n, dtype, store))
    print(json.dumps(rows[-1]), flush=True)
    print(_table(rows).splitlines()[-1], flush=True)
  print(_table(rows))


if __name__ == "__main__":
  main()
