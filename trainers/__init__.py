"""Trainers: plain functions of one resolved trial config (docs/DESIGN.md Contract 1) that yield metric
records (Contract 2). They know nothing of Ray or MLflow, so a test or a notebook calls them directly::

    from trainers import run_trial
    for record in run_trial({"seed": 0, "device": "cpu",
                             "optimizer": {"name": "sqrt_ngd", "lr": 0.02},
                             "trainer": {"name": "linear_teacher", "gain": 0.1, "steps": 2000}}):
        print(record)

Fields left out take the defaults of the trainer's dataclass (``trainers.linear_teacher.LinearTeacherConfig``,
``trainers.mnist_mlp.MnistMlpConfig``) and of :class:`OptimizerConfig`. Bad fields raise ``ValueError``
naming the field and the fix before any work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

__all__ = ["run_trial", "check_config", "TRAINERS", "OPTIMIZERS", "OptimizerConfig", "resolve_device", "config_from_dict",
           "flush_denormals"]

# trainer name -> module holding `run(config) -> Iterator[dict]` and its `*Config` dataclass.
TRAINERS = {"linear_teacher": "trainers.linear_teacher", "mnist_mlp": "trainers.mnist_mlp"}
TRAINER_CONFIGS = {"linear_teacher": "LinearTeacherConfig", "mnist_mlp": "MnistMlpConfig"}

# optimizer name -> (q, structure); None = q is free (fractional q-NGD).
OPTIMIZERS = {
    "sgd": (math.inf, "full"),
    "ngd": (1.0, "full"),
    "sqrt_ngd": (2.0, "full"),
    "ngd_d": (1.0, "block"),
    "sqrt_ngd_d": (2.0, "block"),
    "qngd": (None, "full"),
    "qngd_d": (None, "block"),
}


@dataclass(frozen=True)
class OptimizerConfig:
    """``optimizer:`` of a trial config. ``q`` and ``structure`` follow from ``name`` (given values must
    agree); only ``qngd``/``qngd_d`` take ``q`` freely (>= 1). The step is ``w <- w - lr * D`` where
    D = (H+ + damping)^(-1/q) g (``damping_form: lm``, Levenberg-Marquardt: D -> 0 as damping -> inf) or
    D = ((1 + damping) / (H+ + damping))^(1/q) g (``damping_form: interpolate``, paper S.I.2: D -> g,
    i.e. SGD, as damping -> inf) (block: per layer, with the 1/d^(1/q) factor), then, when ``clip`` is
    set, the whole update lr*D is scaled down to norm ``clip``. ``rtol`` is the Moore–Penrose cut-off
    relative to the largest eigenvalue (null = the update-rule module's default). ``curvature_every``
    (block rules, mnist_mlp): 1 = exact curvature every step; k > 1 reuses the output factors'
    decompositions for up to k steps under a refresh rule (trainers.mlp_curvature). ``precision``:
    ``float64`` (exact) or ``mixed`` (float32 decompositions where a condition estimate says they
    match float64, float64 otherwise; block rules)."""

    name: str = "sgd"
    q: float = math.inf
    structure: str = "full"
    lr: float = 0.01
    damping: float = 0.0
    damping_form: str = "lm"
    clip: float | None = None
    rtol: float | None = None
    curvature_every: int = 1
    precision: str = "float64"

    @classmethod
    def from_dict(cls, raw: Mapping | None) -> OptimizerConfig:
        raw = dict(raw or {})
        name = raw.get("name", cls.name)
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name={name!r} is not known; use one of {list(OPTIMIZERS)}")
        q_preset, structure = OPTIMIZERS[name]
        if "structure" in raw and raw["structure"] != structure:
            raise ValueError(f"optimizer.structure={raw['structure']!r} contradicts optimizer.name={name!r} "
                             f"(which means structure {structure!r}); drop the field or pick the matching name")
        q = float(raw.get("q", 2.0 if q_preset is None else q_preset))
        if q_preset is not None and q != q_preset:
            raise ValueError(f"optimizer.q={q} contradicts optimizer.name={name!r} (q={q_preset}); use "
                             f"name {'qngd' if structure == 'full' else 'qngd_d'} for a free q")
        raw.update(name=name, q=q, structure=structure)
        cfg = config_from_dict(cls, raw, "optimizer")
        if not (cfg.q >= 1.0):
            raise ValueError(f"optimizer.q={cfg.q} must be >= 1 (or .inf for sgd)")
        if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
            raise ValueError(f"optimizer.lr={cfg.lr} must be a positive finite number")
        if not (cfg.damping >= 0):
            raise ValueError(f"optimizer.damping={cfg.damping} must be >= 0")
        if cfg.damping_form not in ("lm", "interpolate"):
            raise ValueError(f"optimizer.damping_form={cfg.damping_form!r} must be lm (Levenberg-Marquardt, "
                             "(H + eps)^(-1/q)) or interpolate (paper S.I.2, ((1 + eps) / (H + eps))^(1/q))")
        if cfg.clip is not None and not cfg.clip > 0:
            raise ValueError(f"optimizer.clip={cfg.clip} must be > 0, or null for no clipping")
        if cfg.rtol is not None and not 0 <= cfg.rtol < 1:
            raise ValueError(f"optimizer.rtol={cfg.rtol} must be in [0, 1), or null for the default")
        if isinstance(cfg.curvature_every, bool) or not isinstance(cfg.curvature_every, int) or cfg.curvature_every < 1:
            raise ValueError(f"optimizer.curvature_every={cfg.curvature_every!r} must be an integer >= 1 "
                             f"(1 = exact curvature every step)")
        if cfg.curvature_every > 1 and cfg.structure != "block":
            raise ValueError(f"optimizer.curvature_every={cfg.curvature_every} needs a block rule (ngd_d, "
                             f"sqrt_ngd_d, qngd_d); {cfg.name} is exact per batch only: use 1")
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"optimizer.precision={cfg.precision!r} must be one of {list(PRECISIONS)}")
        if cfg.precision != "float64" and cfg.structure != "block":
            raise ValueError(f"optimizer.precision={cfg.precision!r} needs a block rule (ngd_d, sqrt_ngd_d, "
                             f"qngd_d); {cfg.name} runs in float64: use precision float64")
        return cfg


PRECISIONS = ("float64", "mixed")


def config_from_dict(cls, raw: Mapping, where: str):
    """Build dataclass ``cls`` from a mapping; an unknown key is a ValueError naming ``where.key``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown field {where}.{unknown[0]}; known fields: {sorted(names)}")
    return cls(**raw)


def resolve_device(device: str) -> torch.device:
    """``auto`` = CUDA when visible, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
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


def check_config(config: Mapping) -> None:
    """Apply every rule of ``run_trial`` that needs no data and no device: the trainer's and the
    optimizer's dataclasses (unknown keys included). Raises the same ``ValueError`` a worker would;
    the sweep driver calls it on every grid point before anything starts."""
    trainer = (config.get("trainer") or {}).get("name")
    if trainer not in TRAINERS:
        raise ValueError(f"trainer.name={trainer!r} is not known; use one of {list(TRAINERS)}")
    unknown = sorted(set(config) - {"seed", "device", "optimizer", "trainer"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]}; a trial config has seed, device, optimizer, trainer")
    cls = getattr(importlib.import_module(TRAINERS[trainer]), TRAINER_CONFIGS[trainer])
    config_from_dict(cls, config["trainer"], "trainer")
    check_speed_modes(trainer, OptimizerConfig.from_dict(config.get("optimizer")))


def check_speed_modes(trainer: str, opt: OptimizerConfig) -> None:
    """``curvature_every`` / ``precision`` exist for the MLP's block rule only (trainers.mlp_curvature)."""
    if trainer != "mnist_mlp" and (opt.curvature_every != 1 or opt.precision != "float64"):
        raise ValueError(f"optimizer.curvature_every and optimizer.precision apply to trainer mnist_mlp only; "
                         f"the {trainer} rule is exact in float64: use 1 and float64")


def trial_threads() -> int:
    """Torch threads of one trial: ``OMP_NUM_THREADS`` when set (Ray sets it to the trial's
    ``resources.cpu``), else 1. Why not torch's default (all cores): trials share the machine with
    other trials, and two contending BLAS threads made a linear-teacher step 10-600x slower here."""
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS") or 1), 1)
    except ValueError:
        return 1


def _with_threads(records: Iterator[dict], threads: int) -> Iterator[dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield from records
    finally:
        torch.set_num_threads(before)
