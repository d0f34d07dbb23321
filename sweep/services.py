"""The services a sweep needs when none are given: a local `mlflow server` and a local Ray.

Why a server and not a file store: SQLite written by several processes at once locks; one server
process owns it and everything else talks HTTP. `--workers 1` and no job runner keep it ~0.5 GB.
"""
from __future__ import annotations

import ctypes
import logging
import os
import secrets
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
    prepare_ray_env(local=not address)
    import ray

    _route_ray_logs(log_file, verbose)
    common = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                  configure_logging=verbose)
    if address:
        ray.init(address=address, **common)
        return None
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _temp_dir=temp_dir, _node_ip_address="127.0.0.1", **common)
    except BaseException:  # a failed start leaves nothing: its processes and its temp dir
        try:
            ray.shutdown()
        finally:
            import shutil
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return temp_dir


def prepare_ray_env(local: bool) -> None:
    """Environment a local Ray must see before `ray` is first imported (Ray reads it at import time).

    Local: every listener on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray bind its GCS,
    raylet, worker and agent servers to loopback; without it they listen on all interfaces), no metrics
    export (Prometheus ports answer without a token: the agents', the dashboard head's, the autoscaler
    monitor's), and a token of this sweep's own
    (RAY_AUTH_TOKEN, token mode: Ray then never touches the shared ~/.ray/auth_token).
    A remote cluster keeps the user's settings: its nodes must reach the driver, with the cluster's token."""
    global _PREPARED
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not local or _PREPARED:
        return
    if "ray._private.ray_constants" in sys.modules:
        from ray._private import ray_constants
        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before the loopback setting: import sweep.services first")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_enable_metrics_collection"] = "0"  # no Prometheus /metrics port: it answers without a token
    # The dashboard head and the autoscaler monitor start Prometheus servers of their own on fixed ports
    # (44227, 44217) whenever prometheus_client is importable, with no switch to turn them off; a port no
    # socket can bind makes each start fail (Ray catches it and logs it to its own log files).
    os.environ["DASHBOARD_METRIC_PORT"] = os.environ["AUTOSCALER_METRIC_PORT"] = "-1"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    _PREPARED = True


_PREPARED = False


def ray_pids() -> list[int]:
    """PIDs of the processes the local Ray of this driver started (GCS, raylet, agents)."""
    try:
        import ray
        node = ray._private.worker._global_node
        return [info.process.pid for infos in node.all_processes.values() for info in infos
                if getattr(info, "process", None) is not None]
    except Exception:  # noqa: BLE001 - best effort: only used to clean up after a killed driver
        return []


class ResultsLock:
    """One sweep per results directory: an exclusive flock on results_dir/sweep.lock, released by the
    kernel when the holder dies (even by SIGKILL). The file also names what the holder started (its
    Ray temp dir and the PIDs of its Ray and MLflow processes), so the next sweep can clean up after a
    holder that was killed."""

    def __init__(self, results: Path):
        self.path = results / "sweep.lock"
        self._f = None
        self.state: dict = {}

    def acquire(self) -> list[str]:
        """Take the lock; returns what was cleaned up after a killed predecessor. RuntimeError when held."""
        import fcntl
        import json
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            try:
                holder = json.loads(self._f.read() or "{}").get("pid")
            except ValueError:
                holder = None
            self._f.close()
            raise RuntimeError(f"{self.path.parent} is in use by another sweep (pid {holder}). Fix: wait for it "
                               "to end, or give this sweep another results_dir") from None
        self._f.seek(0)
        try:
            previous = json.loads(self._f.read() or "{}")
        except ValueError:
            previous = {}
        cleaned = _clean_after(previous)
        self.update(pid=os.getpid())
        return cleaned

    def update(self, **state) -> None:
        import json
        self.state.update(state)
        self._f.seek(0)
        self._f.truncate()
        self._f.write(json.dumps(self.state))
        self._f.flush()

    def release(self) -> None:
        if self._f is not None:
            self.update(pid=None, temp_dir=None, pids=[])
            self._f.close()
            self._f = None


def _clean_after(previous: dict) -> list[str]:
    """A predecessor killed by SIGKILL could not clean up: end its Ray/MLflow processes (by the PIDs
    it recorded, only if they still run Ray or MLflow) and remove its Ray temp dir."""
    import shutil
    cleaned = []
    for pid in previous.get("pids") or []:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(w in cmd for w in ("ray", "mlflow", "gcs_server", "raylet")):
            try:
                os.kill(pid, signal.SIGKILL)
                cleaned.append(f"process {pid}")
            except OSError:
                pass
    temp_dir = previous.get("temp_dir")
    if temp_dir and temp_dir.startswith("/tmp/ray-") and Path(temp_dir).is_dir():
        shutil.rmtree(temp_dir, ignore_errors=True)
        cleaned.append(temp_dir)
    return cleaned


class OneComplaintFileHandler(logging.FileHandler):
    """A log file that cannot be written (full disk) is reported once on stderr, then left alone,
    instead of a "Logging error" traceback per record on the console."""

    def handleError(self, record) -> None:
        exc = sys.exc_info()[1]
        if not getattr(self, "_complained", False):
            self._complained = True
            print(f"warning: cannot write the log file {self.baseFilename} ({exc}); logging to it stopped",
                  file=sys.stderr)
        logging.getLogger().removeHandler(self)


def _route_ray_logs(log_file: str | None, verbose: bool) -> None:
    """Ray's driver-side chatter goes to the sweep's log file unless verbose."""
    if verbose or not log_file:
        return
    handler = OneComplaintFileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("ray", "ray._private", "ray.util"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.propagate = False
