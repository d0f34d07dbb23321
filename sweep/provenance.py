"""Where a run came from: git commit (and whether the tree was dirty), the command line, package
versions, host. Tags on the parent and on every child run, so a number in MLflow can be traced to the
code and environment that produced it. MLflow's own source tags are used where they exist (the UI
shows them in its Source / Version columns)."""
from __future__ import annotations

import getpass
import platform
import shlex
import socket
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "ray", "mlflow", "hydra-core", "numpy")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=1)
def tags() -> dict[str, str]:
    """The provenance tags of this process (computed once: every run of a sweep shares them)."""
    args = sys.argv[1:]
    command = shlex.join(["python", "-m", "sweep", *args]) if sys.argv[0].endswith(
        ("sweep/__main__.py", "-m")) else shlex.join(sys.argv)
    # the UI shows a source name after its last '/': keep the short, path-free part of the command there
    source = " ".join(["sweep", *(a for a in args if "/" not in a)])
    out = {"mlflow.source.type": "LOCAL", "mlflow.source.name": source, "mlflow.user": _user(),
           "sweep.command": command, "sweep.host": socket.gethostname(),
           "sweep.python": platform.python_version(), "sweep.platform": platform.platform(terse=True)}
    commit = _git("rev-parse", "HEAD")
    if commit:
        # dirty = tracked files differ from the commit (untracked results/ or .venv/ do not count)
        status = _git("status", "--porcelain", "--untracked-files=no")
        out.update({"mlflow.source.git.commit": commit, "sweep.git.dirty": str(bool(status)).lower()})
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            out["mlflow.source.git.branch"] = branch
        remote = _git("config", "--get", "remote.origin.url")
        if remote:
            out["mlflow.source.git.repoURL"] = remote
    else:
        out["sweep.git.dirty"] = "unknown (not a git checkout)"
    for p in PACKAGES:
        out[f"version.{p}"] = _version(p)
    return out


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"
