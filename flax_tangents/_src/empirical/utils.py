"""Shared bookkeeping for every empirical-NTK implementation.

Every implementation (`jacobian_contraction`, `ntk_vector_products`,
`structured`) exposes

    ntk(f, params, x1, x2, kwargs1, kwargs2, *,
        trace_axes, diagonal_axes, vmap_axes) -> pytree of kernels

and shares the helpers below, so that all of them read their arguments and lay
out their results identically:

* Axes: `canonicalize_axes` turns user axes (possibly negative) into a sorted
  tuple of non-negative ints and checks them.
* Output layout (NT's convention): for an output leaf of shape
  `(A, B, C, ...)` the kernel has, axis by axis, nothing for a traced axis,
  one axis for a diagonal axis and a pair `(A1, A2)` otherwise, in the
  original order; e.g. `(N, O)` with `trace_axes=()` gives `(N1, N2, O1, O2)`.
  Traced axes are averaged (divided by their size). `contract` produces this
  layout from two arrays that share trailing (parameter) axes;
  `trace_and_diagonal` produces it from a full kernel laid out as
  `(*out1_shape, *out2_shape)`.
* Keyword arguments: `split_kwargs` derives the keyword arguments of the `x1`
  and `x2` evaluations from the user's.
* Flax variables: `split_variables` separates the `'params'` collection (the
  only one differentiated) from the others (held fixed).
* vmap axes: `canonicalize_vmap_axes` turns the user's `vmap_axes` into the
  normalized triple `(in_axes, out_axes, kwargs_axes)` that implementations
  receive, and `per_example_fn` evaluates `f` on one example at a time.
"""

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Axes",
    "PyTree",
    "VmapAxes",
    "canonicalize_axes",
    "canonicalize_tree_axes",
    "canonicalize_vmap_axes",
    "check_trace_and_diagonal",
    "contract",
    "kernel_shape",
    "per_example_fn",
    "split_vmapped_kwargs",
    "split_kwargs",
    "split_variables",
    "trace_and_diagonal",
    "traced_size",
    "zip_axes",
]

PyTree = Any
Axes = Union[int, Sequence[int]]
# `(in_axes, out_axes, kwargs_axes)` after `canonicalize_vmap_axes`: `in_axes`
# is a pytree like `x` of non-negative ints (or None), `out_axes` a pytree like
# `f`'s output of non-negative ints, `kwargs_axes` a dict from keyword name to
# a pytree of non-negative ints (or None) like that keyword's value.
VmapAxes = Optional[tuple[PyTree, PyTree, dict[str, PyTree]]]

# Keyword arguments that are random keys: the `x2` evaluation gets a key of its
# own unless `x2` equals `x1` (NT's rule for `rng`, applied to Flax's `rngs`).
_RNG_KWARGS = ("rng", "rngs")
# Keyword arguments whose tuple values are settings, not `(for_x1, for_x2)`.
_UNSPLIT_KWARGS = ("mutable",)


# Axes and layout.


def canonicalize_axes(axes: Axes, ndim: int, name: str = "axes") -> tuple[
    int, ...]:
  """Sorted, non-negative, de-duplicated axes of an `ndim`-dimensional array.

  Args:
    axes: an int or a sequence of ints, negative ones counting from the end.
    ndim: number of dimensions of the array the axes refer to.
    name: what the axes are called in error messages.

  Returns:
    A sorted tuple of distinct axes in `[0, ndim)`.

  Raises:
    ValueError: if an axis is out of range.

  >>> canonicalize_axes((-1, 0), 3)
  (0, 2)
  """
  axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  result = set()
  for axis in axes:
    if not -ndim <= int(axis) < ndim:
      raise ValueError(
          f"{name}={axes} does not fit an output with {ndim} dimensions: axis "
          f"{axis} is out of range. Give axes in [-{ndim}, {ndim}).")
    result.add(int(axis) % ndim)
  return tuple(sorted(result))


def check_trace_and_diagonal(
    trace_axes: Axes, diagonal_axes: Axes, shape1: Sequence[int],
    shape2: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Checks and canonicalizes `trace_axes`/`diagonal_axes` for two outputs.

  Args:
    trace_axes: axes averaged over.
    diagonal_axes: axes of which only the diagonal is kept.
    shape1: shape of one output leaf of `f(params, x1)`.
    shape2: shape of the same leaf of `f(params, x2)`.

  Returns:
    `(trace_axes, diagonal_axes)`, canonicalized.

  Raises:
    ValueError: if the two outputs have different ranks, an axis is both
      traced and diagonal, or the outputs differ in size along a traced or
      diagonal axis.

  >>> check_trace_and_diagonal((-1,), (), (4, 3), (2, 3))
  ((1,), ())
  """
  if len(shape1) != len(shape2):
    raise ValueError(
        f"f(params, x1) has an output of shape {tuple(shape1)} but "
        f"f(params, x2) has shape {tuple(shape2)}: they must have the same "
        "number of dimensions.")
  ndim = len(shape1)
  trace = canonicalize_axes(trace_axes, ndim, "trace_axes")
  diagonal = canonicalize_axes(diagonal_axes, ndim, "diagonal_axes")
  both = set(trace) & set(diagonal)
  if both:
    raise ValueError(
        f"axes {sorted(both)} are in both trace_axes={tuple(trace_axes)} and "
        f"diagonal_axes={tuple(diagonal_axes)}; an axis is either traced or "
        "diagonal.")
  for axis in trace + diagonal:
    if shape1[axis] != shape2[axis]:
      kind = "trace_axes" if axis in trace else "diagonal_axes"
      raise ValueError(
          f"outputs f(params, x1) of shape {tuple(shape1)} and f(params, x2) "
          f"of shape {tuple(shape2)} differ along axis {axis}, which is in "
          f"{kind}: paired axes must have the same size. Remove the axis "
          f"from {kind} or give inputs whose outputs agree on it.")
  return trace, diagonal


def kernel_shape(
    shape1: Sequence[int], shape2: Sequence[int], trace_axes: Axes,
    diagonal_axes: Axes
) -> tuple[int, ...]:
  """Shape of the NT-layout kernel between outputs of shapes `shape1/2`.

  >>> kernel_shape((4, 3), (2, 3), (), (1,))
  (4, 2, 3)
  """
  trace, diagonal = check_trace_and_diagonal(trace_axes, diagonal_axes,
                                             shape1, shape2)
  shape = ()
  for axis, (size1, size2) in enumerate(zip(shape1, shape2)):
    if axis in trace:
      continue
    shape += (size1,) if axis in diagonal else (size1, size2)
  return shape


def traced_size(shape: Sequence[int], trace_axes: Sequence[int]) -> int:
  """Number of elements along `trace_axes` (the divisor of a trace)."""
  return math.prod(shape[axis] for axis in trace_axes)


def zip_axes(x: jax.Array, start: int = 0, end: Optional[int] = None
             ) -> jax.Array:
  """Interleaves axes `[start:end]`: `(.., A, B, .., A', B')` to `(A, A', ..)`.

  Args:
    x: array whose axes `start:end` are two equally long groups.
    start: first axis of the first group.
    end: one past the last axis of the second group (default: `x.ndim`).

  Returns:
    `x` with the two groups interleaved.

  >>> zip_axes(jnp.zeros((1, 2, 3, 4))).shape
  (1, 3, 2, 4)
  """
  end = x.ndim if end is None else end
  half = (end - start) // 2
  order = list(range(start))
  for i in range(half):
    order += [start + i, start + half + i]
  order += list(range(end, x.ndim))
  return jnp.transpose(x, order)


def _diagonal_positions(trace: Sequence[int], diagonal: Sequence[int]
                        ) -> list[int]:
  """Where each diagonal axis lands in the NT layout of the kernel."""
  positions = []
  for d in diagonal:
    # Each earlier free axis contributes two kernel axes, each earlier
    # diagonal axis one, each earlier traced axis none.
    n_free = sum(1 for a in range(d) if a not in trace and a not in diagonal)
    n_diag = sum(1 for a in diagonal if a < d)
    positions.append(2 * n_free + n_diag)
  return positions


def contract(lhs: jax.Array, rhs: jax.Array, out_ndim: int,
             trace_axes: Sequence[int], diagonal_axes: Sequence[int],
             average: bool = True) -> jax.Array:
  """Contracts two arrays over trailing shared axes into the NT layout.

  `lhs` has shape `(*out1, *extra)` and `rhs` has shape `(*out2, *extra)`;
  `extra` axes (parameters, for a Jacobian) are summed over, the output axes
  are paired as described in the module docstring.

  Args:
    lhs: first array; its first `out_ndim` axes are output axes.
    rhs: second array, with the same number of dimensions.
    out_ndim: number of leading output axes.
    trace_axes: canonical output axes to trace (sum and, if `average`,
      divide by their size).
    diagonal_axes: canonical output axes to keep only the diagonal of.
    average: divide by the traced size, as NT does.

  Returns:
    The kernel in NT layout.

  >>> contract(jnp.ones((2, 3, 5)), jnp.ones((4, 3, 5)), 2, (1,), ()).shape
  (2, 4)
  """
  extra = tuple(range(out_ndim, lhs.ndim))
  contracting = tuple(trace_axes) + extra
  dims = ((contracting, contracting), (tuple(diagonal_axes),
                                       tuple(diagonal_axes)))
  product = jax.lax.dot_general(lhs, rhs, dims)
  n_diag = len(diagonal_axes)
  # dot_general gives (diag..., free1..., free2...): pair the free axes, then
  # move each diagonal axis to its place in output order.
  product = zip_axes(product, n_diag)
  product = jnp.moveaxis(product, tuple(range(n_diag)),
                         tuple(_diagonal_positions(trace_axes, diagonal_axes)))
  if average:
    product = product / traced_size(lhs.shape, trace_axes)
  return product


def trace_and_diagonal(kernel: jax.Array, trace_axes: Sequence[int],
                       diagonal_axes: Sequence[int]) -> jax.Array:
  """NT layout from a full kernel of shape `(*out1_shape, *out2_shape)`.

  Args:
    kernel: array with an even number of dimensions, the first half indexing
      the first output and the second half the second one.
    trace_axes: canonical output axes to average over.
    diagonal_axes: canonical output axes to keep only the diagonal of.

  Returns:
    The kernel in NT layout.

  >>> trace_and_diagonal(jnp.ones((2, 3, 4, 3)), (1,), ()).shape
  (2, 4)
  """
  out_ndim = kernel.ndim // 2
  size = traced_size(kernel.shape[:out_ndim], trace_axes)
  axes1 = list(range(out_ndim))
  axes2 = list(range(out_ndim, 2 * out_ndim))
  # Sum traced pairs and extract diagonal pairs with one einsum.
  letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
  spec1, spec2, out = [], [], []
  for axis in range(out_ndim):
    a = next(letters)
    if axis in trace_axes:
      spec1.append(a)
      spec2.append(a)
    elif axis in diagonal_axes:
      spec1.append(a)
      spec2.append(a)
      out.append(a)
    else:
      b = next(letters)
      spec1.append(a)
      spec2.append(b)
      out += [a, b]
  del axes1, axes2
  spec = f"{''.join(spec1)}{''.join(spec2)}->{''.join(out)}"
  return jnp.einsum(spec, kernel) / size


# Keyword arguments.


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
    if isinstance(value, tuple) and len(value) == 2 and (
        name not in _UNSPLIT_KWARGS):
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
  if isinstance(variables, Mapping) and "params" in variables:
    params = variables["params"]
    others = {k: v for k, v in variables.items() if k != "params"}

    def rebuild(p):
      merged = dict(others)
      merged["params"] = p
      # Keep the caller's mapping type (dict or FrozenDict).
      if not isinstance(variables, dict):
        try:
          return type(variables)(merged)
        except TypeError:
          pass
      return merged

    def f_params(p, x, **kwargs):
      return _output_only(f(rebuild(p), x, **kwargs), kwargs)

    return f_params, params

  def f_plain(p, x, **kwargs):
    return _output_only(f(p, x, **kwargs), kwargs)

  return f_plain, variables


def _output_only(out: PyTree, kwargs: Mapping[str, Any]) -> PyTree:
  """Drops the mutated state that Flax returns when `mutable` is set."""
  mutable = kwargs.get("mutable", False)
  if mutable is not False and isinstance(out, tuple) and len(out) == 2:
    return out[0]
  return out


# vmap axes.


def _broadcast_axes(axes: PyTree, tree: PyTree, what: str) -> PyTree:
  """An int (or None) for every leaf of `tree`, from an int or a prefix."""
  if axes is None or isinstance(axes, (int, np.integer)):
    return jax.tree.map(lambda _: axes, tree)
  try:
    return jax.tree.map(
        lambda a, subtree: jax.tree.map(lambda _: a, subtree), axes, tree,
        is_leaf=lambda a: a is None)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"vmap axes {axes!r} for {what} do not match its structure "
        f"{jax.tree.structure(tree)}: give one int (or None) per leaf, or a "
        "single int.") from e


def _normalize_leaf_axis(axis, leaf, what: str):
  if axis is None:
    return None
  ndim = jnp.ndim(leaf)
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"vmap axis {axis} does not fit {what} of shape {jnp.shape(leaf)}: "
        f"it has {ndim} dimensions. Fix vmap_axes, or pass vmap_axes=None if "
        "f has no batch axis.")
  return int(axis) % ndim


def canonicalize_tree_axes(axes: PyTree, tree: PyTree, what: str) -> PyTree:
  """One non-negative axis (or None) per leaf of `tree`.

  Args:
    axes: None, an int, or a pytree prefix of `tree` with ints or None.
    tree: arrays (or shape structs).
    what: what `tree` is, for error messages.

  Returns:
    A pytree like `tree` of non-negative ints or None.

  Raises:
    ValueError: if `axes` does not match `tree` or an axis is out of range.

  >>> canonicalize_tree_axes(-1, {'a': jnp.ones((2, 3))}, 'x')
  {'a': 1}
  """
  return jax.tree.map(
      lambda a, leaf: _normalize_leaf_axis(a, leaf, what),
      _broadcast_axes(axes, tree, what), tree, is_leaf=lambda a: a is None)


def canonicalize_vmap_axes(vmap_axes: Any, x: PyTree, fx: PyTree,
                           kwargs: Mapping[str, Any]) -> VmapAxes:
  """Normalizes and checks `vmap_axes` against inputs, outputs and kwargs.

  Args:
    vmap_axes: None, an int (`in_axes = out_axes = vmap_axes`), or a triple
      `(in_axes, out_axes, kwargs_axes)` where `in_axes`/`out_axes` are an
      int or a pytree prefix of ints for `x`/`f(params, x)` and
      `kwargs_axes` maps keyword names to axes of their values.
    x: the inputs (arrays or shape structs).
    fx: `f`'s output for `x` (arrays or shape structs).
    kwargs: the keyword arguments of that call.

  Returns:
    None, or `(in_axes, out_axes, kwargs_axes)` with one non-negative int (or
    None for `in_axes`/`kwargs_axes`) per leaf.

  Raises:
    ValueError: if an axis is out of range, an axis is missing for an output,
      a keyword is unknown, or the vmapped sizes disagree.

  >>> canonicalize_vmap_axes(0, jnp.zeros((3, 2)), jnp.zeros((3,)), {})
  (0, 0, {})
  """
  if vmap_axes is None:
    return None
  if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
    in_axes, out_axes, kwargs_axes = vmap_axes
  else:
    in_axes, out_axes, kwargs_axes = vmap_axes, vmap_axes, {}
  kwargs_axes = {} if kwargs_axes is None else dict(kwargs_axes)
  unknown = set(kwargs_axes) - set(kwargs)
  if unknown:
    raise ValueError(
        f"vmap_axes names keyword arguments {sorted(unknown)} that f was not "
        f"called with (it got {sorted(kwargs)}). Remove them from the "
        "kwargs_axes of vmap_axes.")

  in_axes = jax.tree.map(
      lambda a, leaf: _normalize_leaf_axis(a, leaf, "an input x"),
      _broadcast_axes(in_axes, x, "the inputs x"), x,
      is_leaf=lambda a: a is None)
  out_axes = jax.tree.map(
      lambda a, leaf: _normalize_leaf_axis(a, leaf, "an output f(params, x)"),
      _broadcast_axes(out_axes, fx, "the outputs f(params, x)"), fx,
      is_leaf=lambda a: a is None)
  if any(a is None for a in jax.tree.leaves(out_axes,
                                            is_leaf=lambda a: a is None)):
    raise ValueError("every output of f needs a vmap out axis (an int), got "
                     f"{out_axes!r}.")
  kwargs_axes = {
      name: jax.tree.map(
          lambda a, leaf, name=name: _normalize_leaf_axis(
              a, leaf, f"keyword argument {name!r}"),
          _broadcast_axes(axes, kwargs[name], f"keyword argument {name!r}"),
          kwargs[name], is_leaf=lambda a: a is None)
      for name, axes in kwargs_axes.items()
  }

  # Every vmapped axis must have the same size.
  sizes = {}

  def record(axes, tree, what):
    for axis, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda a: a is None),
                          jax.tree.leaves(tree)):
      if axis is not None:
        sizes.setdefault(jnp.shape(leaf)[axis], []).append(
            f"{what} of shape {jnp.shape(leaf)} along axis {axis}")

  record(in_axes, x, "input x")
  record(out_axes, fx, "output f(params, x)")
  for name, axes in kwargs_axes.items():
    record(axes, kwargs[name], f"keyword {name!r}")
  if len(sizes) > 1:
    details = "; ".join(f"size {s}: {', '.join(w)}" for s, w in sizes.items())
    raise ValueError(
        f"vmap_axes={vmap_axes!r} do not fit the inputs: the vmapped axes "
        f"have different sizes ({details}). They must all index the same "
        "batch of examples; fix vmap_axes or pass vmap_axes=None.")
  if not any(a is not None for a in jax.tree.leaves(
      (in_axes, kwargs_axes), is_leaf=lambda a: a is None)):
    raise ValueError(
        f"vmap_axes={vmap_axes!r} maps no input: give an in axis for x or "
        "for a keyword argument, or pass vmap_axes=None.")
  return in_axes, out_axes, kwargs_axes


def _expand(tree: PyTree, axes: PyTree) -> PyTree:
  return jax.tree.map(
      lambda a, leaf: leaf if a is None else jnp.expand_dims(leaf, a), axes,
      tree, is_leaf=lambda a: a is None)


def _squeeze(tree: PyTree, axes: PyTree) -> PyTree:
  return jax.tree.map(lambda leaf, a: jnp.squeeze(leaf, a), tree, axes)


def split_vmapped_kwargs(kwargs: Mapping[str, Any], vmap_axes: VmapAxes
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(mapped, fixed)`: keyword arguments with and without a vmap axis."""
  kwargs_axes = {} if vmap_axes is None else vmap_axes[2]
  mapped = {k: v for k, v in kwargs.items() if k in kwargs_axes}
  fixed = {k: v for k, v in kwargs.items() if k not in kwargs_axes}
  return mapped, fixed


def per_example_fn(
    f: Callable[..., PyTree], vmap_axes: VmapAxes,
    fixed_kwargs: Mapping[str, Any]
) -> tuple[Callable[..., PyTree], tuple[PyTree, PyTree], PyTree]:
  """`f` on one example, ready for `jax.vmap`.

  The returned `g(params, x, mapped_kwargs)` takes one example (inputs and
  vmapped keyword arguments without their batch axis), restores a batch axis
  of size one, calls `f` with `mapped_kwargs` and `fixed_kwargs`, and removes
  the output's batch axis. Keyword arguments without a vmap axis are closed
  over, since `jax.vmap` would map keyword arguments over axis 0.

  Args:
    f: `f(params, x, **kwargs)`.
    vmap_axes: the canonical triple from `canonicalize_vmap_axes`.
    fixed_kwargs: keyword arguments that are not vmapped.

  Returns:
    `(g, (x_axes, kwargs_axes), out_axes)`: use
    `jax.vmap(g, in_axes=(None, x_axes, kwargs_axes), out_axes=out_axes)`
    and call it as `g(params, x, mapped_kwargs)`.

  >>> axes = canonicalize_vmap_axes(0, jnp.ones((3, 2)), jnp.ones((3,)), {})
  >>> g, (x_axes, kw_axes), out_axes = per_example_fn(
  ...     lambda p, x: x.sum(-1) * p, axes, {})
  >>> jax.vmap(g, (None, x_axes, kw_axes), out_axes)(2., jnp.ones((3, 2)), {})
  Array([4., 4., 4.], dtype=float...)
  """
  in_axes, out_axes, kwargs_axes = vmap_axes

  def g(params, x, mapped_kwargs):
    x = _expand(x, in_axes)
    mapped_kwargs = {
        name: _expand(value, kwargs_axes[name])
        for name, value in mapped_kwargs.items()
    }
    return _squeeze(f(params, x, **mapped_kwargs, **fixed_kwargs), out_axes)

  return g, (in_axes, dict(kwargs_axes)), out_axes
