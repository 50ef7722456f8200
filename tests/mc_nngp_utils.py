"""Monte Carlo NNGP estimates from forward passes only (no Jacobians).

`f(x1) f(x2)^T / d` averaged over draws of `model.init`: cheap enough for
the larger stock-layer models of the lifting tests.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sample_nngp(model: nn.Module, x1, x2, key: jax.Array,
                n_samples: int) -> np.ndarray:
  """Per-network NNGP estimates, shape `(n_samples, N1, N2)`."""
  x1, x2 = jnp.asarray(x1), jnp.asarray(x2)

  def one(k):
    variables = model.init(k, x1)
    out1, out2 = model.apply(variables, x1), model.apply(variables, x2)
    return out1 @ out2.T / out1.shape[-1]

  keys = jax.random.split(key, n_samples)
  return np.asarray(jax.jit(jax.vmap(one))(keys))
