"""JACOBIAN_CONTRACTION: the NTK as a contraction of two explicit Jacobians.

`J(x) = d f(params, x) / d params` is formed for each input batch (per
example, under `jax.vmap`, when `vmap_axes` says the examples are
independent) and `J(x1) J(x2)^T` is contracted parameter by parameter into
the NT output layout. Cheap when parameters are few relative to the cost of a
forward pass (convolutions reuse a small filter bank many times).
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax

from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import im2col
from flax_tangents._src.empirical import layout

__all__ = ["jacobian", "ntk"]


def _jacobian_of(fn: Callable[[layout.PyTree], layout.PyTree],
                 params: layout.PyTree,
                 reverse_fn: Callable[[layout.PyTree], layout.PyTree]
                 ) -> layout.PyTree:
  """Jacobian of `fn` at `params`, in the cheaper autodiff mode.

  Reverse mode costs one pass per output element, forward mode one per
  parameter: pick whichever is fewer. `reverse_fn` is `fn` for reverse mode
  (with fast convolution filter gradients, see `im2col`).
  """
  out = jax.eval_shape(fn, params)
  n_out = sum(leaf.size for leaf in jax.tree.leaves(out))
  n_params = sum(jax.numpy.size(leaf) for leaf in jax.tree.leaves(params))
  if n_out <= n_params:
    return jax.jacrev(reverse_fn)(params)
  return jax.jacfwd(fn)(params)


def jacobian(f: Callable[..., layout.PyTree], params: layout.PyTree,
             x: layout.PyTree, kwargs: Mapping[str, Any],
             vmap_axes: example_axes.VmapAxes) -> layout.PyTree:
  """`d f(params, x, **kwargs) / d params`, vmapped over examples if allowed.

  Args:
    f: `f(params, x, **kwargs)`.
    params: the parameters to differentiate.
    x: inputs.
    kwargs: keyword arguments of `f`.
    vmap_axes: None or the canonical triple from
      `example_axes.canonicalize_vmap_axes`.

  Returns:
    A pytree like `f`'s output whose leaves are pytrees like `params` of
    arrays of shape `output_leaf.shape + param_leaf.shape`.

  >>> j = jacobian(lambda p, x: p * x, 2., jax.numpy.ones(3), {}, None)
  >>> j.shape
  (3,)
  """
  # Filter gradients of convolutions, per example or per output, as matrix
  # products rather than grouped convolutions (see `im2col`).
  f_reverse = im2col.with_patch_gradients(f)
  if vmap_axes is None:
    return _jacobian_of(lambda p: f(p, x, **kwargs), params,
                        lambda p: f_reverse(p, x, **kwargs))

  mapped, fixed = example_axes.split_vmapped_kwargs(kwargs, vmap_axes)
  per_example, (x_axes, kwargs_axes), out_axes = example_axes.per_example_fn(
      f, vmap_axes, fixed)
  per_example_reverse, _, _ = example_axes.per_example_fn(f_reverse,
                                                          vmap_axes, fixed)

  def example_jacobian(x_i, mapped_i):
    return _jacobian_of(lambda p: per_example(p, x_i, mapped_i), params,
                        lambda p: per_example_reverse(p, x_i, mapped_i))

  # `out_axes` is a prefix of the Jacobian's tree: each output leaf's axis
  # applies to all of its parameter leaves, which start with the output axes.
  return jax.vmap(example_jacobian, in_axes=(x_axes, kwargs_axes),
                  out_axes=out_axes)(x, mapped)


def ntk(f: Callable[..., layout.PyTree], params: layout.PyTree,
        x1: layout.PyTree, x2: Optional[layout.PyTree],
        kwargs1: Mapping[str, Any], kwargs2: Mapping[str, Any], *,
        trace_axes: layout.Axes, diagonal_axes: layout.Axes,
        vmap_axes: example_axes.VmapAxes) -> layout.PyTree:
  """Empirical NTK by contracting explicit Jacobians.

  Args and returns as `implementation.NtkAlgorithm.__call__`.

  >>> import jax.numpy as jnp
  >>> k = ntk(lambda p, x: x @ p, jnp.ones((2, 3)), jnp.ones((4, 2)), None,
  ...         {}, {}, trace_axes=(), diagonal_axes=(), vmap_axes=None)
  >>> k.shape
  (4, 4, 3, 3)
  """
  j1 = jacobian(f, params, x1, kwargs1, vmap_axes)
  j2 = j1 if x2 is None else jacobian(f, params, x2, kwargs2, vmap_axes)
  fx1 = jax.eval_shape(lambda p: f(p, x1, **kwargs1), params)
  fx2 = fx1 if x2 is None else jax.eval_shape(
      lambda p: f(p, x2, **kwargs2), params)

  def leaf_kernel(out1, out2, jac1, jac2):
    trace, diagonal = layout.check_trace_and_diagonal(
        trace_axes, diagonal_axes, out1.shape, out2.shape)
    terms = [
        layout.contract(a, b, out1.ndim, trace, diagonal, average=False)
        for a, b in zip(jax.tree.leaves(jac1), jax.tree.leaves(jac2))
    ]
    if not terms:  # No parameters: the NTK is zero.
      shape = layout.kernel_shape(out1.shape, out2.shape, trace, diagonal)
      return jax.numpy.zeros(shape, out1.dtype)
    return sum(terms[1:], terms[0]) / layout.traced_size(out1.shape, trace)

  # `fx1` leaves are prefixes of the Jacobian trees `j1`, `j2`.
  return jax.tree.map(leaf_kernel, fx1, fx2, j1, j2)
