"""Executes every notebook in notebooks/ on the `tiny` presets (TOFU, classifiers), as CI does.

The notebooks read JAXUNLEARN_PRESET; their outputs must be stripped in git, so this also
checks that no cell carries outputs or an execution count.
"""

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_five_notebooks_with_stripped_outputs():
    import nbformat

    names = [p.name for p in NOTEBOOKS]
    assert len(names) == 5, names
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        first = nb.cells[1]
        # The Colab install cell is guarded: it installs only when jaxunlearn is missing.
        assert "import jaxunlearn" in first.source and "%pip install" in first.source
        assert "JAXUNLEARN_PRESET" in nb.cells[2].source
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory):
    """One model cache for all notebooks (the tiny target/oracle are trained once) and one
    JAX compilation cache (later kernels reuse the executables of earlier ones)."""
    root = tmp_path_factory.mktemp("notebooks")
    env = {
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),
        "JAXUNLEARN_PRESET": "tiny",
        "JAXUNLEARN_CACHE": str(root / "cache"),
        "MPLBACKEND": "Agg",
        "TQDM_DISABLE": "1",
    }
    return root, env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_tiny(path, shared_env, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    root, env = shared_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    workdir = root / path.stem
    workdir.mkdir()
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute(env={**os.environ, **env})
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    # Each notebook leaves a leaderboard behind in its working folder.
    assert list(workdir.rglob("leaderboard.md")), path.name
