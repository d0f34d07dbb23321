"""Planning cost vs grid size: `sweep.cli.check_args` (compose, validate every grid point with the trainers'
own rules, expand) for the smoke experiment at 1x, 10x and 100x the seeds, side by side in one process.
Planning is linear when seconds per trial stay flat as the grid grows (it was quadratic: 1000 seeds took
263 s). Also the start-up cost of a bad invocation (one line, exit 2) in a fresh interpreter: wall and CPU
seconds, and whether it imported torch, Ray, MLflow or numpy (it should not: the rules are in trainers.config).
`--bad-only` measures just that.

    .venv/bin/python bench/bench_plan.py        # last line: JSON
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import statistics
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


def bad_invocation(repeats: int = 5) -> dict:
    """A bad invocation in a fresh interpreter, to its one-line error: median wall and CPU seconds (the
    child's user + system time; CPU is less sensitive to other jobs' load than wall time), and which heavy
    modules it imported (`-X importtime`, one more run)."""
    cmd = [sys.executable, "-m", "sweep", "+experiment=smoke", "optimizer.lr=0"]
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        assert proc.returncode == 2 and proc.stderr.startswith("error: optimizer.lr"), proc.stderr
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=REPO, capture_output=True, text=True)
    top = {ln.split("|")[-1].strip().split(".")[0] for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    return {"wall_s": round(statistics.median(walls), 2), "cpu_s": round(statistics.median(cpus), 2),
            "heavy_imports": sorted(top & {"torch", "ray", "mlflow", "numpy"})}


def main() -> None:
    if "--bad-only" in sys.argv:
        bad = bad_invocation()
        print(json.dumps({**bad, "load_avg_1m": round(os.getloadavg()[0], 1)}))
        return
    plan_seconds(2)  # warm: imports, Hydra's config search path
    rows = {}
    for seeds in (25, 250, 2500):  # 100, 1000, 10000 trials
        n, s = plan_seconds(seeds)
        rows[n] = s
        print(f"{n:6d} trials planned in {s:7.2f} s  ({1e3 * s / n:.2f} ms per trial)")
    sizes = sorted(rows)
    bad = bad_invocation()
    print(f"bad invocation, fresh interpreter: {bad['wall_s']:.2f} s wall, {bad['cpu_s']:.2f} s CPU to the one-line "
          f"error (median of 5); heavy imports: {', '.join(bad['heavy_imports']) or 'none'}")
    print(json.dumps({"trials": sizes, "seconds": [round(rows[n], 3) for n in sizes],
                      "ms_per_trial": [round(1e3 * rows[n] / n, 3) for n in sizes],
                      "growth_per_trial_largest_vs_smallest": round((rows[sizes[-1]] / sizes[-1]) /
                                                                    (rows[sizes[0]] / sizes[0]), 2),
                      "bad_invocation_s": bad["wall_s"], "bad_invocation_cpu_s": bad["cpu_s"],
                      "bad_invocation_heavy_imports": bad["heavy_imports"], "load_avg_1m": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
