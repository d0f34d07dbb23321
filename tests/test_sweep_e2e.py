"""End to end: `python -m sweep` in a subprocess against a real local Ray and a real `mlflow server`
on loopback, then the runs read back through MLflow's API. No mocks."""
from __future__ import annotations

import io
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from services import run_sweep, start_sweep, sweep_runs, wait_for

SMOKE_POINTS = 8  # 2 optimizers x 2 gains x 2 seeds (conf/experiment/smoke.yaml)
# Slow enough to interrupt: one optimizer, 2 gains x 2 seeds, seconds per trial.
SLOW = ["sweep.axes.optimizer=[sqrt_ngd_d]", "trainer.steps=12000", "trainer.eval_every=200", "trainer.converge_tol=null"]


def _args(server, experiment, tmp_path, *extra):
    return ["+experiment=smoke", f"tracking.uri={server.uri}", f"tracking.experiment={experiment}",
            f"results_dir={tmp_path / 'results'}", *extra]


def test_smoke_sweep_end_to_end(mlflow_server, experiment_name, tmp_path):
    proc, seconds = run_sweep(_args(mlflow_server, experiment_name, tmp_path), tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    parents, children = sweep_runs(mlflow_server.uri, experiment_name)
    assert len(parents) == 1
    parent_id = parents["run_id"].iloc[0]
    assert len(children) == SMOKE_POINTS and set(children["status"]) == {"FINISHED"}
    assert children["tags.trial.key"].nunique() == SMOKE_POINTS
    assert set(children["tags.mlflow.parentRunId"]) == {parent_id}
    assert set(children["tags.optimizer"]) == {"sgd", "sqrt_ngd_d"}
    assert set(children["tags.status"]) == {"finished"} and set(children["tags.attempt"]) == {"1"}
    assert children["tags.node.id"].str.len().min() > 10
    assert set(parents["tags.sweep.id"]) == set(children["tags.sweep.id"])
    # params: the flattened resolved config of each trial
    assert set(children["params.trainer.gain"].astype(float)) == {0.1, 0.01}
    assert set(children["params.optimizer.lr"].astype(float)) == {0.05}
    assert set(children["params.trainer.width"]) == {"6"} and set(children["params.seed"]) == {"0", "1"}
    assert set(children["params.optimizer.q"]) == {"inf", "2.0"}
    # metrics of the contract, per evaluation with its step, and the summary
    for key in ("train_loss", "test_loss", "weight_norm", "weight_norm.l1", "conservation_drift",
                "signal_mode.k1", "noise_mode", "final_test_loss", "early_stop_step", "early_stop_test_loss",
                "weight_norm_growth", "max_conservation_drift", "norm_excess", "final_norm_excess", "converged"):
        assert children[f"metrics.{key}"].notna().all(), key
    client = MlflowClient(mlflow_server.uri)
    for run_id in children["run_id"]:
        assert sorted(m.step for m in client.get_metric_history(run_id, "test_loss")) == list(range(0, 61, 10))
    # no full counterpart of sqrt_ngd_d in the smoke grid, and no trial converges in 60 steps: no ratio
    assert "metrics.norm_excess_vs_full" not in children or children["metrics.norm_excess_vs_full"].isna().all()
    assert (children["metrics.converged"] == 0).all()
    c = children.assign(gain=children["params.trainer.gain"].astype(float), seed=children["params.seed"])
    # report artifacts on the parent, and the summary table agrees with the runs
    names = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert names >= {"report/summary.csv", "report/learning_curves.png", "report/drift_and_norm_excess.png",
                     "report/modes.png"}
    local = client.download_artifacts(parent_id, "report/summary.csv", str(tmp_path))
    summary = pd.read_csv(local)
    assert len(summary) == 4 and set(summary["trials"]) == {2}
    row = summary[(summary["variant"] == "sqrt_ngd_d") & (summary["gain"] == 0.01)].iloc[0]
    runs = c[(c["tags.optimizer"] == "sqrt_ngd_d") & (c["gain"] == 0.01)]["metrics.final_test_loss"]
    assert row["final_test_loss_mean"] == pytest.approx(runs.mean(), rel=1e-9)
    assert row["final_test_loss_std"] == pytest.approx(runs.std(ddof=0), rel=1e-9)
    for png in ("learning_curves.png", "modes.png"):
        head = Path(client.download_artifacts(parent_id, f"report/{png}", str(tmp_path))).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n"
    assert "mean ± std over seeds" in proc.stdout and f"parent run {parent_id}" in out
    print(f"smoke sweep end to end: {seconds:.1f}s")


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _runs(client, experiment, status):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"attributes.status = '{status}' and "
                              "tags.`mlflow.parentRunId` != ''")


def test_killed_driver_resumes_without_duplicates(mlflow_server, experiment_name, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    args = _args(mlflow_server, experiment_name, tmp_path, *SLOW)
    proc = start_sweep(args, tmp_path, log=tmp_path / "first.out")
    family: set[int] = set()
    try:
        def one_done_one_running():
            family.update(_descendants(proc.pid))
            return _runs(client, experiment_name, "FINISHED") and _runs(client, experiment_name, "RUNNING")
        wait_for(one_done_one_running, timeout=240, interval=0.3, what="a finished and a running trial")
        finished_before = {r.info.run_id for r in _runs(client, experiment_name, "FINISHED")}
        family.update(_descendants(proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # what the killed driver started goes with it: the mlflow server (if any), Ray's GCS and raylet, the
        # workers. (Ray's dashboard and runtime-env agents notice later, up to about a minute; the cleanup
        # below ends them if they are still there.)
        core = {p for p in family if re.search(r"gcs_server|raylet|TrialWorker|mlflow", _cmdline(p))}
        assert core
        wait_for(lambda: not any(_alive(p) for p in core), timeout=30, what="the killed driver's Ray to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in family:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    proc2, _ = run_sweep(args, tmp_path, timeout=300)
    assert proc2.returncode == 0, (proc2.stdout + proc2.stderr)[-4000:]
    assert re.search(rf"{len(finished_before)} trials already finished", proc2.stdout.replace("\n", " "))
    parents, children = sweep_runs(mlflow_server.uri, experiment_name)
    assert len(parents) == 1, "the rerun reuses the sweep's parent run"
    assert len(children) == 4 and children["tags.trial.key"].nunique() == 4
    assert set(children["status"]) == {"FINISHED"}
    assert finished_before <= set(children["run_id"]), "finished trials are not rerun"
    for run_id in finished_before:  # and untouched: one value per summary metric, as logged the first time
        assert len(client.get_metric_history(run_id, "final_test_loss")) == 1


def test_dead_worker_is_replaced_and_its_trial_retried(mlflow_server, experiment_name, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    proc = start_sweep(_args(mlflow_server, experiment_name, tmp_path, *SLOW), tmp_path, log=tmp_path / "out")
    try:
        def a_running_worker():
            if not _runs(client, experiment_name, "RUNNING"):
                return None
            busy = [p for p in _descendants(proc.pid) if "ray::TrialWorker.run" in _cmdline(p)]
            return busy[0] if busy else None
        victim = wait_for(a_running_worker, timeout=240, interval=0.3, what="a worker running a trial")
        os.kill(victim, signal.SIGKILL)
        proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    out = (tmp_path / "out").read_text()
    assert proc.returncode == 0, out[-4000:]
    parents, children = sweep_runs(mlflow_server.uri, experiment_name)
    assert len(children) == 4 and set(children["status"]) == {"FINISHED"}
    assert children["tags.trial.key"].nunique() == 4
    assert (children["tags.attempt"].astype(int) >= 2).sum() == 1
    exp = client.get_experiment_by_name(experiment_name)
    lost = client.search_runs([exp.experiment_id], "", run_view_type=ViewType.DELETED_ONLY)
    assert [r.data.tags.get("attempt") for r in lost] == ["1"]
    assert lost[0].data.tags["node.id"] in set(children["tags.node.id"])
    assert lost[0].data.tags["status"] == "retried" and lost[0].data.tags["error"].startswith("worker died: ")


def test_diverged_trial_does_not_stop_the_embedded_sweep(tmp_path):
    """Default tracking (embedded `mlflow server` over ./results) and a variant made to blow up."""
    proc, seconds = run_sweep(["+experiment=smoke", "sweep.variants.sgd.optimizer.lr=1000"], tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    db = tmp_path / "results" / "mlflow" / "mlflow.db"
    assert db.exists()
    ui = re.search(r"Open the runs table: (\S+) -m sweep ui --results (\S+)", proc.stdout)
    assert ui and Path(ui.group(2)) == tmp_path / "results"
    assert Path(tmp_path, ui.group(1)).resolve() == Path(sys.executable).resolve(), \
        "names this environment's python: works without activating .venv"
    # the embedded server is gone: the store is ours to read directly
    port = int(re.search(r"tracking: http://127\.0\.0\.1:(\d+)", proc.stdout).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the embedded mlflow server must be stopped"
    parents, children = sweep_runs(f"sqlite:///{db}", "smoke")
    assert len(parents) == 1 and len(children) == SMOKE_POINTS and set(children["status"]) == {"FINISHED"}
    sgd = children[children["tags.optimizer"] == "sgd"]
    other = children[children["tags.optimizer"] != "sgd"]
    assert set(sgd["tags.status"]) == {"diverged"} and sgd["tags.diverged_step"].astype(int).min() >= 0
    assert set(other["tags.status"]) == {"finished"}
    assert "diverged 4" in proc.stdout  # the live line's final count
    summary = pd.read_csv(next((tmp_path / "results" / "reports").glob("*/summary.csv")))
    assert summary.set_index("variant").loc["sgd", "diverged"].tolist() == [2, 2]
    print(f"embedded smoke sweep with 4 diverged trials: {seconds:.1f}s")
