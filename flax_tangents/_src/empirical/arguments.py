"""Keyword arguments and Flax variables of an empirical-kernel call.

`split_kwargs` derives the keyword arguments of the `x1` and `x2` evaluations
from the user's; `split_variables` separates the `'params'` collection of
Flax variables (the only one differentiated) from the others (held fixed).
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp

from flax_tangents._src import conventions
from flax_tangents._src.empirical.layout import PyTree

__all__ = [
    "ArrayKwargs",
    "is_array",
    "is_array_like",
    "is_flax_variables",
    "params_of",
    "split_kwargs",
    "split_variables",
    "with_params",
]

# Keyword arguments that are random keys: the `x2` evaluation gets a key of its
# own unless `x2` equals `x1` (NT's rule for `rng`, applied to Flax's `rngs`).
_RNG_KWARGS = ("rng", "rngs")


# Array leaves.


# The shared test (`_src/conventions.py`), re-exported for this package.
is_array = conventions.is_array


def is_array_like(leaf: Any) -> bool:
  """`is_array`, or anything with a shape and a dtype (a shape struct).

  The test of the programs traced from `f` (STRUCTURED_DERIVATIVES and the
  `vmap_axes` check), which also take shape structs.

  >>> is_array_like(jax.ShapeDtypeStruct((2,), jnp.float32))
  True
  """
  return is_array(leaf) or (hasattr(leaf, "shape") and hasattr(leaf, "dtype"))


class ArrayKwargs:
  """Keyword arguments split into array leaves (traced) and the rest.

  Attributes:
    kwargs: the keyword arguments.
    leaves: all their leaves, in `jax.tree.leaves` order (sorted by name).
    positions: the indices in `leaves` of the array leaves
      (`is_array_like`).
    arrays: the array leaves.

  >>> import numpy as np
  >>> kw = ArrayKwargs({'train': False, 'mask': np.ones(2)})
  >>> kw.positions, kw.rebuild([np.zeros(2)])
  ([0], {'mask': array([0., 0.]), 'train': False})
  """

  def __init__(self, kwargs: Mapping[str, Any]):
    self.kwargs = kwargs
    self.leaves, self._tree = jax.tree.flatten(dict(kwargs))
    self.positions = [i for i, leaf in enumerate(self.leaves)
                      if is_array_like(leaf)]
    self.arrays = [self.leaves[i] for i in self.positions]

  def rebuild(self, arrays: Any) -> dict[str, Any]:
    """The keyword arguments with `arrays` in place of the array leaves."""
    leaves = list(self.leaves)
    for i, value in zip(self.positions, arrays):
      leaves[i] = value
    return jax.tree.unflatten(self._tree, leaves)

  def leaf_axes(self, kwargs_axes: Mapping[str, Any]
                ) -> list[Optional[int]]:
    """One vmap axis (or None) per leaf, from canonical `kwargs_axes`."""
    axes: list[Optional[int]] = []
    for name in sorted(self.kwargs):
      if name in kwargs_axes:
        axes += jax.tree.leaves(kwargs_axes[name], is_leaf=lambda a: a is None)
      else:
        axes += [None] * len(jax.tree.leaves(self.kwargs[name]))
    return axes


# Keyword arguments of the x1 and x2 evaluations.


def _trees_equal(x1: PyTree, x2: PyTree) -> jax.Array:
  """Traceable `x1 == x2` for two pytrees (False if shapes differ)."""
  leaves1, tree1 = jax.tree.flatten(x1)
  leaves2, tree2 = jax.tree.flatten(x2)
  if tree1 != tree2:
    return jnp.asarray(False)
  equal = jnp.asarray(True)
  for a, b in zip(leaves1, leaves2):
    if jnp.shape(a) != jnp.shape(b):
      return jnp.asarray(False)
    equal = equal & jnp.all(jnp.asarray(a) == jnp.asarray(b))
  return equal


def _second_key(key: PyTree, x1: PyTree, x2: PyTree) -> PyTree:
  """The x2 evaluation's key: `key` if `x1 == x2`, else a new one from it."""
  same = _trees_equal(x1, x2)

  def second(k):
    return jnp.where(same, k, jax.random.fold_in(k, 1))

  return jax.tree.map(second, key)


def split_kwargs(kwargs: Mapping[str, Any], x1: PyTree,
                 x2: Optional[PyTree]) -> tuple[dict[str, Any], dict[str,
                                                                     Any]]:
  """Keyword arguments for the `f(params, x1)` and `f(params, x2)` calls.

  NT's rules, extended to Flax:
    1. `rng` (NT) and `rngs` (Flax; a key or a dict of keys): when `x2` is
       given and differs from `x1`, the `x2` call gets keys derived from
       these (`fold_in(key, 1)`), so that `x1 == x2` gives identical
       randomness (dropout masks) and distinct inputs independent ones.
       A 2-tuple `(for_x1, for_x2)` is used as given.
    2. Any other 2-tuple value `(for_x1, for_x2)` is split between the calls,
       except for `mutable` (a Flax setting, passed unchanged).
    3. Everything else (`train`, `mutable`, ...) goes to both calls.

  Args:
    kwargs: the user's keyword arguments.
    x1: first inputs.
    x2: second inputs, or None (meaning `x1`).

  Returns:
    `(kwargs1, kwargs2)`.

  >>> split_kwargs({'train': False, 'mask': (1, 2)}, 0., None)
  ({'train': False, 'mask': 1}, {'train': False, 'mask': 2})
  """
  kwargs1, kwargs2 = {}, {}
  for name, value in kwargs.items():
    if conventions.is_pair(name, value):
      kwargs1[name], kwargs2[name] = value
    elif name in _RNG_KWARGS and x2 is not None and value is not None:
      kwargs1[name] = value
      kwargs2[name] = _second_key(value, x1, x2)
    else:
      kwargs1[name] = kwargs2[name] = value
  return kwargs1, kwargs2


# Flax variables.


def split_variables(
    f: Callable[..., PyTree], variables: PyTree
) -> tuple[Callable[..., PyTree], PyTree]:
  """Separates the differentiated parameters from Flax's other collections.

  When `variables` is a mapping with a `'params'` collection (what
  `model.init` returns), only that collection is differentiated: the
  returned function closes over the other collections (`batch_stats`, ...)
  and takes the `'params'` collection alone. Otherwise `variables` is a plain
  parameter pytree and is returned as is. In both cases the returned function
  keeps only the output when `f` returns `(output, mutated_state)` because it
  was called with Flax's `mutable=`.

  Args:
    f: `f(variables, x, **kwargs)`, e.g. a Flax `model.apply`.
    variables: Flax variables or any parameter pytree.

  Returns:
    `(f_params, params)` with `f_params(params, x, **kwargs)`.

  >>> f, p = split_variables(lambda v, x: v['params']['w'] * x + v['s'],
  ...                        {'params': {'w': 2.}, 's': 1.})
  >>> p, f(p, 3.)
  ({'w': 2.0}, 7.0)
  """
  if is_flax_variables(variables):

    def f_params(p, x, **kwargs):
      return _output_only(f(with_params(variables, p), x, **kwargs), kwargs)

    return f_params, params_of(variables)

  def f_plain(p, x, **kwargs):
    return _output_only(f(p, x, **kwargs), kwargs)

  return f_plain, variables


def is_flax_variables(tree: PyTree) -> bool:
  """Whether `tree` is a Flax variables mapping with a `'params'` collection."""
  return isinstance(tree, Mapping) and "params" in tree


def params_of(variables: PyTree) -> PyTree:
  """The `'params'` collection of Flax variables, or a plain pytree as is.

  >>> params_of({'params': {'w': 1.}, 'batch_stats': {}}), params_of(2.)
  ({'w': 1.0}, 2.0)
  """
  return variables["params"] if is_flax_variables(variables) else variables


def with_params(variables: Mapping[str, Any], params: PyTree) -> PyTree:
  """`variables` with its `'params'` collection replaced by `params`.

  The caller's mapping type (dict or FrozenDict) is kept.
  """
  merged = dict(variables)
  merged["params"] = params
  if not isinstance(variables, dict):
    mapping_type: Any = type(variables)  # A Mapping subclass.
    try:
      return mapping_type(merged)
    except TypeError:
      pass
  return merged


def _output_only(out: PyTree, kwargs: Mapping[str, Any]) -> PyTree:
  """Drops the mutated state that Flax returns when `mutable` is set."""
  mutable = kwargs.get("mutable", False)
  if mutable is not False and isinstance(out, tuple) and len(out) == 2:
    return out[0]
  return out
