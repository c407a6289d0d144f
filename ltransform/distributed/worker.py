"""``python -m ltransform.distributed.worker SCRIPT ARGS``: what ``ltransform run`` starts on each
rank. It runs SCRIPT as ``python SCRIPT ARGS`` would, and records an uncaught exception for the
launcher's summary (``ltransform.distributed.failures``) before Python prints it."""

from __future__ import annotations

import os
import runpy
import sys
import types

from ltransform.distributed import failures


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m ltransform.distributed.worker SCRIPT [ARGS...]")
    script, *args = argv
    directory = os.environ.get(failures.DIRECTORY) or None
    if directory:
        failures.started(directory)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` sets it
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as error:
        if error.code not in (None, 0):
            failures.record(error, directory)
        raise
    except BaseException as error:  # noqa: BLE001 - printed as Python would, then the same exit status
        error = error.with_traceback(_from_script(error.__traceback__, script))  # without runpy's and ours
        failures.record(error, directory)
        sys.excepthook(type(error), error, error.__traceback__)
        raise SystemExit(1) from None


def _from_script(tb: types.TracebackType | None, script: str) -> types.TracebackType | None:
    """The traceback from the script's first frame on (runpy's and ours cut off)."""
    path, start = os.path.abspath(script), tb
    while start is not None and os.path.abspath(start.tb_frame.f_code.co_filename) != path:
        start = start.tb_next
    return start or tb


if __name__ == "__main__":
    main(sys.argv[1:])
