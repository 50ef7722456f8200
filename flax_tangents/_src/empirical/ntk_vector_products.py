"""NTK_VECTOR_PRODUCTS: the NTK column by column, without Jacobians.

A column of the NTK is `J(x1) J(x2)^T e` for a basis vector `e` of the
`f(x2)` output space: one vector-Jacobian product through `f(params, x2)`
followed by one Jacobian-vector product through `f(params, x1)`. All columns
are computed at once under `jax.vmap`. No Jacobian is contracted, so this is
cheap when a forward pass costs about as much as the parameter count (dense
layers) and outputs are many.

With `vmap_axes`, each VJP is taken through one `x2` example (its outputs'
basis pulled back to parameter space) and each JVP through the whole `x1`
batch at once (`f` linearized once on `x1`, a loop over `x2` examples):
examples are independent, so the batch's Jacobian rows are the per-example
ones, and neither product is repeated for every pair of examples.
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp

from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import im2col
from flax_tangents._src.empirical import layout

__all__ = ["ntk"]


# Above this many bytes of pulled-back tangents (one per output element of
# every `x2` example), the `vmap_axes` path pulls back one example at a time
# inside its loop instead of all examples at once.
_TANGENT_BYTES_AT_ONCE = 64 * 2**20


def _pullbacks(f2: Callable[[layout.PyTree], layout.PyTree],
               params: layout.PyTree) -> list[layout.PyTree]:
  """`J2^T e` for the basis `e` of each output leaf of `f2`.

  Returns:
    One pytree like `params` per output leaf of `f2`, each leaf with a leading
    axis of the output leaf's size (one tangent per basis vector).
  """
  out2 = jax.eval_shape(f2, params)
  leaves2, tree2 = jax.tree.flatten(out2)
  _, pullback = jax.vjp(f2, params)
  tangents = []
  for i, leaf2 in enumerate(leaves2):

    def pull(cotangent, i=i, leaf2=leaf2):
      # A cotangent on output leaf `i` only, zero on the others.
      cotangents = [
          jnp.zeros(leaf.shape, leaf.dtype) for leaf in leaves2
      ]
      cotangents[i] = cotangent.reshape(leaf2.shape)
      (tangent,) = pullback(jax.tree.unflatten(tree2, cotangents))
      return tangent

    tangents.append(jax.vmap(pull)(jnp.eye(leaf2.size, dtype=leaf2.dtype)))
  return tangents


def _pushforwards(push: Callable[[layout.PyTree], layout.PyTree],
                  tangents: list[layout.PyTree], out1: layout.PyTree,
                  out2: layout.PyTree) -> layout.PyTree:
  """`J1 t` for the tangents of `_pullbacks`, as kernels like `out2`.

  Args:
    push: `t -> J1 t`, output tangents like `out1`.
    tangents: `_pullbacks`' result for outputs `out2`.
    out1: shapes of the outputs `push` maps into.
    out2: shapes of the outputs the tangents were pulled back from.

  Returns:
    A pytree like `out2` of kernels `(*out1_leaf.shape, *out2_leaf.shape)`.
  """
  leaves2, tree2 = jax.tree.flatten(out2)
  leaves1 = tree2.flatten_up_to(out1)
  kernels = []
  for i, (leaf1, leaf2, tangent) in enumerate(zip(leaves1, leaves2,
                                                  tangents)):
    # `axis_size`: without parameters the tangents have no leaves.
    columns = jax.vmap(
        lambda t, i=i: tree2.flatten_up_to(push(t))[i],
        axis_size=leaf2.size)(tangent)
    columns = columns.reshape(leaf2.shape + leaf1.shape)
    n2 = len(leaf2.shape)
    kernels.append(jnp.moveaxis(columns, tuple(range(n2)),
                                tuple(range(columns.ndim - n2,
                                            columns.ndim))))
  return jax.tree.unflatten(tree2, kernels)


def _full_kernel(f1: Callable[[layout.PyTree], layout.PyTree],
                 f2: Callable[[layout.PyTree], layout.PyTree],
                 params: layout.PyTree) -> layout.PyTree:
  """`J1 J2^T` of shape `(*out1_leaf.shape, *out2_leaf.shape)` per leaf.

  Only matching output leaves are paired (as in NT, cross-covariances between
  different outputs of `f` are not computed).
  """
  out1 = jax.eval_shape(f1, params)
  out2 = jax.eval_shape(f2, params)
  return _pushforwards(lambda t: jax.jvp(f1, (params,), (t,))[1],
                       _pullbacks(f2, params), out1, out2)


def _per_example_kernels(f: Callable[..., layout.PyTree],
                         f_reverse: Callable[..., layout.PyTree],
                         params: layout.PyTree, x1: layout.PyTree,
                         x2: layout.PyTree, kwargs1: Mapping[str, Any],
                         kwargs2: Mapping[str, Any],
                         vmap_axes: example_axes.CanonicalVmapAxes,
                         fx1: layout.PyTree) -> layout.PyTree:
  """Full kernels `(*out1, *out2)` per leaf, one `x2` example at a time.

  Examples are independent, so `f(params, x1)` on the whole batch has the
  same Jacobian rows as one example at a time: `f` is linearized once on all
  of `x1`, and a loop over `x2` examples pushes the pulled-back basis of one
  example's outputs through it. The pullbacks are per-example VJPs, taken all
  at once under `jax.vmap` when their tangents are small and inside the loop
  otherwise; the loop keeps the tangents in flight (and the JVP's working
  set) to one example's worth.
  """
  mapped2, fixed2 = example_axes.split_vmapped_kwargs(kwargs2, vmap_axes)
  example2, (x_axes, kw_axes), out_axes = example_axes.per_example_fn(
      f_reverse, vmap_axes, fixed2)
  _, push = jax.linearize(lambda p: f(p, x1, **kwargs1), params)

  # The looped-over leaves of `(x2, mapped2)`, their axis moved to the front.
  args = (x2, mapped2)
  is_none = lambda a: a is None
  axes = jax.tree.leaves((x_axes, kw_axes), is_leaf=is_none)
  leaves, tree = jax.tree.flatten(args)
  looped = [jnp.moveaxis(leaf, a, 0)
            for leaf, a in zip(leaves, axes) if a is not None]

  def example_args(looped_j):
    it = iter(looped_j)
    return jax.tree.unflatten(
        tree, [leaf if a is None else next(it)
               for leaf, a in zip(leaves, axes)])

  def example_f2(looped_j):
    x2_j, mapped2_j = example_args(looped_j)
    return lambda p: example2(p, x2_j, mapped2_j)

  # Shapes of one example's outputs and of all the pulled-back tangents.
  out2 = jax.eval_shape(
      lambda l: example_f2(l)(params), [leaf[0] for leaf in looped])
  n2 = looped[0].shape[0]
  tangent_bytes = n2 * sum(leaf.size for leaf in jax.tree.leaves(out2)) * sum(
      jnp.size(leaf) * jnp.asarray(leaf).dtype.itemsize
      for leaf in jax.tree.leaves(params))

  if 0 < tangent_bytes <= _TANGENT_BYTES_AT_ONCE:
    tangents = jax.vmap(lambda l: _pullbacks(example_f2(l), params))(looped)
    kernels = jax.lax.map(
        lambda t_j: _pushforwards(push, t_j, fx1, out2), tangents)
  else:
    kernels = jax.lax.map(
        lambda l: _pushforwards(push, _pullbacks(example_f2(l), params),
                                fx1, out2), looped)
  # Per leaf: (n2, *out1, *out2_example). The x2 batch axis goes to
  # `out1.ndim + out_axes`, giving (*out1, *out2).
  return jax.tree.map(
      lambda k, a, o1: jnp.moveaxis(k, 0, o1.ndim + a), kernels, out_axes,
      fx1)


def ntk(f: Callable[..., layout.PyTree], params: layout.PyTree,
        x1: layout.PyTree, x2: Optional[layout.PyTree],
        kwargs1: Mapping[str, Any], kwargs2: Mapping[str, Any], *,
        trace_axes: layout.Axes, diagonal_axes: layout.Axes,
        vmap_axes: example_axes.VmapAxes) -> layout.PyTree:
  """Empirical NTK from NTK-vector products.

  Args and returns as `implementation.NtkAlgorithm.__call__`.

  >>> k = ntk(lambda p, x: x @ p, jnp.ones((2, 3)), jnp.ones((4, 2)), None,
  ...         {}, {}, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None)
  >>> k.shape
  (4, 4)
  """
  fx1 = jax.eval_shape(lambda p: f(p, x1, **kwargs1), params)
  fx2 = fx1 if x2 is None else jax.eval_shape(
      lambda p: f(p, x2, **kwargs2), params)
  # Pullbacks: filter gradients of convolutions, per example or per output,
  # as matrix products rather than grouped convolutions (see `im2col`).
  f_reverse = im2col.with_patch_gradients(f)
  # Check before the (possibly long) computation.
  jax.tree.map(
      lambda a, b: layout.check_trace_and_diagonal(
          trace_axes, diagonal_axes, a.shape, b.shape), fx1, fx2)
  x2_ = x1 if x2 is None else x2

  if vmap_axes is None:
    full = _full_kernel(lambda p: f(p, x1, **kwargs1),
                        lambda p: f_reverse(p, x2_, **kwargs2), params)
  else:
    full = _per_example_kernels(f, f_reverse, params, x1, x2_, kwargs1,
                                kwargs2, vmap_axes, fx1)

  def in_nt_layout(kernel, out1, out2):
    trace, diagonal = layout.check_trace_and_diagonal(
        trace_axes, diagonal_axes, out1.shape, out2.shape)
    return layout.trace_and_diagonal(kernel, trace, diagonal)

  return jax.tree.map(in_nt_layout, full, fx1, fx2)
