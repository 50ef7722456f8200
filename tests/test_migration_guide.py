"""docs/migrating_from_nt.md has a row for every public name of NT 0.6.5."""

import os
import re

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents import predict as ftp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "docs", "migrating_from_nt.md")
NAMES = os.path.join(ROOT, "tests", "nt_public_names.txt")
STATUSES = {"same", "renamed", "partial", "missing", "NIE", "deliberate"}


def _nt_names():
  with open(NAMES) as f:
    return [line.strip() for line in f
            if line.strip() and not line.startswith("#")]


def _rows():
  """`(first cell, second cell, status)` of every table row naming NT."""
  rows = []
  with open(GUIDE) as f:
    for line in f:
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if line.startswith("| `nt.") and len(cells) == 4:
        rows.append((cells[0].strip("`"), cells[1], cells[3]))
  return rows


def test_every_nt_name_has_one_row():
  names = _nt_names()
  assert len(names) == len(set(names)) == 130
  listed = [name for name, _, _ in _rows()]
  missing = sorted(set(names) - set(listed))
  unknown = sorted(set(listed) - set(names))
  repeated = sorted({n for n in listed if listed.count(n) > 1})
  assert not missing, f"NT names without a row: {missing}"
  assert not unknown, f"rows for names NT does not have: {unknown}"
  assert not repeated, f"names with several rows: {repeated}"


def test_statuses():
  for name, _, status in _rows():
    assert status in STATUSES, (name, status)


def test_dropout_warning_comes_first():
  with open(GUIDE) as f:
    text = f.read()
  first_section = text.split("\n## ")[1]
  assert first_section.startswith("Read this first: `Dropout(rate)`")
  assert "keep_rate" in first_section


def test_named_equivalents_exist():
  # Every `ft.x`, `ftn.X`, `ftp.x` named in the flax_tangents column exists.
  modules = {"ft": ft, "ftn": ftn, "ftp": ftp}
  for name, equivalent, _ in _rows():
    for module, path in re.findall(r"\b(ftn|ftp|ft)\.([A-Za-z_][\w.]*)",
                                   equivalent):
      obj = modules[module]
      for part in path.split("."):
        assert hasattr(obj, part), f"{name}: {module}.{path} does not exist"
        obj = getattr(obj, part)


def test_parity_is_closed_and_the_summary_counts_match():
  # Issue 10's bar: every row is same, renamed or a deliberate difference,
  # and the guide's summary line states the table's counts.
  rows = _rows()
  counts = {s: sum(status == s for _, _, status in rows) for s in STATUSES}
  open_rows = [name for name, _, status in rows
               if status in ("partial", "missing", "NIE")]
  assert not open_rows, f"rows that are not closed: {open_rows}"
  with open(GUIDE) as f:
    text = " ".join(f.read().split())
  summary = (f"Of NT's {len(rows)} public names: {counts['same']} same, "
             f"{counts['renamed']} renamed, {counts['deliberate']} deliberate "
             f"differences (each with its reason), 0 partial, 0 missing.")
  assert summary in text, counts
