"""`vmap_axes`: declaring that examples are independent.

`canonicalize_vmap_axes` turns the user's `vmap_axes` into the normalized
triple `(in_axes, out_axes, kwargs_axes)` that implementations receive, and
`per_example_fn` evaluates `f` on one example at a time.
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.empirical.layout import PyTree

__all__ = [
    "CanonicalVmapAxes",
    "VmapAxes",
    "canonicalize_tree_axes",
    "canonicalize_vmap_axes",
    "per_example_fn",
    "split_vmapped_kwargs",
]

# `(in_axes, out_axes, kwargs_axes)` after `canonicalize_vmap_axes`: `in_axes`
# is a pytree like `x` of non-negative ints (or None), `out_axes` a pytree like
# `f`'s output of non-negative ints, `kwargs_axes` a dict from keyword name to
# a pytree of non-negative ints (or None) like that keyword's value.
CanonicalVmapAxes = tuple[PyTree, PyTree, dict[str, PyTree]]
VmapAxes = Optional[CanonicalVmapAxes]


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


def _check_sizes(vmap_axes: Any, inputs: tuple[Any, Any],
                 outputs: tuple[Any, Any],
                 kwargs: dict[str, tuple[Any, Any]]) -> None:
  """Every vmapped axis must have the same size.

  Args:
    vmap_axes: the user's `vmap_axes`, for the message.
    inputs: `(in_axes, x)`.
    outputs: `(out_axes, fx)`.
    kwargs: by keyword name, `(axes, value)`.

  Raises:
    ValueError: if the vmapped axes have different sizes.
  """
  sizes = {}

  def record(axes, tree, what):
    for axis, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda a: a is None),
                          jax.tree.leaves(tree)):
      if axis is not None:
        sizes.setdefault(jnp.shape(leaf)[axis], []).append(
            f"{what} of shape {jnp.shape(leaf)} along axis {axis}")

  record(*inputs, "input x")
  record(*outputs, "output f(params, x)")
  for name, (axes, value) in kwargs.items():
    record(axes, value, f"keyword {name!r}")
  if len(sizes) > 1:
    details = "; ".join(f"size {s}: {', '.join(w)}" for s, w in sizes.items())
    raise ValueError(
        f"vmap_axes={vmap_axes!r} do not fit the inputs: the vmapped axes "
        f"have different sizes ({details}). They must all index the same "
        "batch of examples; fix vmap_axes or pass vmap_axes=None.")


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

  by_name = {name: (axes, kwargs[name]) for name, axes in kwargs_axes.items()}
  _check_sizes(vmap_axes, (in_axes, x), (out_axes, fx), by_name)
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
    f: Callable[..., PyTree], vmap_axes: CanonicalVmapAxes,
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
