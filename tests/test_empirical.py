"""Empirical NNGP/NTK: every implementation against a direct Jacobian product.

The reference below is written independently of the library: full Jacobians
from `jax.jacobian`, flattened and contracted with `np.einsum`, then traced
and diagonalized entry by entry in NT's layout.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from empirical_reference import full_ntk
from empirical_reference import nt_layout
from empirical_zoo import CASES
from empirical_zoo import VMAP_SAFE
from empirical_zoo import make_case

Impl = ft.NtkImplementation


def _structured_available() -> bool:
  try:
    # pylint: disable-next=import-outside-toplevel
    from flax_tangents._src.empirical import structured
    return hasattr(structured, "ntk")
  except Exception:  # pylint: disable=broad-except
    return False


ALGORITHMS = [Impl.JACOBIAN_CONTRACTION, Impl.NTK_VECTOR_PRODUCTS]
if _structured_available():
  ALGORITHMS.append(Impl.STRUCTURED_DERIVATIVES)


def _tol(dtype):
  return dict(rtol=2e-4, atol=2e-4) if dtype == jnp.float32 else dict(
      rtol=1e-9, atol=1e-9)


def _assert_close(actual, expected, dtype):
  scale = max(1., float(np.max(np.abs(expected))))
  np.testing.assert_allclose(np.asarray(actual) / scale, expected / scale,
                             **_tol(dtype))


@functools.lru_cache(maxsize=None)
def case(name, dtype=jnp.float64):
  """Zoo cases are built once per session."""
  return make_case(name, dtype)


@functools.lru_cache(maxsize=None)
def reference(name, dtype=jnp.float64, x2_is_x1=False):
  """`(x2, full_ntk)` for a zoo case, computed once per session."""
  f, variables, x1, x2, kwargs = case(name, dtype)
  x2 = x1 if x2_is_x1 else x2
  kwargs2 = kwargs
  if "rngs" in kwargs and not x2_is_x1:  # x2 != x1 gets a derived key.
    kwargs2 = {"rngs": {"dropout": jax.random.fold_in(
        kwargs["rngs"]["dropout"], 1)}}
  return x2, full_ntk(f, variables, x1, x2, kwargs, kwargs2)


# The whole zoo, every algorithm, full kernels, float32 and float64.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", CASES)
def test_zoo_matches_jacobian_reference(name, dtype):
  f, variables, x1, _, kwargs = case(name, dtype)
  x2, full = reference(name, dtype)
  expected = nt_layout(full, (), ())
  for algorithm in ALGORITHMS:
    ntk = ft.empirical_ntk_fn(f, trace_axes=(), implementation=algorithm)(
        x1, x2, variables, **kwargs)
    assert ntk.dtype == dtype, algorithm
    _assert_close(ntk, expected, dtype)


# Axes settings on multi-axis outputs.

AXES = [((-1,), ()), ((), (0,)), ((0,), ()), ((1, -1), ()), ((2,), (0, 1))]
AXES_CASES = [("cnn_batchnorm", axes) for axes in AXES]


@pytest.mark.parametrize("name,axes", AXES_CASES)
def test_trace_and_diagonal_axes(name, axes):
  trace_axes, diagonal_axes = axes
  f, variables, x1, _, kwargs = case(name)
  # Traced and diagonal axes pair equal sizes: x1 against itself for axis 0.
  x2, full = reference(name, x2_is_x1=0 in trace_axes + diagonal_axes)
  expected = nt_layout(full, trace_axes, diagonal_axes)
  for algorithm in ALGORITHMS:
    ntk = ft.empirical_ntk_fn(f, trace_axes, diagonal_axes,
                              implementation=algorithm)(x1, x2, variables,
                                                        **kwargs)
    _assert_close(ntk, expected, jnp.float64)


@pytest.mark.filterwarnings("error::UserWarning")  # Independence is proven.
@pytest.mark.parametrize("name", VMAP_SAFE)
def test_vmap_axes_zoo(name):
  f, variables, x1, _, kwargs = case(name, jnp.float32)
  trace_axes = (-1,) if name == "transformer" else ()
  x2, full = reference(name, jnp.float32)
  expected = nt_layout(full, trace_axes, ())
  for algorithm in ALGORITHMS:
    ntk = ft.empirical_ntk_fn(f, trace_axes, vmap_axes=0,
                              implementation=algorithm)(x1, x2, variables,
                                                        **kwargs)
    _assert_close(ntk, expected, jnp.float32)


def _masked_fn(params, x, mask, scale=1.0):
  """Batch along axis 1 of x and of the output; `mask` batched on axis 0."""
  h = jnp.tanh(jnp.einsum("dn,dh->nh", x, params["w1"]))
  out = (h * mask[:, None]) @ params["w2"] * scale
  return out.T  # (out, N)


@pytest.mark.filterwarnings("error::UserWarning")
def test_vmap_axes_per_input_and_per_keyword():
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
  params = {"w1": jax.random.normal(k1, (4, 5)),
            "w2": jax.random.normal(k2, (5, 3))}
  x1, x2 = jax.random.normal(k3, (4, 3)), jax.random.normal(k4, (4, 2))
  mask1, mask2 = jnp.array([1., 0., 2.]), jnp.array([0.5, 1.])
  f1 = lambda p, x: _masked_fn(p, x, mask1, scale=2.0)  # noqa: E731
  f2 = lambda p, x: _masked_fn(p, x, mask2, scale=2.0)  # noqa: E731
  j1 = jax.jacobian(f1)(params, x1)
  j2 = jax.jacobian(f2)(params, x2)
  full = sum(np.einsum("abp,cdp->abcd", np.asarray(a).reshape(3, 3, -1),
                       np.asarray(b).reshape(3, 2, -1))
             for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2)))
  expected = nt_layout(full, (0,), ())
  for algorithm in ALGORITHMS:
    ntk_fn = ft.empirical_ntk_fn(_masked_fn, trace_axes=(0,),
                                 vmap_axes=(1, 1, {"mask": 0}),
                                 implementation=algorithm)
    ntk = ntk_fn(x1, x2, params, mask=(mask1, mask2), scale=2.0)
    assert ntk.shape == (3, 2)
    _assert_close(ntk, expected, jnp.float64)


# AUTO, x2=None, jit and grad.


def test_auto_agrees_caches_and_prints_nothing(capsys):
  f, variables, x1, x2, kwargs = case("cnn_batchnorm", jnp.float32)
  ntk_fn = ft.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0,
                               implementation=Impl.AUTO)
  expected = ft.empirical_ntk_fn(f, trace_axes=(-1,))(x1, x2, variables,
                                                      **kwargs)
  _assert_close(ntk_fn(x1, x2, variables, **kwargs), expected, jnp.float32)
  _assert_close(ntk_fn(x1, x2, variables, **kwargs), expected, jnp.float32)
  choices = list(ntk_fn.auto_selector.choices.values())
  assert len(choices) == 1 and choices[0].implementation in ALGORITHMS
  # Under jit the inputs are tracers: AUTO times stand-ins of equal shapes.
  jitted = jax.jit(lambda v, a, b: ntk_fn(a, b, v, **kwargs))
  _assert_close(jitted(variables, x1, x2), expected, jnp.float32)
  assert capsys.readouterr().out == ""


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_x2_none_is_x1_and_composes_with_grad(algorithm):
  f, variables, x1, _, kwargs = case("mlp")
  ntk_fn = ft.empirical_ntk_fn(f, implementation=algorithm)
  np.testing.assert_allclose(ntk_fn(x1, None, variables),
                             ntk_fn(x1, x1, variables), rtol=1e-12)
  # Differentiable in the inputs, jit-able.
  loss = lambda x: jnp.sum(ntk_fn(x, None, variables))  # noqa: E731
  grad = jax.jit(jax.grad(loss))(x1)
  eps = 1e-6
  direction = jnp.ones_like(x1)
  numeric = (loss(x1 + eps * direction) - loss(x1 - eps * direction)) / (
      2 * eps)
  np.testing.assert_allclose(jnp.sum(grad * direction), numeric, rtol=1e-5)


def test_dropout_key_same_for_equal_inputs():
  f, variables, x1, _, kwargs = case("dropout")
  ntk_fn = ft.empirical_ntk_fn(f, trace_axes=())
  np.testing.assert_allclose(ntk_fn(x1, x1, variables, **kwargs),
                             ntk_fn(x1, None, variables, **kwargs))


def test_only_params_collection_is_differentiated():
  f, variables, x1, x2, kwargs = case("cnn_batchnorm")
  ntk = ft.empirical_ntk_fn(f, trace_axes=(-1,))(x1, x2, variables, **kwargs)
  stats = variables["batch_stats"]
  closed = lambda p, x: f({"params": p, "batch_stats": stats}, x,  # noqa
                          **kwargs)
  expected = ft.empirical_ntk_fn(closed, trace_axes=(-1,))(
      x1, x2, {"w": variables["params"]}["w"])
  np.testing.assert_allclose(ntk, expected, rtol=1e-10)


# NNGP, kernel_fn, ntk_vp_fn, pytree outputs.


@pytest.mark.parametrize("trace_axes,diagonal_axes", AXES[:4])
def test_nngp(trace_axes, diagonal_axes):
  f, variables, x1, x2, kwargs = case("cnn_batchnorm")
  x2 = x1 if 0 in trace_axes + diagonal_axes else x2
  out1 = np.asarray(f(variables, x1, **kwargs))
  out2 = np.asarray(f(variables, x2, **kwargs))
  full = np.einsum("i,j->ij", out1.ravel(), out2.ravel()).reshape(
      out1.shape + out2.shape)
  nngp = ft.empirical_nngp_fn(f, trace_axes, diagonal_axes)(x1, x2, variables,
                                                            **kwargs)
  np.testing.assert_allclose(nngp, nt_layout(full, trace_axes, diagonal_axes),
                             rtol=1e-10, atol=1e-12)


def _two_headed(params, x):
  h = jnp.tanh(x @ params["w"])
  return {"a": h @ params["a"], "b": (h @ params["b"], jnp.sin(h))}


def test_kernel_fn_get_and_pytree_outputs():
  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  params = {"w": jax.random.normal(keys[0], (3, 4)),
            "a": jax.random.normal(keys[1], (4, 2)),
            "b": jax.random.normal(keys[2], (4, 1))}
  x1, x2 = jax.random.normal(keys[3], (5, 3)), jnp.ones((2, 3))
  kernel_fn = ft.empirical_kernel_fn(_two_headed, trace_axes=())
  both = kernel_fn(x1, x2, None, params)
  assert both["a"].ntk.shape == (5, 2, 2, 2)
  assert both["b"][1].nngp.shape == (5, 2, 4, 4)
  assert type(both["a"]).__name__ == "EmpiricalKernel"
  ntk_only = kernel_fn(x1, x2, "ntk", params)
  for name in ("a",):
    out_fn = lambda p, x: _two_headed(p, x)[name]  # noqa: E731
    expected = nt_layout(full_ntk(out_fn, params, x1, x2, {}), (), ())
    _assert_close(ntk_only[name], expected, jnp.float64)
  as_tuple = kernel_fn(x1, x2, ("ntk",), params)
  np.testing.assert_allclose(as_tuple["a"].ntk, ntk_only["a"])
  with pytest.raises(ValueError, match="get="):
    kernel_fn(x1, x2, "cov", params)


def test_ntk_vp_fn_matches_kernel():
  f, variables, x1, x2, kwargs = case("mlp")
  cotangents = jax.random.normal(jax.random.PRNGKey(2), (2, 2))
  vp = jax.jit(ft.empirical_ntk_vp_fn(f, x1, x2, variables))(cotangents)
  full = full_ntk(f, variables, x1, x2, {})
  np.testing.assert_allclose(vp, np.einsum("abcd,cd->ab", full, cotangents),
                             rtol=1e-9, atol=1e-12)


# Bad input.


def test_error_mismatched_input_shapes():
  f, variables, x1, _, _ = case("mlp")
  ntk_fn = ft.empirical_ntk_fn(f)
  with pytest.raises(ValueError, match=r"x1 has shape \(3, 4\).*\(2, 5\)"):
    ntk_fn(x1, jnp.ones((2, 5)), variables)
  with pytest.raises(ValueError, match="structures"):
    ntk_fn(x1, (x1,), variables)


def test_error_vmap_axes_do_not_fit():
  f, variables, x1, x2, _ = case("mlp")
  with pytest.raises(ValueError, match="vmap axis 2 does not fit"):
    ft.empirical_ntk_fn(f, vmap_axes=2)(x1, x2, variables)
  with pytest.raises(ValueError, match="different sizes"):
    ft.empirical_ntk_fn(f, vmap_axes=(1, 0, {}))(x1, None, variables)
  with pytest.raises(ValueError, match="keyword arguments"):
    ft.empirical_ntk_fn(f, vmap_axes=(0, 0, {"mask": 0}))(x1, x2, variables)
  with pytest.raises(ValueError, match="vmap_axes="):
    ft.empirical_ntk_fn(f, vmap_axes="batch")


def test_error_axes():
  f, variables, x1, x2, _ = case("mlp")
  with pytest.raises(ValueError, match="both trace_axes"):
    ft.empirical_ntk_fn(f, trace_axes=(1,), diagonal_axes=(-1,))(
        x1, x2, variables)
  with pytest.raises(ValueError, match="out of range"):
    ft.empirical_ntk_fn(f, trace_axes=(5,))(x1, x2, variables)
  with pytest.raises(ValueError, match="diagonal_axes"):
    ft.empirical_ntk_fn(f, diagonal_axes=(0,))(x1, x2, variables)


@pytest.mark.parametrize("bad", [5, -1, "jacobian", 1.0, None])
def test_error_unknown_implementation(bad):
  with pytest.raises(ValueError, match="not an NtkImplementation"):
    ft.empirical_ntk_fn(lambda p, x: x, implementation=bad)


def test_error_missing_params():
  with pytest.raises(TypeError, match="needs the parameters"):
    ft.empirical_ntk_fn(lambda p, x: x)(jnp.ones((2, 1)))


def test_structured_unavailable_is_clear(monkeypatch):
  from flax_tangents._src.empirical import dispatch  # pylint: disable=g-import-not-at-top

  def missing():
    raise NotImplementedError("STRUCTURED_DERIVATIVES is not available")

  monkeypatch.setattr(dispatch, "_structured_ntk", missing)
  with pytest.raises(NotImplementedError, match="STRUCTURED_DERIVATIVES"):
    ft.empirical_ntk_fn(lambda p, x: x,
                        implementation=Impl.STRUCTURED_DERIVATIVES)
  assert Impl.STRUCTURED_DERIVATIVES not in (
      dispatch.available_implementations())
