"""An independent reference for empirical NTKs: explicit Jacobian products.

Written without the library: full Jacobians from `jax.jacobian`, flattened
and contracted with `np.einsum`, then traced and diagonalized entry by entry
in NT's layout. Only the `'params'` collection of Flax variables is
differentiated, as the library does.
"""

import itertools

import jax
import numpy as np

__all__ = ["full_ntk", "nt_layout", "ntk"]


def _params_and_fn(f, variables, kwargs):
  """Differentiate only Flax's 'params'; drop Flax's mutated state."""
  if isinstance(variables, dict) and "params" in variables:
    rest = {k: v for k, v in variables.items() if k != "params"}
    fp = lambda p, x: f({**rest, "params": p}, x, **kwargs)  # noqa: E731
    params = variables["params"]
  else:
    fp = lambda p, x: f(p, x, **kwargs)  # noqa: E731
    params = variables
  if "mutable" in kwargs:
    return params, lambda p, x: fp(p, x)[0]
  return params, fp


def full_ntk(f, variables, x1, x2, kwargs1, kwargs2=None):
  """`J(x1) J(x2)^T` of shape `(*out1, *out2)` from explicit Jacobians."""
  kwargs2 = kwargs1 if kwargs2 is None else kwargs2
  params, f1 = _params_and_fn(f, variables, kwargs1)
  _, f2 = _params_and_fn(f, variables, kwargs2)
  out1 = np.asarray(jax.jit(f1)(params, x1))
  out2 = np.asarray(jax.jit(f2)(params, x2))
  j1 = jax.jit(jax.jacobian(f1))(params, x1)
  j2 = jax.jit(jax.jacobian(f2))(params, x2)
  flat1 = np.concatenate([np.asarray(a).reshape(out1.size, -1)
                          for a in jax.tree.leaves(j1)], axis=1)
  flat2 = np.concatenate([np.asarray(a).reshape(out2.size, -1)
                          for a in jax.tree.leaves(j2)], axis=1)
  return np.einsum("ip,jp->ij", flat1, flat2).reshape(out1.shape + out2.shape)


def nt_layout(full, trace_axes, diagonal_axes):
  """NT's layout of `full` (shape `(*out1, *out2)`), entry by entry."""
  n = full.ndim // 2
  shape1, shape2 = full.shape[:n], full.shape[n:]
  trace = sorted({a % n for a in trace_axes})
  diag = sorted({a % n for a in diagonal_axes})
  out_shape, slots = [], []
  for a in range(n):
    if a in trace:
      continue
    if a in diag:
      slots.append((a, "d", len(out_shape)))
      out_shape.append(shape1[a])
    else:
      slots.append((a, "f", len(out_shape)))
      out_shape += [shape1[a], shape2[a]]
  result = np.zeros(out_shape, full.dtype)
  trace_sizes = [shape1[a] for a in trace]
  for index in np.ndindex(*out_shape):
    total = 0.
    for t in itertools.product(*[range(s) for s in trace_sizes]):
      i1, i2 = [0] * n, [0] * n
      for a, kind, pos in slots:
        i1[a] = index[pos]
        i2[a] = index[pos] if kind == "d" else index[pos + 1]
      for a, ta in zip(trace, t):
        i1[a] = i2[a] = ta
      total += full[tuple(i1) + tuple(i2)]
    result[index] = total / max(1, int(np.prod(trace_sizes)))
  return result


def ntk(f, variables, x1, x2, kwargs, trace_axes=(), diagonal_axes=(),
        kwargs2=None):
  """The NTK of `f` in NT's layout, for outputs that are pytrees of arrays.

  Each output leaf gets its own kernel (leaves are not paired with each
  other, as in NT).
  """
  kwargs2 = kwargs if kwargs2 is None else kwargs2
  params, f1 = _params_and_fn(f, variables, kwargs)
  _, f2 = _params_and_fn(f, variables, kwargs2)
  out1 = jax.jit(f1)(params, x1)
  out2 = jax.jit(f2)(params, x2)
  j1 = jax.jit(jax.jacobian(f1))(params, x1)
  j2 = jax.jit(jax.jacobian(f2))(params, x2)
  leaves1, tree = jax.tree.flatten(out1)
  leaves2 = jax.tree.leaves(out2)
  jac1 = tree.flatten_up_to(j1)
  jac2 = tree.flatten_up_to(j2)
  kernels = []
  for o1, o2, a, b in zip(leaves1, leaves2, jac1, jac2):
    n1, n2 = np.size(o1), np.size(o2)
    flat1 = np.concatenate([np.asarray(u, np.float64).reshape(n1, -1)
                            for u in jax.tree.leaves(a)], axis=1)
    flat2 = np.concatenate([np.asarray(v, np.float64).reshape(n2, -1)
                            for v in jax.tree.leaves(b)], axis=1)
    full = np.einsum("ip,jp->ij", flat1, flat2).reshape(
        np.shape(o1) + np.shape(o2))
    kernels.append(nt_layout(full, trace_axes, diagonal_axes))
  return jax.tree.unflatten(tree, kernels)
