"""Monte Carlo kernels of finite networks with spatial outputs or dropout.

For a network `f` with outputs `(N, *spatial, C)`, one draw gives the NNGP
estimate `f(x1) f(x2)^T / C` and the NTK estimate `J(x1) J(x2)^T / C`
(contracting parameters and channels), both in the analytic layout
`(N1, N2, S1, S1', ...)`. The Jacobian contraction is written out here so
the check does not depend on the library's empirical kernels.
"""

from __future__ import annotations

import string
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _pair_spec(n_spatial: int, extra: str = "") -> str:
  """einsum spec `a{s}{c}{extra},b{t}{c}{extra}->ab{s0 t0 s1 t1 ...}`."""
  letters = iter(string.ascii_lowercase[4:])
  s = [next(letters) for _ in range(n_spatial)]
  t = [next(letters) for _ in range(n_spatial)]
  out = "".join(i + j for i, j in zip(s, t))
  return (f"a{''.join(s)}c{extra},b{''.join(t)}c{extra}->ab{out}")


def sample_kernels(model: nn.Module, x1: np.ndarray,
                   x2: Optional[np.ndarray], key: jax.Array, n_samples: int,
                   batch_size: int = 8, dropout: bool = False,
                   with_ntk: bool = True,
                   **apply_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """Per-network NNGP and NTK estimates, `(n_samples, N1, N2, ...)` each.

  `with_ntk=False` skips the (costly) Jacobians and returns NTK zeros.

  `x2=None` evaluates the network once on `x1` (one dropout mask for both
  sides, as the analytic `x1_is_x2`); otherwise `x1` and `x2` go through one
  forward pass together, so every input gets its own mask.
  """
  n1 = x1.shape[0]
  xs = x1 if x2 is None else np.concatenate([x1, x2])

  def one_network(k):
    init_key, drop_key = jax.random.split(k)
    params = model.init(init_key, xs)["params"]
    rngs = {"dropout": drop_key} if dropout else {}
    f = lambda p: model.apply({"params": p}, xs, rngs=rngs, **apply_kwargs)
    out = f(params)
    n_spatial, n_out = out.ndim - 2, out.shape[-1]
    nngp = jnp.einsum(_pair_spec(n_spatial), out, out) / n_out
    if not with_ntk:
      ntk = jnp.zeros_like(nngp)
    else:
      jac = jax.jacobian(f)(params)
      ntk = sum(
          jnp.einsum(_pair_spec(n_spatial, "p"), j.reshape(out.shape + (-1,)),
                     j.reshape(out.shape + (-1,)))
          for j in jax.tree.leaves(jac)) / n_out
    if x2 is None:
      return nngp, ntk
    return nngp[:n1, n1:], ntk[:n1, n1:]

  keys = jax.random.split(key, n_samples)
  nngp, ntk = jax.jit(lambda ks: jax.lax.map(
      one_network, ks, batch_size=batch_size))(keys)
  return np.asarray(nngp), np.asarray(ntk)
