"""STRUCTURED vs JACOBIAN_CONTRACTION: seconds and peak memory.

Run: `python benchmarks/empirical_structured.py [--repeats 5] [--vmap]`.

Seconds: median of `--repeats` compiled runs after a warm-up (compiling)
run, each ended with `block_until_ready`. Peak memory: XLA's compiled
`memory_analysis()` of the jitted kernel function, temporaries plus outputs
(bytes the executable allocates beyond its arguments); on CPU this is the
static buffer assignment, not a measured process peak.

Workloads (float32, `trace_axes=()`, 16 inputs for x1 and for x2 unless
said otherwise):
  fcn: Dense(1024), Relu, Dense(1024), Relu, Dense(8) on inputs of dim 64.
  cnn: Conv(64, (3, 3), 'SAME'), Relu, twice, GlobalAvgPool, Dense(10) on
       16x16x3 images.
  embed: nn.Embed(50_000, 64) on 32 sequences of 16 tokens (x1 = x2),
       mean over tokens, Dense(10).

Neural Tangents 0.6.5's structured derivatives on the same 2-core CPU:
fcn 8.2 ms (312x its Jacobian contraction), cnn 0.106 s (its Jacobian
contraction 0.099 s). NT is not installed here, and the machine is shared,
so `--reference` adds a same-run yardstick, `ref s`: NT's Jacobian
contraction re-implemented in a few lines (`jax.vmap(jax.jacrev(f))` per
example, then `J1 J2^T`), for fcn and cnn.
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_tangents._src.empirical import arguments
from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import jacobian_contraction
from flax_tangents._src.empirical import structured

try:
  from flax_tangents import nn as ftn
  _LAYERS = (ftn.Dense, ftn.Conv, ftn.Relu, ftn.GlobalAvgPool)
except (ImportError, AttributeError):  # Fall back to stock Flax layers.
  _LAYERS = None

IMPLEMENTATIONS = {"STRUCTURED": structured.ntk,
                   "JACOBIAN_CONTRACTION": jacobian_contraction.ntk}
NT_STRUCTURED_SECONDS = {"fcn": 0.0082, "cnn": 0.106}


class _GlobalMean(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


class EmbedModel(nn.Module):
  """Embedding lookup, mean over tokens, a Dense head."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(num_embeddings=50_000, features=64)(tokens)
    return nn.Dense(10)(jnp.mean(x, axis=1))


def _layers():
  if _LAYERS is not None:
    dense, conv, relu, gap = _LAYERS
    return dense, conv, relu, gap
  return (nn.Dense, nn.Conv, lambda: nn.relu, _GlobalMean)


def workloads():
  """`name -> (model, x1, x2)`; x2 None means x2 = x1."""
  dense, conv, relu, gap = _layers()
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(0), 5)
  fcn = nn.Sequential([dense(1024), relu(), dense(1024), relu(), dense(8)])
  cnn = nn.Sequential([conv(64, (3, 3), padding="SAME"), relu(),
                       conv(64, (3, 3), padding="SAME"), relu(), gap(),
                       dense(10)])
  return {
      "fcn": (fcn, jax.random.normal(k1, (16, 64), jnp.float32),
              jax.random.normal(k2, (16, 64), jnp.float32)),
      "cnn": (cnn, jax.random.normal(k3, (16, 16, 16, 3), jnp.float32),
              jax.random.normal(k4, (16, 16, 16, 3), jnp.float32)),
      "embed": (EmbedModel(), jax.random.randint(k5, (32, 16), 0, 50_000),
                None),
  }


def _kernel_fn(impl, model, vmap_axes_arg, x1, variables):
  f, _ = arguments.split_variables(model.apply, variables)
  fx = jax.eval_shape(f, variables["params"], x1)
  vmap_axes = example_axes.canonicalize_vmap_axes(vmap_axes_arg, x1, fx, {})

  def kernel(params, a, b):
    return impl(f, params, a, b, {}, {}, trace_axes=(), diagonal_axes=(),
                vmap_axes=vmap_axes)

  return jax.jit(kernel)


def _reference_fn(model, variables):
  """NT-style Jacobian contraction: per-example `jacrev`, then `J1 J2^T`."""
  f, _ = arguments.split_variables(model.apply, variables)

  def single(p, x):
    return f(p, x[None])[0]

  def kernel(params, a, b):
    j1 = jax.vmap(jax.jacrev(single), (None, 0))(params, a)
    j2 = jax.vmap(jax.jacrev(single), (None, 0))(params, b)
    terms = [
        jnp.einsum("nox,mpx->nmop", u.reshape(u.shape[:2] + (-1,)),
                   v.reshape(v.shape[:2] + (-1,)))
        for u, v in zip(jax.tree.leaves(j1), jax.tree.leaves(j2))
    ]
    return sum(terms[1:], terms[0])

  return jax.jit(kernel)


def _seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _peak_bytes(fn, args):
  analysis = fn.lower(*args).compile().memory_analysis()
  if analysis is None:
    return None
  return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def run(repeats, vmap_settings, names, reference=False):
  rows = []
  for name, (model, x1, x2) in workloads().items():
    if names and name not in names:
      continue
    variables = model.init(jax.random.PRNGKey(1), x1)
    variables = jax.tree.map(lambda v: v.astype(jnp.float32), variables)
    args = (variables["params"], x1, x2)
    ref = None
    if reference and name in ("fcn", "cnn"):
      ref = _seconds(_reference_fn(model, variables),
                     (variables["params"], x1, x1 if x2 is None else x2),
                     repeats)
    for vmap_axes in vmap_settings:
      row = {"workload": name, "vmap_axes": vmap_axes, "reference": ref}
      for label, impl in IMPLEMENTATIONS.items():
        fn = _kernel_fn(impl, model, vmap_axes, x1, variables)
        row[label] = (_seconds(fn, args, repeats), _peak_bytes(fn, args))
      rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--vmap", action="store_true",
                      help="also time vmap_axes=0 (examples independent)")
  parser.add_argument("--only", nargs="*", default=(),
                      help="workloads to run (default: all)")
  parser.add_argument("--reference", action="store_true",
                      help="also time an NT-style Jacobian contraction")
  args = parser.parse_args()
  print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, "
        f"layers: {'flax_tangents.nn' if _LAYERS else 'flax.linen'}")
  settings = [None] + ([0] if args.vmap else [])
  print(f"{'workload':<8}{'vmap':>6}{'SD s':>11}{'JC s':>11}{'JC/SD':>8}"
        f"{'SD MiB':>10}{'JC MiB':>10}{'JC/SD':>8}{'NT SD s':>9}"
        f"{'ref s':>9}")
  for row in run(args.repeats, settings, set(args.only), args.reference):
    (sd_s, sd_b), (jc_s, jc_b) = row["STRUCTURED"], row[
        "JACOBIAN_CONTRACTION"]
    mib = lambda b: float("nan") if b is None else b / 2**20  # noqa: E731
    nt = NT_STRUCTURED_SECONDS.get(row["workload"])
    ref = "" if row["reference"] is None else f"{row['reference']:.4f}"
    print(f"{row['workload']:<8}{str(row['vmap_axes']):>6}{sd_s:>11.4f}"
          f"{jc_s:>11.4f}{jc_s / sd_s:>8.1f}{mib(sd_b):>10.1f}"
          f"{mib(jc_b):>10.1f}{mib(jc_b) / mib(sd_b):>8.1f}"
          f"{'' if nt is None else nt:>9}{ref:>9}")


if __name__ == "__main__":
  main()
