"""STRUCTURED_DERIVATIVES: the empirical NTK from structured Jacobians.

For each input batch (`x1`, `x2`), `f` is traced once into a flat program
(`ir`), every parameter leaf gets a plan (`planner`): one or more chains of
structure rules, each ending at a stop variable `y` (possibly inside the body
of a `scan`, stacked over its iterations). One reverse pass (`jax.jacrev`
with respect to additive perturbations of all stop variables at once) gives
every `C = d f / d y`; the factors of each chain are read off the same
forward pass (those computed in a loop body, at every iteration). Each pair
of a parameter's chains contributes `(C1 S1)(C2 S2)^T`, one einsum
(`contraction`), summed over pairs and parameters, in NT's output layout.

With `vmap_axes`, all of this runs per example under `jax.vmap` (the
Jacobians of independent examples are block-diagonal, so only the diagonal
blocks are formed), which is what makes wide networks cheap.

Without `vmap_axes`, the same saving is made whenever it can be proven from
the program (`batching`): if every output slice `out[n]` depends on each stop
variable only through its slice `n`, one reverse pass per output coordinate,
seeded at all examples at once, yields all diagonal blocks, and the cost is
linear in the batch instead of quadratic. Programs that mix examples
(BatchNorm in training, batch statistics, a primitive the analysis does not
know) keep the general whole-batch path, which is always correct.
"""

from collections.abc import Callable, Mapping
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import layout
from flax_tangents._src.empirical.structured import batching
from flax_tangents._src.empirical.structured import contraction
from flax_tangents._src.empirical.structured import ir
from flax_tangents._src.empirical.structured import planner

__all__ = ["ntk"]


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or (
      hasattr(leaf, "shape") and hasattr(leaf, "dtype"))


def _without_axis(leaf: Any, axis: Optional[int]) -> jax.ShapeDtypeStruct:
  shape = tuple(np.shape(leaf))
  if axis is not None:
    shape = shape[:axis] + shape[axis + 1:]
  return jax.ShapeDtypeStruct(shape, leaf.dtype)


class _Side:
  """One input batch (`x1` or `x2`): its program, plans and run-time arrays.

  Attributes:
    program: the flat program of `f` (per example when vmapped).
    plans: one plan per parameter leaf (None: unused).
    out_shapes: full shapes of `f`'s output leaves.
  """

  def __init__(self, f: Callable[..., Any], params: Any, x: Any,
               kwargs: Mapping[str, Any], vmap_axes: example_axes.VmapAxes):
    self._param_leaves = jax.tree.leaves(params)
    param_tree = jax.tree.structure(params)
    kw_leaves, kw_tree = jax.tree.flatten(dict(kwargs))
    array_positions = [i for i, l in enumerate(kw_leaves) if _is_array(l)]
    self._kw_arrays = [kw_leaves[i] for i in array_positions]
    self._x = x
    self.vmap_axes = vmap_axes

    none_leaf = lambda a: a is None  # noqa: E731
    if vmap_axes is None:
      x_axes, kw_axes, out_axes, per_leaf = None, None, None, None
    else:
      x_axes, out_axes, kwargs_axes = vmap_axes
      # One axis (or None) per kwargs leaf, in `kw_leaves` order.
      per_leaf = []
      for name in sorted(kwargs):
        if name in kwargs_axes:
          per_leaf += jax.tree.leaves(kwargs_axes[name], is_leaf=none_leaf)
        else:
          per_leaf += [None] * len(jax.tree.leaves(kwargs[name]))
      kw_axes = [per_leaf[i] for i in array_positions]
    self._x_axes, self._kw_axes, self.out_axes = x_axes, kw_axes, out_axes

    def rebuild_kwargs(kw_arrays):
      leaves = list(kw_leaves)
      for i, value in zip(array_positions, kw_arrays):
        leaves[i] = value
      return jax.tree.unflatten(kw_tree, leaves)

    def traced(param_leaves, x_value, kw_arrays):
      p = jax.tree.unflatten(param_tree, param_leaves)
      kw = rebuild_kwargs(kw_arrays)
      if vmap_axes is None:
        return f(p, x_value, **kw)
      x_value = jax.tree.map(
          lambda a, leaf: leaf if a is None else jnp.expand_dims(leaf, a),
          x_axes, x_value, is_leaf=none_leaf)
      kw_flat = jax.tree.leaves(kw)
      kw_flat = [leaf if a is None else jnp.expand_dims(leaf, a)
                 for leaf, a in zip(kw_flat, per_leaf)]
      kw = jax.tree.unflatten(kw_tree, kw_flat)
      out = f(p, x_value, **kw)
      return jax.tree.map(lambda leaf, a: jnp.squeeze(leaf, a), out, out_axes)

    if vmap_axes is None:
      x_example, kw_example = x, self._kw_arrays
    else:
      x_leaves, x_tree = jax.tree.flatten(x)
      x_example = jax.tree.unflatten(x_tree, [
          _without_axis(l, a) for l, a in zip(
              x_leaves, jax.tree.leaves(x_axes, is_leaf=none_leaf))
      ])
      kw_example = [_without_axis(l, a)
                    for l, a in zip(self._kw_arrays, kw_axes)]
    param_example = [jax.ShapeDtypeStruct(np.shape(l), l.dtype)
                     for l in self._param_leaves]
    x_example = jax.tree.map(
        lambda l: l if isinstance(l, jax.ShapeDtypeStruct) else
        jax.ShapeDtypeStruct(np.shape(l), l.dtype), x_example)
    kw_example = [l if isinstance(l, jax.ShapeDtypeStruct) else
                  jax.ShapeDtypeStruct(np.shape(l), l.dtype)
                  for l in kw_example]
    self.program, self.out_tree = ir.flatten(traced, param_example,
                                             x_example, kw_example)
    self.plans = planner.plan_program(self.program, len(self._param_leaves))
    # Without vmap_axes: which variables are batched along which axis, when
    # the leaves of `x` are batched along 0 (see `batching`).
    self._data_states = None
    if vmap_axes is None:
      x_shapes = [tuple(np.shape(l)) for l in jax.tree.leaves(x)]
      sources = batching.input_states(self.program, len(self._param_leaves),
                                      len(x_shapes), x_shapes)
      if sources is not None:
        self._data_states = batching.variable_states(self.program, sources)
    # Set by `arrays`: stop variable -> its batch axis, and each output's
    # batch axis, where `C` holds only the examples' diagonal blocks.
    self.diag_stops: dict[Any, int] = {}
    self.diag_outs: Optional[list[int]] = None
    self.diag_reason: Optional[str] = None
    outs = jax.tree.leaves(jax.eval_shape(lambda p: f(p, x, **kwargs),
                                          params))
    self.out_shapes = [o.shape for o in outs]
    self.out_dtypes = [o.dtype for o in outs]

  def arrays(self, plans: list[Optional[planner.LeafPlan]]):
    """`(C, factors)`: `C[out][stop address]`, factor values per chain.

    The factor values are, per plan (None for unused leaves), one list per
    chain of `(value, batched)` per factor: `batched` when the value has a
    leading per-example axis (with `vmap_axes`).
    """
    program = self.program
    active = [p for p in plans if p is not None]
    chains = [c for p in active for c in p.chains]
    stop_vars = _unique([c.stop_var for c in chains])
    param_leaves = self._param_leaves
    if not stop_vars:  # No parameter reaches the outputs: the NTK is zero.
      return [{} for _ in program.outputs], [None] * len(plans)
    taps, locate = _factor_taps(chains)

    if self.vmap_axes is None:
      self._plan_diagonal(active, stop_vars)
      if self.diag_outs is not None:
        return self._diagonal_arrays(plans, chains, stop_vars, taps, locate)

    def evaluate(x_value, kw_arrays, deltas):
      args = (list(param_leaves) + jax.tree.leaves(x_value) +
              list(kw_arrays))
      env, tapped = ir.evaluate_with_taps(program, args,
                                          dict(zip(stop_vars, deltas)), taps)
      read = functools.partial(ir.read_atom, env)
      return [read(a) for a in program.outputs], locate(read, tapped)

    if self.vmap_axes is None:
      jac, factor_values = jax.jacrev(
          lambda d: evaluate(self._x, self._kw_arrays, d), has_aux=True)(
              _zeros(program, stop_vars))
      c = [dict(zip(stop_vars, per_out)) for per_out in jac]
      return c, _per_plan(plans, _unbatched(factor_values))

    def one_example(x_value, kw_arrays):
      return jax.jacrev(lambda d: evaluate(x_value, kw_arrays, d)[0])(
          _zeros(program, stop_vars))

    jac = jax.vmap(one_example, in_axes=(self._x_axes, self._kw_axes))(
        self._x, self._kw_arrays)
    c = [dict(zip(stop_vars, per_out)) for per_out in jac]
    factor_values = self._example_factors(
        lambda x_value, kw_arrays: evaluate(x_value, kw_arrays, [])[1])
    return c, _per_plan(plans, factor_values)

  def _example_factors(self, factors):
    """Factor values per example, without a batch axis where they have none.

    A factor that does not depend on the example (a weight, a constant) is
    computed once: under `jax.vmap` it would be copied for every example.

    Returns:
      Per chain, per factor, `(value, batched)`.
    """
    x_leaves, x_tree = jax.tree.flatten(self._x)
    none = lambda a: a is None  # noqa: E731
    x_structs = jax.tree.unflatten(x_tree, [
        _without_axis(l, a) for l, a in zip(
            x_leaves, jax.tree.leaves(self._x_axes, is_leaf=none))])
    kw_structs = [_without_axis(l, a)
                  for l, a in zip(self._kw_arrays, self._kw_axes)]
    x_structs = jax.tree.map(
        lambda l: jax.ShapeDtypeStruct(np.shape(l), l.dtype), x_structs)
    flat = lambda x_value, kw_arrays: jax.tree.leaves(  # noqa: E731
        factors(x_value, kw_arrays))
    program, _ = ir.flatten(flat, x_structs, kw_structs)
    depends = planner.dependents(program, set(program.inputs))
    out_axes = [0 if not isinstance(a, ir.Literal) and a in depends else None
                for a in program.outputs]
    values = jax.vmap(flat, in_axes=(self._x_axes, self._kw_axes),
                      out_axes=out_axes)(self._x, self._kw_arrays)
    tree = jax.tree.structure(jax.eval_shape(factors, x_structs, kw_structs))
    values = jax.tree.unflatten(tree, values)
    batched = jax.tree.unflatten(tree, [a == 0 for a in out_axes])
    per_chain = []
    for chain_values, chain_batched in zip(values, batched):
      per_chain.append([
          _batch_consistently(v, b, self._batch_size())
          for v, b in zip(chain_values, chain_batched)])
    return per_chain

  def _batch_size(self) -> int:
    none = lambda a: a is None  # noqa: E731
    for leaf, a in zip(jax.tree.leaves(self._x),
                       jax.tree.leaves(self._x_axes, is_leaf=none)):
      if a is not None:
        return np.shape(leaf)[a]
    for leaf, a in zip(self._kw_arrays, self._kw_axes):
      if a is not None:
        return np.shape(leaf)[a]
    raise ValueError("vmap_axes maps no input.")

  def _plan_diagonal(self, active, stop_vars) -> None:
    """Sets `diag_stops` and `diag_outs` where examples are independent.

    Otherwise `diag_reason` says why the whole-batch path is taken.
    """
    self.diag_stops, self.diag_outs, self.diag_reason = {}, None, None
    states = self._data_states
    if states is None:
      self.diag_reason = ("the inputs have no common batch axis 0, or are "
                          "scalars")
      return
    program = self.program
    in_body, stacked, lost = {}, {}, None
    for v in stop_vars:
      axis = states.get(v)
      if not isinstance(axis, int) or isinstance(axis, bool):
        if isinstance(axis, batching.Mixed) and lost is None:
          lost = axis
        continue
      axis_stacked = axis + _depth(v)
      if any(c.stop_var == v and c.stop_labels[axis_stacked] in p.root_labels
             for p in active for c in p.chains):
        continue  # A per-example parameter: its rows are not examples.
      in_body[v], stacked[v] = axis, axis_stacked
    if not in_body:
      self.diag_reason = ("no stop variable is batched along the examples" +
                          ("" if lost is None else
                           f" ({lost.finding or lost.reason})"))
      return
    # Proof: with the perturbations of the candidates as the only batched
    # sources, every output is batched (or independent of them).
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

  def _diagonal_arrays(self, plans, chains, stop_vars, taps, locate):
    """`arrays` when `diag_outs` is set: one reverse pass per coordinate."""
    program = self.program
    args = (list(self._param_leaves) + jax.tree.leaves(self._x) +
            list(self._kw_arrays))
    diag = [v for v in stop_vars if v in self.diag_stops]
    full = [v for v in stop_vars if v not in self.diag_stops]

    def forward(diag_deltas, full_deltas):
      env, tapped = ir.evaluate_with_taps(program, args, {
          **dict(zip(diag, diag_deltas)), **dict(zip(full, full_deltas))
      }, taps)
      read = functools.partial(ir.read_atom, env)
      outs = [read(a) for a in program.outputs]
      return outs, locate(read, tapped)

    def summed(diag_deltas):
      # Seeding every example at once: blocks are diagonal, so the sum over
      # examples of `d out[n] / d y` is `d out[n] / d y[n]` on `y[n]`.
      outs, factor_values = forward(diag_deltas, _zeros(program, full))
      outs = [jnp.sum(o, axis=b) for o, b in zip(outs, self.diag_outs)]
      return outs, factor_values

    jac_diag, factor_values = jax.jacrev(summed, has_aux=True)(
        _zeros(program, diag))
    factor_values = _unbatched(factor_values)
    c = [dict(zip(diag, per_out)) for per_out in jac_diag]
    if full:
      jac_full = jax.jacrev(lambda d: forward(_zeros(program, diag), d)[0])(
          _zeros(program, full))
      for c_out, per_out in zip(c, jac_full):
        c_out.update(zip(full, per_out))
    return c, _per_plan(plans, factor_values)


def _unbatched(chain_values):
  """Factor values of the whole batch: `(value, False)` per factor."""
  return [[(v, False) for v in values] for values in chain_values]


def _batch_consistently(value, batched, size):
  """`(value, batched)` of one factor; an index factor's arrays agree."""
  if not isinstance(value, tuple):
    return value, bool(batched)
  flags = [b for v, b in zip(value, batched) if v is not None]
  if all(flags) or not any(flags):
    return value, bool(flags and flags[0])
  value = tuple(None if v is None else v if b else
                jnp.broadcast_to(v, (size,) + jnp.shape(v))
                for v, b in zip(value, batched))
  return value, True


def _unique(items):
  seen, out = set(), []
  for item in items:
    if item not in seen:
      seen.add(item)
      out.append(item)
  return out


def _depth(address) -> int:
  """How many loops a stop address is inside."""
  depth = 0
  while not isinstance(address, int):
    depth, address = depth + 1, address[1]
  return depth


def _zeros(program: ir.FlatProgram, addresses) -> list[jax.Array]:
  zeros = []
  for address in addresses:
    shape, dtype = ir.address_aval(program, address)
    zeros.append(jnp.zeros(shape, dtype))
  return zeros


def _factor_taps(chains):
  """Factors computed in loop bodies become taps of the evaluation.

  Returns:
    `(taps, locate)`: the taps for `ir.evaluate_with_taps`, and
    `locate(read, tapped)` giving one list of factor values per chain.
  """
  taps: dict[tuple[int, ...], list] = {}
  where = []
  for chain in chains:
    places = []
    for factor in chain.factors:
      if factor.scope:
        fns = taps.setdefault(factor.scope, [])
        places.append((factor.scope, len(fns)))
        fns.append(factor.compute)
      else:
        places.append((None, factor))
    where.append(places)

  def locate(read, tapped):
    return [[factor.compute(read) if scope is None else tapped[scope][factor]
             for scope, factor in places] for places in where]

  return taps, locate


def _per_plan(plans, chain_values):
  """Groups per-chain factor values by plan (None for unused leaves)."""
  values, it = [], iter(chain_values)
  for p in plans:
    values.append(None if p is None else [next(it) for _ in p.chains])
  return values


def _reconcile(side1: _Side, side2: _Side):
  """Pairs the plans of both inputs; mismatched ones fall back to Jacobians."""
  plans1, plans2 = list(side1.plans), list(side2.plans)
  for i, (p1, p2) in enumerate(zip(plans1, plans2)):
    if p1 is None and p2 is None:
      continue
    if p1 is None or p2 is None or p1.signature() != p2.signature():
      reason = "the plans for x1 and x2 differ"
      leaf1 = side1.program.inputs[i]
      leaf2 = side2.program.inputs[i]
      plans1[i] = planner.root_plan(side1.program, leaf1, reason)
      plans2[i] = planner.root_plan(side2.program, leaf2, reason)
  return plans1, plans2


def ntk(f: Callable[..., Any], params: Any, x1: Any, x2: Optional[Any],
        kwargs1: Mapping[str, Any], kwargs2: Mapping[str, Any], *,
        trace_axes: layout.Axes, diagonal_axes: layout.Axes,
        vmap_axes: example_axes.VmapAxes) -> Any:
  """Empirical NTK by structured derivatives.

  Args:
    f: `f(params, x, **kwargs)` returning a pytree of arrays.
    params: the pytree differentiated.
    x1: first inputs.
    x2: second inputs, or None for `x1`.
    kwargs1: keyword arguments of the `x1` evaluation.
    kwargs2: keyword arguments of the `x2` evaluation.
    trace_axes: output axes to average over (possibly negative).
    diagonal_axes: output axes to keep the diagonal of (possibly negative).
    vmap_axes: None or the canonical `(in_axes, out_axes, kwargs_axes)`
      from `example_axes.canonicalize_vmap_axes`; with it, Jacobians are
      formed per example (`f` is evaluated on one example at a time).
      With None, `f` runs on the whole batch; where the program provably
      keeps examples independent (batch axis 0 of `x` to some axis of every
      output), only the per-example Jacobian blocks are formed, otherwise
      the cost grows with the square of the batch size.

  Returns:
    A pytree like `f`'s output of kernels in NT layout: for an output leaf
    of shape `(N, O)` and `trace_axes=()`, shape `(N1, N2, O, O)`.

  Raises:
    ValueError: if the outputs for `x1` and `x2` cannot be paired along
      `trace_axes` or `diagonal_axes`.

  >>> import jax.numpy as jnp
  >>> w = jnp.arange(6.).reshape(2, 3)
  >>> k = ntk(lambda p, x: x @ p, w, jnp.ones((4, 2)), None, {}, {},
  ...         trace_axes=(), diagonal_axes=(), vmap_axes=None)
  >>> k.shape
  (4, 4, 3, 3)
  >>> float(k[0, 0, 1, 1])  # sum of squared inputs, 1 + 1
  2.0
  """
  side1 = _Side(f, params, x1, kwargs1, vmap_axes)
  side2 = side1 if x2 is None else _Side(f, params, x2, kwargs2, vmap_axes)
  plans1, plans2 = _reconcile(side1, side2)
  c1, factors1 = side1.arrays(plans1)
  c2, factors2 = (c1, factors1) if x2 is None else side2.arrays(plans2)

  kernels = []
  out_axes = (jax.tree.leaves(vmap_axes[1]) if vmap_axes is not None else
              [None] * len(side1.out_shapes))
  for j, (shape1, shape2) in enumerate(zip(side1.out_shapes,
                                           side2.out_shapes)):
    trace, diagonal = layout.check_trace_and_diagonal(
        trace_axes, diagonal_axes, shape1, shape2)
    letters = contraction.LetterPool()
    axis_letters, out_letters = [], ""
    for axis in range(len(shape1)):
      a = letters.new()
      b = a if (axis in trace or axis in diagonal) else letters.new()
      axis_letters.append((a, b))
      if axis in diagonal:
        out_letters += a
      elif axis not in trace:
        out_letters += a + b
    batch_axis = out_axes[j]
    order = list(range(len(shape1)))
    if batch_axis is not None:
      order = [batch_axis] + [a for a in order if a != batch_axis]
    c_letters = ["".join(axis_letters[a][side] for a in order)
                 for side in (0, 1)]
    batch = (("", "") if batch_axis is None else axis_letters[batch_axis])
    # Sides holding only diagonal blocks: `C` lacks the output's batch axis,
    # and the stop variable's batch axis takes its letter.
    diag_letters = [None, None]
    for side, s in enumerate((side1, side2)):
      if s.diag_outs is not None:
        b = s.diag_outs[j]
        diag_letters[side] = axis_letters[b][side]
    terms = []
    for i, (p1, p2) in enumerate(zip(plans1, plans2)):
      if p1 is None:
        continue
      for a, chain1 in enumerate(p1.chains):
        for b, chain2 in enumerate(p2.chains):
          cl, aliases = list(c_letters), [None, None]
          for side, (s, ch) in enumerate(((side1, chain1), (side2, chain2))):
            if diag_letters[side] is not None and ch.stop_var in s.diag_stops:
              out_b = s.diag_outs[j]
              cl[side] = "".join(axis_letters[x][side] for x in order
                                 if x != out_b)
              aliases[side] = (s.diag_stops[ch.stop_var], diag_letters[side])
          terms.append(
              contraction.term(p1, chain1, chain2, c1[j][chain1.stop_var],
                               c2[j][chain2.stop_var], factors1[i][a],
                               factors2[i][b], cl[0], cl[1], batch[0],
                               batch[1], out_letters, letters,
                               stop_aliases=tuple(aliases)))
    if terms:
      kernel = functools.reduce(jnp.add, terms)
    else:
      kernel = jnp.zeros(
          layout.kernel_shape(shape1, shape2, trace, diagonal),
          side1.out_dtypes[j])
    kernels.append(kernel / layout.traced_size(shape1, trace))
  return jax.tree.unflatten(side1.out_tree, kernels)
