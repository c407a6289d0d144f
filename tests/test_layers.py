"""The layering of DESIGN.md, checked on the source: arrows point down only,
runner -> steps/models/checkpoint -> core/distributed -> io.

Every ``import`` of every module under ``ltransform/`` counts, wherever it is written (inside
functions and ``TYPE_CHECKING`` blocks too): a function-level import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ltransform

ROOT = Path(ltransform.__file__).parent

# (importing package, imported package) pairs that break a rule today, each with where it is and
# why it is not fixed yet. An entry that no longer occurs fails the test: delete it then.
KNOWN: set[tuple[str, str]] = set()  # (file, module) exceptions to the rules; none today


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of ltransform in ``path``, in line order; ``from
    ltransform import x`` names ``ltransform.x`` when x is a module, and for a lazily re-exported
    name the module defining it."""
    package = path.relative_to(root.parent).parts[:-1]  # what ``from . import`` means, also in __init__.py
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            for alias in node.names:
                found.append((node.lineno, _named(module, alias.name, root)))
    return sorted((line, name) for line, name in found if name == "ltransform" or name.startswith("ltransform."))


def _named(module: str, name: str, root: Path) -> str:
    candidate = f"{module}.{name}"
    relative = Path(*candidate.split("."))
    if (root.parent / relative).with_suffix(".py").is_file() or (root.parent / relative).is_dir():
        return candidate
    if module == "ltransform" and name in ltransform._EXPORTS:
        return ltransform._EXPORTS[name][0]
    return module


def layer(module: str) -> str:
    """``ltransform.checkpoint.api`` -> ``checkpoint``; ``ltransform.io`` -> ``io``; ``ltransform`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def allowed(importer: str, imported: str) -> bool:
    source, target = layer(importer), layer(imported)
    if source == "io":
        return False  # a leaf: nothing from ltransform, not even the package's lazy names
    if target == "":
        return True  # ``ltransform`` itself (``__version__``)
    if source in ("core", "distributed"):
        return target in ("core", "distributed", "io")
    if source in ("checkpoint", "models", "steps") and target == "runner":
        return False
    if source == "checkpoint" and target in ("models", "steps"):
        return False
    return True


def modules() -> list[tuple[Path, str]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found.append((path, ".".join(parts[:-1] if path.name == "__init__.py" else parts)))
    return found


def test_imports_point_down_the_layers():
    violations, seen = [], set()
    for path, importer in modules():
        where = path.relative_to(ROOT).as_posix()
        for line, imported in imports(path):
            if allowed(importer, imported):
                continue
            if (where, imported) in KNOWN:
                seen.add((where, imported))
                continue
            violations.append(f"ltransform/{where}:{line} imports {imported}")
    assert violations == [], "imports against the layering of DESIGN.md:\n" + "\n".join(violations)
    assert KNOWN - seen == set(), f"these known exceptions are fixed; delete them from KNOWN: {sorted(KNOWN - seen)}"


@pytest.mark.parametrize("importer, imported, expected", [
    ("ltransform.io", "ltransform", False),
    ("ltransform.io", "ltransform.core.state", False),
    ("ltransform.core.step", "ltransform.distributed.env", True),
    ("ltransform.core.step", "ltransform.io", True),
    ("ltransform.core.step", "ltransform.models.order", False),
    ("ltransform.distributed.env", "ltransform.checkpoint.api", False),
    ("ltransform.checkpoint.api", "ltransform.runner.context", False),
    ("ltransform.checkpoint.api", "ltransform.models.quantize", False),
    ("ltransform.checkpoint.api", "ltransform.steps.precision", False),
    ("ltransform.checkpoint.api", "ltransform", True),
    ("ltransform.models.weights", "ltransform.io", True),
    ("ltransform.steps.precision", "ltransform.runner.run", False),
    ("ltransform.runner.run", "ltransform.checkpoint.api", True),
])
def test_the_rules(importer, imported, expected):
    assert allowed(importer, imported) is expected


def test_the_import_finder_sees_imports_inside_functions_and_resolves_relative_ones(tmp_path):
    package = tmp_path / "ltransform" / "checkpoint"
    package.mkdir(parents=True)
    (tmp_path / "ltransform" / "models").mkdir()
    (tmp_path / "ltransform" / "models" / "quantize.py").write_text("")
    source = package / "api.py"
    source.write_text("import os\nfrom ltransform import io\n\ndef f():\n    from ..models import quantize\n"
                      "    from .files import latest\n    from ltransform import __version__\n")
    (tmp_path / "ltransform" / "io.py").write_text("")
    assert imports(source, tmp_path / "ltransform") == [(2, "ltransform.io"), (5, "ltransform.models.quantize"),
                               (6, "ltransform.checkpoint.files"), (7, "ltransform")]


_NO_MODELS = """
import sys, tempfile, torch
import ltransform.checkpoint.api, ltransform.checkpoint.convert, ltransform.checkpoint.saver
import ltransform as lt
path = lt.save(tempfile.mkdtemp() + "/ckpt.pt", lt.State(model=torch.nn.Linear(2, 1)))
lt.load(path, lt.State(model=torch.nn.Linear(2, 1)))
print(",".join(sorted(m for m in sys.modules if m.startswith("ltransform.models"))))
"""


def test_saving_and_loading_a_checkpoint_never_imports_the_model_transforms():
    out = subprocess.run([sys.executable, "-c", _NO_MODELS], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_ltransform_io_imports_nothing_of_ltransform():
    probe = "import sys, ltransform.io; print(','.join(sorted(m for m in sys.modules if m.startswith('ltransform'))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ltransform,ltransform.io"
