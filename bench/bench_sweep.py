"""Scheduling overhead of the sweep service: the `teacher_student` sweep's wall time against the ideal
sum(trial compute seconds) / workers. Target <= 1.5x. Last line: one JSON object.

    .venv/bin/python bench/bench_sweep.py [--steps N] [--experiment teacher_student] [overrides...]

Runs the real command (`python -m sweep`, embedded MLflow server, local Ray) in a temp dir, then reads
each trial's own compute time (`trial_seconds`, timed inside the worker) back from MLflow. Two ratios:
the trial phase (scheduling only) and the whole command (including Ray and MLflow start-up, report).
Default: the experiment as configured (teacher_student: 25 trials of 3000 steps, ~10 min on 2 cores);
`--steps N` trims every trial for a quicker, harsher measurement (start-up weighs more).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from services import sweep_env, sweep_runs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="teacher_student")
    ap.add_argument("--steps", type=int, default=None, help="trim every trial to this many steps")
    ap.add_argument("--keep-report", metavar="DIR", help="copy the sweep's report (plots, CSV) here")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        args = [f"+experiment={a.experiment}", *([f"trainer.steps={a.steps}"] if a.steps else []), *a.overrides]
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "sweep", *args], cwd=tmp, env=sweep_env(), capture_output=True,
                              text=True)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"sweep failed with exit code {proc.returncode}")
        workers = int(re.search(r"to run on (\d+) workers", proc.stdout).group(1))
        parents, children = sweep_runs(f"sqlite:///{tmp}/results/mlflow/mlflow.db", a.experiment)
        trial_phase = float(parents["tags.sweep.run_seconds"].iloc[0])
        if a.keep_report:
            shutil.copytree(Path(tmp) / "results" / "reports", a.keep_report, dirs_exist_ok=True)
        compute = children["metrics.trial_seconds"]
    ideal = compute.sum() / workers
    out = {"benchmark": "sweep_scheduling", "experiment": a.experiment, "steps": a.steps, "trials": len(children),
           "workers": workers, "sum_trial_compute_s": round(compute.sum(), 2),
           "longest_trial_s": round(compute.max(), 2), "ideal_s": round(ideal, 2),
           "trial_phase_wall_s": round(trial_phase, 2), "command_wall_s": round(wall, 2),
           "ratio_trial_phase": round(trial_phase / ideal, 3), "ratio_command": round(wall / ideal, 3),
           "target": 1.5, "command": "python -m sweep " + " ".join(args)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
