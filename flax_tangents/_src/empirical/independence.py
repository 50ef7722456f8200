"""Checking `vmap_axes`: does `f` treat the examples independently?

With `vmap_axes`, every implementation evaluates `f` on one example at a
time (under `jax.vmap`). That is only the same function when `f(x)[n]` is
what `f` computes on example `n` alone. BatchNorm in training mode
(statistics of the batch), random numbers drawn for the whole batch
(dropout masks, a VAE's noise), or an unmapped keyword argument with a batch
axis break it, and the kernel would be silently wrong.

So before using `vmap_axes`, the whole-batch program of `f` is analysed
(`structured.batching`, in its strict mode): a forward propagation of the
batch axis from the inputs (and the keyword arguments `vmap_axes` maps) to
the outputs, which must arrive at the declared output axes. When that cannot
be proven, `dispatch.prepare` warns, naming the primitive and the line, and
computes the kernel on the whole batch (`vmap_axes=None`), which is exact.

The analysis is conservative: an unknown primitive on the batch axis counts
as "not proven". It cannot see Python code that branches on the batch size
(`if x.shape[0] > 1`), since it traces `f` once, on the whole batch.
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import numpy as np

from flax_tangents._src.empirical import arguments
from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical.structured import batching
from flax_tangents._src.empirical.structured import ir

__all__ = ["finding_for_both", "vmap_axes_finding", "warning_message"]


def _struct(leaf: Any) -> jax.ShapeDtypeStruct:
  dtype = getattr(leaf, "dtype", None)
  return jax.ShapeDtypeStruct(np.shape(leaf), dtype if dtype is not None
                              else jax.numpy.result_type(leaf))


def _batch_size(x: Any, kwargs: Mapping[str, Any],
                vmap_axes: example_axes.CanonicalVmapAxes) -> int:
  in_axes, _, kwargs_axes = vmap_axes
  none = lambda a: a is None  # noqa: E731
  pairs = list(zip(jax.tree.leaves(in_axes, is_leaf=none),
                   jax.tree.leaves(x)))
  for name, axes in kwargs_axes.items():
    pairs += zip(jax.tree.leaves(axes, is_leaf=none),
                 jax.tree.leaves(kwargs[name]))
  sizes = [np.shape(leaf)[a] for a, leaf in pairs if a is not None]
  return sizes[0] if sizes else 1


def vmap_axes_finding(f: Callable[..., Any], params: Any, x: Any,
                      kwargs: Mapping[str, Any],
                      vmap_axes: example_axes.CanonicalVmapAxes
                      ) -> Optional[str]:
  """None if `f` provably treats examples independently along `vmap_axes`.

  Args:
    f: `f(params, x, **kwargs)`.
    params: the parameters (arrays, shape structs or tracers).
    x: the inputs.
    kwargs: the keyword arguments of this call.
    vmap_axes: the canonical triple from
      `example_axes.canonicalize_vmap_axes`.

  Returns:
    None when proven, otherwise what stands in the way (primitive, reason,
    line of the user's code).

  >>> import jax.numpy as jnp
  >>> axes = example_axes.canonicalize_vmap_axes(0, jnp.ones((3, 2)),
  ...                                            jnp.ones((3, 2)), {})
  >>> print(vmap_axes_finding(lambda p, x: x * p, 2., jnp.ones((3, 2)), {},
  ...                         axes))
  None
  >>> print(vmap_axes_finding(lambda p, x: x - x.mean(0, keepdims=True), 2.,
  ...                         jnp.ones((3, 2)), {}, axes))
  `reduce_sum` at ...: reduces over the batch axis (a batch statistic)
  """
  if _batch_size(x, kwargs, vmap_axes) <= 1:
    return None  # One example: per-example evaluation is the same call.
  in_axes, out_axes, kwargs_axes = vmap_axes
  none = lambda a: a is None  # noqa: E731
  kw = arguments.ArrayKwargs(kwargs)
  kw_axes = kw.leaf_axes(kwargs_axes)

  def traced(p, x_value, kw_arrays):
    return f(p, x_value, **kw.rebuild(kw_arrays))

  program, _ = ir.flatten(
      traced, jax.tree.map(_struct, params), jax.tree.map(_struct, x),
      [_struct(leaf) for leaf in kw.arrays])
  n_params = len(jax.tree.leaves(params))
  states = ([None] * n_params +
            list(jax.tree.leaves(in_axes, is_leaf=none)) +
            [kw_axes[i] for i in kw.positions])
  result = batching.analyse(program, states, strict=True)
  for k, (state, consts, want) in enumerate(
      zip(result.states, result.consts, jax.tree.leaves(out_axes))):
    if state == want and not isinstance(state, batching.Mixed):
      continue
    if state is None and want in consts:
      continue  # The same for every example (a broadcast).
    if isinstance(state, batching.Mixed):
      return str(state.finding or result.finding or state.reason)
    got = "does not depend on the inputs" if state is None else (
        f"is batched along axis {state}")
    return (f"output {k} {got}, not along its declared out axis {want}")
  return None


def finding_for_both(f: Callable[..., Any], params: Any, x1: Any,
                     x2: Optional[Any], kwargs1: Mapping[str, Any],
                     kwargs2: Mapping[str, Any],
                     vmap_axes: example_axes.CanonicalVmapAxes
                     ) -> Optional[str]:
  """`vmap_axes_finding` for `x1`, then (if proven there) for `x2`."""
  finding = vmap_axes_finding(f, params, x1, kwargs1, vmap_axes)
  if finding is None and x2 is not None:
    finding = vmap_axes_finding(f, params, x2, kwargs2, vmap_axes)
  return finding


def warning_message(vmap_axes: Any, finding: str) -> str:
  """The warning given when `vmap_axes` cannot be used."""
  return (
      f"vmap_axes={vmap_axes!r} declares that f treats the examples "
      "independently, so that it may be evaluated one example at a time, "
      f"but that could not be proven: {finding}. Evaluated one example at a "
      "time, f would compute something else (batch statistics such as "
      "BatchNorm in training mode, random numbers drawn for the whole "
      "batch), and the kernel would be wrong. Computing it on the whole "
      "batch instead (as with vmap_axes=None): exact, but slower. Pass "
      "vmap_axes=None to silence this warning.")
