"""Tests of `ft.train`: wide networks track their linearization and the NTK."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn


def mlp(width, n_out=2):
  return nn.Sequential([ftn.Dense(width, W_std=1.4, b_std=0.1), ftn.Relu(),
                        ftn.Dense(n_out, W_std=1.1, b_std=0.05)])


@pytest.fixture(scope="module")
def data():
  kx, kt = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (8, 3))
  x_test = jax.random.normal(kt, (4, 3))
  y = jnp.stack([jnp.sin(x[:, 0]), jnp.cos(x[:, 1])], axis=-1)
  y_test = jnp.stack([jnp.sin(x_test[:, 0]), jnp.cos(x_test[:, 1])], axis=-1)
  return x, y, x_test, y_test


def jvp_linearization(f, params_0):
  """Reference linearization, independent of the library's."""
  def f_lin(params, x):
    delta = jax.tree_util.tree_map(lambda a, b: a - b, params, params_0)
    out, tangent = jax.jvp(lambda p: f(p, x), (params_0,), (delta,))
    return out + tangent
  return f_lin


def test_wide_network_tracks_linearization_and_ntk(data):
  x, y, x_test, y_test = data
  lr, steps = 0.5, 60
  gaps = {}
  for width in (32, 1024):
    model = mlp(width)
    variables = model.init(jax.random.PRNGKey(1), x)
    result = ft.train.fit(model.apply, variables, optax.sgd(lr), x, y,
                          x_test, y_test, steps=steps, record_steps=20,
                          learning_rate=lr)
    assert result.completed
    np.testing.assert_array_equal(result.steps, [0, 20, 40, 60])
    np.testing.assert_allclose(result.times, result.steps * lr)
    # Same start, and the loss goes down for all four.
    np.testing.assert_allclose(result.distance_train[0], 0., atol=1e-12)
    for curves in (result.network, result.linearized, result.ntk_empirical,
                   result.ntk_analytic):
      assert curves.train_loss[-1] < 0.5 * curves.train_loss[0]
      assert curves.fx_test.shape == (4, 4, 2)
    gaps[width] = result.final_gaps()
    # Small steps: the linearization follows the gradient flow of the NTK.
    assert gaps[width]["linearized-ntk_empirical/fx_train"] < 5e-3
  # The network departs from its linearization less as width grows.
  for key in ("network-linearized/fx_train", "network-linearized/fx_test",
              "network-ntk_analytic/fx_test"):
    assert gaps[1024][key] < 0.4 * gaps[32][key], (key, gaps)
  assert gaps[1024]["network-linearized/fx_train"] < 0.02
  assert gaps[1024]["network-ntk_analytic/fx_train"] < 0.05


def test_linearization_is_linear_and_matches_jvp(data):
  x, y, _, _ = data
  model = mlp(16)
  variables = model.init(jax.random.PRNGKey(2), x)
  result = ft.train.fit(model.apply, variables, optax.adam(1e-2), x, y,
                        steps=5, record_steps=5)
  assert result.ntk_empirical is None and result.ntk_analytic is None
  f = lambda p, x_: model.apply({"params": p}, x_)
  f_lin = jvp_linearization(f, variables["params"])
  np.testing.assert_allclose(
      result.linearized.fx_train[-1],
      f_lin(result.linearized_variables["params"], x), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(
      result.network.fx_train[-1],
      model.apply(result.variables, x), rtol=1e-10, atol=1e-12)


def test_minibatch_momentum_cross_entropy(data):
  x, _, x_test, _ = data
  labels = jnp.arange(8) % 3
  y = jax.nn.one_hot(labels, 3)
  y_test = jax.nn.one_hot(jnp.arange(4) % 3, 3)
  model = mlp(512, n_out=3)
  variables = model.init(jax.random.PRNGKey(3), x)
  lr, momentum = 0.05, 0.9
  result = ft.train.fit(model.apply, variables,
                        optax.sgd(lr, momentum=momentum), x, y, x_test, y_test,
                        steps=40, loss="cross_entropy", batch_size=8,
                        record_steps=[10, 40], learning_rate=lr,
                        momentum=momentum, kernel_fn=None)
  np.testing.assert_array_equal(result.steps, [0, 10, 40])
  assert result.ntk_analytic is None
  assert result.network.train_accuracy[-1] >= result.network.train_accuracy[0]
  assert result.network.train_loss[-1] < result.network.train_loss[0]
  # Momentum gradient descent and its continuous-time ODE agree on the
  # linearized model up to discretization error.
  gaps = result.final_gaps()
  assert gaps["linearized-ntk_empirical/fx_train"] < 0.05
  assert gaps["network-linearized/fx_train"] < 0.05

  # Minibatches: every example is visited once per epoch; results differ
  # from full batch but stay close to the linearization.
  result = ft.train.fit(model.apply, variables, optax.sgd(0.5), x, y,
                        steps=8, batch_size=4, loss="cross_entropy",
                        record_steps=4, learning_rate=0.5, kernel_fn=None,
                        ntk_trace_axes=(-1,))
  assert result.ntk_empirical.fx_train.shape == (3, 8, 3)
  assert result.final_gaps()["network-linearized/fx_train"] < 0.05


def test_checkpoint_resume_gives_same_params(data, tmp_path):
  x, y, x_test, y_test = data
  model = mlp(16)
  variables = model.init(jax.random.PRNGKey(4), x)
  kwargs = dict(steps=12, batch_size=4, record_steps=3, learning_rate=0.1,
                kernel_fn=None, empirical_ntk=False)
  optimizer = optax.sgd(0.1, momentum=0.9)
  straight = ft.train.fit(model.apply, variables, optimizer, x, y, x_test,
                          y_test, checkpoint_dir=str(tmp_path / "a"), **kwargs)
  stopped = ft.train.fit(model.apply, variables, optimizer, x, y, x_test,
                         y_test, checkpoint_dir=str(tmp_path / "b"),
                         stop_at=7, **kwargs)
  assert not stopped.completed
  np.testing.assert_array_equal(stopped.steps, [0, 3, 6])
  resumed = ft.train.fit(model.apply, variables, optimizer, x, y, x_test,
                         y_test, checkpoint_dir=str(tmp_path / "b"), **kwargs)
  assert resumed.completed
  np.testing.assert_array_equal(resumed.steps, straight.steps)
  for a, b in zip(jax.tree_util.tree_leaves(straight.variables),
                  jax.tree_util.tree_leaves(resumed.variables)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(straight.linearized_variables),
                  jax.tree_util.tree_leaves(resumed.linearized_variables)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(straight.network.fx_test,
                                resumed.network.fx_test)
  np.testing.assert_array_equal(straight.distance_train,
                                resumed.distance_train)


def test_progress_goes_to_stderr(data, capsys):
  x, y, _, _ = data
  model = mlp(4)
  variables = model.init(jax.random.PRNGKey(6), x)
  ft.train.fit(model.apply, variables, optax.sgd(0.1), x, y, steps=4,
               record_steps=2, linearized=False, progress=True)
  err = capsys.readouterr().err
  assert "step 2/4" in err and "step 4/4" in err and "network loss" in err


def test_argument_errors(data):
  x, y, _, _ = data
  model = mlp(4)
  variables = model.init(jax.random.PRNGKey(7), x)
  fit = lambda **kw: ft.train.fit(model.apply, variables, optax.sgd(0.1), x,
                                  y, **kw)
  with pytest.raises(ValueError, match="loss"):
    fit(steps=2, loss="hinge")
  with pytest.raises(ValueError, match="batch_size"):
    fit(steps=2, batch_size=100)
  with pytest.raises(ValueError, match="outside"):
    fit(steps=2, record_steps=[5])
