"""Old name of the spatial Monte Carlo sampler, now `testing.sample_kernels`
(kept for the test files that still import it)."""

import testing


def sample_kernels(model, x1, x2, key, n_samples, batch_size=8,
                   dropout=False, with_ntk=True, **apply_kwargs):
  """`testing.sample_kernels` with one forward pass for `x1` and `x2`."""
  return testing.sample_kernels(
      model, x1, x2, key, n_samples, joint=True, dropout=dropout,
      batch_size=batch_size, ntk="jacobian" if with_ntk else None,
      **apply_kwargs)
