"""Neural Tangents' option enums, accepting case-insensitive strings.

Each enum is a `str` subclass whose values are the upper-case names, so a
member compares equal to its name (`Padding.SAME == 'SAME'`) and works
wherever a string option is expected; and every layer that takes one of
these options also takes the name in any case (`'same'`, `'Same'`).
"""

from __future__ import annotations

import enum
from typing import Any, Callable, TypeVar, Union

import jax
import jax.numpy as jnp

__all__ = [
    "AggregateImplementation",
    "AttentionMechanism",
    "Padding",
    "PositionalEmbedding",
    "attention_fn",
    "canonicalize_fields",
]

EnumT = TypeVar("EnumT", bound="_OptionEnum")


class _OptionEnum(enum.StrEnum):
  """A string enum that also looks members up by case-insensitive name."""

  @classmethod
  def _missing_(cls, value: object) -> Any:
    if isinstance(value, str):
      for member in cls:
        if member.value == value.upper():
          return member
    return None

  @classmethod
  def parse(cls: type[EnumT], value: Union[str, EnumT], name: str) -> EnumT:
    """The member named `value` (any case), or a `ValueError` naming `name`.

    Args:
      value: a member, or its name in any case.
      name: the argument's name, for the error message.

    Returns:
      The enum member.

    Raises:
      ValueError: if `value` names no member.
    """
    try:
      return cls(value)
    except ValueError:
      choices = ", ".join(repr(m.value) for m in cls)
      raise ValueError(
          f"{name}={value!r} is not one of {choices} (any case), or a "
          f"member of {cls.__name__}.") from None


class Padding(_OptionEnum):
  """Padding of convolutions and pooling (NT's `stax.Padding`).

  Attributes:
    CIRCULAR: periodic boundary conditions (the input wraps around, as on a
      torus), with the output shape of `SAME`.
    SAME: zero padding that keeps the spatial shape (at stride 1).
    VALID: no padding.

  >>> from flax_tangents import nn as ftn
  >>> ftn.Padding('same') is ftn.Padding.SAME, ftn.Padding.SAME == 'SAME'
  (True, True)
  """

  CIRCULAR = "CIRCULAR"
  SAME = "SAME"
  VALID = "VALID"


class AggregateImplementation(_OptionEnum):
  """How `ftn.Aggregate` receives its graphs (NT's enum of the same name).

  Attributes:
    DENSE: an adjacency tensor `(N, *V, *V)` per batch; best for dense
      graphs (edges at least about `V**1.5`).
    SPARSE: an edge list `(N, n_edges, n_axes, 2)` of integer coordinates
      per batch; best for sparse graphs (edges about `V` or fewer).
  """

  DENSE = "DENSE"
  SPARSE = "SPARSE"


class PositionalEmbedding(_OptionEnum):
  """Positional embeddings of `ftn.GlobalSelfAttention` (NT's enum).

  Attributes:
    NONE: no positional embeddings.
    SUM: embeddings are added to the activations.
    CONCAT: embeddings are concatenated to the activations' channels.
  """

  NONE = "NONE"
  SUM = "SUM"
  CONCAT = "CONCAT"


class AttentionMechanism(_OptionEnum):
  """The map from query-key products to attention weights (NT's enum).

  Attributes:
    SOFTMAX: `jax.nn.softmax` over the keys.
    IDENTITY: the products themselves.
    ABS: `jnp.abs` of the products.
    RELU: `jax.nn.relu` of the products.

  >>> import jax.numpy as jnp
  >>> from flax_tangents import nn as ftn
  >>> ftn.AttentionMechanism('relu').fn()(jnp.array([-1.0, 2.0]))
  Array([0., 2.], dtype=float...)
  """

  SOFTMAX = "SOFTMAX"
  IDENTITY = "IDENTITY"
  ABS = "ABS"
  RELU = "RELU"

  def fn(self) -> Callable[[jax.Array], jax.Array]:
    """The elementwise function (softmax: over the last axis, the keys)."""
    return attention_fn(self)


def attention_fn(mechanism: str) -> Callable[[jax.Array], jax.Array]:
  """The map from query-key products to attention weights (last axis: keys).

  Args:
    mechanism: an `AttentionMechanism` or its name, in any case.

  Returns:
    The elementwise map (softmax: over the last axis).

  Raises:
    ValueError: for an unknown mechanism.

  >>> import jax.numpy as jnp
  >>> attention_fn('abs')(jnp.array([-1.0, 2.0]))
  Array([1., 2.], dtype=float...)
  """
  fns = {
      "SOFTMAX": lambda x: jax.nn.softmax(x, axis=-1),
      "IDENTITY": lambda x: x,
      "ABS": jnp.abs,
      "RELU": jax.nn.relu,
  }
  return fns[AttentionMechanism.parse(mechanism, "attention_mechanism")]


def canonicalize_fields(module: Any, **enums: type[_OptionEnum]) -> None:
  """Replaces string options of a (constructing) module by enum members.

  Call it from a Flax module's `__post_init__`, before the parent's: each
  named field holding a string in any case becomes the enum member, so the
  rest of the code compares against upper-case names only.

  Args:
    module: the module being constructed.
    **enums: field name -> enum class.

  Raises:
    ValueError: if a field names no member of its enum.
  """
  for field, cls in enums.items():
    value = getattr(module, field)
    if value is not None:
      object.__setattr__(module, field, cls.parse(value, field))
