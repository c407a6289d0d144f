"""kill -9 at random moments of checkpoint saves, 100 trials per kind of save, and tallies.

    python tests/benchmarks/killed_saves.py [--trials 100] [--max-delay 0.15] [--dir /tmp/x]

Kinds: ``full`` (``lt.save(path)``), ``sharded`` (``lt.save(dir, sharded=True)`` to the same path
again and again), ``keep`` (``lt.checkpoint_sharded(keep=2)``, every other trial async). Each trial
forks a child that trains a tiny model and saves after every step, SIGKILLs it after a random
delay, then loads the newest checkpoint, saves the next step and looks for leftovers (the trial
code is ``tests/reliability/test_killed_saves.py``). ``killed_mid_save``: the kill left a partial,
``.old`` or ``.dead`` behind; ``lost``: the newest published checkpoint did not load or differed;
``blocked``: the next save raised; ``leftovers``: something was left after the next save. Also
runs one trial per file system operation of a save (``every_op``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

from test_killed_saves import MODES, every_operation, random_trials, tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--max-delay", type=float, default=0.15, help="kill within this many seconds")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    root = Path(args.dir or tempfile.mkdtemp(prefix="ltransform-killed-saves-"))
    failures = []
    for mode in MODES:
        for label, run in (("random", lambda d, mode=mode: random_trials(mode, d, args.trials,
                                                                         max_delay=args.max_delay)),
                           ("every_op", lambda d, mode=mode: every_operation(mode, d, mode == "keep"))):
            start = time.perf_counter()
            outcomes = run(root / f"{mode}-{label}")
            print(f"{mode:8s} {label:9s} {tally(outcomes)}  ({time.perf_counter() - start:.1f} s)", flush=True)
            failures += [o for o in outcomes if o.lost or o.blocked or o.left_after_next_save]
            shutil.rmtree(root / f"{mode}-{label}", ignore_errors=True)
    for outcome in failures:
        print("FAILED:", outcome)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
