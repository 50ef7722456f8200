"""Old name of the forward-only NNGP sampler, now `testing.sample_kernels`
with `ntk=None` (kept for the test files that still import it)."""

import jax.numpy as jnp

import testing


def sample_nngp(model, x1, x2, key, n_samples):
  """Per-network NNGP estimates, shape `(n_samples, N1, N2)`."""
  return testing.sample_kernels(model, jnp.asarray(x1), jnp.asarray(x2), key,
                                n_samples, ntk=None)[0]
