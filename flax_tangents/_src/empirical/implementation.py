"""Which algorithm computes an empirical NTK, and what each one provides.

`NtkImplementation` names the algorithms (the public option);
`NtkAlgorithm` is the call every single algorithm implements
(`jacobian_contraction.ntk`, `ntk_vector_products.ntk`, `structured.ntk`),
by which `dispatch.implementation_fn` hands one out.
"""

from collections.abc import Callable, Mapping
import enum
from typing import Any, Optional, Protocol

from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import layout

__all__ = ["NtkAlgorithm", "NtkImplementation"]


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


class NtkAlgorithm(Protocol):
  """An empirical NTK algorithm: `ntk(f, params, x1, x2, kwargs1, kwargs2,
  *, trace_axes, diagonal_axes, vmap_axes)`.

  It receives what `dispatch.prepare` produced: `f(params, x, **kwargs)`
  of the differentiated parameters alone, the keyword arguments of the
  `x1` and `x2` evaluations, and `vmap_axes` as None or the canonical
  triple of `example_axes.canonicalize_vmap_axes` (already checked by
  `independence`). It returns a pytree like `f`'s output of kernels in NT
  layout (`layout`), the same kernel whichever algorithm computes it.

  >>> from flax_tangents._src.empirical import jacobian_contraction
  >>> algorithm: NtkAlgorithm = jacobian_contraction.ntk
  """

  def __call__(self, f: Callable[..., layout.PyTree], params: layout.PyTree,
               x1: layout.PyTree, x2: Optional[layout.PyTree],
               kwargs1: Mapping[str, Any], kwargs2: Mapping[str, Any], *,
               trace_axes: layout.Axes, diagonal_axes: layout.Axes,
               vmap_axes: example_axes.VmapAxes) -> layout.PyTree:
    """The empirical NTK of `f` between `x1` and `x2`.

    Args:
      f: `f(params, x, **kwargs)` returning a pytree of arrays.
      params: the pytree differentiated.
      x1: first inputs.
      x2: second inputs, or None for `x1`.
      kwargs1: keyword arguments of the `x1` evaluation.
      kwargs2: keyword arguments of the `x2` evaluation.
      trace_axes: output axes to average over (possibly negative).
      diagonal_axes: output axes to keep the diagonal of (possibly
        negative).
      vmap_axes: None or the canonical `(in_axes, out_axes, kwargs_axes)`
        from `example_axes.canonicalize_vmap_axes`; with it, `f` is
        evaluated one example at a time.

    Returns:
      A pytree like `f`'s output of kernels in NT layout: for an output
      leaf of shape `(N, O)` and `trace_axes=()`, shape `(N1, N2, O, O)`.
    """
    ...
