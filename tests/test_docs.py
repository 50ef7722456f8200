"""The reference site builds with warnings as errors and lists every name.

A docstring that Sphinx cannot parse (a broken section, an unclosed
backtick, a duplicate entry) fails this test, as it would fail the build.
"""

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))

pytest.importorskip("sphinx", reason="docs dependencies (the `test` extra)")
pytest.importorskip("myst_nb", reason="docs dependencies (the `test` extra)")


def _api_modules():
  sys.path.insert(0, os.path.join(ROOT, "docs"))
  try:
    conf = importlib.import_module("conf")
  finally:
    sys.path.pop(0)
  return [m for m, _, _ in conf.API_PAGES]


def test_docs_build_without_warnings(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
             "-b", "html", "-d", str(tmp_path / "doctrees"),
             os.path.join(ROOT, "docs"), str(tmp_path / "html")]
  run = subprocess.run(command, env=env, capture_output=True, text=True,
                       check=False, timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr
  # Every public name of every module that exists has an entry.
  for module_name in _api_modules():
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError:
      continue
    page = tmp_path / "html" / "api" / f"{module_name}.html"
    html = page.read_text()
    for name in module.__all__:
      if not isinstance(getattr(module, name), type(sys)):
        assert f'id="{module_name}.{name}"' in html, (module_name, name)
