"""Shared fixtures: one real `mlflow server` on loopback for the whole test session."""
from __future__ import annotations

import uuid

import pytest

from services import start_mlflow

# No RAY_* settings here: the sweep sets what its local Ray needs itself (sweep/services.py
# prepare_ray_env), and tests/test_sweep_signals.py checks it in a plain user environment.


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite, --workers 1) on a free 127.0.0.1 port; stopped at session end."""
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture
def experiment_name(request) -> str:
    """A fresh MLflow experiment name per test, so tests sharing the server never see each other."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
