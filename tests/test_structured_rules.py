"""Each structure rule against the generic path (and a direct Jacobian).

Every case is a tiny `f(params, x)` in which a parameter reaches one
primitive family. The structured NTK must equal both the generic path (all
rules disabled, so every parameter is a plain Jacobian contraction) and a
direct `jax.jacobian` contraction, and, where a rule exists, the planner
must actually have used it (the parameter's chain does not stop at the
parameter itself).
"""


import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_tangents._src.empirical import example_axes
from flax_tangents._src.empirical import layout
from flax_tangents._src.empirical.structured import interpreter
from flax_tangents._src.empirical.structured import planner
from flax_tangents._src.empirical.structured import side as side_lib

_KEY = jax.random.PRNGKey(0)
N = 3


def _normal(i, shape):
  return jax.random.normal(jax.random.fold_in(_KEY, i), shape)


@jax.custom_vjp
def _scaled_tanh(x):
  return jnp.tanh(x)


def _scaled_tanh_fwd(x):
  return jnp.tanh(x), x


def _scaled_tanh_bwd(x, g):
  return (g * (1 - jnp.tanh(x)**2),)


_scaled_tanh.defvjp(_scaled_tanh_fwd, _scaled_tanh_bwd)

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, **kw):
  return lax.conv_general_dilated(x, w, dimension_numbers=_DN, **kw)


# name -> (f, params, x, structured): `structured` says a rule must apply.
CASES = {
    "dot_rhs": (lambda p, x: x @ p, _normal(1, (4, 3)), _normal(2, (N, 4)),
                True),
    "dot_lhs": (lambda p, x: jnp.einsum("ij,nj->ni", p, x), _normal(1, (3, 4)),
                _normal(2, (N, 4)), True),
    "dot_batch_dims": (lambda p, x: jnp.einsum("nbi,bik->nbk", x, p),
                       _normal(1, (2, 4, 3)), _normal(2, (N, 2, 4)), True),
    "conv_filter": (lambda p, x: _conv(x, p, window_strides=(1, 1),
                                       padding="SAME"),
                    _normal(1, (3, 3, 2, 4)), _normal(2, (N, 5, 5, 2)), True),
    "conv_filter_strided_dilated": (
        lambda p, x: _conv(x, p, window_strides=(2, 1), padding=((1, 0),
                                                                  (2, 1)),
                           rhs_dilation=(1, 2)),
        _normal(1, (2, 2, 2, 3)), _normal(2, (N, 5, 6, 2)), True),
    "conv_input": (lambda p, x: _conv(
        jnp.broadcast_to(p, x.shape), jnp.ones((3, 3, 2, 2)),
        window_strides=(1, 1), padding="SAME") * x,
                   _normal(1, (1, 4, 4, 2)), _normal(2, (N, 4, 4, 2)), True),
    "add_bias": (lambda p, x: jnp.tanh(x + p[None]), _normal(1, (4,)),
                 _normal(2, (N, 4)), True),
    "sub": (lambda p, x: jnp.sin((x - p[None]) * (p[None] - x)),
            _normal(1, (4,)), _normal(2, (N, 4)), False),
    "sub_rhs": (lambda p, x: jnp.sin(x - p[None]), _normal(1, (4,)),
                _normal(2, (N, 4)), True),
    "mul": (lambda p, x: jnp.sin(x * p[None]), _normal(1, (4,)), _normal(2, (N, 4)),
            True),
    "div_numerator": (lambda p, x: jnp.sin(p[None] / (2. + x**2)), _normal(1, (4,)),
                      _normal(2, (N, 4)), True),
    "div_denominator": (lambda p, x: jnp.sin(x / (2. + p**2)[None]),
                        _normal(1, (4,)), _normal(2, (N, 4)), False),
    "div_by_param": (lambda p, x: x / p[None], 2. + _normal(1, (4,))**2,
                     _normal(2, (N, 4)), True),
    "neg_and_scale": (lambda p, x: x @ (-(p * 0.5)), _normal(1, (4, 3)),
                      _normal(2, (N, 4)), True),
    "broadcast_in_dim": (lambda p, x: x * jnp.broadcast_to(p[:, None],
                                                           x.shape),
                         _normal(1, (4,)), _normal(2, (N, 4, 2)), True),
    "reshape_merge": (lambda p, x: x @ p.reshape(6, 2), _normal(1, (2, 3, 2)),
                      _normal(2, (N, 6)), True),
    "reshape_unit_axes": (lambda p, x: x + p.reshape(1, 4), _normal(1, (4,)),
                          _normal(2, (N, 4)), True),
    "transpose": (lambda p, x: x @ p.T, _normal(1, (3, 4)), _normal(2, (N, 4)),
                  True),
    "squeeze_expand_dims": (lambda p, x: x @ jnp.squeeze(
        jnp.expand_dims(p, 0), 0), _normal(1, (4, 3)), _normal(2, (N, 4)),
                            True),
    "concatenate": (lambda p, x: x @ jnp.concatenate([jnp.ones(
        (1, 3)), p]), _normal(1, (2, 3)), _normal(2, (N, 3)), True),
    "pad": (lambda p, x: x @ lax.pad(p, 0., ((1, -1, 1), (0, 2, 0))),
            _normal(1, (3, 2)), _normal(2, (N, 5)), True),
    "rev": (lambda p, x: x @ jnp.flip(p, 0), _normal(1, (4, 3)),
            _normal(2, (N, 4)), True),
    "slice": (lambda p, x: x @ p[1:4:2], _normal(1, (5, 3)),
              _normal(2, (N, 2)), True),
    "reduce_sum": (lambda p, x: x * p.sum(0)[None], _normal(1, (3, 4)),
                   _normal(2, (N, 4)), True),
    "convert_element_type": (lambda p, x: x @ p.astype(jnp.float32).astype(
        jnp.float64), _normal(1, (4, 3)).astype(jnp.float32).astype(
            jnp.float64), _normal(2, (N, 4)), True),
    "copy": (lambda p, x: x @ jnp.array(p, copy=True), _normal(1, (4, 3)),
             _normal(2, (N, 4)), True),
    "select_n": (lambda p, x: jnp.where(x > 0, p[None], 2. * x), _normal(1, (4,)),
                 _normal(2, (N, 4)), True),
    "gather_embedding": (lambda p, x: jnp.take(p, x, axis=0).sum(1),
                         _normal(1, (7, 3)),
                         jax.random.randint(_KEY, (N, 5), 0, 7), True),
    "gather_columns": (lambda p, x: p[:, x].sum(-1).T, _normal(1, (3, 6)),
                       jax.random.randint(_KEY, (N, 2), 0, 6), True),
    "gather_out_of_bounds_fill": (
        lambda p, x: jnp.take(p, x, axis=0, mode="fill", fill_value=0.),
        _normal(1, (4, 2)), jnp.array([[0, 9], [3, -9], [2, 2]]), True),
    "dynamic_slice": (lambda p, x: jax.vmap(lambda i: lax.dynamic_slice(
        p, (i, 0), (2, 3)))(x), _normal(1, (5, 3)), jnp.array([0, 3, 4]),
                      True),
    "nested_jit": (jax.jit(lambda p, x: jnp.tanh(x @ p)), _normal(1, (4, 3)),
                   _normal(2, (N, 4)), True),
    "custom_jvp_relu": (lambda p, x: jax.nn.relu(x @ p) @ p.T,
                        _normal(1, (4, 3)), _normal(2, (N, 4)), False),
    "custom_vjp_on_param": (lambda p, x: x @ _scaled_tanh(p),
                            _normal(1, (4, 3)), _normal(2, (N, 4)), False),
    "custom_vjp_on_data": (lambda p, x: _scaled_tanh(x @ p),
                           _normal(1, (4, 3)), _normal(2, (N, 4)), True),
    "no_rule_fallback": (lambda p, x: x @ jnp.exp(p), _normal(1, (4, 3)),
                         _normal(2, (N, 4)), False),
    "param_used_twice": (lambda p, x: (x @ p) * (x @ p), _normal(1, (4, 3)),
                         _normal(2, (N, 4)), False),
}


def _ntk(f, params, x1, x2, vmap):
  fx = jax.eval_shape(lambda p: f(p, x1), params)
  vmap_axes = example_axes.canonicalize_vmap_axes(vmap, x1, fx, {})
  return jax.jit(lambda p, a, b: interpreter.ntk(
      f, p, a, b, {}, {}, trace_axes=(), diagonal_axes=(),
      vmap_axes=vmap_axes))(params, x1, x2)


def _direct(f, params, x1, x2):
  j1 = jax.jacobian(f)(params, x1)
  j2 = jax.jacobian(f)(params, x2)
  out_ndim = j1.ndim - params.ndim
  full = jnp.tensordot(j1, j2, axes=(tuple(range(out_ndim, j1.ndim)),) * 2)
  return layout.trace_and_diagonal(full, (), ())


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_generic_and_direct(name, monkeypatch):
  f, params, x, structured = CASES[name]
  x2 = x[::-1][:2]
  side = side_lib.Side(f, params, x, {}, None)
  (plan,) = side.plans
  used_rule = all(c.stop_var != side.program.inputs[0] for c in plan.chains)
  if structured:
    assert used_rule, f"{name}: no structure rule was applied"
  # Autodiff rounds cotangents through a float32 cast; the rule does not.
  tol = 1e-6 if name == "convert_element_type" else 1e-10
  if not structured:  # No rule applies: the direct Jacobian is the check.
    np.testing.assert_allclose(_ntk(f, params, x, x2, None),
                               _direct(f, params, x, x2), rtol=tol, atol=tol)
    return

  def both(p, a, b):  # One compile: with the rules, then without any.
    kernel = lambda: interpreter.ntk(  # noqa: E731
        f, p, a, b, {}, {}, trace_axes=(), diagonal_axes=(), vmap_axes=None)
    actual = kernel()
    monkeypatch.setattr(planner, "RULES", {})
    return actual, kernel()

  actual, generic = jax.jit(both)(params, x, x2)
  np.testing.assert_allclose(actual, generic, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["dot_rhs", "conv_filter", "gather_embedding",
                                  "dynamic_slice", "pad", "select_n"])
def test_rule_under_vmap_axes(name):
  f, params, x, _ = CASES[name]
  if name == "dynamic_slice":
    f = lambda p, x: jax.vmap(lambda i: lax.dynamic_slice(  # noqa: E731
        p, (i[0], 0), (2, 3)))(x)
    x = x[:, None]
  actual = _ntk(f, params, x, x[::-1][:2], 0)
  np.testing.assert_allclose(actual, _direct(f, params, x, x[::-1][:2]),
                             rtol=1e-10, atol=1e-10)


def test_embedding_never_forms_a_vocabulary_sized_jacobian():
  vocab, width = 50_000, 4
  table = _normal(3, (vocab, width))
  tokens = jax.random.randint(_KEY, (2, 3), 0, vocab)
  f = lambda p, t: jnp.take(p, t, axis=0).sum(1)  # noqa: E731
  side = side_lib.Side(f, table, tokens, {}, None)
  plans, _ = interpreter._reconcile(side, side)
  compiled = jax.jit(lambda p, t: interpreter.ntk(
      f, p, t, None, {}, {}, trace_axes=(), diagonal_axes=(),
      vmap_axes=None)).lower(table, tokens).compile()
  analysis = compiled.memory_analysis()
  if analysis is not None:  # The table alone is 800 kB; temps stay tiny.
    assert analysis.temp_size_in_bytes < vocab * width * 8 / 4
  assert plans[0].structured


def _diagonal_out_axes(f, params, x):
  """The outputs' batch axes when examples are proven independent, or None."""
  side = side_lib.Side(f, params, x, {}, None)
  active = [p for p in side.plans if p is not None]
  side.plan_diagonal(active, side_lib.stop_vars(active))
  return side.diag_outs


@pytest.mark.parametrize("name", [
    "dot_rhs", "dot_batch_dims", "conv_filter", "conv_input", "add_bias",
    "relu_on_data", "gather_embedding", "gather_columns", "select_n",
    "broadcast_in_dim", "dynamic_slice"
])
def test_independent_examples_are_proven(name):
  if name == "relu_on_data":  # custom_jvp: checked through its JVP.
    f, params, x = (lambda p, x: jax.nn.relu(x @ p) @ jnp.ones((3, 2)),
                    _normal(1, (4, 3)), _normal(2, (N, 4)))
  else:
    f, params, x, _ = CASES[name]
  assert _diagonal_out_axes(f, params, x) == [0]


def _centred(h):
  return h - h.mean(0, keepdims=True)


@pytest.mark.parametrize("f", [
    lambda p, x: _centred(x @ p),  # Batch statistics.
    lambda p, x: jnp.flip(x @ p, 0),  # Examples permuted.
    lambda p, x: x.T @ (x @ p),  # Contracted over the batch.
    lambda p, x: jnp.cumsum(x @ p, 0),
    lambda p, x: _scaled_tanh(x @ p),  # custom_vjp: not analysed.
])
def test_mixed_examples_are_not_diagonal(f):
  assert _diagonal_out_axes(f, _normal(1, (4, 3)), _normal(2, (N, 4))) is None
