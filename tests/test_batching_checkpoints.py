"""Checkpoints of ft.batch when things go wrong: reruns in one process,
damaged tile files, read-only directories, two computations on one
directory, a full disk. (Resume after a crash, refusals of another kernel,
8 devices and two processes: test_batching.py.)"""

import errno
import os
import subprocess
import sys
import threading

import flax.linen as nn
import jax
import numpy as np
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents._src.scale import tile_files
from flax_tangents.batching import CheckpointInUseError
from flax_tangents.batching import CheckpointMismatchError
from flax_tangents.batching import CheckpointWriteError

X = np.random.RandomState(0).randn(10, 3)
N_TILES = 10  # x2=None, 4 row blocks of 3: 4 diagonal + 6 off-diagonal tiles


def model_kernel_fn(w_std=1.5):
  return ft.kernel_fn(nn.Sequential([ftn.Dense(8, W_std=w_std, b_std=0.1),
                                     ftn.Relu(), ftn.Dense(1)]))


class _Stop(Exception):
  pass


def _stop_after(n_tiles):
  def progress(done, total):
    if done >= n_tiles:
      raise _Stop()
  return progress


def _run(kernel_fn, directory, reports=None, progress=None):
  if reports is not None:
    progress = lambda done, total: reports.append((done, total))
  return ft.batch(kernel_fn, 3, checkpoint_dir=directory,
                  progress=progress)(X, None, "ntk")


def _tiles_dir(directory):
  return os.path.join(directory, "tiles")


@pytest.fixture(scope="module")
def expected():
  return np.asarray(ft.batch(model_kernel_fn(), 3)(X, None, "ntk"))


def test_rerun_of_the_same_kernel_fn_in_one_process(tmp_path, expected):
  """A notebook cell rerun after an interrupt: the kernel function has been
  called since (its caches hold entries), and it is accepted."""
  kernel_fn = model_kernel_fn()
  with pytest.raises(_Stop):
    _run(kernel_fn, tmp_path, progress=_stop_after(3))
  kernel_fn(X[:2], X[:5], "nngp")  # any use in between
  reports = []
  np.testing.assert_array_equal(_run(kernel_fn, tmp_path, reports), expected)
  assert 3 <= reports[0][0] < N_TILES
  # The same model built again (a new process would) is the same
  # computation; another configuration is not.
  reports.clear()
  np.testing.assert_array_equal(_run(model_kernel_fn(), tmp_path, reports),
                                expected)
  assert reports == [(N_TILES, N_TILES)]
  with pytest.raises(CheckpointMismatchError, match="what it computes"):
    _run(model_kernel_fn(w_std=2.), tmp_path)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(path):
  with open(path, "r+b") as f:
    f.seek(int(os.path.getsize(path) * 0.6))  # inside the tile's values
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes])
def test_damaged_tile_file_is_named_and_recomputed(tmp_path, expected,
                                                   damage):
  _run(model_kernel_fn(), tmp_path)
  path = tile_files.tile_path(_tiles_dir(tmp_path), 5)
  damage(path)
  reports = []
  with pytest.warns(RuntimeWarning, match=r"tile_00000005\.npz.*damaged"):
    result = _run(model_kernel_fn(), tmp_path, reports)
  np.testing.assert_array_equal(result, expected)
  assert reports[0] == (N_TILES - 1, N_TILES)  # only that tile recomputed
  assert os.path.exists(path + ".damaged")
  tile_files.read_tile(path, 5)  # rewritten whole


def _make_read_only(monkeypatch, directory):
  """A read-only directory: by permissions, or (as root, whom permissions
  do not stop) by making every attempt to write fail as it would."""
  if os.geteuid() != 0:
    for path in (directory, _tiles_dir(directory)):
      os.chmod(path, 0o555)
    return lambda: [os.chmod(p, 0o755)
                    for p in (directory, _tiles_dir(directory))]

  def refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", str(directory))
  monkeypatch.setattr(tile_files, "probe_writable", refuse)
  monkeypatch.setattr(tile_files, "write_tile", refuse)
  return monkeypatch.undo


def test_read_only_directory_fails_before_computing(tmp_path, monkeypatch,
                                                    expected):
  with pytest.raises(_Stop):
    _run(model_kernel_fn(), tmp_path, progress=_stop_after(4))
  before = sorted(os.listdir(_tiles_dir(tmp_path)))
  restore = _make_read_only(monkeypatch, tmp_path)
  reports = []
  try:
    with pytest.raises(CheckpointWriteError, match="not writable"):
      _run(model_kernel_fn(), tmp_path, reports)
    assert reports == []  # refused before any tile was computed
    assert sorted(os.listdir(_tiles_dir(tmp_path))) == before
  finally:
    restore()
  # Made writable again it resumes; finished, it reads even when read-only.
  np.testing.assert_array_equal(_run(model_kernel_fn(), tmp_path), expected)
  restore = _make_read_only(monkeypatch, tmp_path)
  try:
    np.testing.assert_array_equal(_run(model_kernel_fn(), tmp_path),
                                  expected)
  finally:
    restore()


def test_second_computation_on_a_directory_in_use_is_refused(tmp_path,
                                                             expected):
  started, release = threading.Event(), threading.Event()
  results = {}

  def hold(done, total):
    started.set()
    release.wait(60)

  def first():
    results["first"] = _run(model_kernel_fn(), tmp_path, progress=hold)

  thread = threading.Thread(target=first)
  thread.start()
  try:
    assert started.wait(120)
    with pytest.raises(CheckpointInUseError, match="in use.*process"):
      _run(model_kernel_fn(), tmp_path)
  finally:
    release.set()
    thread.join(120)
  np.testing.assert_array_equal(results["first"], expected)
  # Released once the first finished.
  np.testing.assert_array_equal(_run(model_kernel_fn(), tmp_path), expected)


_HOLDER = """
import fcntl, os, sys
f = open(os.path.join(sys.argv[1], "lock"), "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
f.truncate(0); f.write("process %d on host other" % os.getpid()); f.flush()
print("locked", flush=True)
sys.stdin.read()  # holds the lock until its stdin closes
"""


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_directory_locked_by_another_process_is_refused(tmp_path, expected):
  # A second OS process (not a thread) holds the directory's lock, as a
  # run started from another terminal would.
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(CheckpointInUseError,
                       match=rf"in use .*process {holder.pid} on host other"):
      _run(model_kernel_fn(), tmp_path)
  finally:
    holder.stdin.close()
    holder.wait(60)
  np.testing.assert_array_equal(_run(model_kernel_fn(), tmp_path), expected)


def test_full_disk_gives_clear_error_and_resumes(tmp_path, monkeypatch,
                                                 expected):
  written = []
  real_save = tile_files._save  # pylint: disable=protected-access

  def fill_up(file, arrays):
    if len(written) == 3:  # the 4th tile: part written, then no space
      file.write(b"PK\x03\x04partial")
      raise OSError(errno.ENOSPC, "No space left on device")
    written.append(1)
    real_save(file, arrays)

  monkeypatch.setattr(tile_files, "_save", fill_up)
  with pytest.raises(CheckpointWriteError, match="No space left") as info:
    _run(model_kernel_fn(), tmp_path)
  assert "resumes" in str(info.value) and "3 tiles" in str(info.value)
  assert info.value.errno == errno.ENOSPC
  monkeypatch.undo()
  leftovers = [n for n in os.listdir(_tiles_dir(tmp_path))
               if not n.endswith(".npz")]
  assert leftovers == []
  reports = []
  np.testing.assert_array_equal(_run(model_kernel_fn(), tmp_path, reports),
                                expected)
  assert reports[0] == (3, N_TILES)


def test_empirical_kernel_fn_rerun(tmp_path):
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.PRNGKey(0), X)
  kernel_fn = ft.empirical_kernel_fn(model.apply)
  first = ft.batch(kernel_fn, 3, checkpoint_dir=tmp_path)(X, None, "ntk",
                                                          params)
  kernel_fn(X, None, "ntk", params)
  reports = []
  again = ft.batch(ft.empirical_kernel_fn(model.apply), 3,
                   checkpoint_dir=tmp_path,
                   progress=lambda d, t: reports.append((d, t)))(
                       X, None, "ntk", params)
  np.testing.assert_array_equal(again, first)
  assert reports == [(N_TILES, N_TILES)]
