"""Scheduling overhead of the sweep service: the `teacher_student` sweep's wall time against the ideal
sum(trial compute seconds) / workers. Target <= 1.5x. Last line: one JSON object.

    .venv/bin/python bench/bench_sweep.py [--steps 300] [--experiment teacher_student]

Runs the real command (`python -m sweep`, embedded MLflow server, local Ray) in a temp dir, then reads
each trial's own compute time (`trial_seconds`, timed inside the worker) back from MLflow. Two ratios:
the trial phase (scheduling only) and the whole command (including Ray and MLflow start-up, report).
`--steps` trims every trial's budget (default 300) so the benchmark takes minutes on 2 cores; the
paper-scale sweep is `--steps 3000`.
"""
from __future__ import annotations

import argparse
import json
import re
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
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        args = [f"+experiment={a.experiment}", f"trainer.steps={a.steps}", *a.overrides]
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
