"""Runs a script of `tests/multidevice/` as two `jax.distributed` processes."""

import os
import socket
import subprocess
import sys

MULTIDEVICE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "multidevice")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(script: str, *args: str, timeout: float) -> list[str]:
  """Starts `script address rank *args` for ranks 0 and 1, waits for both.

  Args:
    script: a file name in `tests/multidevice/`; it sets its own XLA_FLAGS.
    *args: further command-line arguments, the same for both processes.
    timeout: seconds to wait for each process.

  Returns:
    The standard output of each process, by rank, once both exited with 0
    (otherwise an `AssertionError` shows the failing process's output).
  """
  address = f"localhost:{_free_port()}"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  tests = os.path.dirname(MULTIDEVICE)
  processes = [subprocess.Popen(
      [sys.executable, os.path.join(MULTIDEVICE, script), address, str(rank),
       *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env, cwd=tests) for rank in (0, 1)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=timeout))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for rank, (process, (out, err)) in enumerate(zip(processes, outputs)):
    assert process.returncode == 0, f"process {rank}:\n{out}\n{err[-5000:]}"
  return [out for out, _ in outputs]
