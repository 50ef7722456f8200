"""STRUCTURED_DERIVATIVES agrees with direct Jacobian contractions on the zoo.

References: a direct `jax.jacobian` of the whole model contracted with
`tensordot` (laid out with `layout.trace_and_diagonal`), and the
JACOBIAN_CONTRACTION implementation.
"""

import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from flax_tangents._src.empirical import arguments
from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import jacobian_contraction
from flax_tangents._src.empirical import layout
from flax_tangents._src.empirical.structured import ntk as structured_ntk
from flax_tangents._src.empirical.structured.rules import RULES
import empirical_zoo as zoo
from testing import assert_trees_close

# Structured and reference kernels sum in different orders.
_assert_close = functools.partial(assert_trees_close, rtol=1e-9, atol=1e-9)


@functools.lru_cache(maxsize=None)
def _case(name, dtype_name="float64"):
  case = zoo.make_case(name, jnp.dtype(dtype_name))
  f, params = arguments.split_variables(case.f, case.variables)
  kwargs1, kwargs2 = arguments.split_kwargs(case.kwargs, case.x1, case.x2)
  return f, params, case.x1, case.x2, kwargs1, kwargs2


def _full_reference(f, params, x1, x2, kwargs1, kwargs2):
  """`(*out1_shape, *out2_shape)` kernels from two explicit Jacobians."""
  j1 = jax.jacobian(lambda p: f(p, x1, **kwargs1))(params)
  j2 = jax.jacobian(lambda p: f(p, x2, **kwargs2))(params)
  out = jax.eval_shape(lambda p: f(p, x1, **kwargs1), params)

  def leaf(o, a, b):
    terms = [
        jnp.tensordot(u, v, axes=(tuple(range(o.ndim, u.ndim)),) * 2)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    ]
    return functools.reduce(jnp.add, terms)

  return jax.tree.map(leaf, out, j1, j2)


@functools.lru_cache(maxsize=None)
def _reference(name, same_inputs=False):
  f, params, x1, x2, kwargs1, kwargs2 = _case(name)
  if same_inputs:
    x2, kwargs2 = x1, kwargs1
  return jax.jit(lambda p, a, b: _full_reference(f, p, a, b, kwargs1, kwargs2)
                 )(params, x1, x2)


def _structured(name, trace_axes, diagonal_axes, vmap, same_inputs=False,
                dtype_name="float64"):
  f, params, x1, x2, kwargs1, kwargs2 = _case(name, dtype_name)
  if same_inputs:
    x2, kwargs2 = None, kwargs1
  fx = jax.eval_shape(lambda p: f(p, x1, **kwargs1), params)
  vmap_axes = example_axes.canonicalize_vmap_axes(vmap, x1, fx, kwargs1)

  @jax.jit
  def kernel(p, a, b):
    return structured_ntk(f, p, a, b, kwargs1, kwargs2, trace_axes=trace_axes,
                          diagonal_axes=diagonal_axes, vmap_axes=vmap_axes)

  return kernel(params, x1, x2)


def _layout(full, trace_axes, diagonal_axes):
  def leaf(k):
    ndim = k.ndim // 2
    trace = layout.canonicalize_axes(trace_axes, ndim)
    diagonal = layout.canonicalize_axes(diagonal_axes, ndim)
    return layout.trace_and_diagonal(k, trace, diagonal)

  return jax.tree.map(leaf, full)


# Cases whose zoo test runs per example (`vmap_axes=0`); the others run on
# the whole batch, where the interpreter proves example independence itself
# (transformer, resnet, dropout) or finds none (BatchNorm in training).
_VMAPPED = ("mlp", "cnn_batchnorm", "nnx")


@pytest.mark.parametrize("name", zoo.CASES)
def test_zoo_matches_direct_jacobian(name):
  vmap = 0 if name in _VMAPPED else None
  actual = _structured(name, (), (), vmap)
  _assert_close(actual, _layout(_reference(name), (), ()))


@pytest.mark.parametrize("name,vmap,trace_axes,diagonal_axes", [
    ("mlp", None, (-1,), ()),
    ("mlp", 0, (), (-1,)),
    ("cnn_batchnorm", 0, (1,), (0,)),
    ("cnn_batchnorm", None, (-1, 1), (2,)),
])
def test_trace_diagonal_and_vmap_axes(name, vmap, trace_axes, diagonal_axes):
  same = 0 in layout.canonicalize_axes(diagonal_axes, 4)
  actual = _structured(name, trace_axes, diagonal_axes, vmap,
                       same_inputs=same)
  expected = _layout(_reference(name, same), trace_axes, diagonal_axes)
  _assert_close(actual, expected)


def test_matches_jacobian_contraction():
  f, params, x1, x2, kwargs1, kwargs2 = _case("mlp")
  fx = jax.eval_shape(lambda p: f(p, x1), params)
  vmap_axes = example_axes.canonicalize_vmap_axes(0, x1, fx, kwargs1)
  expected = jax.jit(lambda p, a, b: jacobian_contraction.ntk(
      f, p, a, b, kwargs1, kwargs2, trace_axes=(-1,), diagonal_axes=(),
      vmap_axes=vmap_axes))(params, x1, x2)
  _assert_close(_structured("mlp", (-1,), (), None), expected)


def test_float32():
  actual = _structured("transformer", (), (), None, dtype_name="float32")
  for leaf in jax.tree.leaves(actual):
    assert leaf.dtype == jnp.float32
  _assert_close(actual, _layout(_reference("transformer"), (), ()),
                rtol=2e-4, atol=2e-5)


def test_x2_none_is_x1():
  actual = _structured("resnet", (-1,), (), None, same_inputs=True)
  _assert_close(actual, _layout(_reference("resnet", True), (-1,), ()))


def test_unused_parameter_and_no_parameters():
  params = {"used": jnp.ones((3, 2)), "unused": jnp.ones((5,))}
  x = jnp.arange(12.).reshape(4, 3)
  f = lambda p, x: x @ p["used"]  # noqa: E731
  kernel = structured_ntk(f, params, x, None, {}, {}, trace_axes=(),
                          diagonal_axes=(), vmap_axes=None)
  expected = _full_reference(f, params, x, x, {}, {})
  _assert_close(kernel, _layout(expected, (), ()))
  zero = structured_ntk(lambda p, x: x * 2., {}, x, None, {}, {},
                        trace_axes=(-1,), diagonal_axes=(), vmap_axes=None)
  assert zero.shape == (4, 4) and not np.any(np.asarray(zero))


def _largest_intermediate(fn, *args) -> int:
  """Elements of the largest array any equation of `fn`'s jaxpr makes."""
  largest = 0

  def visit(jaxpr):
    nonlocal largest
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        largest = max(largest, int(np.prod(var.aval.shape)))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return largest


def test_static_index_factors_in_a_loop_are_not_stacked():
  # The gate kernels of Flax's `OptimizedLSTMCell` are concatenated inside
  # the recurrence. The concatenation's index factors are the same at every
  # step; stacked over the steps, a pair of them was a (T*G)^2 Gram.
  steps, gates = 16, 8
  params = {"a": jnp.linspace(-1., 1., 12).reshape(3, 4),
            "b": jnp.linspace(.5, -.5, 12).reshape(3, 4)}

  def f(p, x):
    def step(h, x_t):
      y = x_t @ jnp.concatenate([p["a"], p["b"]], axis=1)
      h = jnp.tanh(y[:, :4] * y[:, 4:] + h)
      return h, None
    h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], 4)), x.swapaxes(0, 1))
    return h

  x1 = jnp.sin(jnp.arange(2 * steps * 3.)).reshape(2, steps, 3)
  x2 = jnp.cos(jnp.arange(3 * steps * 3.)).reshape(3, steps, 3)
  kernel_fn = lambda p, a, b: structured_ntk(  # noqa: E731
      f, p, a, b, {}, {}, trace_axes=(), diagonal_axes=(), vmap_axes=None)
  _assert_close(kernel_fn(params, x1, x2),
                _layout(_full_reference(f, params, x1, x2, {}, {}), (), ()))
  assert _largest_intermediate(kernel_fn, params, x1, x2) < (steps * gates)**2


def test_a_static_factor_that_reads_in_a_loop_is_refused(monkeypatch):
  # A static factor is computed outside the loop, where a read would see no
  # iteration's values: a rule that marks a value-dependent factor static
  # must fail loudly instead of misreading.
  original = RULES["concatenate"]

  def reading_concatenate(ctx):
    result = original(ctx)
    if result is None:
      return None
    factors = tuple(
        dataclasses.replace(
            f, compute=lambda read, c=f.compute: (read(None), c(read))[1])
        if getattr(f, "static", False) else f for f in result.factors)
    return dataclasses.replace(result, factors=factors)

  monkeypatch.setitem(RULES, "concatenate", reading_concatenate)
  params = {"a": jnp.ones((3, 4)), "b": jnp.ones((3, 4))}

  def f(p, x):
    def step(h, x_t):
      return jnp.tanh(x_t @ jnp.concatenate([p["a"], p["b"]], axis=1)) + h, None
    return jax.lax.scan(step, jnp.zeros((x.shape[0], 8)), x.swapaxes(0, 1))[0]

  x = jnp.ones((2, 5, 3))
  with pytest.raises(AssertionError, match="static IndexFactor read"):
    structured_ntk(f, params, x, x, {}, {}, trace_axes=(), diagonal_axes=(),
                   vmap_axes=None)
