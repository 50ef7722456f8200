"""The code map `flax_tangents/_src/README.md` stays true to the code.

Every path it names in backticks must exist, every public name of
`flax_tangents.nn` must have a row in its layer table (whose finite module
defines the class, and whose rule is the one registered), and every stock
Flax class with a registered rule must be named in it.
"""

import importlib
import pathlib
import re

import flax.linen as nn
import pytest

import flax_tangents as ft
from flax_tangents import nn as ftn
from flax_tangents._src.analytic import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flax_tangents"
MAP = PACKAGE / "_src" / "README.md"
TEXT = MAP.read_text()

# Backticked tokens that are paths: they contain a slash or end in `.py`/`.md`.
_TOKEN = re.compile(r"`([^`\s]+)`")
# Where a path written relative to a directory is looked up, in order.
_BASES = (ROOT, PACKAGE, PACKAGE / "_src" / "analytic", PACKAGE / "_src")
_SUFFIXES = (".py", ".md", ".txt", ".npz")


def _path_tokens(text: str) -> list[str]:
  tokens = []
  for token in _TOKEN.findall(text):
    token = token.rstrip(".,;:")
    looks_like_path = ("/" in token and not token.startswith(("http", "//"))
                       and re.fullmatch(r"[\w./-]+", token))
    if looks_like_path or token.endswith(_SUFFIXES):
      tokens.append(token)
  return sorted(set(tokens))


def _resolve(token: str) -> pathlib.Path | None:
  """The file or directory a path token names, or None."""
  for base in _BASES:
    if (base / token).exists():
      return base / token
  if "/" not in token:  # A bare file name: anywhere in the package/tests.
    for top in (PACKAGE, ROOT / "tests", ROOT / "tools"):
      found = sorted(top.rglob(token))
      if found:
        return found[0]
  return None


def _section(title: str) -> str:
  start = TEXT.index(title)
  end = TEXT.find("\n#", start + len(title))
  return TEXT[start:end if end >= 0 else len(TEXT)]


def _table_rows(section: str) -> dict[str, list[str]]:
  """First-column name -> cells, for the rows of the tables of a section."""
  rows = {}
  for line in section.splitlines():
    if not line.startswith("| `"):
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    rows[cells[0].strip("`").split("`")[0]] = cells
  return rows


def test_every_named_path_exists():
  tokens = _path_tokens(TEXT)
  assert len(tokens) > 50, "the map names too few paths: parsing broke"
  missing = [t for t in tokens if _resolve(t) is None]
  assert not missing, f"the code map names paths that do not exist: {missing}"


def test_path_check_can_fail():
  assert _resolve("flax_tangents/_src/analytic/no_such_module.py") is None
  assert _resolve("no_such_module.py") is None
  assert "flax_tangents/x.py" in _path_tokens("see `flax_tangents/x.py`.")


LAYERS = _table_rows(_section("## Layers and their rules"))


@pytest.mark.parametrize("name", sorted(ftn.__all__))
def test_every_public_layer_has_a_row(name):
  assert name in LAYERS, (
      f"flax_tangents.nn.{name} has no row in the layer table of {MAP}")
  finite = LAYERS[name][1].strip("`")
  module = importlib.import_module(
      finite.removesuffix(".py").replace("/", "."))
  assert getattr(module, name) is getattr(ftn, name), (
      f"{name} is not defined or imported in {finite}, as the map says")


@pytest.mark.parametrize("name", sorted(n for n in ftn.__all__
                                        if isinstance(getattr(ftn, n), type)))
def test_layer_rule_column_matches_registry(name):
  rule_cell = LAYERS[name][2]
  has_rule = registry.find_rule(getattr(ftn, name)) is not None
  says_none = rule_cell.startswith(("none", "option enum"))
  assert has_rule != says_none, (
      f"the map says the rule of {name} is {rule_cell!r}, but the registry "
      f"{'has' if has_rule else 'has no'} rule for it")
  named = re.findall(r"`(\w+)", rule_cell)
  if named:  # The rule (or what it calls) appears in the finite module.
    source = (ROOT / LAYERS[name][1].strip("`")).read_text()
    assert named[0] in source, (
        f"{named[0]} (the rule of {name} in the map) is not in its file")


def test_every_stock_rule_is_mapped():
  stock = _section("### Stock Flax modules with a rule")
  registered = [cls for cls in ft.registered_modules()
                if cls.__module__.startswith("flax.")]
  assert nn.Dense in registered
  missing = [cls.__name__ for cls in registered
             if f"`nn.{cls.__name__}`" not in stock]
  assert not missing, f"stock modules with rules not in the map: {missing}"
