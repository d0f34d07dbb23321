"""Cost of the report and of start-up, on a 100-trial `smoke` sweep (issue 11 item 4). Target: the
report phase <= 10 % of the sweep's wall time. Last line: one JSON object.

    .venv/bin/python bench/bench_report.py [--seeds 25]

Runs the real command (`python -m sweep +experiment=smoke 'sweep.seeds=[0..N-1]'`: 4 x N trials,
embedded MLflow server, local Ray) in a temp dir and reads the phases from the sweep's own log
(Ray ready, tracking ready, trials done, report done). Then, side by side in this process, against a
light MLflow server on the same store: reading every history the figures need one call per run and
metric (the old report, 4 threads) vs one bulk call per metric (what `python -m sweep report` does for
trials the driver did not stream itself), and the whole `python -m sweep report` command.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import sweep_or_exit  # noqa: E402  (bench/common.py; puts the repo and tests/ on sys.path)
from services import start_mlflow, sweep_env, sweep_runs  # noqa: E402

KEYS = ["train_loss", "test_loss", "conservation_drift", "weight_norm", "noise_mode", "signal_mode.k1",
        "signal_mode.k2"]


def phases(log: str) -> dict:
    def at(pattern):
        m = re.search(pattern + r" after ([\d.]+)s", log)
        return float(m.group(1)) if m else None
    return {"ray_ready_s": at("ray ready"), "tracking_ready_s": at("tracking ready"),
            "trials_done_s": at("trials done"), "flushed_s": at("tracking flushed"), "report_done_s": at("report done")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=25, help="seeds per grid point (4 grid points)")
    a = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        seeds = "[" + ",".join(str(s) for s in range(a.seeds)) + "]"
        args = ["+experiment=smoke", f"sweep.seeds={seeds}"]
        proc, wall = sweep_or_exit(args, tmp)
        log = next((Path(tmp) / "results" / "logs").glob("sweep-*.log")).read_text()
        p = phases(log)
        db = f"sqlite:///{tmp}/results/mlflow/mlflow.db"
        _, children = sweep_runs(db, "smoke")
        run_ids = list(children["run_id"])

        server = start_mlflow(Path(tmp) / "results" / "mlflow", backend_uri=db)
        try:
            from mlflow.tracking import MlflowClient

            from sweep.report import fetch_histories
            from sweep.tracking import Tracker
            client = MlflowClient(server.uri)
            t = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                n_per_call = sum(len(h) for h in pool.map(lambda rk: client.get_metric_history(*rk),
                                                          [(r, k) for r in run_ids for k in KEYS]))
            per_call = time.monotonic() - t
            tracker = Tracker(server.uri, retry_s=30)
            t = time.monotonic()
            n_bulk = len(fetch_histories(tracker, run_ids, KEYS))
            bulk = time.monotonic() - t
            tracker.close(timeout=10)
        finally:
            server.stop()
        t = time.monotonic()
        rep = subprocess.run([sys.executable, "-m", "sweep", "report", "--results", "results"], cwd=tmp,
                             env=sweep_env(), capture_output=True, text=True)
        report_cmd = time.monotonic() - t
        if rep.returncode != 0:
            raise SystemExit(f"sweep report failed: {rep.stderr[-2000:]}")
    report_s = p["report_done_s"] - p["trials_done_s"]
    out = {"benchmark": "report_and_startup", "trials": len(run_ids), "command_wall_s": round(wall, 1),
           **{k: v for k, v in p.items()}, "trial_phase_s": round(p["trials_done_s"] - p["tracking_ready_s"], 1),
           "report_s": round(report_s, 1), "report_fraction": round(report_s / wall, 3), "target_fraction": 0.10,
           "queued_writes_flush_s": round(p["flushed_s"] - p["trials_done_s"], 1) if p["flushed_s"] else None,
           "report_after_flush_s": round(p["report_done_s"] - p["flushed_s"], 1) if p["flushed_s"] else None,
           "history_points": n_bulk, "history_read_per_call_s": round(per_call, 2),
           "history_read_bulk_s": round(bulk, 2), "bulk_speedup": round(per_call / bulk, 1),
           "same_points": n_bulk == n_per_call, "report_command_s": round(report_cmd, 1),
           "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1),
           "command": " ".join(["python -m sweep", *args])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
