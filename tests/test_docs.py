"""The documentation site (docs/): the API page is complete, and the site builds.

``docs/api.rst`` must document every public name of ``lowrank_optax`` (its
``__all__``, or, while the package has none, every name its ``__init__.py``
imports) and nothing that does not exist. Both are checked by parsing the
reST (``currentmodule`` / ``automodule`` and the ``auto*`` directives), with
no Sphinx build. ``docs/examples.md`` must list every example script and
notebook. The last test builds the site with warnings as errors, as
``.ci/run`` does; it is skipped when Sphinx, myst-parser or furo is missing.
"""

import ast
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

import lowrank_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = "lowrank_optax"

_MODULE = re.compile(r"^\.\. (currentmodule|automodule|module)::\s*(\S+)\s*$")
_AUTO = re.compile(r"^\.\. auto(function|class|data|exception|attribute|method)"
                   r"::\s*([\w.]+)")
_AUTOSUMMARY = re.compile(r"^\.\. autosummary::")


def public_names() -> set:
  """``lowrank_optax.__all__``, or the names ``__init__.py`` imports."""
  names = getattr(lowrank_optax, "__all__", None)
  if names is not None:
    return set(names)
  tree = ast.parse((ROOT / PACKAGE / "__init__.py").read_text())
  return {alias.asname or alias.name
          for node in tree.body if isinstance(node, ast.ImportFrom)
          for alias in node.names}


def documented(rst: str) -> list:
  """Fully qualified names of the objects an rst file documents, in order.

  ``automodule`` documents the module itself; ``auto*`` directives and
  ``autosummary`` entries document ``<current module>.<name>``.
  """
  out, module, in_summary = [], None, False
  for line in rst.splitlines():
    stripped = line.strip()
    if in_summary:
      if line and not line[0].isspace():
        in_summary = False
      elif stripped and not stripped.startswith(":"):
        out.append(f"{module}.{stripped.split()[0].lstrip('~')}")
        continue
      else:
        continue
    m = _MODULE.match(stripped)
    if m:
      module = m.group(2)
      if m.group(1) == "automodule":
        out.append(module)
      continue
    m = _AUTO.match(stripped)
    if m:
      name = m.group(2)
      out.append(name if name.startswith(PACKAGE + ".") else f"{module}.{name}")
      continue
    if _AUTOSUMMARY.match(stripped):
      in_summary = True
  return out


def resolve(qualified: str):
  """The object a dotted name refers to (a module, or attributes of one)."""
  parts = qualified.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(qualified)


@pytest.fixture(scope="module")
def api_names():
  return documented((DOCS / "api.rst").read_text())


def test_parser_on_a_sample():
  rst = """
.. currentmodule:: lowrank_optax

.. autofunction:: galore
.. autoclass:: MatrixView
   :members:

.. automodule:: lowrank_optax.projectors

.. currentmodule:: lowrank_optax.projectors

.. autosummary::
   :nosignatures:

   make
   ~names

.. autodata:: lowrank_optax.DEFAULT_EXCLUDE
"""
  assert documented(rst) == [
      "lowrank_optax.galore", "lowrank_optax.MatrixView",
      "lowrank_optax.projectors", "lowrank_optax.projectors.make",
      "lowrank_optax.projectors.names", "lowrank_optax.DEFAULT_EXCLUDE"]


def test_every_public_name_is_documented(api_names):
  top = {n[len(PACKAGE) + 1:] for n in api_names
         if n.startswith(PACKAGE + ".") and "." not in n[len(PACKAGE) + 1:]}
  missing = sorted(public_names() - top)
  assert not missing, f"add these to docs/api.rst: {missing}"


def test_every_documented_name_exists(api_names):
  unknown = []
  for name in api_names:
    try:
      resolve(name)
    except (ImportError, AttributeError):
      unknown.append(name)
  assert not unknown, f"docs/api.rst documents names that do not exist: {unknown}"


def test_no_name_is_documented_twice(api_names):
  seen, twice = set(), []
  for name in api_names:
    if name in seen:
      twice.append(name)
    seen.add(name)
  assert not twice, f"documented twice in docs/api.rst: {twice}"


def test_examples_page_lists_every_example_and_notebook():
  page = (DOCS / "examples.md").read_text()
  files = sorted(str(p.relative_to(ROOT)) for p in
                 [*ROOT.glob("examples/*.py"), *ROOT.glob("notebooks/*.ipynb")])
  missing = [f for f in files if f"`{f}`" not in page]
  assert not missing, f"add these to docs/examples.md: {missing}"


def test_sphinx_build_has_no_warnings(tmp_path):
  """The site builds with ``-W`` (about 10 s on 2 CPU cores)."""
  for module in ("sphinx", "myst_parser", "furo"):
    pytest.importorskip(module)
  cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
         "html", "-d", str(tmp_path / "doctrees"), str(DOCS),
         str(tmp_path / "html")]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
