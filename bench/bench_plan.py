"""Planning cost vs grid size: `sweep.cli.check_args` (compose, validate every grid point with the trainers'
own rules, expand) for the smoke experiment at 1x, 10x and 100x the seeds, side by side in one process.
Planning is linear when seconds per trial stay flat as the grid grows (it was quadratic: 1000 seeds took
263 s). Also the start-up cost of a bad invocation (one line, exit 2) in a fresh interpreter.

    .venv/bin/python bench/bench_plan.py        # last line: JSON
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def plan_seconds(seeds: int) -> tuple[int, float]:
    from sweep import cli
    args = ["+experiment=smoke", f"sweep.seeds=[{','.join(map(str, range(seeds)))}]"]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trials = cli.check_args(args)
    return len(trials), time.perf_counter() - t0


def bad_invocation_seconds() -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sweep", "+experiment=smoke", "optimizer.lr=0"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: optimizer.lr"), proc.stderr
    return time.perf_counter() - t0


def main() -> None:
    plan_seconds(2)  # warm: imports, Hydra's config search path
    rows = {}
    for seeds in (25, 250, 2500):  # 100, 1000, 10000 trials
        n, s = plan_seconds(seeds)
        rows[n] = s
        print(f"{n:6d} trials planned in {s:7.2f} s  ({1e3 * s / n:.2f} ms per trial)")
    sizes = sorted(rows)
    bad = bad_invocation_seconds()
    print(f"bad invocation, fresh interpreter: {bad:.2f} s to the one-line error")
    print(json.dumps({"trials": sizes, "seconds": [round(rows[n], 3) for n in sizes],
                      "ms_per_trial": [round(1e3 * rows[n] / n, 3) for n in sizes],
                      "growth_per_trial_largest_vs_smallest": round((rows[sizes[-1]] / sizes[-1]) /
                                                                    (rows[sizes[0]] / sizes[0]), 2),
                      "bad_invocation_s": round(bad, 2), "load_avg_1m": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
