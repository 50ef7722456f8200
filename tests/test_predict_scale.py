"""Iterative solves of ft.predict: CG and Lanczos against the dense path, on
arrays and on kernels streamed from ft.batch tiles (resumable), and their
errors. Sharded kernels on 8 devices: test_predict_scale_devices below runs
tests/multidevice/solvers.py in a subprocess; multi-host:
test_two_processes runs tests/multidevice/two_process_solvers.py twice."""

import collections
import os
import subprocess
import sys

import flax.linen as nn
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from multiprocess import run_two_processes

predict = ft.predict
HERE = os.path.dirname(os.path.abspath(__file__))
NngpNtk = collections.namedtuple("NngpNtk", "nngp ntk")

RNG = np.random.RandomState(0)
X = RNG.randn(45, 4)
X_TEST = RNG.randn(6, 4)
Y = RNG.randn(45, 2)
KERNEL_FN = ft.kernel_fn(nn.Sequential([ftn.Dense(8, W_std=1.5, b_std=0.1),
                                        ftn.Relu(), ftn.Dense(1)]))
REG = 1e-3


@pytest.fixture(scope="module")
def kernels():
  """Train kernels from ft.batch (as users get them), test kernels."""
  both = ("nngp", "ntk")
  train = ft.batch(KERNEL_FN, 16)(X, None, both)
  return (NngpNtk(*map(np.asarray, train)),
          NngpNtk(*map(np.asarray, KERNEL_FN(X_TEST, X, both))),
          NngpNtk(*map(np.asarray, KERNEL_FN(X_TEST, None, both))))


def relative(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_cg_agrees_with_dense_float64(kernels):
  train, test_train, test_test = kernels
  dense = predict.gp_inference(train, Y, REG, solver="dense")
  cg = predict.gp_inference(train, Y, REG, solver="cg")
  gets = ("nngp", "ntk", "ntkgp")
  want, got = dense(gets, test_train, test_test), cg(gets, test_train,
                                                     test_test)
  for g in gets:
    assert relative(getattr(got, g).mean, getattr(want, g).mean) < 1e-8, g
    assert relative(getattr(got, g).covariance,
                    getattr(want, g).covariance) < 1e-8, g
  info = cg.solve_info["ntk"]
  assert info.method == "cg" and 0 < info.iterations < 45
  assert info.residual <= info.tol == 1e-10
  assert info.preconditioner == "nystrom(rank=45)"


@pytest.mark.parametrize("preconditioner", ["nystrom", None])
def test_gradient_descent_mse_iterative_agrees(kernels, preconditioner):
  train, test_train, _ = kernels
  solver = predict.CG(preconditioner=preconditioner, rank=10)
  dense = predict.gradient_descent_mse(train.ntk, Y, 0.5, REG,
                                       solver="dense")
  cg = predict.gradient_descent_mse(train.ntk, Y, 0.5, REG, solver=solver)
  f0, f0_test = 0.1 * np.ones_like(Y), np.zeros((6, 2))
  for t in (None, 3., np.array([[0., 1.], [50., 1e4]])):
    want = dense(t, f0, f0_test, test_train.ntk)
    got = cg(t, f0, f0_test, test_train.ntk)
    for a, b in zip(got, want):
      assert a.shape == b.shape
      assert relative(a, b) < 1e-8, t
  assert cg.solve_info["finite t"].method == "lanczos"
  assert cg.solve_info["t=None"].method == "cg"


def test_float32_agreement_is_stated(kernels):
  """float32 kernels are solved in float32 (tol 1e-5 on the residual): the
  mean is within 1e-4 (relative) of the float64 dense solution here."""
  train, test_train, _ = kernels
  want = predict.gp_inference(train.ntk, Y, REG, solver="dense")(
      "ntk", test_train.ntk)
  cg = predict.gp_inference(train.ntk.astype(np.float32),
                            Y.astype(np.float32), REG, solver="cg")
  got = cg("ntk", test_train.ntk.astype(np.float32))
  assert got.dtype == np.float32
  assert cg.solve_info["ntk"].tol == 1e-5
  assert relative(got, want) < 1e-4


def test_preconditioner_cuts_iterations(kernels):
  train, _, _ = kernels
  counts = {}
  for name, solver in {"none": predict.CG(preconditioner=None),
                       "rank 20": predict.CG(rank=20),
                       "rank 45 (= N)": predict.CG(rank=45)}.items():
    fn = predict.gradient_descent_mse(train.ntk, Y, diag_reg=1e-6,
                                      solver=solver)
    fn(None, 0., np.zeros((1, 2)), train.ntk[:1])
    counts[name] = fn.solve_info["t=None"].iterations
  assert counts["rank 20"] * 2 <= counts["none"], counts
  # At full rank the preconditioned kernel is the identity up to rounding.
  assert counts["rank 45 (= N)"] <= 5, counts


def _tiled(tmp_path, get="ntk"):
  ft.batch(KERNEL_FN, 16, checkpoint_dir=tmp_path)(X, None, ("nngp", "ntk"))
  return predict.TiledKernel(tmp_path, get)


def test_tiled_kernel_streams_and_agrees(tmp_path, kernels):
  train, test_train, _ = kernels
  tiled = _tiled(tmp_path)
  np.testing.assert_array_equal(tiled.to_array(), train.ntk)
  want = predict.gp_inference(train.ntk, Y, REG, solver="dense")(
      "ntk", test_train.ntk)
  streamed = predict.gp_inference(tiled, Y, REG)  # 'auto': CG
  assert relative(streamed("ntk", test_train.ntk), want) < 1e-8
  # Both kernels from one checkpoint, the NTK covariance too.
  both = NngpNtk(predict.TiledKernel(tmp_path, "nngp"), tiled)
  dense = predict.gp_inference(train, Y, REG, solver="dense")
  mean, cov = predict.gp_inference(both, Y, REG)("ntk", test_train,
                                                 kernels[2].nngp)
  want_mean, want_cov = dense("ntk", test_train, kernels[2].nngp)
  assert relative(mean, want_mean) < 1e-8
  assert relative(cov, want_cov) < 1e-8


class _Crash(Exception):
  pass


def test_streamed_solve_resumes_after_a_crash(tmp_path, kernels):
  tiled = _tiled(tmp_path)
  reports = []

  def crash_at_5(iteration, residual):
    reports.append(iteration)
    if iteration == 5:
      raise _Crash()

  crashing = predict.gradient_descent_mse(tiled, Y, diag_reg=REG,
                                          solver=predict.CG(
                                              rank=5, progress=crash_at_5))
  with pytest.raises(_Crash):
    crashing(None, None, np.zeros((6, 2)), kernels[1].ntk)
  fresh = predict.gradient_descent_mse(tiled, Y, diag_reg=REG,
                                       solver=predict.CG(rank=5))
  got = fresh(None, None, np.zeros((6, 2)), kernels[1].ntk)
  info = fresh.solve_info["t=None"]
  assert info.resumed_from == 5 and info.iterations > 5
  want = predict.gradient_descent_mse(kernels[0].ntk, Y, diag_reg=REG,
                                      solver="dense")(
                                          None, None, np.zeros((6, 2)),
                                          kernels[1].ntk)
  assert relative(got, want) < 1e-8


def test_progress_bar(tmp_path, capsys):
  tiled = _tiled(tmp_path)
  predict.gradient_descent_mse(
      tiled, Y, diag_reg=REG,
      solver=predict.CG(progress=True, state_dir=""))(
          None, 0., np.zeros((1, 2)), np.ones((1, 45)))
  err = capsys.readouterr().err
  assert "ft.predict CG t=None: iteration" in err and "tiles" in err


def test_solver_choice_and_errors(tmp_path, kernels):
  train = kernels[0]
  dense = predict.gradient_descent_mse(train.ntk, Y)  # 'auto', small N
  assert not hasattr(dense, "solve_info")
  assert predict.DENSE_MAX_N == 10_000
  with pytest.raises(ValueError, match="solver must be"):
    predict.gp_inference(train.ntk, Y, solver="lu")
  with pytest.raises(ValueError, match=r"\(N, N\) kernel matrix"):
    predict.gradient_descent_mse(np.ones((4, 4, 2, 2)), np.ones((4, 2)),
                                 trace_axes=(), solver="cg")
  tiled = _tiled(tmp_path)
  with pytest.raises(ValueError, match="iteratively"):
    predict.gp_inference(tiled, Y, solver="dense")
  not_psd = -np.eye(45)
  with pytest.raises(predict.NotPSDError, match="not positive definite"):
    predict.gradient_descent_mse(not_psd, Y, solver="cg")(
        None, 0., np.zeros((1, 2)), np.ones((1, 45)))
  with pytest.raises(predict.ConvergenceError, match="maxiter"):
    predict.gradient_descent_mse(
        train.ntk, Y, diag_reg=1e-8,
        solver=predict.CG(maxiter=3, preconditioner=None))(
            None, 0., np.zeros((1, 2)), np.ones((1, 45)))


def test_unfinished_tiles_are_refused(tmp_path):
  class Stop(Exception):
    pass

  def stop(done, total):
    if done >= 2:
      raise Stop()
  with pytest.raises(Stop):
    ft.batch(KERNEL_FN, 16, checkpoint_dir=tmp_path, progress=stop)(
        X, None, "ntk")
  tiled = predict.TiledKernel(tmp_path)
  assert tiled.missing()
  with pytest.raises(ValueError, match="unfinished.*Rerun the ft.batch"):
    predict.gradient_descent_mse(tiled, Y)


def test_eight_devices():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # The script sets its own.
  result = subprocess.run(
      [sys.executable, os.path.join(HERE, "multidevice", "solvers.py")],
      capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
  assert result.returncode == 0, result.stdout + result.stderr[-5000:]
  for name in ("sharded", "ragged", "streamed", "never_gathered",
               "finite_t"):
    assert f"OK {name}" in result.stdout, result.stdout


def test_two_processes(tmp_path):
  """Multi-host: sharded and streamed solves under jax.distributed."""
  outputs = run_two_processes("two_process_solvers.py", str(tmp_path / "tiles"),
                              timeout=600)
  for rank, out in enumerate(outputs):
    for name in ("sharded", "streamed"):
      assert f"OK {name} process {rank}" in out, out
