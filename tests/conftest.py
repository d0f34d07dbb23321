"""Shared fixtures: one real `mlflow server` on loopback for the whole test session."""
from __future__ import annotations

import os
import uuid

import pytest

from services import start_mlflow

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


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
