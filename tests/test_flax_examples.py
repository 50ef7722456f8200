"""Flax's own example models: every implementation against direct Jacobians.

The models are Flax's `examples/*/models.py` (copied into
`tests/flax_examples/`, see its README), built tiny by `flax_example_zoo`.
For each: JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS and
STRUCTURED_DERIVATIVES agree with a direct `jax.jacobian` contraction
(`empirical_reference`, written without the library), and
`ft.empirical_ntk_plan` reports STRUCTURED_DERIVATIVES fully structured:
no parameter falls back to a plain Jacobian and examples are proven
independent (shared embeddings, LSTM weights inside `scan`, max pooling,
masks broadcast along size-one axes included).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
import empirical_reference
import flax_example_zoo as zoo

Impl = ft.NtkImplementation
IMPLEMENTATIONS = (Impl.JACOBIAN_CONTRACTION, Impl.NTK_VECTOR_PRODUCTS,
                   Impl.STRUCTURED_DERIVATIVES)


@functools.lru_cache(maxsize=None)
def _case(name):
  return zoo.make_case(name)


def _tolerance(example):
  # float32 anywhere in the computation (Flax's examples build some constants,
  # e.g. sinusoidal position tables, in float32) bounds the agreement of
  # implementations that order its operations differently.
  jaxpr = jax.make_jaxpr(lambda v: example.f(v, example.x1, **example.kwargs))(
      example.variables)
  dtypes = {v.aval.dtype for eqn in _equations(jaxpr.jaxpr)
            for v in eqn.outvars if hasattr(v.aval, "dtype")}
  dtypes |= {o.dtype for o in jaxpr.out_avals}
  return 2e-4 if jnp.dtype(jnp.float32) in dtypes else 1e-9


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


@pytest.mark.parametrize("name", zoo.CASES)
def test_implementations_match_direct_jacobian(name):
  ex = _case(name)
  expected = empirical_reference.ntk(ex.f, ex.variables, ex.x1, ex.x2,
                                     ex.kwargs, ex.trace_axes)
  tol = _tolerance(ex)
  # One compile for all three implementations.
  fns = [ft.empirical_ntk_fn(ex.f, ex.trace_axes, implementation=impl)
         for impl in IMPLEMENTATIONS]
  kernels = jax.jit(lambda v, a, b: [fn(a, b, v, **ex.kwargs)
                                     for fn in fns])(ex.variables, ex.x1,
                                                     ex.x2)
  for impl, kernel in zip(IMPLEMENTATIONS, kernels):
    for actual, want in zip(jax.tree.leaves(kernel),
                            jax.tree.leaves(expected)):
      scale = max(1., float(np.max(np.abs(want))))
      np.testing.assert_allclose(np.asarray(actual) / scale, want / scale,
                                 rtol=tol, atol=tol, err_msg=impl.name)


@pytest.mark.parametrize("name", zoo.CASES)
def test_structured_derivatives_nothing_falls_back(name):
  ex = _case(name)
  plan = ft.empirical_ntk_plan(ex.f, ex.x1, ex.x2, ex.variables, **ex.kwargs)
  assert not plan.fallbacks, str(plan)
  assert plan.examples_independent, str(plan)
  assert plan.fully_structured
  # The models that draw random numbers for the whole batch refuse
  # vmap_axes (see test_independence.py); the others accept it.
  per_example = ft.empirical_ntk_plan(ex.f, ex.x1, ex.x2, ex.variables,
                                      vmap_axes=0, **ex.kwargs)
  assert per_example.vmap_axes_used == ex.per_example, str(per_example)
