"""The notebooks in colabs/ run top to bottom on CPU (their smoke variants) and are committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = Path(__file__).resolve().parents[1] / "colabs"
# notebook -> lines its outputs must contain
NOTEBOOKS = {
    "quickstart.ipynb": ("class fidelity",),
    "maskgit.ipynb": ("class fidelity", "kept tokens unchanged: True", "masked tokens filled: True"),
}


def test_every_notebook_is_run_here():
    assert sorted(p.name for p in COLABS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stripped(name):
    nb = nbformat.read(COLABS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "strip outputs before committing (nbstripout)"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(name):
    nb = nbformat.read(COLABS / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(COLABS)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for line in NOTEBOOKS[name]:
        assert line in outputs, outputs[-3000:]
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
