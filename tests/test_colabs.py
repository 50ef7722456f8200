"""Every notebook in colabs/ runs top to bottom at its small default size.

Each notebook is executed in a fresh Jupyter kernel with nbclient; a cell
that raises fails the test and names the cell. Run time is printed (`-s`):
wall time, and the CPU time of the kernel process (user + system), which
other load on the machine changes far less; colabs/README.md reports both.
"""

import glob
import os
import resource
import time

import pytest

nbclient = pytest.importorskip("nbclient", reason="the `test` extra")
nbformat = pytest.importorskip("nbformat", reason="the `test` extra")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The kernel imports the checkout's flax_tangents even when not installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p]))
  notebook = nbformat.read(path, as_version=4)
  # Cells run in a scratch directory: checkpoints and files they write go
  # there, not into the repository.
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  cpu_before = _children_cpu_seconds()
  start = time.perf_counter()
  client.execute()  # Shuts the kernel down: its CPU time is then counted.
  wall = time.perf_counter() - start
  print(f"{os.path.basename(path)}: {wall:.1f} s wall, "
        f"{_children_cpu_seconds() - cpu_before:.1f} s CPU (kernel)")


def _children_cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def test_every_notebook_states_what_it_shows():
  for path in NOTEBOOKS:
    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and "What this shows" in first.source, (
        path)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code[0].source.startswith("FULL = False"), path
