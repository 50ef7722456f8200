"""One input batch of STRUCTURED_DERIVATIVES: its program, plans and proof.

A `Side` is `x1` or `x2` with its keyword arguments: `f` traced into a flat
program (per example under `vmap_axes`), one plan per parameter leaf
(`planner`), and, without `vmap_axes`, the proof (`batching`) that lets
`jacobians` form only the examples' diagonal blocks (`plan_diagonal`).
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.empirical import arguments
from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical.structured import batching
from flax_tangents._src.empirical.structured import ir
from flax_tangents._src.empirical.structured import planner

__all__ = ["Side", "depth", "example_structs", "stop_vars"]


def _is_none(a: Any) -> bool:
  return a is None


def _without_axis(leaf: Any, axis: Optional[int]) -> jax.ShapeDtypeStruct:
  shape = tuple(np.shape(leaf))
  if axis is not None:
    shape = shape[:axis] + shape[axis + 1:]
  return jax.ShapeDtypeStruct(shape, leaf.dtype)


def _struct(leaf: Any) -> jax.ShapeDtypeStruct:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)


def example_structs(x: Any, kw_arrays: list[Any], axes: Optional[tuple]
                    ) -> tuple[Any, list[jax.ShapeDtypeStruct]]:
  """Shape structs of `x` and the keyword arrays, for tracing.

  Args:
    x: the inputs.
    kw_arrays: the array leaves of the keyword arguments.
    axes: None (the whole batch), or `(x_axes, kw_axes)` (one example: the
      batch axes removed).

  Returns:
    `(x_structs, kw_structs)`.
  """
  if axes is None:
    return jax.tree.map(_struct, x), [_struct(l) for l in kw_arrays]
  x_axes, kw_axes = axes
  x_leaves, x_tree = jax.tree.flatten(x)
  x_structs = jax.tree.unflatten(x_tree, [
      _without_axis(l, a) for l, a in zip(
          x_leaves, jax.tree.leaves(x_axes, is_leaf=_is_none))
  ])
  return x_structs, [_without_axis(l, a) for l, a in zip(kw_arrays, kw_axes)]


def _traced(f: Callable[..., Any], param_tree: Any,
            kw: arguments.ArrayKwargs,
            vmap_axes: example_axes.VmapAxes) -> Callable[..., Any]:
  """`f` as a function of `(param leaves, x, kwargs arrays)`.

  With `vmap_axes`, of one example: its batch axes are restored (size one)
  around the call and removed from the outputs.
  """

  def traced(param_leaves, x_value, kw_arrays):
    p = jax.tree.unflatten(param_tree, param_leaves)
    kwargs = kw.rebuild(kw_arrays)
    if vmap_axes is None:
      return f(p, x_value, **kwargs)
    x_axes, out_axes, kwargs_axes = vmap_axes
    x_value = jax.tree.map(
        lambda a, leaf: leaf if a is None else jnp.expand_dims(leaf, a),
        x_axes, x_value, is_leaf=_is_none)
    kw_flat, kw_tree = jax.tree.flatten(kwargs)
    kw_flat = [leaf if a is None else jnp.expand_dims(leaf, a)
               for leaf, a in zip(kw_flat, kw.leaf_axes(kwargs_axes))]
    out = f(p, x_value, **jax.tree.unflatten(kw_tree, kw_flat))
    return jax.tree.map(lambda leaf, a: jnp.squeeze(leaf, a), out, out_axes)

  return traced


class Side:
  """One input batch (`x1` or `x2`): its program, plans and run-time arrays.

  Attributes:
    program: the flat program of `f` (per example when vmapped).
    out_tree: the treedef of `f`'s output.
    plans: one plan per parameter leaf (None: unused).
    vmap_axes: None or the canonical triple.
    out_axes: the outputs' vmap axes (None without `vmap_axes`).
    out_shapes: full shapes of `f`'s output leaves.
    out_dtypes: their dtypes.
    param_leaves: the parameter leaves.
    x: the inputs.
    kw_arrays: the array leaves of the keyword arguments.
    x_axes: the inputs' vmap axes, or None.
    kw_axes: the vmap axis of each of `kw_arrays`, or None.
    diag_stops: set by `plan_diagonal`: stop variable -> its batch axis
      (stacked over loops), where `C` holds only the diagonal blocks.
    diag_outs: set by `plan_diagonal`: each output's batch axis, or None
      when the whole-batch path is taken.
    diag_reason: set by `plan_diagonal`: why the whole-batch path is taken.
  """

  def __init__(self, f: Callable[..., Any], params: Any, x: Any,
               kwargs: Mapping[str, Any], vmap_axes: example_axes.VmapAxes):
    self.param_leaves = jax.tree.leaves(params)
    kw = arguments.ArrayKwargs(kwargs)
    self.kw_arrays, self.x, self.vmap_axes = kw.arrays, x, vmap_axes
    self.x_axes, self.kw_axes, self.out_axes = None, None, None
    if vmap_axes is not None:
      self.x_axes, self.out_axes, kwargs_axes = vmap_axes
      per_leaf = kw.leaf_axes(kwargs_axes)
      self.kw_axes = [per_leaf[i] for i in kw.positions]
    axes = None if vmap_axes is None else (self.x_axes, self.kw_axes)
    x_example, kw_example = example_structs(x, self.kw_arrays, axes)
    param_example = [jax.ShapeDtypeStruct(np.shape(l), l.dtype)
                     for l in self.param_leaves]
    traced = _traced(f, jax.tree.structure(params), kw, vmap_axes)
    self.program, self.out_tree = ir.flatten(traced, param_example,
                                             x_example, kw_example)
    self.plans = planner.plan_program(self.program, len(self.param_leaves))
    self._data_states = self._variable_states()
    self.diag_stops: dict[Any, int] = {}
    self.diag_outs: Optional[list[int]] = None
    self.diag_reason: Optional[str] = None
    outs = jax.tree.leaves(jax.eval_shape(lambda p: f(p, x, **kwargs),
                                          params))
    self.out_shapes = [o.shape for o in outs]
    self.out_dtypes = [o.dtype for o in outs]

  def _variable_states(self) -> Optional[dict]:
    """Without `vmap_axes`: each variable's batch axis, when the leaves of
    `x` are batched along 0 (see `batching`); else None."""
    if self.vmap_axes is not None:
      return None
    x_shapes = [tuple(np.shape(l)) for l in jax.tree.leaves(self.x)]
    sources = batching.input_states(self.program, len(self.param_leaves),
                                    len(x_shapes), x_shapes)
    if sources is None:
      return None
    return batching.variable_states(self.program, sources)

  def batch_size(self) -> int:
    """The size of the vmapped axis (with `vmap_axes`)."""
    for leaf, a in zip(jax.tree.leaves(self.x),
                       jax.tree.leaves(self.x_axes, is_leaf=_is_none)):
      if a is not None:
        return np.shape(leaf)[a]
    for leaf, a in zip(self.kw_arrays, self.kw_axes or []):
      if a is not None:
        return np.shape(leaf)[a]
    raise ValueError("vmap_axes maps no input.")

  def plan_diagonal(self, active: list[planner.LeafPlan],
                    stops: list[Any]) -> None:
    """Sets `diag_stops` and `diag_outs` where examples are independent.

    Otherwise `diag_reason` says why the whole-batch path is taken.

    Args:
      active: the plans of the used parameter leaves.
      stops: their stop variables (`stop_vars`).
    """
    self.diag_stops, self.diag_outs, self.diag_reason = {}, None, None
    states = self._data_states
    if states is None:
      self.diag_reason = ("the inputs have no common batch axis 0, or are "
                          "scalars")
      return
    in_body, stacked, lost = _batched_stops(states, active, stops)
    if not in_body:
      self.diag_reason = ("no stop variable is batched along the examples" +
                          ("" if lost is None else
                           f" ({lost.finding or lost.reason})"))
      return
    # Proof: with the perturbations of the candidates as the only batched
    # sources, every output is batched (or independent of them).
    program = self.program
    result = batching.analyse(program, [None] * len(program.inputs),
                              extra=in_body)
    out_axes = []
    for atom, state in zip(program.outputs, result.states):
      if state is None and not isinstance(atom, ir.Literal):
        state = states.get(atom)
      if not isinstance(state, int) or isinstance(state, bool):
        finding = result.finding or getattr(state, "finding", None)
        self.diag_reason = (f"examples are not independent: {finding}"
                            if finding else "an output has no batch axis")
        return
      out_axes.append(state)
    self.diag_stops, self.diag_outs = stacked, out_axes


def _batched_stops(states: dict, active: list[planner.LeafPlan],
                   stops: list[Any]):
  """The stop variables batched along the examples.

  Returns:
    `(in_body, stacked, lost)`: their batch axes in their own body and
    stacked over loops, and the first `batching.Mixed` state met, if any.
  """
  in_body, stacked, lost = {}, {}, None
  for v in stops:
    axis = states.get(v)
    if not isinstance(axis, int) or isinstance(axis, bool):
      if isinstance(axis, batching.Mixed) and lost is None:
        lost = axis
      continue
    axis_stacked = axis + depth(v)
    if any(c.stop_var == v and c.stop_labels[axis_stacked] in p.root_labels
           for p in active for c in p.chains):
      continue  # A per-example parameter: its rows are not examples.
    in_body[v], stacked[v] = axis, axis_stacked
  return in_body, stacked, lost


def stop_vars(active: list[planner.LeafPlan]) -> list[Any]:
  """The distinct stop variables of the plans' chains, in order."""
  seen, out = set(), []
  for item in (c.stop_var for p in active for c in p.chains):
    if item not in seen:
      seen.add(item)
      out.append(item)
  return out


def depth(address) -> int:
  """How many loops a stop address is inside."""
  n = 0
  while not isinstance(address, int):
    n, address = n + 1, address[1]
  return n
