"""Opening the results where they are read: the link to an experiment's runs table, and
`python -m sweep ui`, a light MLflow UI (one worker, no job runner) on a results directory.

Why the deep link: MLflow 3 opens an experiment in its GenAI view (traces); `workflowType=machine_learning`
lands on the runs table (model-training view) directly.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path


def runs_url(server: str, experiment_id: str) -> str:
    """The runs table in model-training mode, listing the trials (child runs: flat, not folded under
    their parent) sorted by name, so variant, gain and seed read down the first column."""
    from urllib.parse import quote, urlencode
    query = urlencode({"workflowType": "machine_learning", "searchFilter": "tags.`trial.key` != ''",
                       "orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"}, quote_via=quote)
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def run_url(server: str, experiment_id: str, run_id: str) -> str:
    """One run's page (the parent's shows the summary as its description)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_command(results: Path | str, experiment: str | None = None, port: int | None = None) -> str:
    """The command that serves `results` (this environment's python: works without activating .venv)."""
    python = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") \
        else sys.executable
    args = [python, "-m", "sweep", "ui", "--results", str(results)]
    if experiment:
        args += ["--experiment", experiment]
    if port:
        args += ["--port", str(port)]
    return shlex.join(args)


def record_timings(tracker, parent_id: str, run_s: float, wall_s: float) -> None:
    """The parent's timings add up over resumed invocations: a resume that ran nothing adds 0, it never
    overwrites the first run's trial phase with 0.0."""
    run = tracker.call(tracker.client.get_run, parent_id)
    tags = run.data.tags

    def prior(name: str) -> float:
        try:
            return float(tags.get(name, 0.0))
        except ValueError:
            return 0.0
    n = int(prior("sweep.invocations")) + 1
    total_run, total_wall = prior("sweep.run_seconds") + run_s, prior("sweep.wall_seconds") + wall_s
    tracker.call(tracker.client.set_tag, parent_id, "sweep.run_seconds", f"{total_run:.1f}")
    tracker.call(tracker.client.set_tag, parent_id, "sweep.wall_seconds", f"{total_wall:.1f}")
    tracker.call(tracker.client.set_tag, parent_id, "sweep.invocations", str(n))
    tracker.call(tracker.client.set_tag, parent_id, "sweep.last_run_seconds", f"{run_s:.1f}")


def store_of(results: Path) -> tuple[str, str]:
    """(backend URI, artifacts dir) of the embedded store under a results directory."""
    db = results / "mlflow" / "mlflow.db"
    if not db.exists():
        raise SystemExit(f"error: no MLflow store at {db}. Fix: run a sweep first, or pass --results DIR "
                         "(the sweep's results_dir)")
    return f"sqlite:///{db}", str(results / "mlflow" / "artifacts")


def experiment_id(client, name: str | None) -> tuple[str, str]:
    """(id, name) of the named experiment, else of the one with the most recent run."""
    from mlflow.entities import ViewType
    if name:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            names = [e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
            raise SystemExit(f"error: --experiment {name!r} is not in this store. Fix: use one of {names}")
        return exp.experiment_id, exp.name
    exps = [e for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY) if e.name != "Default"]
    if not exps:
        raise SystemExit("error: the store holds no experiment yet. Fix: run a sweep first")
    best = max(exps, key=lambda e: e.last_update_time or 0)
    return best.experiment_id, best.name


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep ui", description="A light MLflow UI (one worker, no "
                                 "job runner) on a sweep's results; prints the link to the runs table.")
    ap.add_argument("--results", default="results", help="the sweep's results_dir (default: results)")
    ap.add_argument("--experiment", help="experiment to link to (default: the most recently used)")
    ap.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    a = ap.parse_args(argv)
    from mlflow.tracking import MlflowClient

    from .services import MlflowServer, free_port
    results = Path(a.results).resolve()
    backend, artifacts = store_of(results)
    client = MlflowClient(backend)
    exp_id, exp_name = experiment_id(client, a.experiment)
    parents = client.search_runs([exp_id], "tags.`sweep.id` != ''", order_by=["attributes.start_time DESC"])
    parent = next((r for r in parents if "mlflow.parentRunId" not in r.data.tags), None)
    port = a.port
    if port is not None and not _free(a.host, port):
        new = free_port(a.host)
        print(f"port {port} is taken; using {new}", flush=True)
        port = new
    (results / "logs").mkdir(parents=True, exist_ok=True)
    server = MlflowServer(backend, artifacts, port=port, host=a.host, log_path=results / "logs" / "mlflow-ui.log")
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does: the server goes too
    server.start()
    try:
        server.wait_ready()
        print(f"MLflow UI ready in {time.monotonic() - t0:.0f} s (one worker; Ctrl-C stops it). "
              f"Trials of '{exp_name}':\n  {runs_url(server.uri, exp_id)}", flush=True)
        if parent is not None:
            print(f"the summary of its latest sweep:\n  {run_url(server.uri, exp_id, parent.info.run_id)}", flush=True)
        while server.proc.poll() is None:
            time.sleep(0.5)
        print(f"error: the MLflow UI exited with code {server.proc.returncode}; see {server.log_path}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _free(host: str, port: int) -> bool:
    import socket
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
