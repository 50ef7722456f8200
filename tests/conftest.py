"""Strict, shared test settings.

float64 is enabled for the whole session: golden values are float64 and are
compared at rtol 1e-6. float32 tests cast their inputs explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def load_golden(name: str) -> dict[str, np.ndarray]:
  """The arrays of `tests/golden/<name>.npz` (copied from NT 0.6.5 runs)."""
  with np.load(os.path.join(GOLDEN_DIR, f"{name}.npz")) as data:
    return {k: data[k] for k in data.files}
