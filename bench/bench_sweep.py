"""Scheduling overhead of the sweep service: the `teacher_student` sweep's wall time against the ideal
sum(trial compute seconds) / workers. Target <= 1.5x. Last line: one JSON object.

    .venv/bin/python bench/bench_sweep.py [--steps N | --converged] [--experiment teacher_student] [overrides...]

Runs the real command (`python -m sweep`, embedded MLflow server, local Ray) in a temp dir, then reads
each trial's own compute time (`trial_seconds`, timed inside the worker) back from MLflow. Two ratios:
the trial phase (scheduling only) and the whole command (including Ray and MLflow start-up, report).

Budget: today's teacher_student runs every trial until it has converged (`trainer.converge_tol`, SGD
capped at 400k steps: ~33 min on 2 cores), too long to repeat. By default the benchmark keeps the
experiment's grid and settings (5 rules x 5 seeds, lr, damping, clipping, log-spaced evaluations) and
gives every trial the same fixed budget instead: `trainer.steps=3000 trainer.converge_tol=null` (all
steps run; SGD's 400k-step cap is overridden too). `--steps N` changes that budget; `--converged` runs
the experiment exactly as configured.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

from common import sweep_or_exit  # noqa: E402  (bench/common.py; puts the repo and tests/ on sys.path)
from services import sweep_runs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="teacher_student")
    ap.add_argument("--steps", type=int, default=3000, help="fixed steps per trial, run to the end (default 3000)")
    ap.add_argument("--converged", action="store_true", help="the experiment's own budget (until converged)")
    ap.add_argument("--keep-report", metavar="DIR", help="copy the sweep's report (plots, CSV) here")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = ap.parse_args()
    budget = [] if a.converged else [f"trainer.steps={a.steps}", "trainer.converge_tol=null"]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        args = [f"+experiment={a.experiment}", *budget, *a.overrides]
        proc, wall = sweep_or_exit(args, tmp)
        workers = int(re.search(r"to run on (\d+) workers", proc.stdout).group(1))
        parents, children = sweep_runs(f"sqlite:///{tmp}/results/mlflow/mlflow.db", a.experiment)
        trial_phase = float(parents["tags.sweep.run_seconds"].iloc[0])
        if a.keep_report:
            shutil.copytree(Path(tmp) / "results" / "reports", a.keep_report, dirs_exist_ok=True)
        compute = children["metrics.trial_seconds"]
    ideal = compute.sum() / workers
    out = {"benchmark": "sweep_scheduling", "experiment": a.experiment,
           "budget": "as configured (until converged)" if a.converged else f"{a.steps} steps, converge_tol=null",
           "trials": len(children),
           "workers": workers, "sum_trial_compute_s": round(compute.sum(), 2),
           "longest_trial_s": round(compute.max(), 2), "ideal_s": round(ideal, 2),
           "trial_phase_wall_s": round(trial_phase, 2), "command_wall_s": round(wall, 2),
           "ratio_trial_phase": round(trial_phase / ideal, 3), "ratio_command": round(wall / ideal, 3),
           "target": 1.5, "command": "python -m sweep " + " ".join(args)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
