"""Strict, shared settings for tests and doctests.

float64 is enabled for the whole session: golden values are float64 and are
compared at rtol 1e-6; float32 tests cast their inputs explicitly. Implicit
rank promotion is an error, so broadcasting bugs cannot hide.

Tests use tiny shapes, so their time goes to XLA compiling, not running:
LLVM's backend optimizations are turned off (IEEE semantics are kept, only
machine code is slower), which roughly halves the suite's time. Notebook
kernels and the docs build inherit the setting.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
