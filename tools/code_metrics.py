"""Size and import-structure figures of the package, for issue 14.

Usage: `python tools/code_metrics.py [ROOT] [--top N]` (ROOT defaults to
`flax_tangents`). Prints

- the largest files and every file over `MAX_FILE_LINES` lines (all lines,
  docstrings included);
- the longest functions and every function over `MAX_FUNCTION_LINES` lines,
  counted without their docstring (a nested function counts inside its
  parent too, as it is part of the parent's body);
- imports made inside functions (`import` statements not at module level);
- import cycles between the package's modules: those of the module-level
  imports alone, and those that also need a function-level import (a cycle
  broken only by importing inside a function);
- modules under `_src` that import public modules of the package.

Only the standard library is used; nothing is imported from the package.

>>> import pathlib, tempfile
>>> root = pathlib.Path(tempfile.mkdtemp()) / "pkg"
>>> root.mkdir()
>>> _ = (root / "__init__.py").write_text("")
>>> _ = (root / "a.py").write_text("from pkg import b\\n")
>>> body = 'def f():\\n  "Doc."\\n  from pkg import a\\n'
>>> _ = (root / "b.py").write_text(body)
>>> m = measure(root)
>>> [(f.name, f.lines, f.lines_with_docstring) for f in m.functions]
[('f', 2, 3)]
>>> m.cycles_top_level, m.cycles_all
([], [['pkg.a', 'pkg.b']])
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import pathlib
import sys
from typing import Iterator, Optional

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
_PUBLIC_OF_SRC = "_src"


@dataclasses.dataclass(frozen=True)
class Function:
  path: str
  name: str
  lineno: int
  lines: int  # without the docstring
  lines_with_docstring: int


@dataclasses.dataclass(frozen=True)
class Import:
  path: str
  lineno: int
  module: str  # the importing module
  target: str  # the imported module of the package
  top_level: bool


@dataclasses.dataclass
class Metrics:
  files: list[tuple[int, str]]
  functions: list[Function]
  imports: list[Import]
  cycles_top_level: list[list[str]]
  cycles_all: list[list[str]]


def _module_name(root: pathlib.Path, path: pathlib.Path) -> str:
  parts = list(path.relative_to(root.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _docstring_lines(node: ast.AST) -> int:
  body = getattr(node, "body", [])
  if (body and isinstance(body[0], ast.Expr) and
      isinstance(body[0].value, ast.Constant) and
      isinstance(body[0].value.value, str)):
    return body[0].end_lineno - body[0].lineno + 1
  return 0


def _functions(path: str, tree: ast.AST) -> Iterator[Function]:
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      total = node.end_lineno - node.lineno + 1
      yield Function(path, node.name, node.lineno,
                     total - _docstring_lines(node), total)


def _walk_imports(node: ast.AST, in_function: bool
                  ) -> Iterator[tuple[ast.AST, bool]]:
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.Import, ast.ImportFrom)):
      yield child, in_function
    nested = in_function or isinstance(
        child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    yield from _walk_imports(child, nested)


def _resolve(node: ast.AST, module: str, is_package: bool,
             modules: set[str]) -> list[str]:
  """The package's modules that an import statement imports."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in modules]
  base = node.module or ""
  if node.level:
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    base = ".".join(parts[:keep] + ([base] if base else []))
  targets = []
  for alias in node.names:
    candidate = f"{base}.{alias.name}"
    if candidate in modules:
      targets.append(candidate)
    elif base in modules:
      targets.append(base)
  return sorted(set(targets))


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm; components of more than one module, sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(sorted(component))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(components)


def measure(root: pathlib.Path) -> Metrics:
  """Files, functions, imports and import cycles of the package at `root`."""
  root = pathlib.Path(root)
  paths = sorted(root.rglob("*.py"))
  names = {p: _module_name(root, p) for p in paths}
  modules = set(names.values())
  files, functions, imports = [], [], []
  for path in paths:
    src = path.read_text()
    rel = str(path.relative_to(root.parent))
    files.append((src.count("\n"), rel))
    tree = ast.parse(src)
    functions.extend(_functions(rel, tree))
    module = names[path]
    for node, in_function in _walk_imports(tree, False):
      for target in _resolve(node, module, path.name == "__init__.py",
                             modules):
        if target != module:
          imports.append(Import(rel, node.lineno, module, target,
                                not in_function))
  top: dict[str, set[str]] = {}
  every: dict[str, set[str]] = {}
  for imp in imports:
    every.setdefault(imp.module, set()).add(imp.target)
    if imp.top_level:
      top.setdefault(imp.module, set()).add(imp.target)
  files.sort(reverse=True)
  functions.sort(key=lambda f: (-f.lines, f.path, f.lineno))
  return Metrics(files, functions, imports, _strongly_connected(top),
                 _strongly_connected(every))


def _is_public(module: str) -> bool:
  return _PUBLIC_OF_SRC not in module.split(".")


def report(m: Metrics, top: int = 15) -> str:
  """The figures as text."""
  out = []
  add = out.append
  big = [f for f in m.files if f[0] > MAX_FILE_LINES]
  long = [f for f in m.functions if f.lines > MAX_FUNCTION_LINES]
  add(f"files: {len(m.files)}, lines: {sum(n for n, _ in m.files)}")
  add(f"largest file: {m.files[0][1]} ({m.files[0][0]} lines)")
  add(f"files over {MAX_FILE_LINES} lines: {len(big)}")
  out += [f"  {n:5d}  {p}" for n, p in big]
  f0 = m.functions[0]
  add(f"functions: {len(m.functions)}; longest: {f0.path}:{f0.lineno} "
      f"{f0.name} ({f0.lines} lines without docstring, "
      f"{f0.lines_with_docstring} with)")
  add(f"functions over {MAX_FUNCTION_LINES} lines without docstring: "
      f"{len(long)}")
  shown = m.functions[:max(top, len(long))]
  out += [f"  {f.lines:4d} ({f.lines_with_docstring:4d})  "
          f"{f.path}:{f.lineno} {f.name}" for f in shown]
  nested = [i for i in m.imports if not i.top_level]
  add(f"function-level imports of package modules: {len(nested)}")
  out += [f"  {i.path}:{i.lineno} -> {i.target}" for i in nested]
  add(f"import cycles of module-level imports: {len(m.cycles_top_level)}")
  out += ["  " + " <-> ".join(c) for c in m.cycles_top_level]
  add("import cycles once function-level imports count: "
      f"{len(m.cycles_all)}")
  out += ["  " + " <-> ".join(c) for c in m.cycles_all]
  src_public = sorted({(i.module, i.target) for i in m.imports
                       if not _is_public(i.module) and _is_public(i.target)
                       and i.target.count(".") > 0})
  add(f"_src modules importing public modules: "
      f"{len({a for a, _ in src_public})} modules, {len(src_public)} edges")
  counts: dict[str, int] = {}
  for _, target in src_public:
    counts[target] = counts.get(target, 0) + 1
  out += [f"  {n:3d}  -> {t}" for t, n in sorted(counts.items())]
  return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("root", nargs="?", default="flax_tangents")
  parser.add_argument("--top", type=int, default=15,
                      help="how many of the longest functions to list")
  args = parser.parse_args(argv)
  print(report(measure(pathlib.Path(args.root)), args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
