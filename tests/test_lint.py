"""The style holds: `ruff check` (pyproject's [tool.ruff]) is clean."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
  run = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "flax_tangents", "tests"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
