"""Which values of a lifted module are independent of which.

Adding or multiplying two branches is exact only when they are uncorrelated
(sums) or independent (products) in the infinite-width limit. The argument
is the one of tensor programs: the output of an affine layer with fresh,
centred, i.i.d. weights `W` (a *fresh* term, named by the layer) is a
centred Gaussian, independent in the limit of everything not computed from
that output. So two summands are uncorrelated when one of them is a fresh
term that the other does not depend on; anything else (`x + relu(x)`, the
same layer called twice, a deterministic input plus a non-centred
activation) is refused.

A value is a sum of `Term`s: each is either fresh (the layer's name) or
opaque, with the set of layer names it depends on. Linear maps of a value
over locations (pooling, reshapes, scaling by constants) keep its terms.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any, Iterable, Optional

__all__ = [
    "Provenance",
    "Term",
    "lookup",
    "opaque",
    "record",
    "uncorrelated",
]


@dataclasses.dataclass(frozen=True)
class Term:
  """One summand: `fresh` names its affine layer, or `None` if opaque."""
  fresh: Optional[str]
  deps: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Provenance:
  """The summands of a value (see the module docstring)."""
  terms: tuple[Term, ...]

  @property
  def deps(self) -> frozenset[str]:
    return frozenset().union(*(t.deps for t in self.terms))

  @property
  def is_fresh(self) -> bool:
    """Whether the value is a sum of fresh terms (a centred Gaussian)."""
    return bool(self.terms) and all(t.fresh is not None for t in self.terms)


def fresh(name: str, inputs: Iterable[Provenance]) -> Provenance:
  """The output of a fresh affine layer `name` applied to `inputs`."""
  deps = frozenset({name}).union(*(p.deps for p in inputs))
  return Provenance((Term(name, deps),))


def opaque(inputs: Iterable[Provenance], *names: str) -> Provenance:
  """A value computed from `inputs` (and layers `names`) in any other way."""
  deps = frozenset(names).union(*(p.deps for p in inputs))
  return Provenance((Term(None, deps),))


def _pair_uncorrelated(a: Term, b: Term) -> bool:
  return ((a.fresh is not None and a.fresh not in b.deps) or
          (b.fresh is not None and b.fresh not in a.deps))


def uncorrelated(a: Provenance, b: Provenance) -> bool:
  """Whether every summand of `a` is uncorrelated with every one of `b`."""
  return all(_pair_uncorrelated(s, t)
             for s, t in itertools.product(a.terms, b.terms))


def independent(a: Provenance, b: Provenance) -> bool:
  """Whether `a` and `b` are independent (for products of branches).

  A fresh value (centred Gaussian) is independent of anything that does not
  depend on its layers.
  """
  return ((a.is_fresh and not {t.fresh for t in a.terms} & b.deps) or
          (b.is_fresh and not {t.fresh for t in b.terms} & a.deps))


def sum_of(a: Provenance, b: Provenance) -> Provenance:
  return Provenance(a.terms + b.terms)


# Provenance of kernels returned by module calls, by `id` of the kernel (the
# kernel itself is kept alive so that its id is not reused).
_table = threading.local()


def _entries() -> dict[int, tuple[Any, Provenance]]:
  if not hasattr(_table, "entries"):
    _table.entries = {}
  return _table.entries


def record(kernel: Any, provenance: Provenance) -> None:
  """Remembers the provenance of a kernel a module call returned."""
  _entries()[id(kernel)] = (kernel, provenance)


def lookup(kernel: Any) -> Optional[Provenance]:
  """The recorded provenance of `kernel`, if any."""
  entry = _entries().get(id(kernel))
  if entry is None or entry[0] is not kernel:
    return None
  return entry[1]


def clear() -> None:
  """Forgets all recorded provenance (at the end of a kernel computation)."""
  _entries().clear()


_counter = itertools.count()


def unknown(kernel: Any) -> Provenance:
  """The provenance of a kernel from outside: opaque, its own source."""
  found = lookup(kernel)
  if found is not None:
    return found
  provenance = opaque((), f"<input {next(_counter)}>")
  record(kernel, provenance)
  return provenance
