"""Sphinx configuration of the lowrank_optax documentation.

Built by ``.ci/run`` with warnings as errors:
``python3 -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "lowrank_optax"
author = "lowrank_optax developers"
copyright = "2026, lowrank_optax developers"  # pylint: disable=redefined-builtin

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_default_options = {}  # no members, no "Bases:" lines
autodoc_typehints = "none"          # signatures show defaults; types live in Args
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False

html_theme = "furo"
html_title = "lowrank_optax"
exclude_patterns = ["_build"]
# JAX and optax objects in signatures and docstrings are not cross-linked.
nitpicky = False
