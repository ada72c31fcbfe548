"""Executes every notebook under notebooks/ (they are documentation that must run).

The notebooks are saved with the outputs of one execution so that GitHub shows
their tables and plots; a second test checks that the saved copies are complete
(every code cell ran, in order, without an error, and the plots are there).
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _errors(nb):
  return [o for c in nb.cells if c.cell_type == "code"
          for o in c.get("outputs", []) if o.get("output_type") == "error"]


def test_notebooks_exist():
  names = {p.name for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "methods_tour.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  assert not _errors(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_notebook_has_outputs(path):
  """The committed copy holds one clean, complete, in-order execution with its plots."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  counts = [c.get("execution_count") for c in code]
  assert None not in counts, f"{path.name}: saved without running every cell"
  assert counts == list(range(1, len(code) + 1)), f"{path.name}: cells ran out of order"
  assert not _errors(nb)
  stderr = [o.get("text", "") for c in code for o in c.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == "stderr"]
  assert not stderr, f"{path.name}: warnings in the saved outputs: {stderr}"
  images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, f"{path.name}: no plot in the saved outputs"
