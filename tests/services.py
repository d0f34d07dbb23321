"""Reusable helpers for tests that need real services: an `mlflow server` on a free loopback port,
a fresh Ray temp dir, and `python -m sweep` in a subprocess. Every helper stops what it starts."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep.services import MlflowServer, free_port  # noqa: F401  (re-exported for other test modules)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def sweep_env(**extra: str) -> dict:
    """Environment for a sweep subprocess: the user's, with the repo importable and no usage stats. No
    loopback setting: the sweep binds its local Ray to 127.0.0.1 itself (tests/test_sweep_signals.py)."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HYDRA_FULL_ERROR="0")
    for k in [k for k in env if k.startswith("RAY_") and k != "RAY_USAGE_STATS_ENABLED"]:
        env.pop(k)  # a plain user's: in-process Ray calls of earlier tests leave RAY_* in os.environ
    env.update(extra)
    return env


def fresh_ray_temp_dir() -> str:
    """A new short temp dir for Ray (socket paths must fit 107 chars; a stale one can hang ray.init)."""
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


def start_mlflow(root: str | Path, backend_uri: str | None = None, port: int | None = None) -> MlflowServer:
    """Start an `mlflow server` on 127.0.0.1 (SQLite under `root` unless `backend_uri` is given),
    serving artifacts into root/artifacts; returns once /health answers. Call .stop() when done."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(backend_uri or f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", port=port,
                          log_path=root / "server.log")
    server.start()
    try:
        return server.wait_ready()
    except BaseException:
        server.stop()
        raise


def run_sweep(args: list[str], cwd: str | Path, timeout: float = 300, env: dict | None = None):
    """`python -m sweep ARGS` to completion; returns (CompletedProcess, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.run([PYTHON, "-m", "sweep", *args], cwd=cwd, env=env or sweep_env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def start_sweep(args: list[str], cwd: str | Path, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """`python -m sweep ARGS` in the background (for tests that interrupt it); output to `log`."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([PYTHON, "-m", "sweep", *args], cwd=cwd, env=env or sweep_env(), stdout=out,
                            stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    """End a background process started here: SIGTERM first (a sweep then cleans up), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:.0f}s")


def sweep_runs(uri: str, experiment: str):
    """(parents, children) DataFrames of an experiment's visible runs on the server at `uri`."""
    import mlflow
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None, None
    runs = mlflow.search_runs([exp.experiment_id], max_results=5000)
    if runs.empty or "tags.mlflow.parentRunId" not in runs:
        return runs, runs.iloc[0:0]
    is_child = runs["tags.mlflow.parentRunId"].notna()
    return runs[~is_child], runs[is_child]
