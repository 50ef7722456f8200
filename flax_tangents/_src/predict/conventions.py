"""Conventions every predictor of `ft.predict` shares, written once.

- `get`: which kernels a predictor uses (`'nngp'`, `'ntk'`, `'ntkgp'`); a
  string gives one result, a tuple a namedtuple (`canonicalize_get`,
  `package`), as in Neural Tangents.
- Kernel arguments: an array (used for every `get`), an `ft.Kernel`, a
  namedtuple with `nngp`/`ntk` fields, a `TiledKernel`, or kernels computed
  on first use (`LazyTrainKernels`); `kernel_of` reads one of them.
- Outputs: train outputs, test outputs, or both (`pick`); a `Gaussian` when
  a covariance is asked for.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from flax_tangents._src import conventions as shared
from flax_tangents._src.scale.tiled_kernel import TiledKernel
from flax_tangents._src.typing import Get

__all__ = ["Gaussian", "LazyTrainKernels", "canonicalize_get", "is_array",
           "kernel_of", "package", "pick", "symmetrize"]


class Gaussian(NamedTuple):
  """A `(mean, covariance)` pair.

  Attributes:
    mean: mean, of the shape of the network outputs (with any leading time
      axes).
    covariance: covariance, of the shape of the respective kernel (e.g.
      `(N_test, N_test)`), with any leading time axes.
  """
  mean: jax.Array
  covariance: jax.Array


def canonicalize_get(get: Get, allowed: Sequence[str]
                     ) -> tuple[bool, tuple[str, ...]]:
  """`(whether one string was given, the requested kernels in order)`.

  Args:
    get: a string, a tuple of strings, or None (`('nngp', 'ntk')`).
    allowed: the strings this predictor accepts.

  Returns:
    Whether `get` was one string, and the requested kernels.

  Raises:
    ValueError: for an entry not in `allowed`, or a repeated one.

  >>> canonicalize_get('ntk', ('nngp', 'ntk'))
  (True, ('ntk',))
  >>> canonicalize_get(None, ('nngp', 'ntk'))
  (False, ('nngp', 'ntk'))
  """
  if get is None:
    get = ("nngp", "ntk")
  single = isinstance(get, str)
  gets = (get,) if single else tuple(get)
  for g in gets:
    if g not in allowed:
      raise ValueError(f"get must be one of {tuple(allowed)} or a tuple of "
                       f"them; got {g!r}.")
  if len(set(gets)) != len(gets):
    raise ValueError(f"Repeated entries in get={gets}.")
  return single, gets


@functools.lru_cache(None)
def _namedtuple(fields: tuple[str, ...]):
  return collections.namedtuple("Gaussians", fields)


def package(out: dict[str, Any], single: bool, gets: tuple[str, ...]):
  """NT's `get` semantics: a string gives one value, a tuple a namedtuple.

  >>> package({'ntk': 1, 'nngp': 2}, False, ('ntk', 'nngp'))
  Gaussians(ntk=1, nngp=2)
  >>> package({'ntk': 1}, True, ('ntk',))
  1
  """
  if single:
    return out[gets[0]]
  return _namedtuple(gets)(*(out[g] for g in gets))


# The shared array-leaf test: a kernel given as an array, not a `Kernel`.
is_array = shared.is_array


def kernel_of(k: Any, g: str, name: str) -> Any:
  """`k` if it is an array, else its `g` field (a `Kernel` or namedtuple).

  Args:
    k: an array, a `TiledKernel`, or an object with a `g` attribute.
    g: `'nngp'` or `'ntk'`.
    name: how errors name `k`.

  Returns:
    The kernel, as a `jax.Array` or a `TiledKernel`.

  Raises:
    ValueError: if `k` has no `g` kernel.
  """
  if isinstance(k, TiledKernel):
    return k
  if is_array(k):
    return jnp.asarray(k)
  value = getattr(k, g, None)
  if value is None:
    raise ValueError(f"{name} has no {g!r} kernel; pass a Kernel or a "
                     f"namedtuple with a {g!r} field.")
  return value if isinstance(value, TiledKernel) else jnp.asarray(value)


class LazyTrainKernels:
  """`nngp`/`ntk` attributes computed by `fetch` on first access."""

  def __init__(self, fetch: Callable[[str], jax.Array]):
    self._fetch = fetch

  @property
  def nngp(self) -> jax.Array:
    return self._fetch("nngp")

  @property
  def ntk(self) -> jax.Array:
    return self._fetch("ntk")


def pick(train: Any, test: Any, want_train: bool, want_test: bool) -> Any:
  """`(train, test)` if both are wanted, else the one that is.

  >>> pick(1, 2, True, True), pick(1, None, True, False)
  ((1, 2), 1)
  """
  if want_train and want_test:
    return train, test
  return train if want_train else test


def symmetrize(cov: jax.Array) -> jax.Array:
  """`(cov + cov^T) / 2` over the last two axes."""
  return (cov + jnp.swapaxes(cov, -1, -2)) / 2
