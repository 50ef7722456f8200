"""One of two processes solving kernel regression together (jax.distributed).

Usage: python two_process_solvers.py COORDINATOR_ADDRESS RANK CHECKPOINT_DIR

Each process has 2 simulated CPU devices: the default mesh spans 4 devices
over 2 processes. Run by tests/test_predict_scale.py; both processes print
`OK <check> process <rank>` for each check:

- sharded: a train kernel from ft.batch, a global jax.Array sharded by rows
  over both processes (neither holds it whole), solved by CG for
  gp_inference and gradient_descent_mse; agrees to 1e-8 with a dense
  float64 solve of the same kernel, means and covariances (with global
  test kernels, gathered by the covariance: they are small), the reference
  kernel gathered for the check only (the
  kernel computed on one process differs by about 1e-9, as the ReLU
  kernel's arccos amplifies rounding near equal inputs);
- streamed: the same kernel from ft.batch checkpoint tiles in a directory
  both processes share, each process reading its own devices' tiles.
"""

import sys

import distributed_cpu

distributed_cpu.initialize()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
import numpy as np  # noqa: E402

import flax_tangents as ft  # noqa: E402
from flax_tangents import nn as ftn  # noqa: E402

KERNEL_FN = ft.kernel_fn(nn.Sequential([ftn.Dense(16, W_std=1.5, b_std=0.1),
                                        ftn.Relu(), ftn.Dense(1)]))
REG = 1e-3
RNG = np.random.RandomState(0)  # The same data on both processes.
X, X_TEST = RNG.randn(36, 5), RNG.randn(5, 5)
Y = RNG.randn(36, 3)


def relative(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def reference(kernel):
  """Dense float64 solves of the kernel, gathered on every process."""
  k = multihost_utils.process_allgather(kernel, tiled=True)
  k_td = np.asarray(KERNEL_FN(X_TEST, X, "ntk"))
  mean = ft.predict.gp_inference(k, Y, REG, solver="dense")("ntk", k_td)
  gd = ft.predict.gradient_descent_mse(k, Y, diag_reg=REG, solver="dense")(
      None, None, np.zeros((5, 3)), k_td)
  return k_td, np.asarray(mean), np.asarray(gd)


def solve_and_compare(k_train, k_td, want_mean, want_gd, solver):
  cg = ft.predict.gp_inference(k_train, Y, REG, solver=solver)
  assert relative(cg("ntk", k_td), want_mean) < 1e-8
  info = cg.solve_info["ntk"]
  assert info.method == "cg" and info.residual <= info.tol, info
  gd = ft.predict.gradient_descent_mse(k_train, Y, diag_reg=REG,
                                       solver=solver)
  assert relative(gd(None, None, np.zeros((5, 3)), k_td), want_gd) < 1e-8


def main():
  assert jax.process_count() == 2 and jax.device_count() == 4
  rank, directory = jax.process_index(), sys.argv[3]
  kernel = ft.batch(KERNEL_FN, 6)(X, None, "ntk")
  assert not kernel.is_fully_addressable  # Spread over both processes.
  assert {s.data.shape for s in kernel.addressable_shards} == {(9, 36)}
  k_td, want_mean, want_gd = reference(kernel)
  solve_and_compare(kernel, k_td, want_mean, want_gd,
                    ft.predict.CG(rank=10))
  # Covariances with global test kernels (gathered: they are small).
  test_train = ft.batch(KERNEL_FN, 6)(X_TEST[:4], X, ("nngp", "ntk"))
  test_test = ft.batch(KERNEL_FN, 6)(X_TEST[:4], None, "nngp")
  assert not test_train.ntk.is_fully_addressable
  train = ft.batch(KERNEL_FN, 6)(X, None, ("nngp", "ntk"))
  gathered = [multihost_utils.process_allgather(k, tiled=True)
              for k in (*train, *test_train, test_test)]
  want = ft.predict.gp_inference(type(train)(*gathered[:2]), Y, REG,
                                 solver="dense")(
                                     "ntk", type(train)(*gathered[2:4]),
                                     gathered[4])
  got = ft.predict.gp_inference(train, Y, REG, solver=ft.predict.CG(
      rank=10))("ntk", test_train, test_test)
  assert relative(got.mean, want.mean) < 1e-8
  assert relative(got.covariance, want.covariance) < 1e-8
  print(f"OK sharded process {rank}", flush=True)

  ft.batch(KERNEL_FN, 6, store_on_device=False,
           checkpoint_dir=directory)(X, None, "ntk")
  tiled = ft.predict.TiledKernel(directory)
  solve_and_compare(tiled, k_td, want_mean, want_gd,
                    ft.predict.CG(rank=10, state_dir=""))
  print(f"OK streamed process {rank}", flush=True)


if __name__ == "__main__":
  main()
  jax.distributed.shutdown()
