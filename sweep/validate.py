"""Checks that run before anything starts. A bad config raises ConfigError (field, problem, fix);
the CLI prints it as one line and exits 2, having created nothing."""
from __future__ import annotations

import difflib
import math
import os
import re
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from .schema import OPTIMIZERS, TRAINERS


class ConfigError(Exception):
    def __init__(self, field: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field, problem, fix
        sep = "" if problem.startswith("=") else " "
        super().__init__(f"{field}{sep}{problem}. Fix: {fix}")


def _positive(value, field: str, fix: str) -> None:
    if value is None or not (value > 0) or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(field, f"must be > 0, got {value!r}", fix)


def check_optimizer_name(name: str, field: str = "optimizer.name") -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(field, f"is {name!r}, not a known optimizer",
                          f"use one of {', '.join(OPTIMIZERS)}")


def check_trial(c: dict, where: str = "") -> None:
    """One resolved trial config, checked by the trainers' and the optimizer's own rules (the code the
    workers run: `trainers.config.check_config`, no torch), then the rules of where it will run (device vs
    resources). `where` names the grid point in the message."""
    from trainers.config import check_config
    at = f" (grid point {where})" if where else ""
    try:
        check_config(c)
    except (ValueError, TypeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        found = _FIELD.search(message)
        field = found.group(0) if found else "trainer"
        unknown = re.match(r"unknown field ([\w.]+)", message)
        if unknown:
            field = unknown.group(1)
            raise ConfigError(field, f"is not a field of the {field.split('.')[0]} config{at}",
                              _did_you_mean(field, c)) from None
        problem = message[len(field):] if message.startswith(field) else f": {message}"
        raise ConfigError(field, f"{problem.lstrip(' :') if not problem.startswith('=') else problem}{at}",
                          f"give {field} a valid value (`--cfg job` prints the composed config)") from None


_FIELD = re.compile(r"\b(?:trainer|optimizer)(?:\.[A-Za-z_]\w*)+|\bdevice\b")


def _did_you_mean(field: str, c: dict) -> str:
    section, _, rest = field.partition(".")
    node, parts = c.get(section, {}), rest.split(".")
    for p in parts[:-1]:
        node = node.get(p, {}) if isinstance(node, dict) else {}
    known = [k for k in (node if isinstance(node, dict) else {}) if k != parts[-1]]
    close = difflib.get_close_matches(parts[-1], known, n=1)
    prefix = ".".join([section, *parts[:-1]])
    hint = f"did you mean {prefix}.{close[0]}? " if close else ""
    return (f"{hint}remove it (a key added with + must be one the trainer reads); known: "
            f"{', '.join(sorted(known))}")


def check_device(device: str, gpu: float) -> None:
    """A trial's device against what its worker gets: CUDA only with a GPU reserved (resources.gpu)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device)):
        raise ConfigError("device", f"is {device!r}", "use auto, cpu, cuda or cuda:N")
    if str(device).startswith("cuda") and not gpu > 0:
        raise ConfigError("device", f"is {device!r} but resources.gpu={gpu:g} reserves no GPU for a trial",
                          "set resources.gpu=1 (or a fraction), or device=auto")


def check_service(cfg) -> None:
    """The service's own settings (resources, retries, report, tracking and cluster addresses)."""
    if not str(cfg.name).strip() or not re.fullmatch(r"[\w.+-]+", str(cfg.name)):
        raise ConfigError("name", f"is {cfg.name!r}", "give the experiment a name of letters, digits, . _ + -")
    retry = cfg.tracking.retry_s
    if not (isinstance(retry, (int, float)) and 0 <= retry < math.inf):
        raise ConfigError("tracking.retry_s", f"must be a finite number of seconds >= 0, got {retry!r}",
                          "e.g. tracking.retry_s=300 (how long an outage is waited out)")
    check_results_dir(cfg.results_dir)
    r = cfg.resources
    check_device(cfg.device, r.gpu)
    _positive(r.cpu, "resources.cpu", "give CPUs per trial, e.g. resources.cpu=1")
    if not (r.gpu >= 0):
        raise ConfigError("resources.gpu", f"must be >= 0, got {r.gpu!r}", "use 0 for CPU-only or a fraction like 0.25")
    if r.workers is not None:
        _positive(r.workers, "resources.workers", "give a positive worker count, or null for as many as fit")
    if cfg.sweep.max_retries < 0:
        raise ConfigError("sweep.max_retries", f"must be >= 0, got {cfg.sweep.max_retries}", "use 0 for no retries")
    for name in cfg.sweep.variants:
        check_optimizer_name(name, f"sweep.variants.{name}")
    if cfg.cluster.address is None:
        check_local_resources(cfg)
    if cfg.tracking.uri is not None:
        check_mlflow(cfg.tracking.uri, "tracking.uri",
                     "start the MLflow server or fix the address; omit tracking.uri for an embedded local store")
    if cfg.cluster.address is not None:
        check_ray(cfg.cluster.address, "cluster.address",
                  "start the Ray cluster or fix host:port (its GCS port); omit cluster.address for a local Ray")


def check_known_keys(cfg, schema_cls, prefix: str = "") -> None:
    """Keys added with `+` to the service's own sections: Hydra lets `+` add a key to a typed node,
    but nothing would read it (the trial sections are checked by the trainers' rules instead)."""
    import dataclasses
    import typing
    hints = typing.get_type_hints(schema_cls)
    names = {f.name for f in dataclasses.fields(schema_cls)}
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if prefix == "" and key in ("optimizer", "trainer", "hydra"):
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            raise ConfigError(path, "is not a setting of the sweep",
                              (f"did you mean {prefix}{close[0]}? " if close else "") + "remove it")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            check_known_keys(cfg[key], kind, f"{path}.")


def check_results_dir(path: str) -> None:
    """Where the journal, logs and embedded store go: a directory we can create and write."""
    p = Path(str(path)).expanduser()
    if not str(path).strip():
        raise ConfigError("results_dir", "is empty", "give a directory, e.g. results_dir=results")
    if p.exists() and not p.is_dir():
        raise ConfigError("results_dir", f"{str(path)!r} is a file, not a directory", "point it at a directory")
    existing = p
    while not existing.exists():
        existing = existing.parent
    try:  # a real probe (root passes os.access everywhere); removed at once
        tempfile.TemporaryFile(dir=existing).close()
        writable = existing.is_dir()
    except OSError:
        writable = False
    if not writable:
        raise ConfigError("results_dir", f"{str(path)!r} is not writable ({existing} is read-only for this user)",
                          "point it at a directory you can write")


def local_gpus() -> int:
    """GPUs a local Ray would detect (NVIDIA's /proc entries, narrowed by CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def check_local_resources(cfg) -> None:
    """A local Ray's size is known before it starts: check the requests against it now."""
    c, r = cfg.cluster, cfg.resources
    if c.num_cpus is not None and not c.num_cpus >= 1:
        raise ConfigError("cluster.num_cpus", f"must be >= 1, got {c.num_cpus!r}", "use null for all cores")
    if c.num_gpus is not None and not c.num_gpus >= 0:
        raise ConfigError("cluster.num_gpus", f"must be >= 0, got {c.num_gpus!r}", "use null to detect GPUs")
    cpus = c.num_cpus if c.num_cpus is not None else os.cpu_count()
    gpus = c.num_gpus if c.num_gpus is not None else local_gpus()
    if r.cpu > cpus:
        raise ConfigError("resources.cpu", f"={r.cpu:g} per trial does not fit the local Ray ({cpus} CPUs)",
                          f"use resources.cpu <= {cpus}")
    if r.gpu > gpus:
        raise ConfigError("resources.gpu", f"={r.gpu:g} per trial does not fit the local Ray ({gpus:g} GPUs)",
                          "use resources.gpu=0 (CPU) or run on a machine or cluster with GPUs")


def check_trial_data(trial: dict) -> None:
    """Data the trial reads from a local path (local Ray: the workers share this filesystem)."""
    data = trial["trainer"].get("data") or {}
    if data.get("root") is not None:
        from trainers.data import DataError, find_idx_dir
        try:
            find_idx_dir(data.get("name", "mnist"), Path(data["root"]))
        except DataError as e:
            raise ConfigError("trainer.data.root", f"={data['root']} does not hold the dataset's IDX files",
                              str(e).split("Fix: ", 1)[-1]) from None


def check_reachable(address: str, field: str, fix: str, timeout: float = 3.0) -> socket.socket:
    """A quick TCP connect, so a wrong address fails in seconds and not after a long client retry."""
    host, port = parse_address(address, field)
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConfigError(field, f"{address!r} is unreachable ({host}:{port}: {e.strerror or e})", fix) from None


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def check_ray(address: str, field: str, fix: str, timeout: float = 3.0) -> None:
    """A Ray cluster's GCS (and Ray Client) speak gRPC: send the HTTP/2 preface, expect the server's
    SETTINGS frame. A port that is open but is something else (a web server, Redis) fails in seconds,
    where `ray.init` would wait on it indefinitely."""
    if address.startswith("ray://"):
        address = address[len("ray://"):]
    with check_reachable(address, field, fix, timeout) as sock:
        try:
            sock.sendall(HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError as e:
            head = b""
            why = e.strerror or type(e).__name__
        else:
            why = "it closed the connection" if len(head) < 9 else f"it answered {head[:9]!r}"
    if len(head) < 9 or head[3] != 0x04:
        raise ConfigError(field, f"{address!r} is not a Ray cluster (no gRPC answer: {why})", fix)


def check_mlflow(uri: str, field: str, fix: str, timeout: float = 3.0) -> None:
    """An MLflow tracking server answers GET /health with OK and GET /version with its version.
    Other schemes (file:, sqlite:, databricks) are the MLflow client's to judge."""
    import urllib.error
    import urllib.request
    if not uri.startswith(("http://", "https://")):
        parse_address(uri, field)
        return
    check_reachable(uri, field, fix, timeout).close()
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:
            body = r.read(64)
        ok = body.strip().startswith(b"OK")
        if ok:
            try:
                with urllib.request.urlopen(f"{base}/version", timeout=timeout) as r:
                    ok = bool(re.fullmatch(rb"\d+\.\d+[\w.+-]*", r.read(64).strip()))
            except urllib.error.HTTPError as e:
                ok = e.code in (401, 403)  # an authenticating MLflow: the client brings the credentials
        why = "no MLflow /health and /version answer"
    except urllib.error.HTTPError as e:
        ok, why = False, f"GET /health answered HTTP {e.code}"
    except (OSError, ValueError) as e:
        ok, why = False, f"GET /health failed: {getattr(e, 'reason', None) or e}"
    if not ok:
        raise ConfigError(field, f"{uri!r} is not an MLflow tracking server ({why})", fix)


def parse_address(address: str, field: str) -> tuple[str, int]:
    url = urlparse(address if "://" in address else f"tcp://{address}")
    default = {"http": 80, "https": 443, "ray": 10001}.get(url.scheme)
    try:
        port = url.port or default
    except ValueError:
        port = None
    if not url.hostname or port is None:
        raise ConfigError(field, f"{address!r} is not an address", "write host:port or http://host:port")
    return url.hostname, port
