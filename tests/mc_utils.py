"""Old name of the Monte Carlo helpers, now in `testing.py` (kept for the
test files that still import it)."""

from testing import assert_mc_close
from testing import sample_kernels

__all__ = ["assert_mc_close", "sample_kernels", "sample_kernels_projected"]


def sample_kernels_projected(model, x1, x2, key, n_samples):
  """`testing.sample_kernels(..., ntk='projected')`."""
  return sample_kernels(model, x1, x2, key, n_samples, ntk="projected")
