"""Every notebook in colabs/ runs top to bottom at its small default size.

Each notebook is executed in a fresh Jupyter kernel with nbclient; a cell
that raises fails the test and names the cell. Run time is printed (`-s`)
and is what the README and colabs/README.md report.
"""

import glob
import os
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
  start = time.perf_counter()
  client.execute()
  print(f"{os.path.basename(path)}: {time.perf_counter() - start:.1f} s")


def test_every_notebook_states_what_it_shows():
  for path in NOTEBOOKS:
    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and "What this shows" in first.source, (
        path)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code[0].source.startswith("FULL = False"), path
