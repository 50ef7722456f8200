"""Which random layers a kernel's activations depend on.

The kernel of a sum of branches is the sum of their kernels only if the
branches are uncorrelated, and the kernel of a product is the product of
kernels only if they are independent. In the infinite-width limit the
output of an affine layer is a centred Gaussian field independent of
everything that does not use its weights; so every activation is a
function of the Gaussian fields of some affine layers: its *sources* (the
raw inputs have none, being fixed). Two activations with disjoint sources
are independent.

Every affine rule marks its output as a new source, identified by the
module's path within one run of the model (a module called twice shares its
weights, so its outputs share the source); every other rule keeps its
input's sources (`Kernel.replace` copies them) and merges take the union.
`FanInSum` then refuses branches that share a source (`x + x`,
`x + pool(x)`, a module reused in both branches) or that have two non-zero
means, and `FanInProd` refuses dependent factors: each of these would be a
plausible wrong number.

Sources are bookkeeping of one Python run, not pytree data: a kernel that
went through a JAX transformation (`jit` on a Kernel argument, `lax.scan`)
or was built by hand has unknown sources, and merges then assume the
branches independent, as Neural Tangents always does.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Any, Iterator, Optional, Sequence

from flax_tangents._src.analytic.kernel import Kernel

__all__ = [
    "check_independent",
    "check_sum",
    "fresh",
    "layer",
    "run",
    "sources_of",
    "union",
    "with_sources",
]

Source = tuple[Any, ...]
_state = threading.local()
_counter = itertools.count()


@contextlib.contextmanager
def run() -> Iterator[None]:
  """One run of a model on kernels: layer identities are local to it."""
  previous = getattr(_state, "run", None)
  _state.run = next(_counter)
  try:
    yield
  finally:
    _state.run = previous


@contextlib.contextmanager
def layer(path: tuple[str, ...]) -> Iterator[None]:
  """The module whose rule is running (its path identifies its weights)."""
  previous = getattr(_state, "path", None)
  _state.path = tuple(path)
  try:
    yield
  finally:
    _state.path = previous


def _current() -> Source:
  run_id, path = getattr(_state, "run", None), getattr(_state, "path", None)
  if run_id is None or path is None:
    return ("anonymous", next(_counter))  # A rule called directly.
  return (run_id,) + path


def sources_of(kernel: Kernel) -> Optional[frozenset[Source]]:
  """The sources of `kernel`'s activations; `None` if unknown."""
  return kernel._sources  # pylint: disable=protected-access


def with_sources(kernel: Kernel,
                 sources: Optional[frozenset[Source]]) -> Kernel:
  """`kernel` with its sources set (in place; kernels are fresh copies)."""
  object.__setattr__(kernel, "_sources", sources)
  return kernel


def fresh(kernel: Kernel) -> Kernel:
  """Marks the output of an affine layer as a new Gaussian source."""
  return with_sources(kernel, frozenset({_current()}))


def union(kernels: Sequence[Kernel]) -> Optional[frozenset[Source]]:
  """All sources of `kernels`, or `None` if any is unknown."""
  sources = [sources_of(k) for k in kernels]
  known = [s for s in sources if s is not None]
  if len(known) != len(sources):
    return None
  return frozenset().union(*known)


def _name(source: Source) -> str:
  path = [str(p) for p in source[1:]] if source[0] != "anonymous" else []
  return "/".join(path) or "an affine layer"


def _shared(a: frozenset[Source], b: frozenset[Source]) -> str:
  return ", ".join(sorted(f"'{_name(s)}'" for s in a & b))


def check_sum(kernels: Sequence[Kernel], layer_name: str) -> None:
  """Raises unless the kernel of the sum is the sum of the kernels.

  That needs every pair of branches uncorrelated: independent (disjoint
  sources) and at least one of the two centred (Gaussian).

  Raises:
    ValueError: naming the branches, the shared layer and the fix.
  """
  uncentred = [i for i, k in enumerate(kernels) if not k.is_gaussian]
  sources = [sources_of(k) for k in kernels]
  if any(s is None for s in sources):
    uncentred_allowed = 0  # Unknown sources: as NT, all must be centred.
  else:
    uncentred_allowed = 1
  if len(uncentred) > uncentred_allowed:
    raise ValueError(_uncentred_message(kernels, uncentred, layer_name))
  if any(s is None for s in sources):
    return
  known = [s for s in sources if s is not None]
  for i, j in itertools.combinations(range(len(kernels)), 2):
    if known[i] & known[j]:
      raise ValueError(
          f"{layer_name}: branches {i} and {j} both depend on "
          f"{_shared(known[i], known[j])} (e.g. `x + x`, `x + pool(x)`, "
          "or one module used in both branches), so they are correlated and "
          "the kernel of their sum is not the sum of their kernels. Start "
          "each branch but one with its own affine layer (`Dense`/`Conv`), "
          "as in `x + Conv(relu(x))`.")


def _uncentred_message(kernels: Sequence[Kernel], uncentred: list[int],
                       layer_name: str) -> str:
  def what(k):
    return ("the raw inputs" if k.is_input else
            "not a centred Gaussian (the output of a nonlinearity, or of "
            "Flatten/FanInConcat/a layer fed by one)")
  i = uncentred[0]
  also = (f", and branch {uncentred[1]} is {what(kernels[uncentred[1]])}"
          if len(uncentred) > 1 else "")
  return (
      f"{layer_name}: branch {i} is {what(kernels[i])}{also}. The kernel of "
      "a sum is the sum of kernels only for uncorrelated branches; a branch "
      "with a non-zero mean is correlated with any other such branch "
      "(products of means), and with one whose independence is unknown. "
      "End all branches but one with an affine layer (`Dense`/`Conv`), e.g. "
      "write `x + Dense(relu(x))` with `x` itself the output of an affine "
      "layer, or merge with `FanInConcat`.")


def check_independent(kernels: Sequence[Kernel], layer_name: str) -> None:
  """Raises if two factors of a product share a source (are dependent).

  Raises:
    ValueError: naming the factors and the shared layer.
  """
  sources = [sources_of(k) for k in kernels]
  if any(s is None for s in sources):
    return
  known = [s for s in sources if s is not None]
  for i, j in itertools.combinations(range(len(kernels)), 2):
    if known[i] & known[j]:
      raise ValueError(
          f"{layer_name}: branches {i} and {j} both depend on "
          f"{_shared(known[i], known[j])}, so they are not independent "
          "and the kernel of their product is not the product of their "
          "kernels. Give each factor its own affine layer.")
