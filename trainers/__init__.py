"""Trainers: plain functions of one resolved trial config (docs/DESIGN.md Contract 1) that yield metric
records (Contract 2). They know nothing of Ray or MLflow, so a test or a notebook calls them directly::

    from trainers import run_trial
    for record in run_trial({"seed": 0, "device": "cpu",
                             "optimizer": {"name": "sqrt_ngd", "lr": 0.02},
                             "trainer": {"name": "linear_teacher", "gain": 0.1, "steps": 2000}}):
        print(record)

Fields left out take the defaults of the trainer's dataclass (``trainers.config.LinearTeacherConfig``,
``trainers.config.MnistMlpConfig``) and of :class:`OptimizerConfig`: ``trainers.config`` holds every config
rule and needs no torch. Bad fields raise ``ValueError`` naming the field and the fix before any work starts.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from trainers.config import (OPTIMIZERS, PRECISIONS, TRAINER_CONFIGS, OptimizerConfig, check_config,  # noqa: F401
                             check_speed_modes, config_from_dict)

if TYPE_CHECKING:
    import torch

__all__ = ["run_trial", "check_config", "TRAINERS", "OPTIMIZERS", "OptimizerConfig", "resolve_device", "config_from_dict",
           "flush_denormals"]

# trainer name -> module holding `run(config) -> Iterator[dict]`; its config dataclass is in trainers.config.
# torch is imported by the functions that need it: `import trainers.config` (the driver's checks) stays light.
TRAINERS = {name: f"trainers.{name}" for name in TRAINER_CONFIGS}


def resolve_device(device: str) -> torch.device:
    """``auto`` = CUDA when visible, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device: auto or cpu")
    return dev


@contextlib.contextmanager
def flush_denormals():
    """Flush subnormal floats to zero on CPU for the duration of a trial (restored to torch's default
    afterwards). Why: near convergence the float64 curvature algebra meets subnormal intermediates,
    and measured here a full-structure sqrtNGD step on the linear teacher then took ~70 ms instead
    of ~5 ms; values below 2.2e-308 carry no information for training."""
    import torch
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def run_trial(config: Mapping) -> Iterator[dict]:
    """Run one trial: dispatch on ``config["trainer"]["name"]`` and yield its metric records.

    Validation happens eagerly (before the first ``next``), so a bad config fails at the call."""
    trainer = (config.get("trainer") or {}).get("name")
    if trainer not in TRAINERS:
        raise ValueError(f"trainer.name={trainer!r} is not known; use one of {list(TRAINERS)}")
    return _with_threads(importlib.import_module(TRAINERS[trainer]).run(config), trial_threads())


def trial_threads() -> int:
    """Torch threads of one trial: ``OMP_NUM_THREADS`` when set (Ray sets it to the trial's
    ``resources.cpu``), else 1. Why not torch's default (all cores): trials share the machine with
    other trials, and two contending BLAS threads made a linear-teacher step 10-600x slower here."""
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS") or 1), 1)
    except ValueError:
        return 1


def _with_threads(records: Iterator[dict], threads: int) -> Iterator[dict]:
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield from records
    finally:
        torch.set_num_threads(before)
