"""Tests of ft.batch: tiling, stitching, checkpointed resume, multi-device.

Checks on 8 simulated devices and with two processes run in subprocesses
(scripts in tests/multidevice/), since the device count is fixed when JAX
is imported.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents.batching import CheckpointMismatchError
from multiprocess import run_two_processes

HERE = os.path.dirname(os.path.abspath(__file__))
RNG = np.random.RandomState(0)
X1 = RNG.randn(11, 3)
X2 = RNG.randn(7, 3)
IMAGES = RNG.randn(7, 4, 3, 2)


def rbf(x1, x2=None, get=None):
  x2 = x1 if x2 is None else x2
  return jnp.exp(-((x1[:, None] - x2[None]) ** 2).sum(-1))


def input_kernel(diagonal_spatial):
  def kernel_fn(x1, x2=None, get=None):
    kernel = ft.Kernel.from_inputs(x1, x2, diagonal_spatial=diagonal_spatial)
    if diagonal_spatial:  # Make the spatial axes distinguishable.
      scale = (1. + jnp.arange(3.)).reshape(1, 1, 1, 3)
      kernel = kernel.replace(nngp=kernel.nngp * scale)
    return kernel if get is None else getattr(kernel, get)
  return kernel_fn


def assert_close(a, b, rtol=1e-12, atol=1e-14):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


# ----------------------------------------------------------------- tiling


@pytest.mark.parametrize("batch_size", [1, 3, 4, 11, 50])
@pytest.mark.parametrize("store_on_device", [True, False])
def test_arrays_any_sizes(batch_size, store_on_device):
  batched = ft.batch(rbf, batch_size, store_on_device=store_on_device)
  assert_close(batched(X1), rbf(X1))
  assert_close(batched(X1, X2), rbf(X1, X2))
  assert_close(batched(X2, X1), rbf(X2, X1))
  expected_type = jax.Array if store_on_device else np.ndarray
  assert isinstance(batched(X1), expected_type)


@pytest.mark.parametrize("diagonal_spatial", [False, True])
@pytest.mark.parametrize("store_on_device", [True, False])
def test_kernel_outputs(diagonal_spatial, store_on_device):
  kernel_fn = input_kernel(diagonal_spatial)
  batched = ft.batch(kernel_fn, 3, store_on_device=store_on_device)
  for x2 in (None, IMAGES[:5]):
    got, want = batched(IMAGES, x2), kernel_fn(IMAGES, x2)
    assert isinstance(got, ft.Kernel)
    assert_close(got, want)
    fields = ("shape1", "shape2", "x1_is_x2", "diagonal_spatial",
              "diagonal_batch", "is_input", "is_gaussian")
    assert [getattr(got, f) for f in fields] == [getattr(want, f)
                                                 for f in fields]
    assert (got.cov2 is None) == (want.cov2 is None)
  # Arrays of an analytic function: the layout comes from its Kernel.
  assert_close(batched(IMAGES, None, "nngp"), kernel_fn(IMAGES, None, "nngp"))
  assert_close(batched(IMAGES, None, "cov1"), kernel_fn(IMAGES, None, "cov1"))


def test_analytic_kernel_fn():
  model = nn.Sequential([ftn.Dense(16, W_std=1.5, b_std=0.1), ftn.Relu(),
                         ftn.Dense(1)])
  kernel_fn = ft.kernel_fn(model)
  exact = jax.jit(kernel_fn, static_argnames="get")
  batched = ft.batch(kernel_fn, 4)
  both = batched(X1, None, ("nngp", "ntk"))
  assert type(both).__name__ == type(kernel_fn(X1, None, ("nngp", "ntk"))
                                    ).__name__
  # On the diagonal the ReLU kernel takes arccos of a correlation of 1 up to
  # rounding, which amplifies rounding to about sqrt(eps): two compiled
  # programs (the tile's and the whole kernel's) agree to ~1e-9 there.
  assert_close(both, exact(X1, None, ("nngp", "ntk")), rtol=1e-8)
  assert_close(batched(X1, X2, get="ntk"), exact(X1, X2, get="ntk"))
  full = batched(X1, X2)
  assert full.shape1[0] == 11 and full.shape2[0] == 7
  assert_close(full, exact(X1, X2))


@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_empirical_kernel_fn_with_params(trace_axes):
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.PRNGKey(0), X1)
  kernel_fn = ft.empirical_kernel_fn(model.apply, trace_axes=trace_axes)
  batched = ft.batch(kernel_fn, 4)
  assert_close(batched(X1, None, None, params),
               kernel_fn(X1, None, None, params), rtol=1e-5, atol=1e-6)
  assert_close(batched(X1, X2, "ntk", params), kernel_fn(X1, X2, "ntk", params),
               rtol=1e-5, atol=1e-6)


def test_symmetric_computes_each_offdiagonal_tile_once():
  reports = []
  ft.batch(rbf, 3, progress=lambda done, total: reports.append(total))(X1)
  n_blocks = 4  # ceil(11 / 3)
  assert reports[-1] == n_blocks * (n_blocks + 1) // 2


def test_pytree_inputs_and_tiled_keyword_pairs():
  def kernel_fn(x1, x2=None, get=None, weights=None):
    x2 = x1 if x2 is None else x2
    k = x1["a"] @ x2["a"].T + x1["b"] @ x2["b"].T
    if weights is not None:
      k = k * weights[0][:, None] * weights[1][None, :]
    return k
  x1 = {"a": X1, "b": X1[:, :2]}
  x2 = {"a": X2, "b": X2[:, :2]}
  weights = (np.arange(11.), np.arange(7.))
  assert_close(ft.batch(kernel_fn, 4)(x1, x2, weights=weights),
               kernel_fn(x1, x2, weights=weights))


def test_compiles_once_per_tile_shape():
  batched = ft.batch(rbf, 4)
  batched(X1, X2)
  programs = batched._programs  # pylint: disable=protected-access
  compiled = len(programs)
  batched(X1 + 1., X2)
  # A new wrapper of the same function (a rerun notebook cell) reuses them.
  again = ft.batch(rbf, 4, checkpoint_dir=None)
  again(X1, X2 - 1.)
  assert again._programs is programs  # pylint: disable=protected-access
  assert len(programs) == compiled


def test_bad_arguments():
  with pytest.raises(ValueError, match="batch_size"):
    ft.batch(rbf, -1)
  with pytest.raises(NotImplementedError, match="inputs"):
    ft.batch(rbf, 2)(ft.Kernel.from_inputs(X1))

  def non_diagonal(x1, x2=None, get=None):
    return ft.Kernel.from_inputs(x1, x2, diagonal_batch=False)
  with pytest.raises(NotImplementedError, match="diagonal_batch"):
    ft.batch(non_diagonal, 2)(X1)


# ------------------------------------------------------------ checkpoints


class _Crash(Exception):
  pass


def _crash_after(n_tiles):
  def progress(done, total):
    if done >= n_tiles:
      raise _Crash()
  return progress


@pytest.mark.parametrize("store_on_device", [True, False])
def test_resume_after_crash_is_identical(tmp_path, store_on_device):
  kernel_fn = input_kernel(False)
  directory = tmp_path / "tiles"
  with pytest.raises(_Crash):
    ft.batch(kernel_fn, 2, checkpoint_dir=directory,
             progress=_crash_after(5))(IMAGES)
  reports = []
  resumed = ft.batch(kernel_fn, 2, checkpoint_dir=directory,
                     store_on_device=store_on_device,
                     progress=lambda d, t: reports.append((d, t)))(IMAGES)
  restored, total = reports[0]
  assert 5 <= restored < total
  uninterrupted = ft.batch(kernel_fn, 2)(IMAGES)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed.shape1 == uninterrupted.shape1
  # A finished directory: nothing left to compute.
  reports.clear()
  ft.batch(kernel_fn, 2, checkpoint_dir=directory,
           progress=lambda d, t: reports.append((d, t)))(IMAGES)
  assert reports == [(total, total)]


def test_unfinished_writes_are_ignored_and_removed(tmp_path):
  directory = tmp_path / "tiles"
  ft.batch(rbf, 4, checkpoint_dir=directory)(X1, X2)
  leftover = directory / "tiles" / "tile_00000000.npz.tmp-123-456"
  leftover.write_bytes(b"PK\x03\x04 interrupted")
  assert_close(ft.batch(rbf, 4, checkpoint_dir=directory)(X1, X2),
               rbf(X1, X2))
  assert not leftover.exists()


def test_refuses_checkpoint_of_another_kernel(tmp_path):
  directory = tmp_path / "tiles"
  ft.batch(rbf, 4, checkpoint_dir=directory)(X1, X2)

  def other(x1, x2=None, get=None):
    return rbf(x1, x2) * 2.

  cases = {
      "x1": lambda: ft.batch(rbf, 4, checkpoint_dir=directory)(X1 + 1., X2),
      "x2": lambda: ft.batch(rbf, 4, checkpoint_dir=directory)(X1),
      "batch_size": lambda: ft.batch(rbf, 3, checkpoint_dir=directory)(X1, X2),
      "get": lambda: ft.batch(rbf, 4, checkpoint_dir=directory)(X1, X2, "ntk"),
      "kernel_fn": lambda: ft.batch(other, 4, checkpoint_dir=directory)(X1,
                                                                        X2),
  }
  for part, run in cases.items():
    with pytest.raises(CheckpointMismatchError, match=part):
      run()


def test_refuses_checkpoint_of_other_params_or_model(tmp_path):
  model = nn.Dense(2)
  kernel_fn = ft.empirical_kernel_fn(model.apply)
  params = model.init(jax.random.PRNGKey(0), X1)
  ft.batch(kernel_fn, 4, checkpoint_dir=tmp_path / "a")(X1, None, "ntk",
                                                         params)
  other = jax.tree.map(lambda p: p + 1., params)
  with pytest.raises(CheckpointMismatchError, match="parameters"):
    ft.batch(kernel_fn, 4, checkpoint_dir=tmp_path / "a")(X1, None, "ntk",
                                                           other)
  wide, narrow = (ft.kernel_fn(nn.Sequential([ftn.Dense(1, W_std=w)]))
                  for w in (1., 2.))
  ft.batch(wide, 4, checkpoint_dir=tmp_path / "b")(X1, None, "nngp")
  with pytest.raises(CheckpointMismatchError, match="kernel_fn"):
    ft.batch(narrow, 4, checkpoint_dir=tmp_path / "b")(X1, None, "nngp")


# ------------------------------------------------ subprocesses: 8 devices


def _python(*args, env=None, timeout=300):
  full_env = dict(os.environ, **(env or {}))
  full_env.pop("XLA_FLAGS", None)  # The scripts set their own.
  return subprocess.run([sys.executable, *args], capture_output=True,
                        text=True, timeout=timeout, env=full_env, cwd=HERE)


def _script(name):
  return os.path.join(HERE, "multidevice", name)


def test_eight_devices():
  result = _python(_script("eight_devices.py"), "checks")
  assert result.returncode == 0, result.stdout + result.stderr[-5000:]
  for name in ("arrays", "kernels", "analytic", "empirical", "monte_carlo",
               "checkpoint_onto_other_mesh"):
    assert f"OK {name}" in result.stdout, result.stdout


def test_eight_devices_killed_and_resumed(tmp_path):
  directory = str(tmp_path / "tiles")
  crashed = _python(_script("eight_devices.py"), "crash", directory, "12")
  assert crashed.returncode == -9, crashed.stderr[-5000:]  # SIGKILL
  resumed = _python(_script("eight_devices.py"), "resume", directory)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-5000:]
  assert "OK resume" in resumed.stdout


def test_two_processes(tmp_path):
  outputs = run_two_processes("two_processes.py", str(tmp_path / "tiles"),
                              timeout=300)
  for rank, out in enumerate(outputs):
    assert f"OK process {rank} of 2" in out, out
