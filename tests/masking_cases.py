"""Padded sequences for the masking tests (NT's `mask_constant`)."""

import flax.linen as nn
import numpy as np

import flax_tangents as ft

PAD = -7.0


def padded(lengths, size, channels, seed):
  """Sequences of the given lengths, padded with PAD to `size` locations."""
  x = np.random.RandomState(seed).randn(len(lengths), size, channels)
  for i, length in enumerate(lengths):
    x[i, length:] = PAD
  return x


class Masked(nn.Module):
  """Applies `inner` to `MaskedArray(x)` (padding = PAD), unmasked output."""
  inner: nn.Module

  def __call__(self, x):
    return self.inner(ft.MaskedArray.from_mask_constant(x, PAD)).unmask()
