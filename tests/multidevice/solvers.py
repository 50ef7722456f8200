"""Iterative ft.predict solves on 8 simulated CPU devices. Run by
tests/test_predict_scale.py in a subprocess (the device count must be set
before JAX is imported). Prints `OK <name>` for each check.

- sharded: a kernel from ft.batch, sharded by rows over the 8 devices,
  solved by CG (gp_inference means and covariances, gradient_descent_mse)
  agrees with the dense solve to 1e-8 (float64);
- never_gathered: the compiled product keeps the kernel's row sharding (no
  all-gather of a kernel-sized operand), and the iterates' memory per
  device is a fraction of the kernel's;
- ragged: 61 training points (not divisible by 8): ft.batch returns a
  replicated kernel, which the solver splits by rows on the devices;
- streamed: the same from ft.batch checkpoint tiles, one tile per device
  per round;
- finite_t: Lanczos on the sharded kernel.
"""

import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import flax_tangents as ft  # noqa: E402
from flax_tangents import nn as ftn  # noqa: E402
from flax_tangents._src.predict import operators  # noqa: E402

RNG = np.random.RandomState(0)
KERNEL_FN = ft.kernel_fn(nn.Sequential([ftn.Dense(16, W_std=1.5, b_std=0.1),
                                        ftn.Relu(), ftn.Dense(1)]))
REG = 1e-3


def relative(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def check(name, fn):
  start = time.perf_counter()
  fn()
  print(f"OK {name} {time.perf_counter() - start:.1f}s", flush=True)


def problem(n):
  x, x_test = RNG.randn(n, 5), RNG.randn(7, 5)
  y = RNG.randn(n, 3)
  train = ft.batch(KERNEL_FN, 8)(x, None, ("nngp", "ntk"))
  test_train = KERNEL_FN(x_test, x, ("nngp", "ntk"))
  test_test = KERNEL_FN(x_test, None, ("nngp", "ntk"))
  return train, test_train, test_test, y


def agree(train, test_train, test_test, y, n_devices_expected):
  assert len(train.ntk.sharding.device_set) == n_devices_expected
  dense_train = type(train)(*(np.asarray(k) for k in train))
  gets = ("nngp", "ntk", "ntkgp")
  want = ft.predict.gp_inference(dense_train, y, REG, solver="dense")(
      gets, test_train, test_test)
  cg = ft.predict.gp_inference(train, y, REG, solver="cg")
  got = cg(gets, test_train, test_test)
  for g in gets:
    for field in ("mean", "covariance"):
      error = relative(getattr(getattr(got, g), field),
                       getattr(getattr(want, g), field))
      assert error < 1e-8, (g, field, error)
  assert cg.solve_info["ntk"].residual <= 1e-10
  gd = ft.predict.gradient_descent_mse(train.ntk, y, diag_reg=REG,
                                       solver="cg")
  want_gd = ft.predict.gradient_descent_mse(dense_train.ntk, y, diag_reg=REG,
                                            solver="dense")
  f0_test = np.zeros((7, 3))
  assert relative(gd(None, None, f0_test, test_train.ntk),
                  want_gd(None, None, f0_test, test_train.ntk)) < 1e-8


def sharded():
  train, test_train, test_test, y = problem(64)
  assert train.ntk.sharding.spec == P("tiles"), train.ntk.sharding
  agree(train, test_train, test_test, y, 8)


def never_gathered():
  train, _, _, _ = problem(64)
  op = operators.ArrayOperator(train.ntk)
  v = np.ones((64, 3))
  hlo = operators._matmul.lower(op.kernel, v, 64).compile().as_text()  # pylint: disable=protected-access
  for line in hlo.splitlines():
    if "all-gather" in line:
      # Only vectors may be gathered, never a kernel-sized (64 x 64) block.
      assert not re.search(r"f64\[64,64\]", line), line
  assert op.kernel.sharding.spec == P("tiles")
  shard_shapes = {s.data.shape for s in op.kernel.addressable_shards}
  assert shard_shapes == {(8, 64)}, shard_shapes


def ragged():
  train, test_train, test_test, y = problem(61)
  assert train.ntk.sharding.spec == P(), train.ntk.sharding  # replicated
  op = operators.ArrayOperator(train.ntk)
  assert op.kernel.shape == (64, 61)  # split by rows, padded to 8 x 8
  assert {s.data.shape for s in op.kernel.addressable_shards} == {(8, 61)}
  agree(train, test_train, test_test, y, 8)


def streamed():
  x, x_test = RNG.randn(61, 5), RNG.randn(7, 5)
  y = RNG.randn(61, 3)
  directory = tempfile.mkdtemp()
  ft.batch(KERNEL_FN, 8, checkpoint_dir=directory)(x, None, "ntk")
  tiled = ft.predict.TiledKernel(directory)
  dense = np.asarray(ft.batch(KERNEL_FN, 8)(x, None, "ntk"))
  k_td = KERNEL_FN(x_test, x, "ntk")
  want = ft.predict.gp_inference(dense, y, REG, solver="dense")("ntk", k_td)
  solver = ft.predict.CG(state_dir="", rank=20)
  got = ft.predict.gp_inference(tiled, y, REG, solver=solver)("ntk", k_td)
  assert relative(got, want) < 1e-8
  op = operators.TiledOperator(tiled)
  assert op.mesh.size == 8 and len(op._rounds) == 5  # 36 tiles, 8 a round  # pylint: disable=protected-access


def finite_t():
  train, test_train, _, y = problem(64)
  ts = np.array([0.5, 20., 1e3])
  gd = ft.predict.gradient_descent_mse(train.ntk, y, 0.3, REG, solver="cg")
  want = ft.predict.gradient_descent_mse(np.asarray(train.ntk), y, 0.3, REG,
                                         solver="dense")
  f0, f0_test = np.zeros_like(y), np.zeros((7, 3))
  for a, b in zip(gd(ts, f0, f0_test, test_train.ntk),
                  want(ts, f0, f0_test, test_train.ntk)):
    assert relative(a, b) < 1e-8
  assert gd.solve_info["finite t"].method == "lanczos"


if __name__ == "__main__":
  assert jax.device_count() == 8
  check("sharded", sharded)
  check("never_gathered", never_gathered)
  check("ragged", ragged)
  check("streamed", streamed)
  check("finite_t", finite_t)
  sys.exit(0)
