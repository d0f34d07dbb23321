"""Ctrl-C and SIGTERM end a sweep cleanly, a second sweep on the same results directory is refused, and
the embedded Ray listens on loopback only -- all checked on a real sweep in a plain user environment
(no RAY_* variables from the test: the sweep sets what its local Ray needs itself)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from services import run_sweep, start_sweep, sweep_env, sweep_runs, wait_for
from test_sweep_e2e import SLOW, _alive, _cmdline, _descendants, _runs


def _listening(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process) of every listening TCP/UDP socket of `pids`, from `ss`."""
    out = subprocess.run(["ss", "-lntupH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.append((line.split()[4], ",".join(re.findall(r'\("([^"]+)"', line))))
    return found


def _http_status(addr: str, path: str) -> int | None:
    """Status of a plain HTTP GET (no token) to a listening socket; None when it does not speak HTTP/1."""
    import http.client
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]").removeprefix("::ffff:"), int(port), timeout=3)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None  # gRPC (HTTP/2 only) or a closed connection
    finally:
        conn.close()


def _loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_the_sweep_cleanly(signum, code, mlflow_server, experiment_name, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    experiment_name = re.sub(r"[^\w-]", "-", experiment_name)
    results = tmp_path / "results"
    args = ["+experiment=smoke", f"tracking.uri={mlflow_server.uri}", f"tracking.experiment={experiment_name}",
            f"results_dir={results}", *SLOW]
    env = sweep_env()  # no RAY_* but the usage-stats opt-out
    shared_token = Path.home() / ".ray" / "auth_token"  # Ray's default token file: the sweep's Ray has its own
    token_before = (shared_token.read_bytes(), shared_token.stat().st_mtime_ns) if shared_token.exists() else None
    proc = start_sweep(args, tmp_path, env=env, log=tmp_path / "out")
    family: set[int] = set()
    try:
        def running():
            assert proc.poll() is None, (tmp_path / "out").read_text()[-3000:]
            family.update(_descendants(proc.pid))
            return _runs(client, experiment_name, "RUNNING")
        wait_for(running, timeout=240, interval=0.3, what="a running trial")
        family.update(_descendants(proc.pid))
        lock = json.loads((results / "sweep.lock").read_text())
        assert lock["pid"] == proc.pid and lock["temp_dir"].startswith("/tmp/ray-")
        if signum == signal.SIGTERM:
            # every listening socket of the sweep's process tree is on loopback
            sockets = _listening(family | {proc.pid})
            assert len(sockets) >= 4, sockets  # GCS, raylet, workers, agents at least
            assert [s for s in sockets if not _loopback(s[0])] == [], sockets
            # nothing of the sweep's Ray answers a plain HTTP request without its token: no Prometheus
            # /metrics port (metrics export off), the runtime-env agent says 401, the rest speak gRPC only
            answers = {(a, who): _http_status(a, "/metrics") for a, who in sockets}
            assert {k: v for k, v in answers.items() if v not in (None, 401)} == {}, answers
            assert 401 in answers.values(), answers  # the check reaches an HTTP server (the runtime-env agent)
            gcs = next(p for p in family if "gcs_server" in _cmdline(p))  # started with the sweep's environment
            token = dict(kv.split("=", 1) for kv in Path(f"/proc/{gcs}/environ").read_text().split("\0")
                         if "=" in kv)["RAY_AUTH_TOKEN"]
            assert len(token) == 64 and not any(token in _cmdline(p) for p in family), "the token is in no command line"
            # a second sweep on the same results directory is refused at once, naming it
            second, seconds = run_sweep(args, tmp_path, timeout=120, env=env)
            assert second.returncode == 2, second.stdout + second.stderr
            assert "results_dir" in second.stderr and "in use by another sweep" in second.stderr, second.stderr
            assert "Traceback" not in second.stdout + second.stderr
        core = {p for p in family if re.search(r"gcs_server|raylet|ray::|mlflow|dashboard|runtime_env", _cmdline(p))}
        assert core
        proc.send_signal(signum)
        assert proc.wait(90) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    out = (tmp_path / "out").read_text()
    assert f"interrupted ({signal.Signals(signum).name})" in out and "run the same command again" in out, out[-3000:]
    assert "Traceback" not in out and "core dump" not in out.lower(), out[-3000:]
    parents, children = sweep_runs(mlflow_server.uri, experiment_name)
    assert set(parents["status"]) == {"KILLED"}
    assert "RUNNING" not in set(children["status"]) and "KILLED" in set(children["status"]), children["status"]
    # nothing of it is left: its Ray and MLflow processes (by PID) and its Ray temp dir
    wait_for(lambda: not any(_alive(p) for p in core), timeout=30, what="the sweep's processes to exit")
    assert not Path(lock["temp_dir"]).exists()
    assert json.loads((results / "sweep.lock").read_text())["pid"] is None
    token_after = (shared_token.read_bytes(), shared_token.stat().st_mtime_ns) if shared_token.exists() else None
    assert token_after == token_before, "the user's ~/.ray/auth_token is neither created nor changed"


def test_next_sweep_cleans_up_after_a_killed_one(tmp_path):
    """SIGKILL leaves no chance to clean up: the next sweep on the directory removes the Ray temp dir and
    ends the processes the killed one recorded (only if they still run Ray or MLflow)."""
    results = tmp_path / "results"
    results.mkdir()
    stale = Path("/tmp") / f"ray-stale-{os.getpid()}"
    stale.mkdir()
    decoy = subprocess.Popen(["sleep", "300"])  # a recorded PID that is not Ray's: left alone
    try:
        (results / "sweep.lock").write_text(json.dumps({"pid": 999999999, "temp_dir": str(stale),
                                                         "pids": [decoy.pid]}))
        proc, _ = run_sweep(["+experiment=smoke", "sweep.seeds=[0]", "sweep.axes.optimizer=[sgd]",
                             "trainer.steps=5", "report.enabled=false", f"results_dir={results}"], tmp_path, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert not stale.exists()
        assert decoy.poll() is None, "a PID that does not run Ray or MLflow is not killed"
    finally:
        decoy.kill()
        if stale.exists():
            stale.rmdir()
