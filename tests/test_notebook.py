"""The notebooks execute top to bottom (nbclient), so they cannot rot; and they are committed
with their outputs (plots visible on GitHub), as ``scripts/notebooks.sh`` writes them.

Each notebook runs from a copy in a temporary directory, so its run artefacts (``runs/``) and
its outputs never land in the repository.
"""

import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NAMES = ["quickstart.ipynb", "distributed.ipynb", "finetune.ipynb", "qlora_fsdp.ipynb"]


def _script():
    spec = importlib.util.spec_from_file_location("ltransform_notebooks_script", REPO / "scripts" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


notebooks = _script()


def executed(name, tmp_path):
    """Execute a copy of notebooks/NAME in tmp_path, as scripts/notebooks.sh does; return it."""
    copy = tmp_path / name
    shutil.copy(NOTEBOOKS / name, copy)
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:  # what is checked must come from this run, not from the committed outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return notebooks.clean(notebooks.execute(nb, tmp_path, timeout=300))


def outputs(nb):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def printed(nb):
    return "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream")


def test_quickstart_notebook_runs_and_the_loss_falls(tmp_path):
    nb = executed("quickstart.ipynb", tmp_path)
    text = printed(nb)
    assert "loss fell from" in text
    assert "[APPLY]" not in text and "[CLIP] clip_gradients" in text  # lt.explain printed the pipeline
    assert any("image/png" in o.get("data", {}) for o in outputs(nb))  # the loss plot was drawn
    assert notebooks.problems(nb) == []


def test_distributed_notebook_launches_two_processes_by_fork(tmp_path):
    nb = executed("distributed.ipynb", tmp_path)
    text = printed(nb)
    assert "rank 0 of 2" in text
    assert "ddp: 2 processes match one process" in text and "fsdp: 2 processes match one process" in text
    assert "launched from a notebook: ok" in text
    assert notebooks.problems(nb) == []


def test_finetune_notebook_trains_adapters_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    nb = executed("finetune.ipynb", tmp_path)
    text = printed(nb)
    assert "all of them adapters: True" in text and "the 4-bit weights did not move: True" in text
    assert "8 linear layers in nf4" in text
    assert "tokens/s" in text and "adapters.pt:" in text and "fine-tuned, adapters reloaded:" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs(nb)) == 1  # loss and throughput
    assert notebooks.problems(nb) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune.ipynb"]  # its files went to a temporary directory


def test_the_notebooks_are_all_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_holds_its_outputs(name):
    """Every code cell executed in one top-to-bottom run, no errors, a plot wherever it plots,
    no volatile metadata: regenerate with ``bash scripts/notebooks.sh`` after editing one."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert notebooks.problems(nb) == [], f"{name}: run bash scripts/notebooks.sh {name}"
    assert any(outputs(nb))
    if name != "distributed.ipynb":
        assert notebooks.plots(nb) and any("image/png" in o.get("data", {}) for o in outputs(nb))


def test_clean_keeps_outputs_and_counts_and_drops_the_volatile_metadata():
    nb = nbformat.v4.new_notebook(metadata={"language_info": {"name": "python", "version": "3.11.7"},
                                            "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}})
    cell = nbformat.v4.new_code_cell("1", execution_count=1, metadata={"execution": {"iopub.status.busy": "2026"}})
    widget = {"text/plain": "  0%|", notebooks.WIDGET: {"model_id": "x"}}
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "1"}, execution_count=1),
                    nbformat.v4.new_output("display_data", widget)]
    nb.cells = [cell]
    notebooks.clean(nb)
    assert nb.metadata == {"language_info": {"name": "python"}}
    assert cell.metadata == {} and cell.execution_count == 1
    assert [o.get("data") for o in cell.outputs] == [{"text/plain": "1"}, {"text/plain": "  0%|"}]
    assert notebooks.problems(nb) == []
    cell.execution_count = None
    assert notebooks.problems(nb) == ["cell 0 was not executed"]


def test_a_tqdm_widget_is_saved_as_the_text_of_its_last_state():
    def model(name, **state):
        return {"model_name": name, "state": state}

    widgets = {"bar": model("HBoxModel", children=["IPY_MODEL_pre", "IPY_MODEL_fill", "IPY_MODEL_post"]),
               "pre": model("HTMLModel", value="100%"), "fill": model("FloatProgressModel", value=80.0, max=80.0),
               "post": model("HTMLModel", value="\u200780/80\u2007[00:08&lt;00:00,\u200716.43step/s]")}
    assert notebooks.progress_text(widgets, "bar") == "100%|██████████| 80/80 [00:08<00:00, 16.43step/s]"
    assert notebooks.progress_text(widgets, "pre") is None and notebooks.progress_text(widgets, "gone") is None


def test_qlora_fsdp_notebook_shards_a_4bit_base_on_two_processes(tmp_path):
    """It executes: 2 forked processes, torchao's NF4 sharded by FSDP2, against one process."""
    pytest.importorskip("torchao")
    nb = executed("qlora_fsdp.ipynb", tmp_path)
    text = printed(nb)
    shard = "a DTensor of shape (1024, 256) whose local shard is a NF4Tensor of shape (512, 256)"
    assert f"2 ranks; a quantized weight on rank 0: {shard}" in text
    assert "(2.00x rank 0's share)" in text and "bitwise equal: True" in text
    assert "largest loss difference, 2 processes against 1:" in text
    assert notebooks.problems(nb) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qlora_fsdp.ipynb"]
