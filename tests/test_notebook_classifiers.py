"""Executes notebooks/05_class_forgetting_ssd.ipynb on the tiny classifier preset, as CI does."""

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "05_class_forgetting_ssd.ipynb"


@pytest.mark.slow  # tests/test_notebooks.py runs every notebook in the default suite
def test_class_forgetting_notebook_runs_on_tiny(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert "import jaxunlearn" in nb.cells[1].source and "%pip install" in nb.cells[1].source
    assert "JAXUNLEARN_PRESET" in nb.cells[2].source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    env = {
        "JAXUNLEARN_PRESET": "tiny",
        "JAXUNLEARN_CACHE": str(tmp_path / "cache"),
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join(
            [str(NOTEBOOK.parent.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env={**os.environ, **env})
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]  # fmt: skip
    assert not errors
    assert (tmp_path / "class-forgetting-tiny" / "leaderboard.md").is_file()
