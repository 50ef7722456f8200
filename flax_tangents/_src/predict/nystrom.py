"""The randomized Nystrom preconditioner for `(K + mu I) x = b`.

From one product of the kernel with `rank` random vectors, a rank-`rank`
approximation `K ~ U diag(lam) U^T` (Tropp, Yurtsever, Udell and Cevher
2017, Algorithm 3: a shift `nu` keeps it numerically stable), and the
preconditioner of Frangella, Tropp and Udell (2023, "Randomized Nystrom
preconditioning", eq. 5.3):

    P^{-1} = (lam_r + mu) U diag(1 / (lam + mu)) U^T + (I - U U^T),

which maps the top `rank` eigenvalues of `K + mu I` to about `lam_r + mu`,
so conjugate gradients converge as if the condition number were
`(lam_r + mu) / (lam_min + mu)` instead of `(lam_1 + mu) / (lam_min + mu)`.
Every step is a product or a small `rank x rank` factorization, so it runs
on sharded and streamed kernels alike.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Nystrom", "nystrom"]

_HIGHEST = jax.lax.Precision.HIGHEST


class Nystrom(NamedTuple):
  """A low-rank approximation `U diag(lam) U^T` of a PSD kernel."""
  u: jax.Array    # (n, r), orthonormal columns (zero where dropped)
  lam: jax.Array  # (r,), descending, >= 0

  @property
  def rank(self) -> int:
    return int(jnp.sum(self.lam > 0))


def nystrom(matmul: Callable[[jax.Array], jax.Array], n: int, rank: int,
            dtype, key: jax.Array) -> Nystrom:
  """The Nystrom approximation from one product `matmul(Omega)`.

  Args:
    matmul: `V -> K @ V` for `V` of shape `(n, c)`.
    n: the kernel's size.
    rank: the number of random vectors (at most `n`).
    dtype: the kernel's dtype.
    key: random key for the test matrix.
  """
  omega = _orthonormal_test_matrix(key, n, rank, dtype)
  return _factor(omega, matmul(omega))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _orthonormal_test_matrix(key, n, rank, dtype):
  omega = jax.random.normal(key, (n, rank), dtype)
  # Cholesky QR: a Gaussian matrix with n >= rank is well conditioned.
  gram = jnp.matmul(omega.T, omega, precision=_HIGHEST)
  factor = jnp.linalg.cholesky(gram)
  return jax.scipy.linalg.solve_triangular(factor, omega.T, lower=True).T


@jax.jit
def _factor(omega: jax.Array, sketch: jax.Array) -> Nystrom:
  n, dtype = omega.shape[0], omega.dtype
  eps = jnp.finfo(dtype).eps
  shift = jnp.sqrt(n) * eps * jnp.linalg.norm(sketch)
  shifted = sketch + shift * omega
  core = jnp.matmul(omega.T, shifted, precision=_HIGHEST)
  core = (core + core.T) / 2
  factor = jnp.linalg.cholesky(core)
  # B = Y_nu C^{-T}; its thin SVD from the eigenvectors of B^T B.
  b = jax.scipy.linalg.solve_triangular(factor, shifted.T, lower=True).T
  squares, v = jnp.linalg.eigh(jnp.matmul(b.T, b, precision=_HIGHEST))
  squares, v = squares[::-1], v[:, ::-1]
  keep = squares > squares[0] * eps * n
  scale = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, squares, 1.)), 0.)
  u = jnp.matmul(b, v, precision=_HIGHEST) * scale[None, :]
  lam = jnp.where(keep, jnp.maximum(squares - shift, 0.), 0.)
  ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(lam))
  # A failed factorization leaves no preconditioner rather than NaNs.
  return Nystrom(jnp.where(ok, u, 0.), jnp.where(ok, lam, 0.))


@jax.jit
def apply_inverse(approximation: Nystrom, mu: jax.Array,
                  r: jax.Array) -> jax.Array:
  """`P^{-1} r` for `(K + mu I)`, `r` of shape `(n, c)`."""
  u, lam = approximation
  kept = lam > 0
  # The smallest kept eigenvalue: the level the top ones are mapped to.
  floor = jnp.min(jnp.where(kept, lam, jnp.inf)) + mu
  weights = jnp.where(kept, floor / (lam + mu) - 1., 0.)
  weights = jnp.where(jnp.isfinite(weights), weights, 0.)
  projected = jnp.matmul(u.T, r, precision=_HIGHEST)
  return r + jnp.matmul(u, weights[:, None] * projected, precision=_HIGHEST)
