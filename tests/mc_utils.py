"""Monte Carlo kernels of finite networks, for checking analytic limits.

Networks are drawn with `model.init`; the NNGP estimate of one network is
`f(x1) f(x2)^T / d` (averaged over its `d` outputs) and its NTK estimate the
Jacobian contraction `J(x1) J(x2)^T / d`, written here directly so the check
does not depend on the library's empirical kernels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sample_kernels(model: nn.Module, x1: jax.Array, x2: jax.Array,
                   key: jax.Array, n_samples: int,
                   **apply_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """Per-network NNGP and NTK estimates, shape `(n_samples, N1, N2)` each."""

  def one_network(k):
    params = model.init(k, x1)["params"]
    f = lambda p, x: model.apply({"params": p}, x, **apply_kwargs)
    out1, out2 = f(params, x1), f(params, x2)
    n_out = out1.shape[-1]
    nngp = jnp.einsum("a...i,b...i->ab", out1, out2) / (
        n_out * np.prod(out1.shape[1:-1]))
    jac1 = jax.jacobian(f)(params, x1)
    jac2 = jax.jacobian(f)(params, x2)
    ntk = sum(
        jnp.einsum("ai...,bi...->ab", j1.reshape(j1.shape[:2] + (-1,)),
                   j2.reshape(j2.shape[:2] + (-1,))) / n_out
        for j1, j2 in zip(jax.tree.leaves(jac1), jax.tree.leaves(jac2)))
    return nngp, ntk

  keys = jax.random.split(key, n_samples)
  nngp, ntk = jax.jit(jax.vmap(one_network))(keys)
  return np.asarray(nngp), np.asarray(ntk)


def sample_kernels_projected(model: nn.Module, x1: jax.Array, x2: jax.Array,
                             key: jax.Array, n_samples: int
                             ) -> tuple[np.ndarray, np.ndarray]:
  """As `sample_kernels`, without forming Jacobians (for wide networks).

  The NTK estimate of one network contracts the parameter gradients of
  `v . f(x)` for a standard normal `v` over the outputs, which is unbiased
  for the output-averaged `J J^T / d` (with more variance). Outputs must be
  `(N, d)`.
  """
  x = jnp.concatenate([jnp.asarray(x1), jnp.asarray(x2)])
  n1 = x1.shape[0]

  def one_network(k):
    init_key, v_key = jax.random.split(k)
    params = model.init(init_key, x[:1])["params"]
    f = lambda p, xs: model.apply({"params": p}, xs)
    out = f(params, x)
    n_out = out.shape[-1]
    v = jax.random.normal(v_key, (n_out,), out.dtype)
    grads = jax.vmap(lambda xi: jax.grad(
        lambda p: jnp.dot(f(p, xi[None])[0], v))(params))(x)
    flat = jnp.concatenate([g.reshape(x.shape[0], -1)
                            for g in jax.tree.leaves(grads)], axis=1)
    return out[:n1] @ out[n1:].T / n_out, flat[:n1] @ flat[n1:].T / n_out

  keys = jax.random.split(key, n_samples)
  nngp, ntk = jax.jit(jax.vmap(one_network))(keys)
  return np.asarray(nngp), np.asarray(ntk)


def assert_mc_close(samples: np.ndarray, expected: np.ndarray, *,
                    n_se: float = 5.0, bias: float = 0.0) -> None:
  """Checks a sample mean against its limit within a justified tolerance.

  The tolerance is `n_se` standard errors of the mean (measured from the
  samples themselves) plus `bias` times the kernel's scale, the latter for
  the O(1/width) finite-width bias of networks deeper than one hidden layer
  (zero for one hidden layer, whose kernels are unbiased at any width).
  """
  samples = np.asarray(samples, np.float64)
  mean = samples.mean(0)
  se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
  scale = np.abs(expected).max()
  tolerance = n_se * se + bias * scale + 1e-6 * scale
  excess = np.abs(mean - expected) - tolerance
  assert np.all(excess <= 0), (
      f"Monte Carlo mean differs from the limit beyond {n_se} standard "
      f"errors (+{bias} x scale): max excess {excess.max():.3g}, "
      f"mean={mean}, expected={expected}, se={se}")
