"""The services a sweep needs when none are given: a local `mlflow server` and a local Ray.

Why a server and not a file store: SQLite written by several processes at once locks; one server
process owns it and everything else talks HTTP. `--workers 1` and no job runner keep it ~0.5 GB.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the process that started it dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class MlflowServer:
    """`mlflow server` on loopback owning `backend_uri`, serving artifacts into `artifacts_dir`."""

    def __init__(self, backend_uri: str, artifacts_dir: str | Path, port: int | None = None,
                 log_path: str | Path | None = None, host: str = "127.0.0.1"):
        self.backend_uri, self.artifacts_dir = backend_uri, str(artifacts_dir)
        self.host, self.port = host, port or free_port(host)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "MlflowServer":
        Path(self.artifacts_dir).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", self.artifacts_dir, "--host", self.host, "--port", str(self.port),
               "--workers", "1"]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent, start_new_session=True)
        if out is not subprocess.DEVNULL:
            out.close()
        return self

    def wait_ready(self, timeout: float = 90.0) -> "MlflowServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self.proc.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"mlflow server on {self.uri} not ready after {timeout:.0f}s")

    def terminate(self) -> None:
        """Ask it to stop (its own process group: the uvicorn children too); stop() waits."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        """Stop it and its uvicorn children, by pid; waits for them."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self):
        return self.start().wait_ready()

    def __exit__(self, *exc):
        self.stop()


def start_ray(address: str | None, num_cpus: int | None, num_gpus: float | None, verbose: bool,
              log_file: str | None) -> str | None:
    """Connect to `address`, or start a local Ray on loopback in a fresh temp dir (returned, to remove).

    Why a fresh temp dir and address="local": a stale `ray_current_cluster` file from an earlier
    `ray stop` makes a plain `ray.init()` hang for minutes; port 6379 belongs to Redis here."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray binds 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    _route_ray_logs(log_file, verbose)
    common = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                  configure_logging=verbose)
    if address:
        ray.init(address=address, **common)
        return None
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             _temp_dir=temp_dir, _node_ip_address="127.0.0.1", **common)
    return temp_dir


def _route_ray_logs(log_file: str | None, verbose: bool) -> None:
    """Ray's driver-side chatter goes to the sweep's log file unless verbose."""
    if verbose or not log_file:
        return
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("ray", "ray._private", "ray.util"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.propagate = False
