"""What the benchmarks share: the real sweep command, run to completion in a directory of their own."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from services import run_sweep  # noqa: E402  (tests/services.py: the sweep in a plain user environment)


def sweep_or_exit(args: list[str], cwd: str | Path) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m sweep ARGS` in `cwd`, no time limit: (the finished process, wall seconds). A failed sweep
    ends the benchmark with the tail of its output: a benchmark of a broken run measures nothing."""
    proc, wall = run_sweep(args, cwd, timeout=None)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"sweep failed with exit code {proc.returncode}")
    return proc, wall
