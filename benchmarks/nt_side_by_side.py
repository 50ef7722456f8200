"""Neural Tangents 0.6.5 on our benchmarks' workloads, for same-run ratios.

NOT part of flax_tangents and not imported by it: run it with the Python of
a separate virtualenv holding NT 0.6.5 on the last JAX it runs on, built by
`../shared/tools/setup_nt_venv.sh DIR` (NT does not import on current JAX).
`benchmarks/empirical.py` and `benchmarks/analytic.py` call it in a
subprocess when given `--nt-python DIR/bin/python`, so that both libraries
are timed in one run on the same, possibly busy, machine.

Run: `DIR/bin/python benchmarks/nt_side_by_side.py empirical|analytic
[--only NAMES] [--repeats 5]`. Prints one JSON object:
`{workload: {implementation or 'kernel': seconds, ...}, ...}` (median of the
repeats after a compiling warm-up call, each ended with
`block_until_ready`); analytic workloads also report
`peak_mib`, XLA's compiled temporaries plus outputs.

The workloads mirror ours layer for layer (see the docstrings of
`empirical.py` and `analytic.py`); inputs are drawn the same way but from
NT's JAX, so values differ while shapes and dtypes are identical.
"""

import argparse
import json
import statistics
import time

import jax
import neural_tangents as nt
from neural_tangents import stax


def _seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _peak_mib(fn, args):
  try:
    analysis = fn.lower(*args).compile().memory_analysis()
    return (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / 2**20
  except Exception:  # pylint: disable=broad-except
    return None


# Empirical NTK workloads of benchmarks/empirical.py.


def empirical_workloads():
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  fcn = stax.serial(stax.Dense(1024), stax.Relu(), stax.Dense(1024),
                    stax.Relu(), stax.Dense(8))
  cnn = stax.serial(stax.Conv(64, (3, 3), padding="SAME"), stax.Relu(),
                    stax.Conv(64, (3, 3), padding="SAME"), stax.Relu(),
                    stax.GlobalAvgPool(), stax.Dense(10))
  return {
      "fcn": (fcn, jax.random.normal(k1, (16, 64)),
              jax.random.normal(k2, (16, 64))),
      "cnn": (cnn, jax.random.normal(k3, (16, 16, 16, 3)),
              jax.random.normal(k4, (16, 16, 16, 3))),
  }


def run_empirical(names, repeats):
  results = {}
  for name, ((init_fn, apply_fn, _), x1, x2) in empirical_workloads().items():
    if names and name not in names:
      continue
    _, params = init_fn(jax.random.PRNGKey(1), x1.shape)
    row = {}
    for short, impl in (("JC", 1), ("NVP", 2), ("SD", 3)):
      ntk_fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(),
                                           vmap_axes=0, implementation=impl))
      row[short] = _seconds(ntk_fn, (x1, x2, params), repeats)
    results[name] = row
  return results


# Analytic workloads of benchmarks/analytic.py.


def _cnn21(top):
  layers = []
  for _ in range(21):
    layers += [stax.Conv(1, (3, 3), (1, 1), "SAME"), stax.Relu()]
  return stax.serial(*layers, top)


def _fcn10():
  layers = []
  for _ in range(10):
    layers += [stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu()]
  return stax.serial(*layers, stax.Dense(1, W_std=1.5, b_std=0.05))


def _myrtle5():
  """NT's Myrtle kernel notebook, depth 5: average pooling, 10 outputs."""
  w, b = 2. ** 0.5, 0.
  conv = lambda: stax.Conv(1, (3, 3), W_std=w, b_std=b, padding="SAME")  # noqa: E731
  pool = lambda: stax.AvgPool((2, 2), strides=(2, 2))  # noqa: E731
  return stax.serial(conv(), stax.Relu(), conv(), stax.Relu(), pool(),
                     conv(), stax.Relu(), pool(),
                     conv(), stax.Relu(), pool(), pool(), pool(),
                     stax.Flatten(), stax.Dense(10, w, b))


def _wrn_block(channels, strides, channel_mismatch):
  main = stax.serial(
      stax.Relu(), stax.Conv(channels, (3, 3), strides, padding="SAME"),
      stax.Relu(), stax.Conv(channels, (3, 3), padding="SAME"))
  shortcut = (stax.Identity() if not channel_mismatch else
              stax.Conv(channels, (3, 3), strides, padding="SAME"))
  return stax.serial(stax.FanOut(2), stax.parallel(main, shortcut),
                     stax.FanInSum())


def _wide_resnet(block_size=2, channels=1):
  """NT's README WideResnet (groups of `block_size` blocks), global pooling."""
  layers = [stax.Conv(channels, (3, 3), padding="SAME")]
  for strides in ((1, 1), (2, 2), (2, 2)):
    layers.append(_wrn_block(channels, strides, True))
    for _ in range(block_size - 1):
      layers.append(_wrn_block(channels, (1, 1), False))
  return stax.serial(*layers, stax.GlobalAvgPool(),
                     stax.Dense(10, 1., 0.))


def _attention(depth=2):
  layers = []
  for _ in range(depth):
    layers += [stax.GlobalSelfAttention(n_chan_out=1, n_chan_key=1,
                                        n_chan_val=1, n_heads=1,
                                        linear_scaling=True),
               stax.Relu()]
  return stax.serial(stax.Dense(1), *layers, stax.GlobalAvgPool(),
                     stax.Dense(1))


def analytic_workloads():
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  return {
      "cnn21_flatten": (_cnn21(stax.Flatten()),
                        jax.random.normal(keys[0], (64, 8, 8, 3)), 20),
      "cnn21_gap": (_cnn21(stax.GlobalAvgPool()),
                    jax.random.normal(keys[1], (16, 8, 8, 3)), 5),
      "fcn10": (_fcn10(), jax.random.normal(keys[2], (1000, 100)), 10),
      "myrtle5": (_myrtle5(), jax.random.normal(keys[3], (8, 32, 32, 3)), 3),
      "wrn": (_wide_resnet(), jax.random.normal(keys[4], (8, 16, 16, 3)), 3),
      "attention": (_attention(), jax.random.normal(keys[5], (32, 64, 8)),
                    5),
  }


def run_analytic(names, repeats):
  results = {}
  for name, ((_, _, kernel_fn), x, reps) in analytic_workloads().items():
    if names and name not in names:
      continue
    fn = jax.jit(lambda a, kf=kernel_fn: kf(a, None, ("nngp", "ntk")))
    results[name] = {"kernel": _seconds(fn, (x,), min(repeats, reps)),
                     "peak_mib": _peak_mib(fn, (x,))}
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("suite", choices=("empirical", "analytic"))
  parser.add_argument("--only", nargs="*", default=())
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  run = run_empirical if args.suite == "empirical" else run_analytic
  results = run(set(args.only), args.repeats)
  results["_versions"] = {"jax": jax.__version__,
                          "neural_tangents": getattr(nt, "__version__",
                                                     "0.6.5")}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
