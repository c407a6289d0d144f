"""The XLA guide's snippets (docs/guides/xla.md), run in the XLA job's venv on 4 PJRT CPU devices.

The extraction and the runner are tests/test_docs.py's; the main suite leaves this page out.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("ltransform_test_docs", Path(__file__).parents[1] / "test_docs.py")
assert _SPEC is not None and _SPEC.loader is not None
docs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(docs)


def test_the_xla_guide_runs(tmp_path: Path) -> None:
    assert "guides/xla.md" in docs.XLA_PAGES
    docs.run_page("guides/xla.md", python=sys.executable, tmp_path=tmp_path,
                  env={"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"})
