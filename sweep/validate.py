"""Checks that run before anything starts. A bad config raises ConfigError (field, problem, fix);
the CLI prints it as one line and exits 2, having created nothing."""
from __future__ import annotations

import math
import re
import socket
from urllib.parse import urlparse

from .schema import OPTIMIZERS, TRAINERS


class ConfigError(Exception):
    def __init__(self, field: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field} {problem}. Fix: {fix}")


def _positive(value, field: str, fix: str) -> None:
    if value is None or not (value > 0) or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(field, f"must be > 0, got {value!r}", fix)


def check_optimizer_name(name: str, field: str = "optimizer.name") -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(field, f"is {name!r}, not a known optimizer",
                          f"use one of {', '.join(OPTIMIZERS)}")


def check_trial(c: dict) -> None:
    """Value checks the type schema cannot express, on one resolved trial config."""
    o, t = c["optimizer"], c["trainer"]
    check_optimizer_name(o["name"])
    q = o["q"]
    if not (q >= 1):
        raise ConfigError("optimizer.q", f"must be >= 1 (or .inf for SGD), got {q!r}",
                          "use q >= 1: 1 is NGD, 2 is sqrtNGD, .inf is SGD")
    if o["structure"] not in ("full", "block"):
        raise ConfigError("optimizer.structure", f"is {o['structure']!r}", "use full or block")
    _positive(o["lr"], "optimizer.lr", "give a positive learning rate, e.g. optimizer.lr=0.01")
    if not (o["damping"] >= 0):
        raise ConfigError("optimizer.damping", f"must be >= 0, got {o['damping']!r}", "use 0 for none")
    if o["clip"] is not None:
        _positive(o["clip"], "optimizer.clip", "give a positive max update norm, or null for no clipping")
    if o["rtol"] is not None and not (0 <= o["rtol"] < 1):
        raise ConfigError("optimizer.rtol", f"must be in [0, 1), got {o['rtol']!r}", "use null for torch's default")
    if t["name"] not in TRAINERS:
        raise ConfigError("trainer.name", f"is {t['name']!r}", f"use one of {', '.join(TRAINERS)}")
    _positive(t["gain"], "trainer.gain", "give a positive initial gain, e.g. trainer.gain=1e-3")
    _positive(t["steps"], "trainer.steps", "give a positive number of steps")
    _positive(t["eval_every"], "trainer.eval_every", "give a positive evaluation interval")
    _positive(t["max_weight_norm"], "trainer.max_weight_norm", "give a positive divergence bound")
    if t.get("epochs") is not None:
        _positive(t["epochs"], "trainer.epochs", "give a positive number of epochs, or null to budget by steps")
    for f in ("batch_size", "train_subset", "test_subset", "width", "depth", "rank", "train_samples", "test_samples"):
        if t.get(f) is not None:
            _positive(t[f], f"trainer.{f}", f"give a positive trainer.{f}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(c["device"])):
        raise ConfigError("device", f"is {c['device']!r}", "use auto, cpu, cuda or cuda:N")


def check_service(cfg) -> None:
    """The service's own settings (resources, retries, report, tracking and cluster addresses)."""
    r = cfg.resources
    _positive(r.cpu, "resources.cpu", "give CPUs per trial, e.g. resources.cpu=1")
    if not (r.gpu >= 0):
        raise ConfigError("resources.gpu", f"must be >= 0, got {r.gpu!r}", "use 0 for CPU-only or a fraction like 0.25")
    if r.workers is not None:
        _positive(r.workers, "resources.workers", "give a positive worker count, or null for as many as fit")
    if cfg.sweep.max_retries < 0:
        raise ConfigError("sweep.max_retries", f"must be >= 0, got {cfg.sweep.max_retries}", "use 0 for no retries")
    for name in cfg.sweep.variants:
        check_optimizer_name(name, f"sweep.variants.{name}")
    if cfg.tracking.uri is not None:
        check_reachable(cfg.tracking.uri, "tracking.uri",
                        "start the MLflow server or fix the address; omit tracking.uri for an embedded local store")
    if cfg.cluster.address is not None:
        check_reachable(cfg.cluster.address, "cluster.address",
                        "start the Ray cluster or fix host:port; omit cluster.address for a local Ray")


def check_reachable(address: str, field: str, fix: str, timeout: float = 3.0) -> None:
    """A quick TCP connect, so a wrong address fails in seconds and not after a long client retry."""
    host, port = parse_address(address, field)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(field, f"{address!r} is unreachable ({host}:{port}: {e.strerror or e})", fix) from None


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
