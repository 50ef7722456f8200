"""Checks of ft.batch, ft.monte_carlo_kernel_fn and ft.checkpoint on 8
simulated CPU devices. Run by tests/test_batching.py in a subprocess (the
device count must be set before JAX is imported).

Usage: python eight_devices.py checks
       python eight_devices.py crash CHECKPOINT_DIR N_TILES
       python eight_devices.py resume CHECKPOINT_DIR

`checks` runs every equality check and prints `OK <name>` for each; `crash`
starts a checkpointed kernel and kills its own process (SIGKILL, no
cleanup) once N_TILES tiles are done; `resume` finishes it and compares
with an uninterrupted computation.
"""

import os
import signal
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import flax_tangents as ft  # noqa: E402
from flax_tangents import nn as ftn  # noqa: E402

RNG = np.random.RandomState(0)
X1 = RNG.randn(13, 5)
X2 = RNG.randn(6, 5)
IMAGES = RNG.randn(9, 4, 3, 2)


def rbf(x1, x2=None, get=None):
  x2 = x1 if x2 is None else x2
  return jnp.exp(-((x1[:, None] - x2[None]) ** 2).sum(-1))


def image_kernel(x1, x2=None, get=None):
  kernel = ft.Kernel.from_inputs(x1, x2, diagonal_spatial=False)
  return kernel if get is None else getattr(kernel, get)


def close(a, b, rtol=1e-10, atol=1e-12):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def check(name, fn):
  start = time.perf_counter()
  fn()
  print(f"OK {name} {time.perf_counter() - start:.1f}s", flush=True)


def checks():
  assert jax.device_count() == 8
  mesh = Mesh(np.asarray(jax.devices()), ("tiles",))

  def arrays():
    for store in (True, False):
      batched = ft.batch(rbf, 4, store_on_device=store)
      close(batched(X1), rbf(X1))
      close(batched(X1, X2), rbf(X1, X2))
      result = batched(X1[:8], X2)
      if store:  # 8 rows on 8 devices: one row each.
        assert result.sharding.spec == P("tiles"), result.sharding
      else:
        assert isinstance(result, np.ndarray)

  def kernels():
    for store in (True, False):
      batched = ft.batch(image_kernel, 2, store_on_device=store)
      for x2 in (None, IMAGES[:5]):
        got, want = batched(IMAGES, x2), image_kernel(IMAGES, x2)
        close(got, want)
        assert got.shape1 == want.shape1 and got.shape2 == want.shape2
        assert got.x1_is_x2 == want.x1_is_x2
        assert (got.cov2 is None) == (want.cov2 is None)
      close(batched(IMAGES, None, "nngp"), image_kernel(IMAGES, None, "nngp"))

  def analytic():
    model = nn.Sequential([ftn.Dense(32, W_std=1.5, b_std=0.1), ftn.Relu(),
                           ftn.Dense(1)])
    kernel_fn = ft.kernel_fn(model)
    exact = jax.jit(kernel_fn, static_argnames="get")
    batched = ft.batch(kernel_fn, 3)
    close(batched(X1, None, ("nngp", "ntk")), exact(X1, None, ("nngp", "ntk")))
    close(batched(X1, X2), exact(X1, X2))
    # NT's calls: batch_size=0 splits the rows of x1 over the 8 devices;
    # device_count=2 uses two of them.
    close(ft.batch(kernel_fn)(X1, X2), exact(X1, X2))
    close(ft.batch(kernel_fn, 3, device_count=2)(X1, X2), exact(X1, X2))

  def empirical():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    params = model.init(jax.random.PRNGKey(0), X1)
    full = ft.empirical_kernel_fn(model.apply, trace_axes=())
    close(ft.batch(full, 4)(X1, None, None, params), full(X1, None, None, params),
          rtol=1e-5, atol=1e-6)
    traced = ft.empirical_kernel_fn(model.apply)
    close(ft.batch(traced, 4)(X1, X2, "ntk", params),
          traced(X1, X2, "ntk", params), rtol=1e-5, atol=1e-6)

  def monte_carlo():
    model = nn.Sequential([ftn.Dense(64), ftn.Relu(), ftn.Dense(2)])
    key = jax.random.PRNGKey(1)
    parallel = ft.monte_carlo_kernel_fn(model, key, 11, mesh=mesh)
    tiled = ft.monte_carlo_kernel_fn(model, key, 11, batch_size=4)
    reference = ft.monte_carlo_kernel_fn(model, key, 11)
    want = jax.jit(lambda x: reference(x, None, "ntk"))(X1)  # scanned
    close(parallel(X1, None, "ntk"), want, rtol=1e-5, atol=1e-6)
    close(tiled(X1, None, "ntk"), want, rtol=1e-5, atol=1e-6)

  def checkpoint_onto_other_mesh():
    import tempfile
    kernel = ft.batch(image_kernel, 3)(IMAGES[:8])
    path = os.path.join(tempfile.mkdtemp(), "kernel")
    ft.checkpoint.save_kernel(path, kernel)
    two = Mesh(np.asarray(jax.devices()[:2]), ("data",))
    restored = ft.checkpoint.restore_kernel(path, NamedSharding(two, P("data")))
    assert restored.nngp.sharding.mesh.devices.size == 2
    assert restored.nngp.sharding.spec == P("data")
    close(restored, kernel)
    assert restored.shape1 == kernel.shape1

  check("arrays", arrays)
  check("kernels", kernels)
  check("analytic", analytic)
  check("empirical", empirical)
  check("monte_carlo", monte_carlo)
  check("checkpoint_onto_other_mesh", checkpoint_onto_other_mesh)


def crash(directory, n_tiles):
  def kill_after(done, total):
    if done >= n_tiles:
      os.kill(os.getpid(), signal.SIGKILL)  # A hard crash: no cleanup.
  ft.batch(rbf, 2, checkpoint_dir=directory, progress=kill_after)(X1)


def resume(directory):
  reports = []
  kernel = ft.batch(rbf, 2, checkpoint_dir=directory,
                    progress=lambda done, total: reports.append((done, total)))(X1)
  uninterrupted = ft.batch(rbf, 2)(X1)
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(uninterrupted))
  restored, total = reports[0]
  assert 0 < restored < total, reports
  print("OK resume", restored, total, flush=True)


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "checks":
    checks()
  elif mode == "crash":
    crash(sys.argv[2], int(sys.argv[3]))
  elif mode == "resume":
    resume(sys.argv[2])
