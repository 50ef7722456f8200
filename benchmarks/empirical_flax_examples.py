"""Empirical NTK of Flax's own example models: compile and run seconds.

Run: `python benchmarks/empirical_flax_examples.py [--only resnet lm1b ...]
[--vmap none|0|both] [--repeats 3] [--impls JC NVP SD] [--auto]
[--explain] [--n 4]`. `--explain --impls` (no implementation) prints only the
public plan report, `str(ft.empirical_ntk_plan(...))`, of each model.

The models are Flax's `examples/*/models.py` (ResNet of imagenet, the
Transformers of lm1b and wmt, the LSTMs of sst2 and seq2seq, the VAE, the
PPO actor-critic), copied into `tests/flax_examples/` and built by
`tests/flax_example_zoo.py` at its `'bench'` sizes (float32, 8 inputs in
`x1` and 8 in `x2`, `trace_axes` as in the zoo: the logit axis is traced
for the language models and the VAE).

For each model and implementation: `compile s` is `jax.jit(...).lower(...)
.compile()` of the kernel function, `run s` the median of `--repeats`
compiled runs (each ended with `block_until_ready`), both measured in the
same process, implementation after implementation, so the ratios
`JC/SD` (run) are measured under the same load. `plan` is what
`ft.empirical_ntk_plan` says of STRUCTURED_DERIVATIVES (`ok`: no parameter
falls back and examples are proven independent). With `--auto`, AUTO's
first call (its choice included) and its pick are reported too, and the
per-call milliseconds of AUTO and of its pick's own `ntk_fn` after their
first calls (AUTO's dispatch cost).

`vmap_axes=None` is the default call: without STRUCTURED_DERIVATIVES'
proof of example independence, Jacobian contraction and NTK-vector products
cost the square of the batch there. `vmap_axes=0` (per-example
evaluation) is valid only for the models that do not draw random numbers
for the whole batch (not the VAE and seq2seq, which fall back with a
warning).
"""

import argparse
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import flax_tangents as ft  # noqa: E402
import flax_example_zoo as zoo  # noqa: E402  pylint: disable=g-import-not-at-top

IMPLEMENTATIONS = {
    "JC": ft.NtkImplementation.JACOBIAN_CONTRACTION,
    "NVP": ft.NtkImplementation.NTK_VECTOR_PRODUCTS,
    "SD": ft.NtkImplementation.STRUCTURED_DERIVATIVES,
}
SHORT = {v: k for k, v in IMPLEMENTATIONS.items()}


def _block(tree):
  return jax.block_until_ready(tree)


def measure(ex, impl, vmap_axes, repeats):
  """`(compile_s, run_s)` of one implementation on one model."""
  ntk_fn = ft.empirical_ntk_fn(ex.f, ex.trace_axes, vmap_axes=vmap_axes,
                               implementation=impl)
  fn = jax.jit(lambda v, a, b: ntk_fn(a, b, v, **ex.kwargs))
  start = time.perf_counter()
  compiled = fn.lower(ex.variables, ex.x1, ex.x2).compile()
  compile_s = time.perf_counter() - start
  _block(compiled(ex.variables, ex.x1, ex.x2))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    _block(compiled(ex.variables, ex.x1, ex.x2))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times)


def first_call_auto(ex, vmap_axes, repeats):
  """AUTO's first call (choosing included), its pick, and the per-call
  seconds of AUTO and of the picked implementation's own `ntk_fn` after
  their first calls (both called eagerly: AUTO's cost over its pick's is
  its dispatch, which must be small)."""
  def call_seconds(ntk_fn):
    times = []
    for _ in range(max(repeats, 5)):
      start = time.perf_counter()
      _block(ntk_fn(ex.x1, ex.x2, ex.variables, **ex.kwargs))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  ntk_fn = ft.empirical_ntk_fn(ex.f, ex.trace_axes, vmap_axes=vmap_axes,
                               implementation=ft.NtkImplementation.AUTO)
  start = time.perf_counter()
  _block(ntk_fn(ex.x1, ex.x2, ex.variables, **ex.kwargs))
  seconds = time.perf_counter() - start
  choice = list(ntk_fn.auto_selector.choices.values())[0]
  pick_fn = ft.empirical_ntk_fn(ex.f, ex.trace_axes, vmap_axes=vmap_axes,
                                implementation=choice.implementation)
  _block(pick_fn(ex.x1, ex.x2, ex.variables, **ex.kwargs))
  auto_call, pick_call = call_seconds(ntk_fn), call_seconds(pick_fn)
  return seconds, SHORT.get(choice.implementation, "?"), auto_call, pick_call


def plan_status(ex, vmap_axes):
  """`(short status, plan)`: `ok`, or fallbacks (`+wb`: whole-batch)."""
  plan = ft.empirical_ntk_plan(ex.f, ex.x1, ex.x2, ex.variables,
                               vmap_axes=vmap_axes, **ex.kwargs)
  if plan.fully_structured:
    return "ok", plan
  return f"{len(plan.fallbacks)}fb" + ("" if plan.vmap_axes_used or
                                       plan.examples_independent else
                                       "+wb"), plan


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", default=zoo.CASES)
  parser.add_argument("--vmap", choices=("none", "0", "both"), default="none")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--impls", nargs="*", default=list(IMPLEMENTATIONS))
  parser.add_argument("--auto", action="store_true",
                      help="also time AUTO's first call")
  parser.add_argument("--n", type=int, default=None,
                      help="examples in x1 and in x2 (default: the zoo's 8)")
  parser.add_argument("--explain", action="store_true",
                      help="print ft.empirical_ntk_plan's report per model")
  args = parser.parse_args()
  settings = {"none": [None], "0": [0], "both": [None, 0]}[args.vmap]
  print(f"backend: {jax.default_backend()}, devices: {len(jax.devices())}, "
        f"jax {jax.__version__}")
  header = f"{'model':<9}{'vmap':>5}{'params':>9}{'plan':>6}"
  for short in args.impls:
    header += f"{short + ' cmp s':>11}{short + ' run s':>11}"
  header += f"{'JC/SD':>7}"
  if args.auto:
    header += (f"{'AUTO 1st s':>11}{'pick':>5}{'AUTO call ms':>13}"
               f"{'pick call ms':>13}")
  print(header)
  for name in args.only:
    if args.n:  # Fewer examples: less memory for the whole-batch Jacobians.
      zoo._SIZES[name]["bench"]["n"] = (args.n, args.n)  # pylint: disable=protected-access
    ex = zoo.make_case(name, "bench", jnp.float32)
    n_params = sum(l.size for l in jax.tree.leaves(ex.variables["params"]))
    for vmap_axes in settings:
      if vmap_axes is not None and not ex.per_example:
        continue
      status, plan = plan_status(ex, vmap_axes)
      if args.explain:
        print(f"{name}, vmap_axes={vmap_axes}: {plan}")
      row = (f"{name:<9}{str(vmap_axes):>5}{n_params:>9}{status:>6}")
      runs = {}
      for short in args.impls:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          compile_s, run_s = measure(ex, IMPLEMENTATIONS[short], vmap_axes,
                                     args.repeats)
        runs[short] = run_s
        row += f"{compile_s:>11.2f}{run_s:>11.4f}"
      if "JC" in runs and "SD" in runs:
        row += f"{runs['JC'] / runs['SD']:>7.1f}"
      if args.auto:
        seconds, pick, auto_call, pick_call = first_call_auto(
            ex, vmap_axes, args.repeats)
        row += (f"{seconds:>11.2f}{pick:>5}{auto_call * 1e3:>13.2f}"
                f"{pick_call * 1e3:>13.2f}")
      print(row, flush=True)


if __name__ == "__main__":
  main()
