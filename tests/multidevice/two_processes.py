"""One of two processes computing a kernel together under jax.distributed.

Usage: python two_processes.py COORDINATOR_ADDRESS RANK CHECKPOINT_DIR

Each process has 2 simulated CPU devices, so the default mesh spans 4
devices over 2 processes. Run by tests/test_batching.py; both processes
print `OK process <rank> of 2` when every check passes.
"""

import sys

import distributed_cpu

distributed_cpu.initialize()

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flax_tangents as ft  # noqa: E402


def rbf(x1, x2=None, get=None):
  x2 = x1 if x2 is None else x2
  return jnp.exp(-((x1[:, None] - x2[None]) ** 2).sum(-1))


def main():
  assert jax.process_count() == 2 and jax.device_count() == 4
  rank, directory = jax.process_index(), sys.argv[3]
  x = np.random.RandomState(0).randn(13, 3)
  want = np.asarray(rbf(x))

  # Host results: every process gets the whole kernel; tiles checkpointed
  # to a directory both processes share.
  reports = []
  got = ft.batch(rbf, 3, store_on_device=False, checkpoint_dir=directory,
                 progress=lambda d, t: reports.append((d, t)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert reports[0][0] == 0, reports
  # Rerun: every tile comes from the checkpoint.
  reports.clear()
  again = ft.batch(rbf, 3, store_on_device=False, checkpoint_dir=directory,
                   progress=lambda d, t: reports.append((d, t)))(x)
  np.testing.assert_array_equal(again, got)
  assert reports == [(reports[0][1], reports[0][1])], reports

  # Device results: a global array spread over both processes' devices.
  kernel = ft.batch(rbf, 3)(x, x[:8])
  assert not kernel.is_fully_addressable
  gathered = multihost_utils.process_allgather(kernel, tiled=True)
  np.testing.assert_allclose(gathered, np.asarray(rbf(x, x[:8])), rtol=1e-12)
  print(f"OK process {rank} of 2", flush=True)


if __name__ == "__main__":
  main()
  jax.distributed.shutdown()
