"""Flax NNX modules passed directly to the empirical and training functions.

References are independent of the library: explicit `jax.jacobian`s of
`nnx.merge(graphdef, params, rest)` with respect to the `nnx.Param` state
only, flattened and contracted with `np.einsum`; and the pure-function recipe
(`nnx.split` into parameters and the rest) through the Linen-style path.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_tangents as ft
from flax_tangents.batching import CheckpointMismatchError

Impl = ft.NtkImplementation
IMPLEMENTATIONS = (Impl.JACOBIAN_CONTRACTION, Impl.NTK_VECTOR_PRODUCTS,
                   Impl.STRUCTURED_DERIVATIVES)


class CNN(nnx.Module):
  """Conv, BatchNorm, ReLU, Dropout, global average, Linear."""

  def __init__(self, rngs: nnx.Rngs, width: int = 6):
    dt = jnp.float64
    self.conv = nnx.Conv(2, width, (3, 3), param_dtype=dt, rngs=rngs)
    self.norm = nnx.BatchNorm(width, param_dtype=dt, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(width, 3, param_dtype=dt, rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.norm(self.conv(x))))
    return self.head(h.mean(axis=(1, 2)))


class Transformer(nnx.Module):
  """Token and position embeddings, one pre-norm attention block, an MLP."""

  def __init__(self, rngs: nnx.Rngs, vocab: int = 7, length: int = 4,
               features: int = 8):
    dt = jnp.float64
    self.embed = nnx.Embed(vocab, features, param_dtype=dt, rngs=rngs)
    self.position = nnx.Param(
        0.1 * jax.random.normal(rngs.params(), (length, features), dt))
    self.norm1 = nnx.LayerNorm(features, param_dtype=dt, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        2, features, param_dtype=dt, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(features, param_dtype=dt, rngs=rngs)
    self.mlp1 = nnx.Linear(features, 16, param_dtype=dt, rngs=rngs)
    self.mlp2 = nnx.Linear(16, features, param_dtype=dt, rngs=rngs)
    self.head = nnx.Linear(features, 2, param_dtype=dt, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens) + self.position[...][None]
    h = h + self.attention(self.norm1(h))
    h = h + self.mlp2(nnx.gelu(self.mlp1(self.norm2(h))))
    return self.head(h.mean(axis=1))


class TinyNet(nnx.Module):
  """Linear, BatchNorm, ReLU, Dropout, Linear: cheap to compile."""

  def __init__(self, rngs: nnx.Rngs, width: int = 5):
    dt = jnp.float64
    self.hidden = nnx.Linear(3, width, param_dtype=dt, rngs=rngs)
    self.norm = nnx.BatchNorm(width, param_dtype=dt, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(width, 3, param_dtype=dt, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(nnx.relu(self.norm(self.hidden(x)))))


def _nontrivial_statistics(model, key: jax.Array) -> None:
  """Running statistics away from (0, 1), so holding them fixed matters."""
  k1, k2 = jax.random.split(key)
  shape = model.norm.mean.shape
  model.norm.mean.set_value(0.3 * jax.random.normal(k1, shape, jnp.float64))
  model.norm.var.set_value(0.5 + jax.random.uniform(k2, shape, jnp.float64))


def make(name: str):
  """`(model, x1, x2)`; `model` in the mode the case name says."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  if name.startswith(("cnn", "tiny")):
    tiny = name.startswith("tiny")
    model = TinyNet(nnx.Rngs(0)) if tiny else CNN(nnx.Rngs(0))
    _nontrivial_statistics(model, jax.random.PRNGKey(9))
    shape = (3,) if tiny else (5, 5, 2)
    x1 = jax.random.normal(k1, (3, *shape), jnp.float64)
    x2 = jax.random.normal(k2, (2, *shape), jnp.float64)
    # eval: running statistics, no dropout. train: the batch's own
    # statistics and dropout masks from the RNG state held fixed.
    model.eval() if name.endswith("eval") else model.train()
  else:
    model = Transformer(nnx.Rngs(0))
    x1 = jax.random.randint(k1, (3, 4), 0, 7)
    x2 = jax.random.randint(k2, (2, 4), 0, 7)
  return model, x1, x2


CASES = ("cnn_eval", "cnn_train", "transformer")


def rtol(name):
  # Flax's attention takes its softmax in float32 whatever the dtype.
  return 1e-6 if name == "transformer" else 1e-10


def recipe(model):
  """The pure-function recipe: `(f, params)` with the rest held fixed."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  f = lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x)  # noqa: E731
  return f, params


def flat_jacobians(model, x1, x2, all_state=False):
  """Jacobians `(N O, P)` on `x1` and `x2` of the `nnx.Param` leaves."""
  if all_state:  # BatchNorm statistics differentiated too.
    graphdef, params, rest = nnx.split(model, (nnx.Param, nnx.BatchStat),
                                       ...)
    f = lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x)  # noqa: E731
  else:
    f, params = recipe(model)

  @jax.jit
  def flat_jacobian(x):
    jac = jax.jacobian(f)(params, x)
    n, o = f(params, x).shape
    return jnp.concatenate(
        [j.reshape(n * o, -1) for j in jax.tree.leaves(jac)], 1)

  return np.asarray(flat_jacobian(x1)), np.asarray(flat_jacobian(x2))


def jacobian_ntk(model, x1, x2, all_state=False):
  """`J(x1) J(x2)^T`, shape `(N1, N2, O, O)`, from explicit Jacobians."""
  j1, j2 = flat_jacobians(model, x1, x2, all_state)
  ntk = np.einsum("ip,jp->ij", j1, j2)
  n1, n2, o = x1.shape[0], x2.shape[0], j1.shape[0] // x1.shape[0]
  return ntk.reshape(n1, o, n2, o).transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=None)
def _case(name):
  model, x1, x2 = make(name)
  return model, x1, x2, jacobian_ntk(model, x1, x2)


def _host(state):
  """A state's arrays on the host (keys as their data), to compare."""
  return jax.tree.map(
      lambda a: np.asarray(jax.random.key_data(a) if jnp.issubdtype(
          a.dtype, jax.dtypes.prng_key) else a), state)


# Each case with Jacobian contraction; the other algorithms on BatchNorm in
# training mode (examples interact) and on attention. The adapter is the
# same for every algorithm, which test_empirical.py checks on pure functions.
@pytest.mark.parametrize("name,implementation", [
    ("cnn_eval", Impl.JACOBIAN_CONTRACTION),
    ("cnn_train", Impl.JACOBIAN_CONTRACTION),
    ("transformer", Impl.JACOBIAN_CONTRACTION),
    ("cnn_train", Impl.NTK_VECTOR_PRODUCTS),
    ("cnn_train", Impl.STRUCTURED_DERIVATIVES),
], ids=lambda v: getattr(v, "name", v))
def test_ntk_of_module_matches_jacobian(name, implementation):
  model, x1, x2, expected = _case(name)
  ntk_fn = ft.empirical_ntk_fn(model, trace_axes=(),
                               implementation=implementation)
  np.testing.assert_allclose(ntk_fn(x1, x2), expected, rtol=rtol(name),
                             atol=1e-12)


@pytest.mark.parametrize("name", ("transformer",))
def test_vmap_axes_and_traced_output(name):
  model, x1, x2, expected = _case(name)
  ntk_fn = ft.empirical_ntk_fn(model, vmap_axes=0,
                               implementation=Impl.NTK_VECTOR_PRODUCTS)
  traced = np.einsum("ijkk->ij", expected) / expected.shape[-1]
  np.testing.assert_allclose(ntk_fn(x1, x2), traced, rtol=rtol(name),
                             atol=1e-12)


def test_module_equals_pure_function_recipe():
  model, x1, x2 = make("tiny_train")
  f, params = recipe(model)
  direct = ft.empirical_kernel_fn(model, trace_axes=())(x1, x2, ("nngp",
                                                                 "ntk"))
  by_recipe = ft.empirical_kernel_fn(f, trace_axes=())(x1, x2, ("nngp",
                                                                "ntk"), params)
  np.testing.assert_allclose(direct.ntk, by_recipe.ntk, rtol=1e-13)
  np.testing.assert_allclose(direct.nngp, by_recipe.nngp, rtol=1e-13)
  # The NNGP is the outer product of the outputs.
  out1, out2 = f(params, x1), f(params, x2)
  np.testing.assert_allclose(direct.nngp, np.einsum("ik,jl->ijkl", out1,
                                                    out2), rtol=1e-12)
  nngp = ft.empirical_nngp_fn(model)(x1, x2)
  np.testing.assert_allclose(nngp, out1 @ out2.T / out1.shape[-1],
                             rtol=1e-12)


def test_only_params_are_differentiated():
  model, x1, x2, expected = _case("cnn_eval")
  # The check discriminates: differentiating the statistics too differs.
  all_state = jacobian_ntk(model, x1, x2, all_state=True)
  assert not np.allclose(all_state, expected, rtol=1e-3)
  np.testing.assert_allclose(
      ft.empirical_ntk_fn(model, trace_axes=())(x1, x2), expected,
      rtol=1e-10, atol=1e-12)


def test_params_argument_and_current_state():
  model, x1, x2 = make("tiny_eval")
  ntk_fn = ft.empirical_ntk_fn(model, trace_axes=())
  other, _, _ = make("tiny_eval")
  other.head.kernel[...] = 2. * other.head.kernel[...]
  other.norm.mean[...] = other.norm.mean[...] + 1.
  expected = jacobian_ntk(other, x1, x2)
  # A module of the same structure: its parameters and its statistics.
  np.testing.assert_allclose(ntk_fn(x1, x2, other), expected, rtol=1e-10)
  # A full state does the same; a parameter state keeps the model's rest.
  np.testing.assert_allclose(ntk_fn(x1, x2, nnx.state(other)), expected,
                             rtol=1e-10)
  mixed = jacobian_ntk(nnx.merge(*nnx.split(model, nnx.Param, ...)[:1],
                                 nnx.state(other, nnx.Param),
                                 nnx.state(model, nnx.Not(nnx.Param))),
                       x1, x2)
  np.testing.assert_allclose(ntk_fn(x1, x2, nnx.state(other, nnx.Param)),
                             mixed, rtol=1e-10)
  # `params=None` reads the model at call time: update it in place.
  nnx.update(model, nnx.state(other))
  np.testing.assert_allclose(ntk_fn(x1, x2), expected, rtol=1e-10)


def test_mode_switch_is_honoured():
  model, x1, x2 = make("tiny_eval")
  ntk_fn = ft.empirical_ntk_fn(model, trace_axes=())
  eval_ntk = ntk_fn(x1, x2)
  np.testing.assert_allclose(eval_ntk, jacobian_ntk(model, x1, x2),
                             rtol=1e-10, atol=1e-12)
  model.train()
  train_ntk = ntk_fn(x1, x2)
  np.testing.assert_allclose(train_ntk, jacobian_ntk(model, x1, x2),
                             rtol=1e-10, atol=1e-12)
  assert not np.allclose(train_ntk, eval_ntk, rtol=1e-3)


def test_module_state_is_never_mutated():
  model, x1, x2 = make("tiny_train")
  before = _host(nnx.state(model))
  ft.empirical_kernel_fn(model)(x1, x2, "ntk")
  ft.linearize(model)(nnx.state(model, nnx.Param), x1)
  jax.tree.map(np.testing.assert_array_equal, before,
               _host(nnx.state(model)))


def test_params_of_another_kind_are_refused():
  model, x1, _ = make("tiny_eval")
  with pytest.raises(TypeError, match="nnx.State"):
    ft.empirical_ntk_fn(model)(x1, None, {"params": {}})
  with pytest.raises(TypeError, match="no nnx.Param"):
    ft.empirical_ntk_fn(model)(x1, None, nnx.state(model, nnx.BatchStat))
  with pytest.raises(TypeError, match="expansion point"):
    ft.linearize(lambda p, x: p * x)


def _random_step(params, scale=0.1):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  steps = [scale * jax.random.normal(k, a.shape, a.dtype)
           for k, a in zip(keys, leaves)]
  return jax.tree.map(jnp.add, params, jax.tree.unflatten(tree, steps)), steps


@pytest.mark.parametrize("name", ("cnn_eval", "transformer"))
def test_linearize_module(name):
  model, x1, x2, _ = _case(name)
  f, params_0 = recipe(model)
  f_lin = jax.jit(ft.linearize(model))
  out = f(params_0, x1)
  np.testing.assert_allclose(f_lin(params_0, x1), out, rtol=1e-12)
  # Move the parameters: f + J (p - p0) from the explicit Jacobian.
  params_1, steps = _random_step(params_0)
  jacobian = flat_jacobians(model, x1, x2)[0]
  change = jacobian @ np.concatenate([np.ravel(d) for d in steps])
  np.testing.assert_allclose(f_lin(params_1, x1),
                             out + change.reshape(out.shape), rtol=rtol(name),
                             atol=1e-12)


def test_linearize_point_is_a_snapshot():
  model, x1, _ = make("tiny_eval")
  f, params_0 = recipe(model)
  params_0 = jax.tree.map(lambda a: a, params_0)  # Detached from the model.
  f_lin = ft.linearize(model)
  params_1, _ = _random_step(params_0)
  expected = ft.linearize(f, params_0)(params_1, x1)
  # Training the module in place does not move the expansion point, and a
  # module is accepted as the parameters (its mode and other state too).
  nnx.update(model, params_1)
  np.testing.assert_allclose(f_lin(model, x1), expected, rtol=1e-12)
  model.train()
  f_train, _ = recipe(model)
  np.testing.assert_allclose(f_lin(model, x1),
                             ft.linearize(f_train, params_0)(params_1, x1),
                             rtol=1e-12)


def test_taylor_expand_module():
  model, x1, _ = make("tiny_eval")
  f, params = recipe(model)
  expected = ft.taylor_expand(f, params, 2)
  scaled = jax.tree.map(lambda a: 1.1 * a, params)
  np.testing.assert_allclose(ft.taylor_expand(model, None, 2)(scaled, x1),
                             expected(scaled, x1), rtol=1e-12)


def test_ntk_vector_product_module():
  model, x1, x2, expected = _case("cnn_eval")
  v = jax.random.normal(jax.random.PRNGKey(1), (2, 3), jnp.float64)
  np.testing.assert_allclose(
      ft.empirical_ntk_vp_fn(model, x1, x2, None)(v),
      np.einsum("ijkl,jl->ik", expected, v), rtol=1e-10)


def test_monte_carlo_factory():
  key = jax.random.PRNGKey(4)
  x1 = jax.random.normal(key, (3, 3), jnp.float64)

  def factory(rngs):
    model = TinyNet(rngs)
    model.eval()
    return model

  kernel_fn = ft.monte_carlo_kernel_fn(factory, key, 2, trace_axes=())
  sample_keys = [jax.random.split(jax.random.fold_in(key, s))[0]
                 for s in range(2)]
  expected = np.mean([jacobian_ntk(factory(nnx.Rngs(k)), x1, x1)
                      for k in sample_keys], axis=0)
  np.testing.assert_allclose(kernel_fn(x1, None, "ntk"), expected, rtol=1e-10,
                             atol=1e-12)


def test_monte_carlo_refuses_an_instance():
  model, _, _ = make("tiny_eval")
  with pytest.raises(TypeError, match="lambda rngs: TinyNet"):
    ft.monte_carlo_kernel_fn(model, jax.random.PRNGKey(0), 2)


def test_fit_module_matches_recipe():
  model, x1, _ = make("tiny_eval")
  y = jnp.eye(3, dtype=jnp.float64)
  before = _host(nnx.state(model))
  kwargs = dict(steps=6, record_steps=3, learning_rate=0.5)
  direct = ft.train.fit(model, None, optax.sgd(0.5), x1, y, **kwargs)
  f, params = recipe(model)
  by_recipe = ft.train.fit(f, params, optax.sgd(0.5), x1, y, **kwargs)
  for curves in ("network", "linearized", "ntk_empirical"):
    np.testing.assert_allclose(getattr(direct, curves).fx_train,
                               getattr(by_recipe, curves).fx_train,
                               rtol=1e-13)
  # The module is unchanged; the trained states fit it and its linearization.
  jax.tree.map(np.testing.assert_array_equal, before,
               _host(nnx.state(model)))
  f_lin = ft.linearize(model)
  np.testing.assert_allclose(f_lin(direct.linearized_variables, x1),
                             direct.linearized.fx_train[-1], rtol=1e-12)
  nnx.update(model, direct.variables)
  np.testing.assert_allclose(model(x1), direct.network.fx_train[-1],
                             rtol=1e-12)


def test_batch_of_module_kernel_and_its_checkpoints(tmp_path):
  model, x1, x2 = make("tiny_eval")
  x = jnp.concatenate([x1, x2])
  ntk_fn = ft.empirical_ntk_fn(model)
  batched = ft.batch(ntk_fn, 2, checkpoint_dir=str(tmp_path), progress=False)
  np.testing.assert_allclose(batched(x, None), ntk_fn(x, None), rtol=1e-12)
  # Tiles written for the module's state are not reused for another state
  # (the module's state, RNG keys included, is in the fingerprint).
  model.head.kernel[...] = 2. * model.head.kernel[...]
  with pytest.raises(CheckpointMismatchError, match="different kernel_fn"):
    batched(x, None)
