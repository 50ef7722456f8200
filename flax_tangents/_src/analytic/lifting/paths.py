"""Full paths of modules whose kernels are computed in nested `apply` calls.

Submodules of a lifted module are applied to kernels as top-level modules of
their own `apply`, so their `module.path` starts afresh. The prefix of the
module that made the call is kept here, so messages (and the names that tell
layers apart) use the full path in the user's model.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import flax.linen as nn

__all__ = ["describe", "full_path", "prefix"]


class _State(threading.local):
  def __init__(self):
    self.prefix: tuple[str, ...] = ()


_state = _State()


def full_path(module: nn.Module) -> tuple[str, ...]:
  """The module's path in the whole model."""
  return _state.prefix + tuple(str(p) for p in module.path)


def path_string(module: nn.Module) -> str:
  return "/".join(full_path(module)) or "<top-level module>"


def describe(module: nn.Module) -> str:
  """`"module 'a/b' of type pkg.Class"`."""
  cls = type(module)
  return (f"module '{path_string(module)}' of type "
          f"{cls.__module__}.{cls.__qualname__}")


@contextlib.contextmanager
def prefix(path: tuple[str, ...]) -> Iterator[None]:
  """Runs nested applies with `path` as the prefix of their modules' paths."""
  previous = _state.prefix
  _state.prefix = tuple(str(p) for p in path)
  try:
    yield
  finally:
    _state.prefix = previous
