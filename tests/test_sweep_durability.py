"""Nothing lost: a killed driver, a tracking outage and a full disk each stop the sweep without losing a
finished trial, and the next run replays the local journal into MLflow instead of recomputing."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from services import free_port, run_sweep, start_mlflow, start_sweep, sweep_runs, wait_for
from test_sweep_e2e import _alive, _cmdline, _descendants, _runs

# 2 optimizers x 2 gains x 10 seeds of a tiny teacher: a large grid of short trials
LARGE = ["+experiment=smoke", "sweep.seeds=[0,1,2,3,4,5,6,7,8,9]", "trainer.steps=20", "report.enabled=false"]
LARGE_TRIALS = 40


def _output(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _histories_complete(uri: str, experiment: str, n: int, steps: list[int]) -> None:
    parents, children = sweep_runs(uri, experiment)
    assert len(parents) == 1
    assert len(children) == n and children["tags.trial.key"].nunique() == n
    assert set(children["status"]) == {"FINISHED"}
    client = MlflowClient(uri)
    for run_id in children["run_id"]:
        assert sorted(m.step for m in client.get_metric_history(run_id, "test_loss")) == steps, run_id
        assert len(client.get_metric_history(run_id, "final_test_loss")) == 1, run_id


def test_sigkill_after_the_last_trial_loses_nothing_and_recomputes_nothing(tmp_path):
    """The driver is killed once every trial is durable (journal) while MLflow is behind (its server is
    frozen with SIGSTOP); the rerun replays the journal: every trial FINISHED, none run again."""
    server = start_mlflow(tmp_path / "mlflow", port=free_port())
    results = tmp_path / "results"
    args = [*LARGE, f"tracking.uri={server.uri}", "tracking.experiment=large", f"results_dir={results}"]
    log = tmp_path / "first.out"
    proc = start_sweep(args, tmp_path, log=log)
    family: set[int] = set()
    try:
        wait_for(lambda: re.search(r"sweep \d+/40", _output(log)) or proc.poll() is not None, timeout=300,
                 interval=0.2, what="the first finished trial")
        os.kill(server.proc.pid, signal.SIGSTOP)  # MLflow stops acknowledging; trials keep finishing
        try:
            wait_for(lambda: f"durable {LARGE_TRIALS} " in _output(log) or proc.poll() is not None, timeout=300,
                     interval=0.2, what="every trial durable")
            assert proc.poll() is None, _output(log)[-3000:]
            family.update(_descendants(proc.pid))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert (results / "journal").is_dir() and list((results / "journal").glob("*.jsonl"))
        _, children = sweep_runs(server.uri, "large")
        finished_before = int((children["status"] == "FINISHED").sum()) if children is not None else 0
        assert finished_before < LARGE_TRIALS, "MLflow was frozen: it cannot have all of them"
        proc2, _ = run_sweep(args, tmp_path, timeout=300)
        out = proc2.stdout + proc2.stderr
        assert proc2.returncode == 0, out[-4000:]
        m = re.search(r"(\d+) trials already finished \((\d+) replayed from the journal\), (\d+) to run", out)
        assert m, out[-3000:]
        assert int(m.group(1)) == LARGE_TRIALS and int(m.group(3)) == 0, m.group(0)
        assert int(m.group(2)) >= LARGE_TRIALS - finished_before, m.group(0)
        _histories_complete(server.uri, "large", LARGE_TRIALS, [0, 10, 20])
        assert not list((results / "journal").glob("*.jsonl")), "acknowledged: the journal is removed"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in family:
            if _alive(p) and re.search(r"ray|mlflow", _cmdline(p)):
                os.kill(p, signal.SIGKILL)
        server.stop()


def test_worker_killed_before_its_run_was_created_stays_visible_as_deleted(tmp_path):
    """Issue 13 item 3. One worker, two trials. MLflow is frozen (SIGSTOP) while the first trial runs, so
    its last records wait in the driver's queue and the second trial's create call waits behind them when
    that trial's worker is SIGKILLed. The lost attempt still ends up in MLflow as a deleted run with its
    attempt, node id and why; the retry finishes as attempt 2."""
    from mlflow.entities import ViewType

    server = start_mlflow(tmp_path / "mlflow", port=free_port())
    results = tmp_path / "results"
    args = ["+experiment=smoke", "sweep.axes.optimizer=[sqrt_ngd_d]", "sweep.seeds=[0]", "trainer.steps=1500",
            "trainer.eval_every=100", "trainer.converge_tol=null", "resources.workers=1", "report.enabled=false",
            f"tracking.uri={server.uri}", "tracking.experiment=killed", f"results_dir={results}"]
    log = tmp_path / "out"
    proc = start_sweep(args, tmp_path, log=log)
    client = MlflowClient(server.uri)
    family: set[int] = set()
    try:
        def first_trial_running():
            assert proc.poll() is None, _output(log)[-3000:]
            family.update(_descendants(proc.pid))
            return _runs(client, "killed", "RUNNING")
        wait_for(first_trial_running, timeout=300, interval=0.2, what="the first trial's run")
        os.kill(server.proc.pid, signal.SIGSTOP)  # the first trial's records now queue up in the driver
        try:
            assert not re.search(r"sweep \d/2", _output(log)), "the first trial ends after MLflow froze"
            wait_for(lambda: re.search(r"sweep 1/2", _output(log)) or proc.poll() is not None, timeout=240,
                     interval=0.1, what="the first trial to end")  # the second one is dispatched next
            worker = [p for p in _descendants(proc.pid) if "ray::TrialWorker" in _cmdline(p)]
            assert len(worker) == 1, worker
            os.kill(worker[0], signal.SIGKILL)
            wait_for(lambda: any("attempt 1 lost" in f.read_text() for f in (results / "logs").glob("sweep-*.log")),
                     timeout=120, interval=0.2, what="the driver to retry the trial")
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for p in family:
            if _alive(p) and re.search(r"ray|mlflow", _cmdline(p)):
                os.kill(p, signal.SIGKILL)
    try:
        out = _output(log)
        assert proc.returncode == 0, out[-3000:]
        _, children = sweep_runs(server.uri, "killed")
        assert len(children) == 2 and set(children["status"]) == {"FINISHED"}
        assert sorted(children["tags.attempt"]) == ["1", "2"]
        node = children["tags.node.id"].iloc[0]
        assert set(children["tags.node.id"]) == {node} and len(node) > 10
        retried = children[children["tags.attempt"] == "2"]["tags.trial.key"].iloc[0]
        exp = client.get_experiment_by_name("killed")
        lost = client.search_runs([exp.experiment_id], "", run_view_type=ViewType.DELETED_ONLY)
        assert [(r.data.tags.get("trial.key"), r.data.tags.get("attempt"), r.data.tags.get("node.id"))
                for r in lost] == [(retried, "1", node)], [r.data.tags for r in lost]
        tags = lost[0].data.tags
        assert tags["status"] == "retried" and tags["error"].startswith("worker died: "), tags
    finally:
        server.stop()


def test_tracking_outage_past_retry_s_stops_the_sweep_resumably(tmp_path):
    server = start_mlflow(tmp_path / "mlflow", port=free_port())
    results = tmp_path / "results"
    args = [*LARGE, f"tracking.uri={server.uri}", "tracking.experiment=outage", f"results_dir={results}",
            "tracking.retry_s=3"]
    log = tmp_path / "first.out"
    proc = start_sweep(args, tmp_path, log=log)
    try:
        wait_for(lambda: re.search(r"sweep \d+/40", _output(log)) or proc.poll() is not None, timeout=300,
                 interval=0.2, what="the first finished trial")
        server.stop()
        t0 = time.monotonic()
        code = proc.wait(120)
        stopped_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    out = _output(log)
    assert code == 3, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "tracking stopped" in errors[0] and "tracking.retry_s=3" in errors[0], out[-3000:]
    assert "run the same command again" in errors[0]
    assert "Traceback" not in out and "Logging error" not in out, out[-3000:]
    assert len(out.splitlines()) < 60, "the console is not flooded"
    assert stopped_after < 60, f"stopped {stopped_after:.0f} s after the outage began (retry_s=3)"
    server.start().wait_ready()  # the server is back, on the same port
    try:
        proc2, _ = run_sweep(args, tmp_path, timeout=300)
        assert proc2.returncode == 0, (proc2.stdout + proc2.stderr)[-4000:]
        _histories_complete(server.uri, "outage", LARGE_TRIALS, [0, 10, 20])
    finally:
        server.stop()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 256 KiB tmpfs the test mounts (needs root, as on this project's machines and CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_reported_as_such(small_filesystem, mlflow_server, tmp_path):
    """Results on a filesystem that fills mid-sweep: one clear message, exit 3, within seconds of filling,
    no 'Logging error' flood, nothing left running."""
    args = ["+experiment=smoke", "trainer.steps=400", "trainer.eval_every=1", "trainer.converge_tol=null", "report.enabled=false",
            f"tracking.uri={mlflow_server.uri}", "tracking.experiment=fulldisk", f"results_dir={small_filesystem}"]
    log = tmp_path / "out"
    proc = start_sweep(args, tmp_path, log=log)
    family: set[int] = set()
    try:
        def ended():
            family.update(_descendants(proc.pid))
            return proc.poll() is not None
        wait_for(ended, timeout=300, interval=0.3, what="the sweep to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    out = _output(log)
    assert proc.returncode == 3, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"results_dir {small_filesystem} is full" in errors[0], out[-3000:]
    assert "Traceback" not in out and out.count("Logging error") == 0, out[-3000:]
    assert len(out.splitlines()) < 60, "the console is not flooded"
    _, children = sweep_runs(mlflow_server.uri, "fulldisk")
    assert children is None or "FINISHED" not in set(children["status"]) or \
        all(children[children["status"] == "FINISHED"]["metrics.final_test_loss"].notna())
    core = {p for p in family if re.search(r"gcs_server|raylet|ray::", _cmdline(p))}
    wait_for(lambda: not any(_alive(p) for p in core), timeout=30, what="the sweep's Ray to exit")
