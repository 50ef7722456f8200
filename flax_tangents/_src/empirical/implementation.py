"""`NtkImplementation`: which algorithm computes an empirical NTK."""

import enum

__all__ = ["NtkImplementation"]


class NtkImplementation(enum.IntEnum):
  """Algorithms for the empirical NTK; all give the same kernel.

  Attributes:
    AUTO: measure the others on the given function and shapes (once per
      compilation) and use the fastest.
    JACOBIAN_CONTRACTION: materialize per-input Jacobians and contract them.
      Cheap for small parameter counts and many outputs.
    NTK_VECTOR_PRODUCTS: build the NTK column by column from
      Jacobian-vector and vector-Jacobian products, never forming Jacobians.
      Good for wide networks with few outputs.
    STRUCTURED_DERIVATIVES: interpret the function's jaxpr and contract each
      primitive's Jacobian using its structure (block-diagonal, Kronecker,
      constant along an axis). Usually the fastest and smallest.

  >>> import flax_tangents as ft
  >>> ft.NtkImplementation(1)
  <NtkImplementation.JACOBIAN_CONTRACTION: 1>
  """

  AUTO = 0
  JACOBIAN_CONTRACTION = 1
  NTK_VECTOR_PRODUCTS = 2
  STRUCTURED_DERIVATIVES = 3
