"""Tests of ft.checkpoint (restoring onto another mesh: test_batching.py,
8 devices)."""

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn


def test_kernel_round_trip_keeps_static_fields(tmp_path):
  x1, x2 = np.ones((3, 4, 2)), np.arange(16.).reshape(2, 4, 2)
  kernel = ft.Kernel.from_inputs(x1, x2, diagonal_spatial=True)
  kernel = kernel.replace(is_gaussian=True)
  ft.checkpoint.save_kernel(tmp_path / "k", kernel)
  restored = ft.checkpoint.restore_kernel(tmp_path / "k")
  for field in ("x1_is_x2", "is_gaussian", "is_reversed", "is_input",
                "diagonal_batch", "diagonal_spatial", "shape1", "shape2",
                "batch_axis", "channel_axis"):
    assert getattr(restored, field) == getattr(kernel, field), field
  for field in ("nngp", "ntk", "cov1", "cov2", "mask1", "mask2"):
    a, b = getattr(restored, field), getattr(kernel, field)
    assert (a is None) == (b is None), field
    if a is not None:
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype


def test_analytic_kernel_round_trip(tmp_path):
  model = nn.Sequential([ftn.Dense(8), ftn.Relu(), ftn.Dense(1)])
  kernel = ft.kernel_fn(model)(np.ones((3, 2)))
  ft.checkpoint.save_kernel(tmp_path / "k", kernel)
  restored = ft.checkpoint.restore_kernel(
      tmp_path / "k", NamedSharding(Mesh(np.asarray(jax.devices()), ("d",)),
                                    P()))
  np.testing.assert_array_equal(restored.ntk, kernel.ntk)
  assert restored.cov2 is None and restored.x1_is_x2


def test_train_state_round_trip_into_target(tmp_path):
  model = nn.Dense(3)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adam(1e-3))
  state = state.replace(step=7)
  ft.checkpoint.save(tmp_path / "state", state)
  fresh = train_state.TrainState.create(
      apply_fn=model.apply,
      params=jax.tree.map(jnp.zeros_like, params), tx=optax.adam(1e-3))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), fresh)
  restored = ft.checkpoint.restore(tmp_path / "state", abstract)
  assert isinstance(restored, train_state.TrainState)
  assert int(restored.step) == 7
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state,
               state.opt_state)


def test_restore_without_target_and_overwrite(tmp_path):
  tree = {"params": {"w": jnp.arange(6.).reshape(2, 3)}, "step": 1}
  ft.checkpoint.save(tmp_path / "v", tree)
  with pytest.raises(ValueError):
    ft.checkpoint.save(tmp_path / "v", tree)
  ft.checkpoint.save(tmp_path / "v", dict(tree, step=2), force=True)
  restored = ft.checkpoint.restore(tmp_path / "v")
  np.testing.assert_array_equal(restored["params"]["w"], tree["params"]["w"])
  assert int(restored["step"]) == 2


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    ft.checkpoint.restore(tmp_path / "missing")
  with pytest.raises(FileNotFoundError):
    ft.checkpoint.restore_kernel(tmp_path / "missing")
  with pytest.raises(TypeError, match="ft.Kernel"):
    ft.checkpoint.save_kernel(tmp_path / "k", {"nngp": jnp.ones(2)})
  ft.checkpoint.save(tmp_path / "tree", {"a": jnp.ones(2)})
  with pytest.raises(Exception):
    ft.checkpoint.restore_kernel(tmp_path / "tree")
