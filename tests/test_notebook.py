"""The quickstart notebook executes top to bottom (nbclient), so it cannot rot."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_quickstart_notebook_runs_and_the_loss_falls():
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "loss fell from" in text
    assert "[APPLY]" not in text and "[CLIP] clip_gradients" in text  # lt.explain printed the pipeline
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot was drawn


def test_distributed_notebook_launches_two_processes_by_fork():
    nb = nbformat.read(NOTEBOOKS / "distributed.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []) if o.output_type == "stream")
    assert "rank 0 of 2" in text
    assert "ddp: 2 processes match one process" in text and "fsdp: 2 processes match one process" in text
    assert "launched from a notebook: ok" in text
