"""AUTO: each candidate compiled at most once, memory-safe, inspectable.

Compilations are counted from JAX's own compile log (`jax.log_compiles`,
as optax's `log_compilations` test helper does).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents._src.empirical import auto
from test_empirical import case

Impl = ft.NtkImplementation


def _compiles(caplog) -> int:
  return sum("Finished XLA compilation of jit(compute)" in r.getMessage()
             for r in caplog.records)


def _auto_fn(name="cnn_batchnorm"):
  f, variables, x1, x2, kwargs = case(name, jnp.float32)
  ntk_fn = ft.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0,
                               implementation=Impl.AUTO)
  return ntk_fn, (x1, x2, variables), kwargs


def test_each_candidate_compiles_once_and_the_choice_is_reused(
    caplog, monkeypatch):
  monkeypatch.setattr(auto, "_CLOSE", 1e9)  # Time every candidate.
  ntk_fn, args, kwargs = _auto_fn()
  caplog.set_level(logging.DEBUG)
  with jax.log_compiles():
    first = ntk_fn(*args, **kwargs)
    (choice,) = ntk_fn.auto_selector.choices.values()
    assert _compiles(caplog) == len(choice.measured_seconds) == len(
        ft._src.empirical.dispatch.available_implementations())  # pylint: disable=protected-access
    caplog.clear()
    second = ntk_fn(*args, **kwargs)
    assert _compiles(caplog) == 0
  np.testing.assert_array_equal(first, second)


def test_choice_is_inspectable_and_clear_winners_are_not_compiled(caplog):
  ntk_fn, args, kwargs = _auto_fn()
  caplog.set_level(logging.DEBUG)
  with jax.log_compiles():
    ntk = ntk_fn(*args, **kwargs)
  (choice,) = ntk_fn.auto_selector.choices.values()
  assert choice.implementation in Impl
  assert set(choice.estimated_seconds) == set(
      ft._src.empirical.dispatch.available_implementations())  # pylint: disable=protected-access
  assert choice.reason
  # Compiled: the timed candidates, or the one clear winner.
  assert _compiles(caplog) == max(1, len(choice.measured_seconds))
  assert all(reason for reason in choice.skipped.values())
  f = case("cnn_batchnorm", jnp.float32).f
  expected = ft.empirical_ntk_fn(f, trace_axes=(-1,))(*args, **kwargs)
  np.testing.assert_allclose(ntk, expected, rtol=2e-4, atol=2e-4)


def test_candidates_that_do_not_fit_are_never_compiled(caplog, monkeypatch):
  ntk_fn, args, kwargs = _auto_fn("mlp")
  # Room for the small structured computation, not for a Jacobian.
  traces = {}
  original = auto.choose

  def spy(candidates, call_args):
    traces.update(candidates)
    return original(candidates, call_args)

  monkeypatch.setattr(auto, "choose", spy)
  monkeypatch.setattr(auto, "available_bytes", lambda: 1)
  with pytest.raises(MemoryError, match="would not fit"):
    ntk_fn(*args, **kwargs)
  assert set(traces) == set(
      ft._src.empirical.dispatch.available_implementations())  # pylint: disable=protected-access


def test_memory_limit_skips_only_what_does_not_fit(monkeypatch):
  # Jacobian contraction and NTK-vector products hold 1024 x 65536 floats
  # (256 MiB) at once; structured derivatives never form them.
  params = jax.random.normal(jax.random.PRNGKey(0), (256, 256)) / 16
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 256))
  f = lambda p, x: jnp.tanh(x @ p)  # noqa: E731
  monkeypatch.setattr(auto, "available_bytes", lambda: 64 * 2**20)
  ntk_fn = ft.empirical_ntk_fn(f, trace_axes=(-1,),
                               implementation=Impl.AUTO)
  ntk = ntk_fn(x, None, params)
  (choice,) = ntk_fn.auto_selector.choices.values()
  assert choice.implementation == Impl.STRUCTURED_DERIVATIVES
  for implementation in (Impl.JACOBIAN_CONTRACTION,
                         Impl.NTK_VECTOR_PRODUCTS):
    assert "would not fit" in choice.skipped[implementation]
  expected = ft.empirical_ntk_fn(
      f, trace_axes=(-1,),
      implementation=Impl.STRUCTURED_DERIVATIVES)(x, None, params)
  np.testing.assert_allclose(ntk, expected, rtol=1e-12)


def test_a_candidate_slower_than_the_budget_is_run_once(monkeypatch):
  calls = []

  def executable(x):
    calls.append(x)
    return x

  monkeypatch.setattr(auto, "_TIME_BUDGET_S", -1.)  # Every run is "slow".
  assert auto._best_seconds(executable, (jnp.ones(2),)) >= 0  # pylint: disable=protected-access
  assert len(calls) == 1
  monkeypatch.setattr(auto, "_TIME_BUDGET_S", 1e9)  # Every run is fast.
  calls.clear()
  auto._best_seconds(executable, (jnp.ones(2),))  # pylint: disable=protected-access
  assert len(calls) == 1 + auto._MAX_TIMED_RUNS  # pylint: disable=protected-access
