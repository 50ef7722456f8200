"""From a user's call to an implementation's `ntk(...)`: checks and plumbing.

`prepare` turns `(f, variables, x1, x2, kwargs)` as the user gave them into
the arguments every implementation receives (see `layout`, `arguments`,
`example_axes`), checking inputs, outputs and axes with errors that name the
cause and the fix.
`implementation_fn` maps an `NtkImplementation` to its `ntk` function (an
`NtkAlgorithm`).
`partition_kwargs` separates array keyword arguments (traced by `jax.jit`)
from static ones (`train=False`, `mutable=[...]`).
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional
import warnings

import jax
import numpy as np

from flax_tangents._src.empirical import arguments
from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import independence
from flax_tangents._src.empirical import jacobian_contraction
from flax_tangents._src.empirical import layout
from flax_tangents._src.empirical import ntk_vector_products
from flax_tangents._src.empirical import structured
from flax_tangents._src.empirical.implementation import NtkAlgorithm
from flax_tangents._src.empirical.implementation import NtkImplementation

__all__ = [
    "Prepared",
    "StaticKwargs",
    "as_implementation",
    "available_implementations",
    "check_vmap_axes_type",
    "implementation_fn",
    "merge_kwargs",
    "partition_kwargs",
    "prepare",
]


# Implementations.


def as_implementation(implementation: Any) -> NtkImplementation:
  """Validates `implementation` (an `NtkImplementation` or its int value).

  >>> as_implementation(2)
  <NtkImplementation.NTK_VECTOR_PRODUCTS: 2>
  """
  try:
    if isinstance(implementation, (bool, float)) or implementation is None:
      raise ValueError
    return NtkImplementation(implementation)
  except (ValueError, TypeError):
    choices = ", ".join(f"{m.name} ({m.value})" for m in NtkImplementation)
    raise ValueError(
        f"implementation={implementation!r} is not an NtkImplementation. "
        f"Use ft.NtkImplementation.<NAME> or its int value: {choices}."
    ) from None


def _structured_ntk() -> NtkAlgorithm:
  """STRUCTURED_DERIVATIVES' `ntk` (tests replace it to make it missing)."""
  return structured.ntk


# How to get each single algorithm's `ntk`: a getter, so that an algorithm
# missing from an installation raises NotImplementedError when asked for.
_ALGORITHMS: dict[NtkImplementation, Callable[[], NtkAlgorithm]] = {
    NtkImplementation.JACOBIAN_CONTRACTION: lambda: jacobian_contraction.ntk,
    NtkImplementation.NTK_VECTOR_PRODUCTS: lambda: ntk_vector_products.ntk,
    # Looked up when called, so that replacing `_structured_ntk` works.
    NtkImplementation.STRUCTURED_DERIVATIVES: lambda: _structured_ntk(),
}


def implementation_fn(implementation: NtkImplementation) -> NtkAlgorithm:
  """The `ntk(f, params, x1, x2, kwargs1, kwargs2, *, ...)` of an algorithm.

  Raises:
    NotImplementedError: for an algorithm missing from this installation.
    ValueError: for AUTO, which is not a single algorithm.

  >>> implementation_fn(NtkImplementation.JACOBIAN_CONTRACTION).__module__
  'flax_tangents._src.empirical.jacobian_contraction'
  """
  algorithm = _ALGORITHMS.get(implementation)
  if algorithm is None:
    raise ValueError(f"{implementation!r} is not a single algorithm.")
  return algorithm()


def available_implementations() -> tuple[NtkImplementation, ...]:
  """The algorithms AUTO may choose from, in this installation."""
  available = []
  for implementation in _ALGORITHMS:
    try:
      implementation_fn(implementation)
    except NotImplementedError:
      continue
    available.append(implementation)
  return tuple(available)


# Keyword arguments: arrays are traced, everything else is static.


class StaticKwargs:
  """The non-array leaves of the keyword arguments, hashable for `jax.jit`."""

  def __init__(self, treedef, static_leaves: tuple[tuple[int, Any], ...]):
    self.treedef = treedef
    self.static_leaves = static_leaves

  def _key(self):
    return (self.treedef, self.static_leaves)

  def __hash__(self):
    try:
      return hash(self._key())
    except TypeError:  # An unhashable setting: fall back to its repr.
      return hash((self.treedef, repr(self.static_leaves)))

  def __eq__(self, other):
    if not isinstance(other, StaticKwargs):
      return NotImplemented
    try:
      return bool(self._key() == other._key())
    except Exception:  # pylint: disable=broad-except
      return self is other


def partition_kwargs(kwargs: Mapping[str, Any]
                     ) -> tuple[list[Any], StaticKwargs]:
  """`(array_leaves, static)`: what `jax.jit` traces and what it keys on.

  >>> arrays, static = partition_kwargs({'train': False, 'w': np.ones(2)})
  >>> len(arrays), static.static_leaves
  (1, ((0, False),))
  """
  leaves, treedef = jax.tree.flatten(dict(kwargs))
  arrays = [leaf for leaf in leaves if arguments.is_array(leaf)]
  static = tuple((i, leaf) for i, leaf in enumerate(leaves)
                 if not arguments.is_array(leaf))
  return arrays, StaticKwargs(treedef, static)


def merge_kwargs(arrays: list[Any], static: StaticKwargs) -> dict[str, Any]:
  """Inverse of `partition_kwargs`."""
  static_at = dict(static.static_leaves)
  array_iter = iter(arrays)
  leaves = [
      static_at[i] if i in static_at else next(array_iter)
      for i in range(static.treedef.num_leaves)
  ]
  return jax.tree.unflatten(static.treedef, leaves)


# Checks.


def check_vmap_axes_type(vmap_axes: Any) -> None:
  """Rejects `vmap_axes` of the wrong kind when the kernel fn is built."""
  if vmap_axes is None or isinstance(vmap_axes, (int, np.integer)):
    return
  if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
    if not (vmap_axes[2] is None or isinstance(vmap_axes[2], Mapping)):
      raise ValueError(
          f"vmap_axes={vmap_axes!r}: the third entry (kwargs_axes) must be a "
          "dict from keyword-argument name to axis, e.g. (0, 0, {'mask': 0}).")
    return
  if isinstance(vmap_axes, (list, tuple, dict)):
    # A pytree of axes for x and out alike (NT accepts that too).
    return
  raise ValueError(
      f"vmap_axes={vmap_axes!r} is not valid: give None, an int (the batch "
      "axis of inputs and outputs), or a triple (in_axes, out_axes, "
      "kwargs_axes).")


def _batch_axes(x: layout.PyTree, vmap_axes: Any) -> list[int]:
  """The batch axis of each leaf of `x` (0 unless `vmap_axes` says so)."""
  leaves = jax.tree.leaves(x)
  if vmap_axes is None:
    return [0] * len(leaves)
  if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
    in_axes = vmap_axes[0]
  else:
    in_axes = vmap_axes
  canonical = example_axes.canonicalize_tree_axes(in_axes, x, "an input x")
  axes = jax.tree.leaves(canonical, is_leaf=lambda a: a is None)
  return [0 if a is None else a for a in axes]


def check_inputs(x1: layout.PyTree, x2: Optional[layout.PyTree],
                 vmap_axes: Any) -> None:
  """`x1` and `x2` must agree in structure and in shape except batch size."""
  if x2 is None:
    return
  tree1, tree2 = jax.tree.structure(x1), jax.tree.structure(x2)
  if tree1 != tree2:
    raise ValueError(
        f"x1 and x2 have different structures ({tree1} vs {tree2}): give "
        "both as the same kind of pytree of arrays, or x2=None for x1.")
  for axis, a, b in zip(_batch_axes(x1, vmap_axes), jax.tree.leaves(x1),
                        jax.tree.leaves(x2)):
    shape1, shape2 = tuple(np.shape(a)), tuple(np.shape(b))
    if len(shape1) != len(shape2) or any(
        s1 != s2 for i, (s1, s2) in enumerate(zip(shape1, shape2))
        if i != axis):
      raise ValueError(
          f"x1 has shape {shape1} but x2 has shape {shape2}: inputs may "
          f"differ only in their batch size (axis {axis}). Give x2 examples "
          "shaped like those of x1.")


class Prepared(NamedTuple):
  f: Callable[..., Any]
  params: layout.PyTree
  kwargs1: dict[str, Any]
  kwargs2: dict[str, Any]
  vmap_axes: example_axes.VmapAxes
  fx1: layout.PyTree
  fx2: layout.PyTree


def prepare(f: Callable[..., Any], variables: layout.PyTree,
            x1: layout.PyTree, x2: Optional[layout.PyTree],
            kwargs: Mapping[str, Any], trace_axes: layout.Axes,
            diagonal_axes: layout.Axes, vmap_axes: Any) -> Prepared:
  """Splits Flax variables and kwargs, checks shapes and normalizes axes.

  Args:
    f: the user's `f(variables, x, **kwargs)`.
    variables: Flax variables (only `'params'` is differentiated) or any
      parameter pytree.
    x1: first inputs.
    x2: second inputs or None.
    kwargs: the user's keyword arguments for `f`.
    trace_axes: output axes to average over.
    diagonal_axes: output axes to keep the diagonal of.
    vmap_axes: the user's `vmap_axes`.

  Returns:
    A `Prepared` tuple with what an implementation's `ntk` receives and the
    output shapes `fx1`, `fx2`.

  Raises:
    ValueError: for mismatched inputs or outputs and axes that do not fit.

  Warns:
    UserWarning: when `vmap_axes` is given but `f` cannot be proven to treat
      the examples independently (see `independence`); `vmap_axes` is then
      not used.
  """
  check_inputs(x1, x2, vmap_axes)
  f_params, params = arguments.split_variables(f, variables)
  kwargs1, kwargs2 = arguments.split_kwargs(kwargs, x1, x2)
  fx1 = jax.eval_shape(lambda p, x: f_params(p, x, **kwargs1), params, x1)
  if x2 is None:
    fx2 = fx1
  else:
    fx2 = jax.eval_shape(lambda p, x: f_params(p, x, **kwargs2), params, x2)
    tree1, tree2 = jax.tree.structure(fx1), jax.tree.structure(fx2)
    if tree1 != tree2:
      raise ValueError(f"f(params, x1) and f(params, x2) return different "
                       f"structures: {tree1} vs {tree2}.")
  jax.tree.map(
      lambda a, b: layout.check_trace_and_diagonal(trace_axes, diagonal_axes,
                                                  a.shape, b.shape), fx1, fx2)
  canonical = example_axes.canonicalize_vmap_axes(vmap_axes, x1, fx1, kwargs1)
  if x2 is not None and vmap_axes is not None:
    example_axes.canonicalize_vmap_axes(vmap_axes, x2, fx2, kwargs2)
  if canonical is not None:
    # Never a silently wrong kernel: `f` must treat examples independently.
    finding = independence.finding_for_both(f_params, params, x1, x2,
                                            kwargs1, kwargs2, canonical)
    if finding is not None:
      warnings.warn(independence.warning_message(vmap_axes, finding),
                    UserWarning, stacklevel=3)
      canonical = None
  return Prepared(f_params, params, kwargs1, kwargs2, canonical, fx1, fx2)
