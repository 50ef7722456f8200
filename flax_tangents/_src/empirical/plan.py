"""`empirical_ntk_plan`: what the empirical NTK of `f` will do, and why.

STRUCTURED_DERIVATIVES is fast when every parameter's Jacobian is described
by its structure (a dense layer's by its inputs, an embedding's by its
indices) and when examples are proven independent (only the diagonal blocks
of the Jacobians are formed); otherwise it falls back, correctly but
slowly, to plain Jacobians of some parameters or to the whole-batch path.
With `vmap_axes`, every implementation evaluates `f` one example at a time,
which is only allowed when `f` treats examples independently. This module
reports all of it for a given `f` and inputs, without computing a kernel.
"""

from collections.abc import Callable
import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from flax_tangents._src.empirical import dispatch
from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import independence
from flax_tangents._src.empirical.structured import side as side_lib

__all__ = ["LeafReport", "NtkPlan", "empirical_ntk_plan"]


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """How STRUCTURED_DERIVATIVES treats one parameter leaf.

  Attributes:
    path: the leaf's path in the parameters (`jax.tree_util.keystr`).
    shape: its shape.
    status: `'structured'` (every chain reaches the inputs through structure
      rules), `'partial'` (some chain stops early, after some structure),
      `'jacobian'` (a plain Jacobian of the parameter: the fallback), or
      `'unused'` (no output depends on it).
    chains: number of paths from the parameter to where its Jacobian is
      measured (several for a parameter with several uses).
    reasons: for each chain that stopped early, why.
  """
  path: str
  shape: tuple[int, ...]
  status: str
  chains: int
  reasons: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class NtkPlan:
  """What the empirical NTK of `f` does on given inputs.

  Attributes:
    leaves: one `LeafReport` per parameter leaf.
    vmap_axes: the `vmap_axes` asked for.
    vmap_axes_used: whether `f` is evaluated one example at a time (False
      when `vmap_axes` is None, or when `f` could not be proven to treat
      examples independently).
    vmap_axes_reason: why `vmap_axes` cannot be used, or None.
    examples_independent: without `vmap_axes`, whether STRUCTURED_DERIVATIVES
      proved that each output example depends only on its input example (its
      cost is then linear in the batch, not quadratic).
    independence_reason: why that could not be proven, or None.
  """
  leaves: tuple[LeafReport, ...]
  vmap_axes: Any
  vmap_axes_used: bool
  vmap_axes_reason: Optional[str]
  examples_independent: Optional[bool]
  independence_reason: Optional[str]

  @property
  def fallbacks(self) -> tuple[LeafReport, ...]:
    """The leaves that are not fully structured (and used)."""
    return tuple(l for l in self.leaves
                 if l.status in ("partial", "jacobian"))

  @property
  def fully_structured(self) -> bool:
    """No leaf falls back and the batch is handled example by example."""
    return not self.fallbacks and (self.vmap_axes_used or
                                   bool(self.examples_independent))

  def __str__(self) -> str:
    counts = {}
    for leaf in self.leaves:
      counts[leaf.status] = counts.get(leaf.status, 0) + 1
    lines = ["STRUCTURED_DERIVATIVES plan: " + ", ".join(
        f"{n} {status}" for status, n in sorted(counts.items())) +
             f" parameter leaves of {len(self.leaves)}."]
    if self.vmap_axes is not None:
      lines.append(f"vmap_axes={self.vmap_axes!r}: " + (
          "used (examples proven independent)." if self.vmap_axes_used else
          f"NOT used: {self.vmap_axes_reason}."))
    if not self.vmap_axes_used:
      lines.append("Examples: " + (
          "proven independent (per-example Jacobian blocks only)."
          if self.examples_independent else
          f"whole-batch path: {self.independence_reason}."))
    for leaf in self.fallbacks:
      lines.append(f"  {leaf.path} {leaf.shape}: {leaf.status}; " +
                   "; ".join(leaf.reasons))
    return "\n".join(lines)


def _status(plan, leaf_var) -> tuple[str, tuple[str, ...]]:
  if plan is None:
    return "unused", ()
  reasons = tuple(c.reason for c in plan.chains if c.reason)
  if not reasons:
    return "structured", ()
  if any(c.stop_var == leaf_var and c.reason for c in plan.chains):
    return "jacobian", reasons
  return "partial", reasons


def empirical_ntk_plan(f: Callable[..., Any], x1: Any, x2: Any = None,
                       params: Any = None, vmap_axes: Any = None,
                       **kwargs) -> NtkPlan:
  """Explains what `empirical_ntk_fn(f, ...)` does on these inputs.

  Reports, for STRUCTURED_DERIVATIVES, which parameter leaves fall back to
  plain Jacobians and why (the primitive and the line of the model's code),
  and whether examples were proven independent; and, for every
  implementation, whether `vmap_axes` can be used. Nothing is computed but
  traces of `f`.

  Args:
    f: `f(params, x, **kwargs)`, as for `empirical_ntk_fn`.
    x1: first inputs.
    x2: second inputs, or None for `x1`.
    params: Flax variables (only `'params'` is differentiated) or any
      parameter pytree.
    vmap_axes: as for `empirical_ntk_fn`.
    **kwargs: keyword arguments of `f`, as for the kernel function.

  Returns:
    An `NtkPlan`; `print` it for a summary.

  Raises:
    TypeError: without `params`.
    ValueError: as `empirical_ntk_fn` for mismatched inputs or axes.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import flax_tangents as ft
  >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
  >>> x = jnp.ones((4, 5))
  >>> plan = ft.empirical_ntk_plan(model.apply, x, None,
  ...                              model.init(jax.random.PRNGKey(0), x))
  >>> plan.fully_structured, [leaf.status for leaf in plan.leaves]
  (True, ['structured', 'structured', 'structured', 'structured'])
  """
  if params is None:
    raise TypeError("empirical_ntk_plan needs the parameters: call it as "
                    "empirical_ntk_plan(f, x1, x2, params, **kwargs).")
  dispatch.check_vmap_axes_type(vmap_axes)
  prepared = dispatch.prepare(f, params, x1, x2, kwargs, (), (), None)
  canonical, reason = None, None
  if vmap_axes is not None:
    canonical = example_axes.canonicalize_vmap_axes(
        vmap_axes, x1, prepared.fx1, prepared.kwargs1)
    if canonical is not None:  # Always: `vmap_axes` is not None.
      reason = independence.finding_for_both(
          prepared.f, prepared.params, x1, x2, prepared.kwargs1,
          prepared.kwargs2, canonical)
    if reason is not None:
      canonical = None
  side = side_lib.Side(prepared.f, prepared.params, x1, prepared.kwargs1,
                       canonical)
  plans = side.plans
  independent, why = None, None
  if canonical is None:
    active = [p for p in plans if p is not None]
    stops = side_lib.stop_vars(active)
    if stops:
      side.plan_diagonal(active, stops)
      independent, why = side.diag_outs is not None, side.diag_reason
  paths = jax.tree_util.tree_leaves_with_path(prepared.params)
  leaves = []
  for (path, leaf), plan, var in zip(paths, plans, side.program.inputs):
    status, reasons = _status(plan, var)
    leaves.append(LeafReport(jax.tree_util.keystr(path),
                             tuple(np.shape(leaf)), status,
                             0 if plan is None else len(plan.chains),
                             reasons))
  return NtkPlan(tuple(leaves), vmap_axes, canonical is not None, reason,
                 independent, why)
