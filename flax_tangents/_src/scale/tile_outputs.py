"""What a kernel function returns for one tile, and how tiles are stitched.

Every array a kernel function returns plays one of three roles, read from
its name (the `Kernel` field, the namedtuple field, or `get`):

- `pair` (`nngp`, `ntk`, or any unnamed kernel array): leading axes
  `(N1, N2)`; stitched along both.
- `row` (`cov1`, `mask1`): leading axis `N1`; taken from one tile per row.
- `col` (`cov2`, `mask2`): leading axis `N2`; taken from one tile per column.

Transposing a tile of a `pair` array (to use the tile of `(x1_j, x1_i)` as
the one of `(x1_i, x1_j)`) swaps the two batch axes and every other pair of
`x1`/`x2` axes, while axes that exist once (diagonal spatial axes,
`diagonal_axes`) stay. That layout is known for `Kernel` fields, for arrays
with no axes beyond the batch pair, and from a layout hint; otherwise it is
unknown and symmetric kernels compute mirror tiles instead of transposing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["OutputTemplate", "PAIR", "ROW", "COL", "transpose_permutation"]

PAIR, ROW, COL = "pair", "row", "col"
_ROLE_BY_NAME: dict[Optional[str], str] = {
    "nngp": PAIR, "ntk": PAIR, "cov1": ROW, "mask1": ROW, "cov2": COL,
    "mask2": COL}

# A layout is a sequence of 'pair' / 'single' for the axes after (N1, N2).
Layout = Sequence[str]
LayoutHint = Callable[[int], Optional[Layout]]


def transpose_permutation(layout: Layout) -> tuple[int, ...]:
  """Axis permutation mapping the `(x1_j, x1_i)` tile to `(x1_i, x1_j)`."""
  perm = [1, 0]
  position = 2
  for group in layout:
    if group == "pair":
      perm += [position + 1, position]
      position += 2
    else:
      perm.append(position)
      position += 1
  return tuple(perm)


def _kernel_layout(kernel: Kernel) -> Layout:
  spatial_ndim = len(kernel.shape1) - 2
  group = "single" if kernel.diagonal_spatial else "pair"
  return (group,) * spatial_ndim


def layout_ndim(layout: Layout) -> int:
  return sum(2 if g == "pair" else 1 for g in layout)


def _name(entry: Any) -> Optional[str]:
  for attribute in ("name", "key"):
    value = getattr(entry, attribute, None)
    if isinstance(value, str):
      return value
  return None


def _child(node: Any, entry: Any) -> Any:
  if hasattr(entry, "name"):
    return getattr(node, entry.name)
  if hasattr(entry, "key"):
    return node[entry.key]
  if hasattr(entry, "idx"):
    return node[entry.idx]
  return None


@dataclasses.dataclass(frozen=True)
class OutputLeaf:
  """One array of a tile's output.

  Attributes:
    key: its path in the output pytree (`jax.tree_util.keystr`).
    role: `PAIR`, `ROW` or `COL`.
    shape: its shape for one tile.
    dtype: its dtype.
    perm: for `PAIR` leaves, the transposing permutation, or `None` if the
      layout is unknown.
    name: its name (`nngp`, `ntk`, a namedtuple field, or `get` for a bare
      array), if it has one.
  """
  key: str
  role: str
  shape: tuple[int, ...]
  dtype: Any
  perm: Optional[tuple[int, ...]]
  name: Optional[str] = None


class OutputTemplate:
  """The structure of a tile's output, from an abstract evaluation.

  Args:
    abstract_output: `jax.eval_shape` of the wrapped function on one tile.
    batch_size: rows/columns of the tile.
    get: the `get` argument of the call, naming a bare array's role.
    layout_hint: maps the number of non-batch axes of a pair array to its
      layout, or returns `None` when unknown.

  Raises:
    NotImplementedError: for a `Kernel` with `diagonal_batch=False`, whose
      `cov1` needs tiles that a batched computation does not form.
    ValueError: if an array's leading axes are not the tile's batch axes.
  """

  def __init__(self, abstract_output: Any, batch_size: int, get: Any,
               layout_hint: Optional[LayoutHint] = None):
    path_leaves, self.treedef = jax.tree_util.tree_flatten_with_path(
        abstract_output)
    self.leaves: list[OutputLeaf] = []
    for path, leaf in path_leaves:
      parent = abstract_output
      for entry in path[:-1]:
        parent = _child(parent, entry) if parent is not None else None
      name = _name(path[-1]) if path else (get if isinstance(get, str)
                                           else None)
      role = _ROLE_BY_NAME.get(name, PAIR)
      if isinstance(parent, Kernel) and not parent.diagonal_batch:
        raise NotImplementedError(
            "ft.batch cannot tile a Kernel with `diagonal_batch=False`: its "
            "`cov1` needs every pair of `x1` tiles. Ask for "
            "get=('nngp', 'ntk') or use a model whose kernel keeps "
            "`diagonal_batch=True`.")
      n_batch = 2 if role == PAIR else 1
      expected = (batch_size,) * n_batch
      if tuple(leaf.shape[:n_batch]) != expected:
        raise ValueError(
            f"ft.batch: output {jax.tree_util.keystr(path) or get!r} of a "
            f"{batch_size}x{batch_size} tile has shape {leaf.shape}; its "
            f"leading axes should be {expected} (the batch axes). Kernels "
            "with the batch axis among `diagonal_axes` cannot be tiled.")
      perm = None
      if role == PAIR:
        rest = len(leaf.shape) - 2
        layout = None
        if isinstance(parent, Kernel):
          layout = _kernel_layout(parent)
        elif rest == 0:
          layout = ()
        elif layout_hint is not None:
          layout = layout_hint(rest)
        if layout is not None and layout_ndim(layout) == rest:
          perm = transpose_permutation(layout)
      self.leaves.append(OutputLeaf(jax.tree_util.keystr(path), role,
                                    tuple(leaf.shape), leaf.dtype, perm,
                                    name))

  @property
  def all_transposable(self) -> bool:
    return all(leaf.perm is not None for leaf in self.leaves
               if leaf.role == PAIR)

  def flatten(self, output: Any, roles: Sequence[str]) -> dict[str, Any]:
    """The arrays of `output` with the given roles, keyed by path."""
    by_key = {jax.tree_util.keystr(path): leaf for path, leaf in
              jax.tree_util.tree_flatten_with_path(output)[0]}
    result = {}
    for leaf in self.leaves:
      if leaf.role in roles:
        if leaf.key not in by_key:
          raise ValueError(f"ft.batch: output {leaf.key} is missing from a "
                           "tile computed with both inputs.")
        result[leaf.key] = by_key[leaf.key]
    return result

  def build(self, arrays: dict[str, Any], n1: int, n2: int) -> Any:
    """The full output from stitched arrays, with `Kernel` shapes fixed."""
    output = jax.tree_util.tree_unflatten(
        self.treedef, [arrays[leaf.key] for leaf in self.leaves])

    def fix(node):
      if not isinstance(node, Kernel):
        return node
      axis = node.batch_axis

      def with_size(shape, n):
        shape = tuple(shape)
        return shape[:axis] + (n,) + shape[axis + 1:]
      return node.replace(shape1=with_size(node.shape1, n1),
                          shape2=with_size(node.shape2, n2))

    return jax.tree.map(fix, output, is_leaf=lambda x: isinstance(x, Kernel))


def empirical_layout_hint(trace_axes: Sequence[int],
                          diagonal_axes: Sequence[int]) -> LayoutHint:
  """Layout of NT-layout empirical kernels (`ft.empirical_kernel_fn`).

  Each output axis after the batch axis gives nothing when traced, one axis
  when diagonal and an `(x1, x2)` pair otherwise, in order.
  """
  def hint(rest: int) -> Optional[Layout]:
    n_diag, n_trace = len(diagonal_axes), len(trace_axes)
    n_pair, odd = divmod(rest - n_diag, 2)
    if odd or n_pair < 0:
      return None
    out_ndim = 1 + n_pair + n_diag + n_trace
    trace = {a % out_ndim for a in trace_axes}
    diagonal = {a % out_ndim for a in diagonal_axes}
    if 0 in trace or 0 in diagonal:
      return None
    layout = []
    for axis in range(1, out_ndim):
      if axis in diagonal:
        layout.append("single")
      elif axis not in trace:
        layout.append("pair")
    return tuple(layout)
  return hint


def describe_leaves(template: OutputTemplate) -> list[dict[str, Any]]:
  """JSON-able description of a template's leaves (for tile readers)."""
  return [{"key": leaf.key, "name": leaf.name, "role": leaf.role,
           "shape": list(leaf.shape), "dtype": np.dtype(leaf.dtype).name,
           "perm": None if leaf.perm is None else list(leaf.perm)}
          for leaf in template.leaves]
