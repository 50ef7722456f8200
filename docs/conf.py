"""Sphinx configuration of the flax_tangents reference site.

Build: `python -m sphinx -W -b html docs docs/_build/html` (from the
repository root). The API pages are generated from each public module's
`__all__` when the build starts, so every public name has an entry and a
name added later needs no edit here.
"""

import inspect
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "flax_tangents"
author = "the flax_tangents authors"
copyright = "the flax_tangents authors; Apache-2.0"  # noqa: A001

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # Attributes: sections as fields, not duplicates.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"exclude-members": "__init__"}
# The notebooks in colabs/ are rendered with the outputs committed in them;
# CI executes them separately (tests/test_colabs.py).
nb_execution_mode = "off"
myst_heading_anchors = 3
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb",
                 ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
# `x` in docstrings is code, as in Markdown.
default_role = "code"
html_theme = "alabaster"
html_title = "flax_tangents"
suppress_warnings = ["myst.header"]

# (module, title, introduction) of each API page.
API_PAGES = [
    ("flax_tangents", "flax_tangents",
     "Kernels, empirical kernels, linearization and scale."),
    ("flax_tangents.nn", "flax_tangents.nn",
     "Linen layers that carry their infinite-width kernel rules."),
    ("flax_tangents.predict", "flax_tangents.predict",
     "Predictions of wide networks: gradient descent and GP inference."),
    ("flax_tangents.train", "flax_tangents.train",
     "Linearized training with optax."),
    ("flax_tangents.checkpoint", "flax_tangents.checkpoint",
     "Saving and restoring kernels and variables with orbax."),
    ("flax_tangents.typing", "flax_tangents.typing",
     "Type names (Neural Tangents' where they apply)."),
]


def _directive(obj) -> str:
  if inspect.isclass(obj):
    return "autoclass"
  if callable(obj):
    return "autofunction"
  return "autodata"


def _api_page(module_name: str, title: str, intro: str) -> str:
  module = __import__(module_name, fromlist=["_"])
  lines = [title, "=" * len(title), "", intro, "",
           f".. automodule:: {module_name}", "   :no-members:", ""]
  for name in module.__all__:
    obj = getattr(module, name)
    if inspect.ismodule(obj):
      lines += [f"* :doc:`{obj.__name__}`", ""]
      continue
    directive = _directive(obj)
    lines += [f".. {directive}:: {module_name}.{name}"]
    if directive == "autoclass":
      lines += ["   :members:"]
    lines += [""]
  return "\n".join(lines)


def _write_api_pages(app) -> None:
  """docs/api/<module>.rst for every module that exists, and the index."""
  api_dir = os.path.join(app.srcdir, "api")
  os.makedirs(api_dir, exist_ok=True)
  names = []
  for module_name, title, intro in API_PAGES:
    try:
      text = _api_page(module_name, title, intro)
    except ModuleNotFoundError:
      continue  # Not written yet (flax_tangents.typing lands separately).
    names.append(module_name)
    path = os.path.join(api_dir, f"{module_name}.rst")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # Unchanged files keep Sphinx's incremental build.
      with open(path, "w") as f:
        f.write(text)
  index = ["API reference", "=============", "", ".. toctree::",
           "   :maxdepth: 1", ""] + [f"   {n}" for n in names] + [""]
  with open(os.path.join(api_dir, "index.rst"), "w") as f:
    f.write("\n".join(index))


def _copy_notebooks(app) -> None:
  """colabs/*.ipynb into the source tree (the site renders their outputs)."""
  source = os.path.join(ROOT, "colabs")
  target = os.path.join(app.srcdir, "colabs")
  os.makedirs(target, exist_ok=True)
  wanted = sorted(n for n in os.listdir(source) if n.endswith(".ipynb")) if (
      os.path.isdir(source)) else []
  for name in os.listdir(target):
    if name not in wanted:
      os.remove(os.path.join(target, name))
  for name in wanted:
    with open(os.path.join(source, name), "rb") as f:
      data = f.read()
    path = os.path.join(target, name)
    if not os.path.exists(path) or open(path, "rb").read() != data:
      with open(path, "wb") as f:
        f.write(data)


def setup(app):
  app.connect("builder-inited", _write_api_pages)
  app.connect("builder-inited", _copy_notebooks)
