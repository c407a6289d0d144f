"""Execute the notebooks and save them with their outputs, so GitHub shows the plots.

    bash scripts/notebooks.sh                        # every notebooks/*.ipynb, in place
    bash scripts/notebooks.sh finetune.ipynb         # some of them
    python scripts/notebooks.py --check              # exit 1 if a notebook lacks its outputs

Each notebook runs top to bottom in a fresh ``python3`` kernel (nbclient), with notebooks/ as
its working directory, this checkout first on ``PYTHONPATH`` and a time limit per cell. What
changes from run to run without meaning anything is not saved: execution timestamps, the
Python patch version, widget state and ids. A tqdm progress bar (a widget, which GitHub cannot
show) is saved as the text of its final state. The execution counts and every output (plots
as ``image/png``) are. A cell that fails stops the script, and the notebook is not rewritten.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import html
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


def kernel_env(repo: Path = REPO) -> dict[str, str]:
    """The environment a notebook's kernel gets: this checkout importable first, the inline
    matplotlib backend (an ``MPLBACKEND`` such as Agg would draw nothing), fixed hash seed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MPLBACKEND", None)
    env["PYTHONHASHSEED"] = "0"
    return env


def execute(nb: nbformat.NotebookNode, cwd: Path, *, timeout: int = 600,
            env: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """Run every cell of ``nb`` (in place) in a fresh python3 kernel started in ``cwd``."""
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            store_widget_state=True, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=kernel_env() if env is None else env)
    return nb


WIDGET = "application/vnd.jupyter.widget-view+json"


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop the volatile metadata of an executed notebook (in place); keep counts and outputs,
    and give a cell without an id one derived from its source.

    Widget outputs become text: a tqdm bar the text of its last state, any other widget its
    text fallback (without the widget state a frontend could not draw it anyway)."""
    widgets = nb.metadata.pop("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    nb.metadata.get("language_info", {}).pop("version", None)
    ids = {cell.get("id") for cell in nb.cells}
    for i, cell in enumerate(nb.cells):
        if not cell.get("id"):  # nbformat would invent a random one on every save
            cell["id"] = next(c for c in (hashlib.sha1(f"{cell.source}{n}".encode()).hexdigest()[:8]
                                          for n in range(i, i + 100)) if c not in ids)
            ids.add(cell["id"])
        cell.metadata.pop("execution", None)
        for output in cell.get("outputs", []):
            output.get("metadata", {}).pop("transient", None)
            view = output.get("data", {}).pop(WIDGET, None)
            if view is not None:
                text = progress_text(widgets, view.get("model_id"))
                if text is not None:
                    output["data"]["text/plain"] = text
    return nb


def progress_text(widgets: dict, model_id: str | None) -> str | None:
    """The terminal form of a tqdm notebook bar's last state, e.g. ``100%|██████████| 80/80 [...]``."""
    box = widgets.get(model_id, {})
    if box.get("model_name") != "HBoxModel":
        return None
    children = [widgets.get(c.removeprefix("IPY_MODEL_"), {}) for c in box["state"].get("children", [])]
    if [c.get("model_name") for c in children] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    prefix, bar, suffix = (c["state"] for c in children)
    done = bar.get("value", 0) / bar["max"] if bar.get("max") else 0
    filled = max(0, min(10, int(done * 10)))
    text = f"{prefix.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{suffix.get('value', '')}"
    return html.unescape(text).replace("\u2007", " ")


def plots(nb: nbformat.NotebookNode) -> bool:
    """Whether the notebook draws with matplotlib."""
    return any(cell.cell_type == "code" and "matplotlib" in cell.source for cell in nb.cells)


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """What keeps ``nb`` from being a committed, executed notebook (empty list: nothing)."""
    found = []
    code = [(i, cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.source.strip()]
    counts = [cell.execution_count for _, cell in code]
    for i, cell in code:
        if cell.execution_count is None:
            found.append(f"cell {i} was not executed")
        if any(o.output_type == "error" for o in cell.outputs):
            found.append(f"cell {i} holds an error")
        if "execution" in cell.metadata:
            found.append(f"cell {i} keeps execution timestamps")
        if any(WIDGET in o.get("data", {}) for o in cell.outputs):
            found.append(f"cell {i} shows a widget, which GitHub cannot draw (run it through clean())")
    if None not in counts and counts != list(range(1, len(counts) + 1)):
        found.append(f"execution counts {counts} are not 1..{len(counts)} (not one top-to-bottom run)")
    images = sum("image/png" in o.get("data", {}) for _, cell in code for o in cell.outputs)
    if plots(nb) and not images:
        found.append("it plots, but holds no image/png output")
    if "widgets" in nb.metadata:
        found.append("it keeps widget state")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks (default: every notebooks/*.ipynb)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--check", action="store_true", help="run nothing: report notebooks without outputs")
    args = parser.parse_args(argv)
    paths = [NOTEBOOKS / Path(p).name if not Path(p).exists() else Path(p) for p in args.notebooks] \
        or sorted(NOTEBOOKS.glob("*.ipynb"))
    failed = False
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if not args.check:
            started = time.perf_counter()
            executed = clean(execute(copy.deepcopy(nb), path.parent, timeout=args.timeout))
            nbformat.validate(executed)
            nbformat.write(executed, path)
            print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: executed in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            nb = executed
        for problem in problems(nb):
            failed = True
            print(f"{path.name}: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
