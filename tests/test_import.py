"""`import ltransform` stays light: no optional extras, no heavy submodules."""

import subprocess
import sys

# (tqdm is not listed: torch itself imports it.)
OPTIONAL = ["bitsandbytes", "transformer_engine", "torch_xla", "tensorboard", "wandb", "mlflow", "torchao",
            "torch.utils.tensorboard", "matplotlib", "numpy.testing"]


def extras_imported_after(code: str) -> str:
    """The optional extras in sys.modules after a fresh interpreter ran ``code``."""
    probe = f"{code}; import sys; print(','.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


def test_import_ltransform_does_not_import_optional_extras():
    assert extras_imported_after("import ltransform") == ""


def test_import_time_over_torch_is_small():
    """`-X importtime` attributes time to each module; ltransform's own share must stay small."""
    code = "import torch, attrs; import ltransform"
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         check=True).stderr
    own = [line for line in err.splitlines() if line.rstrip().endswith("| ltransform")]
    cumulative_us = int(own[0].split("|")[1])
    # The promise is <= 50 ms over torch; names load on first use, so it measures ~1.5 ms here.
    assert cumulative_us < 50_000, f"import ltransform took {cumulative_us / 1000:.1f} ms over torch"


def test_every_public_name_loads_and_still_no_extra_is_imported():
    assert extras_imported_after("import ltransform as lt; [getattr(lt, n) for n in lt.__all__]") == ""


def test_the_lazy_table_and_the_type_checking_imports_list_the_same_names():
    import ast
    import importlib

    import ltransform as lt

    tree = ast.parse(open(lt.__file__).read())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    imported = {(alias.asname or alias.name): (node.module, alias.name) for node in block.body
                for alias in node.names}
    assert imported == lt._EXPORTS
    assert lt.__all__ == sorted(lt._EXPORTS)  # spelled out for type checkers; the same names
    for name, (module, attribute) in lt._EXPORTS.items():
        assert getattr(lt, name) is getattr(importlib.import_module(module), attribute)
    assert "save" in dir(lt) and lt.__version__
