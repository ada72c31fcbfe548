"""Every docstring Example in the package runs and prints what it says.

The house style asks for a runnable Example in each public docstring; this
runs them all with ``doctest`` (module by module), so a stale example fails
the suite instead of misleading a reader.
"""

import doctest
import importlib
import pkgutil

import pytest

import lowrank_optax

MODULES = sorted(m.name for m in pkgutil.iter_modules(lowrank_optax.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module("lowrank_optax." + name)
  result = doctest.testmod(
      module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} doctest failure(s) in {name}"
