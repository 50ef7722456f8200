"""The style and the types hold: `ruff check` (pyproject's [tool.ruff]) and
`pyright` (pyproject's [tool.pyright]) are clean.

Both are pinned in the `test` extra (`pyright[nodejs]` brings its own
Node.js as a wheel, so nothing is downloaded when it runs).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_is_clean():
  run = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "flax_tangents", "tests",
       "benchmarks", "examples", "tools"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr


def _pyright_errors(report: dict) -> list[str]:
  """`path:line:column - error: message (rule)` for each error of a report
  of `pyright --outputjson`."""
  lines = []
  for d in report["generalDiagnostics"]:
    if d["severity"] != "error":
      continue
    start = d.get("range", {}).get("start", {"line": -1, "character": -1})
    path = os.path.relpath(d["file"], ROOT)
    rule = f" ({d['rule']})" if "rule" in d else ""
    lines.append(f"{path}:{start['line'] + 1}:{start['character'] + 1} - "
                 f"error: {d['message']}{rule}")
  return lines


def test_pyright_is_clean():
  # `--pythonpath`: imports (jax, flax) resolve in this interpreter's
  # environment, whatever `python` is first on PATH.
  run = subprocess.run(
      [sys.executable, "-m", "pyright", "--outputjson", "--pythonpath",
       sys.executable, "flax_tangents"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=900)
  try:
    report = json.loads(run.stdout)
  except json.JSONDecodeError:  # pyright did not run: say why.
    raise AssertionError(f"pyright failed to run (exit {run.returncode}):\n"
                         f"{run.stdout}\n{run.stderr}") from None
  errors = _pyright_errors(report)
  summary = report["summary"]
  n_files = sum(name.endswith(".py") for _, _, names in os.walk(
      os.path.join(ROOT, "flax_tangents")) for name in names)
  assert summary["filesAnalyzed"] >= n_files, summary  # not vacuous
  if errors or summary["errorCount"]:
    pytest.fail(f"pyright: {summary['errorCount']} errors in "
                f"{summary['filesAnalyzed']} files:\n" + "\n".join(errors),
                pytrace=False)


def test_pyright_errors_are_listed():
  report = {"generalDiagnostics": [
      {"file": os.path.join(ROOT, "flax_tangents", "x.py"),
       "severity": "error", "message": "bad", "rule": "reportFoo",
       "range": {"start": {"line": 2, "character": 4}}},
      {"file": os.path.join(ROOT, "flax_tangents", "x.py"),
       "severity": "warning", "message": "meh"}]}
  assert _pyright_errors(report) == [
      os.path.join("flax_tangents", "x.py") + ":3:5 - error: bad (reportFoo)"]
