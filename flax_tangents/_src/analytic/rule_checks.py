"""A cheap consistency check of what a user's kernel rule returns.

Rules registered by users (`ft.register_kernel_rule`, `@ft.kernel_rule`)
are checked after every call: each covariance must have the shape that the
kernel's own `shape1`/`shape2` and layout flags imply, and (when values are
known, i.e. not under `jit`) `cov1`/`cov2` must be symmetric, `cov1` the
diagonal of `nngp` when `x2` is `x1`, and every `nngp` entry within the
Cauchy-Schwarz bound `nngp[i, j]**2 <= var1[i] * var2[j]` of the variances in
`cov1`/`cov2`. A rule that updates `nngp` but forgets `cov1`, `cov2` or the
shapes fails here (forgetting `cov2` as soon as two inputs are correlated
enough for the bound to see it), naming the rule and the field, rather than
giving a wrong kernel later. The rules
of `flax_tangents` itself are tested instead and skip the check.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np

from flax_tangents._src.analytic.kernel import Kernel

__all__ = ["check_rule_output", "expected_shapes"]


def _spatial(shape: tuple[int, ...], diagonal_spatial: bool
             ) -> tuple[int, ...]:
  sizes = shape[1:-1]
  if diagonal_spatial:
    return tuple(sizes)
  return tuple(s for size in sizes for s in (size, size))


def expected_shapes(kernel: Kernel) -> dict[str, Optional[tuple[int, ...]]]:
  """Shapes of `nngp`, `ntk`, `cov1`, `cov2` implied by the static fields."""
  n1, n2 = kernel.shape1[0], kernel.shape2[0]
  spatial = _spatial(kernel.shape1, kernel.diagonal_spatial)
  batch = lambda n: (n,) if kernel.diagonal_batch else (n, n)
  return {"nngp": (n1, n2) + spatial, "ntk": (n1, n2) + spatial,
          "cov1": batch(n1) + spatial,
          "cov2": batch(n2) + _spatial(kernel.shape2,
                                       kernel.diagonal_spatial)}


def _transposed(cov: np.ndarray, n_batch: int,
                diagonal_spatial: bool) -> np.ndarray:
  perm = list(range(cov.ndim))
  if n_batch == 2:
    perm[0], perm[1] = 1, 0
  if not diagonal_spatial:
    for a in range(n_batch, cov.ndim, 2):
      perm[a], perm[a + 1] = a + 1, a
  return np.transpose(cov, perm)


def _is_builtin(rule: Callable[..., Any]) -> bool:
  return getattr(rule, "__module__", "").startswith("flax_tangents.")


def _check_kernel(kernel: Kernel, where: str) -> None:
  expected = expected_shapes(kernel)
  for field, shape in expected.items():
    value = getattr(kernel, field)
    if value is None:
      if field in ("nngp", "cov1"):
        raise ValueError(f"{where} returned a Kernel without `{field}`.")
      continue
    if tuple(np.shape(value)) != shape:
      raise ValueError(
          f"{where} returned a Kernel whose `{field}` has shape "
          f"{tuple(np.shape(value))}, but its shape1={kernel.shape1}, "
          f"shape2={kernel.shape2}, diagonal_batch={kernel.diagonal_batch} "
          f"and diagonal_spatial={kernel.diagonal_spatial} imply {shape}. "
          "A rule must update every covariance (nngp, ntk, cov1, cov2) and "
          "shape1/shape2 together, e.g. with `kernel.replace(...)`.")
  n_batch = 1 if kernel.diagonal_batch else 2
  for field in ("cov1", "cov2"):
    value = getattr(kernel, field)
    if value is None or (n_batch == 1 and kernel.diagonal_spatial):
      continue
    try:
      values = np.asarray(value)
    except (jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError):
      return  # Under a transformation: values are unknown.
    mirrored = _transposed(values, n_batch, kernel.diagonal_spatial)
    scale = np.max(np.abs(values)) if values.size else 0.0
    if not np.allclose(values, mirrored, rtol=1e-5, atol=1e-6 * scale):
      raise ValueError(
          f"{where} returned a Kernel whose `{field}` is not symmetric (it "
          "is the covariance of a batch with itself). Check the rule's "
          f"formula for `{field}`.")
  _check_same_inputs(kernel, where)
  _check_cauchy_schwarz(kernel, where)


def _variances(cov: np.ndarray, kernel: Kernel) -> np.ndarray:
  """`(n, spatial...)` variances of each input and location."""
  if not kernel.diagonal_batch:
    cov = np.moveaxis(np.diagonal(cov, axis1=0, axis2=1), -1, 0)
  if not kernel.diagonal_spatial:
    for _ in range((cov.ndim - 1) // 2):
      cov = np.diagonal(cov, axis1=1, axis2=2)  # appended last, in order
  return cov


def _check_cauchy_schwarz(kernel: Kernel, where: str) -> None:
  """`nngp[i, j]**2 <= var1[i] var2[j]` at every pair of locations."""
  try:
    nngp = np.asarray(kernel.nngp, np.float64)
    cov2 = kernel.cov1 if kernel.cov2 is None else kernel.cov2
    var1 = _variances(np.asarray(kernel.cov1, np.float64), kernel)
    var2 = _variances(np.asarray(cov2, np.float64), kernel)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return
  if kernel.diagonal_spatial:  # (n1, n2, s...)
    bound = var1[:, None] * var2[None]
  else:  # (n1, n2, s1, t1, s2, t2, ...)
    k = var1.ndim - 1
    bound = np.transpose(np.multiply.outer(var1, var2), [0, k + 1] + [
        a for i in range(k) for a in (1 + i, k + 2 + i)])
  scale = max(np.max(np.abs(bound)), 1e-300) if bound.size else 1.0
  if np.any(nngp**2 > bound * (1 + 1e-4) + 1e-10 * scale):
    raise ValueError(
        f"{where} returned a Kernel whose `nngp` exceeds the Cauchy-Schwarz "
        "bound `nngp[i, j]**2 <= cov1[i] * cov2[j]`: the covariances cannot "
        "come from one activation. The rule probably changes `nngp` and not "
        "`cov1` or `cov2` (which is None only when x2 is x1); apply the same "
        "formula to all of them.")


def _check_same_inputs(kernel: Kernel, where: str) -> None:
  """With `x2 = x1`, `cov1` is the batch diagonal of `nngp`."""
  if kernel.cov2 is not None:
    return
  try:
    nngp, cov1 = np.asarray(kernel.nngp), np.asarray(kernel.cov1)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return
  diagonal = np.moveaxis(np.diagonal(nngp, axis1=0, axis2=1), -1, 0)
  if not kernel.diagonal_batch:
    cov1 = np.moveaxis(np.diagonal(cov1, axis1=0, axis2=1), -1, 0)
  scale = np.max(np.abs(cov1)) if cov1.size else 0.0
  if not np.allclose(diagonal, cov1, rtol=1e-5, atol=1e-6 * scale):
    raise ValueError(
        f"{where} returned a Kernel whose `cov1` differs from the diagonal "
        "of `nngp` although x2 is x1: the rule changes one and not the "
        "other. Apply the same formula to `nngp`, `cov1` and `cov2`.")


def check_rule_output(rule: Callable[..., Any], module: Any,
                      output: Any) -> None:
  """Checks the kernels a user's rule returned (see the module docstring).

  Raises:
    ValueError: naming the rule, the module type and the inconsistent field.
  """
  if _is_builtin(rule):
    return
  name = getattr(rule, "__qualname__", repr(rule))
  where = f"The kernel rule {name} of {type(module).__name__}"
  is_kernel = lambda x: isinstance(x, Kernel)
  for kernel in jax.tree.leaves(output, is_leaf=is_kernel):
    if isinstance(kernel, Kernel):
      _check_kernel(kernel, where)
