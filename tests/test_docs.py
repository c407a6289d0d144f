"""The documentation cannot drift from the code: every snippet runs, every public name is documented.

Every ```python block of ``docs/`` runs: a page's blocks in order, in one namespace, in a fresh
``python -c`` process (so ``lt.launch`` forks, as in a notebook) with a timeout, in a temporary
directory. Not run: blocks whose title starts with "Lightning" (the Lightning originals that
the migration guide translates, ```python title="Lightning ..."), other languages (```bash),
and a block whose first line is ``# docs: skip (<reason>)``, counted against ``SKIPS`` so a skip
cannot creep in unnoticed. The XLA guide runs in the XLA job (tests/xla/test_docs_xla.py, in
the torch_xla venv), with the same extraction.

The site itself (mkdocs build --strict: every docstring parses, every link resolves) is built
by ``scripts/docs.sh`` in ``.ci/run``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ltransform as lt

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
XLA_PAGES = {"guides/xla.md"}  # run by the XLA job only
SKIPS = {  # page -> blocks skipped with "# docs: skip (reason)"; keep this short
    "guides/from-lightning.md": 1,  # the XLA FSDP translation: its code runs in guides/xla.md (XLA job)
}
TIMEOUT = 240  # seconds for one page's blocks

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)


def blocks(page: Path) -> list[tuple[int, str, str]]:
    """The page's ```python blocks as ``(line, info, code)``, in order (indented ones dedented)."""
    text = page.read_text()
    out = []
    for match in _FENCE.finditer(text):
        info = match["info"].strip()
        if info.split(" ", 1)[0] != "python":
            continue
        indent = match["indent"]
        body = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in match["body"].splitlines(keepends=True))
        out.append((text.count("\n", 0, match.start()) + 2, info, body))
    return out


def runnable(page: Path) -> tuple[list[tuple[int, str]], int]:
    """The blocks of ``page`` that run, as ``(line, code)``, and how many were skipped."""
    run, skipped = [], 0
    for line, info, code in blocks(page):
        title = re.search(r'title="([^"]*)"', info)
        if title and title[1].startswith("Lightning"):
            continue
        if code.lstrip().startswith("# docs: skip"):
            assert re.match(r"# docs: skip \(.+\)", code.lstrip()), f"{page}:{line}: a skip must give its reason"
            skipped += 1
            continue
        run.append((line, code))
    return run, skipped


# the runner: exec each block, compiled with its page and line so a traceback points at the doc
RUNNER = r"""
import json, sys
page, items = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for line, code in items:
    print(f"--- {page}:{line}", flush=True)
    exec(compile("\n" * (line - 1) + code, page, "exec"), namespace)
print("--- all blocks ran", flush=True)
"""


def run_page(name: str, python: str = sys.executable, env: dict | None = None,
             tmp_path: Path | None = None) -> None:
    """Run the page's blocks in one fresh process; fail with its output if a block fails."""
    page = DOCS / name
    items, skipped = runnable(page)
    assert skipped == SKIPS.get(name, 0), f"{name}: {skipped} skipped blocks, SKIPS says {SKIPS.get(name, 0)}"
    if not items:
        return
    work = tmp_path or Path.cwd()
    spec = work / "blocks.json"
    spec.write_text(json.dumps([str(page.relative_to(ROOT)), items]))
    # one intra-op thread, as tests/conftest.py sets for the suite (a fair share of a small CI
    # machine; lt.launch's forked ranks run on one thread whatever the parent has)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        done = subprocess.run([python, "-c", RUNNER, str(spec)], cwd=work, env=environment,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{name}: its blocks ran over {TIMEOUT} s\n{error.stdout or ''}{error.stderr or ''}")
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "--- all blocks ran" in done.stdout, f"{name} failed:\n{output[-6000:]}"


def pages() -> list[str]:
    return sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if str(p.relative_to(DOCS)) not in XLA_PAGES)


@pytest.mark.parametrize("name", pages())
def test_page_runs(name: str, tmp_path: Path) -> None:
    run_page(name, tmp_path=tmp_path)


def test_skips_are_counted() -> None:
    for name, count in SKIPS.items():
        assert runnable(DOCS / name)[1] == count, name


def test_extraction() -> None:
    """What runs and what does not, on a page written for the purpose."""
    sample = (
        "text\n```python\na = 1\n```\n"
        '```python title="Lightning"\nfrom lightning import Fabric\n```\n'
        "```bash\nls\n```\n"
        "- item\n\n    ```python\n    b = a + 1\n    ```\n"
        "```python\n# docs: skip (needs a GPU)\nc = 3\n```\n"
    )
    page = Path(os.environ.get("TMPDIR", "/tmp")) / f"ltransform-docs-sample-{os.getpid()}.md"
    page.write_text(sample)
    try:
        items, skipped = runnable(page)
    finally:
        page.unlink()
    assert [code for _, code in items] == ["a = 1\n", "b = a + 1\n"]
    assert [line for line, _ in items] == [3, 14] and skipped == 1


def _documented() -> set[str]:
    """The objects the API reference renders (``::: module.name`` lines of docs/api/)."""
    found = set()
    for page in (DOCS / "api").glob("*.md"):
        found |= set(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.MULTILINE))
    return found


def test_every_public_name_is_in_the_api_reference() -> None:
    documented = _documented()
    missing = [name for name in lt.__all__ if ".".join(lt._EXPORTS[name]) not in documented]
    assert not missing, (
        f"public names missing from the API reference: {missing}; add a '::: module.name' entry "
        "(with 'heading: \"lt.NAME\"') to the right page of docs/api/"
    )
    public = {".".join(target) for target in lt._EXPORTS.values()}
    stale = sorted(documented - public)
    assert not stale, f"docs/api/ renders names that are not public (any more): {stale}"


def test_the_api_headings_say_the_public_names() -> None:
    for page in (DOCS / "api").glob("*.md"):
        text = page.read_text()
        for target, heading in re.findall(r'^::: ([\w.]+)\s*\n\s+options:\s*\n\s+heading: "lt\.(\w+)"', text,
                                          re.MULTILINE):
            assert ".".join(lt._EXPORTS[heading]) == target, f"{page.name}: lt.{heading} is not {target}"
        assert text.count("\n::: ") == len(re.findall(r'heading: "lt\.', text)), f"{page.name}: an entry has no heading"


def test_the_migration_guide_maps_every_fabric_member() -> None:
    """Each public member of the installed ``lightning.Fabric`` has a row in the guide's table."""
    spec = importlib.util.find_spec("lightning")
    if spec is None or spec.origin is None:
        pytest.skip("lightning is not installed (the dev extra installs it)")
    # read from the source (importing lightning takes ~10 s): the class's public defs and properties
    tree = ast.parse((Path(spec.origin).parent / "fabric" / "fabric.py").read_text())
    fabric = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Fabric")
    members = sorted({n.name for n in fabric.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and not n.name.startswith("_")})
    page = (DOCS / "guides" / "from-lightning.md").read_text()
    table = page[page.index("## `lightning.Fabric`"):page.index("## The Trainer")]
    assert len(members) >= 30, members
    missing = [m for m in members if f"fabric.{m}" not in table and f"Fabric({m}=" not in table]
    assert not missing, f"Fabric members missing from the table of docs/guides/from-lightning.md: {missing}"


def test_every_lt_name_the_docs_use_exists() -> None:
    """``lt.NAME`` in any page (prose, tables, code) is a public name: the guides invent no API."""
    names = set()
    for page in DOCS.rglob("*.md"):
        names |= set(re.findall(r"\blt\.([A-Za-z_]\w*)", page.read_text()))
    modules = {"plans", "core", "steps", "models", "runner", "distributed", "checkpoint", "examples", "cli"}
    unknown = sorted(n for n in names - modules if n not in lt.__all__)
    assert not unknown, f"the docs use names ltransform does not export: {unknown}"
