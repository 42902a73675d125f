"""notebooks/quickstart.ipynb: stored without outputs, and executed top to bottom on CPU with nbclient (the
install cell skips itself because jpllm_jax imports)."""
from __future__ import annotations

import pathlib

import nbformat
import pytest

from conftest import SHARED_DATA

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has stored outputs"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(monkeypatch):
  from nbclient import NotebookClient
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JPLLM_SHARED_DATA", str(SHARED_DATA))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "install skipped" in text
  assert "->" in text and "jcommonsenseqa" in text  # generated text and the evaluation table
  diff = float(text.split("max |logit difference|:")[1].split()[0])
  assert diff < 1e-3, diff
