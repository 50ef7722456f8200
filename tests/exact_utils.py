"""Exact kernels of finite networks that are linear in their parameters.

A network with a single parameterized layer (followed by any parameter-free
linear layers: pooling, resizing, indexing) is linear in its parameters
`theta`, so its tangent kernel `J(x1) J(x2)^T` is the same for every draw
and equals the infinite-width NTK exactly (for the NTK parameterization,
where `theta ~ N(0, 1)`, it is also the NNGP `E[f(x1) f(x2)^T]`). This
checks the geometry of a layer (padding, strides, dimensions) against its
finite `apply` to float64 precision, with no sampling and one compilation.
"""

from __future__ import annotations

import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _pair_spec(n_spatial: int) -> str:
  letters = iter(string.ascii_lowercase[4:])
  s = [next(letters) for _ in range(n_spatial)]
  t = [next(letters) for _ in range(n_spatial)]
  out = "".join(i + j for i, j in zip(s, t))
  return f"a{''.join(s)}cp,b{''.join(t)}cp->ab{out}"


def exact_ntk(model: nn.Module, x1: jax.Array, x2: jax.Array) -> np.ndarray:
  """`J(x1) J(x2)^T / C` in the analytic layout `(N1, N2, S1, S1', ...)`.

  Parameters are cast to float64 so the comparison is limited only by the
  analytic kernel's own precision.
  """
  n1 = x1.shape[0]
  xs = jnp.concatenate([x1, x2])

  @jax.jit
  def kernel(key):
    params = model.init(key, xs)["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    f = lambda p: model.apply({"params": p}, xs)
    out = f(params)
    spec = _pair_spec(out.ndim - 2)
    jac = jax.jacobian(f)(params)
    ntk = sum(jnp.einsum(spec, j.reshape(out.shape + (-1,)),
                         j.reshape(out.shape + (-1,)),
                         precision=jax.lax.Precision.HIGHEST)
              for j in jax.tree.leaves(jac)) / out.shape[-1]
    return ntk[:n1, n1:]

  # "rbg" keys compile faster than threefry; the values do not matter.
  return np.asarray(kernel(jax.random.key(0, impl="rbg")))
