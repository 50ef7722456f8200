"""Strict, shared settings for tests and doctests.

float64 is enabled for the whole session: golden values are float64 and are
compared at rtol 1e-6; float32 tests cast their inputs explicitly. Implicit
rank promotion is an error, so broadcasting bugs cannot hide.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
