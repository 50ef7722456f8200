"""Fingerprints: what a checkpoint directory of kernel tiles was written for.

A fingerprint is a small JSON-able dict of named digests (inputs, tiling,
`get`, what the kernel function computes, its array arguments such as
parameters, its other arguments). Comparing two names the parts that differ,
so a refusal can say why.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable

import jax
import numpy as np

__all__ = ["computation_identity", "digest", "mismatches"]

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def digest(tree: Any) -> str:
  """SHA-256 of a pytree's structure, shapes, dtypes and values."""
  hasher = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(tree)
  hasher.update(str(treedef).encode())
  for leaf in leaves:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      if (isinstance(leaf, jax.Array)
          and jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key)):
        leaf = jax.random.key_data(leaf)  # Typed keys (e.g. NNX RNG state).
      host = np.ascontiguousarray(np.asarray(leaf))
      hasher.update(f"{host.shape}{host.dtype}".encode())
      hasher.update(host.tobytes())
    else:
      hasher.update(_stable_repr(leaf).encode())
  return hasher.hexdigest()[:32]


def _stable_repr(value: Any) -> str:
  text = repr(value)
  # Reprs holding memory addresses differ from run to run; keep the type.
  return type(value).__qualname__ if " at 0x" in text else text


def computation_identity(fn: Callable[..., Any], *abstract_args: Any) -> str:
  """A digest of what `fn` computes on arguments of the given shapes.

  `fn` is traced to a jaxpr on abstract arguments (`jax.ShapeDtypeStruct`
  pytrees): the digest covers every operation with its parameters and the
  values of the constants it closes over, and nothing else. So it does not
  change when `fn` is called (caches filled by earlier calls), renamed or
  rebuilt identically in a new process, and it does change when a model's
  configuration, a closed-over array or the library's rules change what is
  computed.

  Args:
    fn: a jit-able function.
    *abstract_args: its arguments, as pytrees of `jax.ShapeDtypeStruct`.

  Returns:
    A hex digest.
  """
  closed = jax.make_jaxpr(fn)(*abstract_args)
  # Printed parameters may name Python objects by address; drop addresses.
  text = _ADDRESS.sub("0x", str(closed.jaxpr))
  hasher = hashlib.sha256(text.encode())
  hasher.update(digest(list(closed.consts)).encode())
  return hasher.hexdigest()[:32]


def mismatches(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Names of the fingerprint parts that differ."""
  return sorted(name for name in set(stored) | set(current)
                if stored.get(name) != current.get(name))
