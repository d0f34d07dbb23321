"""Structured config schemas (Hydra ConfigStore) for `python -m sweep`.

Why: Hydra checks every key and type against these dataclasses while composing, so an unknown key or a
wrong type fails before anything starts. The trial sections (optimizer, trainer) are generated from the
trainers' own dataclasses (`trainers.config`: `OptimizerConfig`, `LinearTeacherConfig`, `MnistMlpConfig`,
torch-free, so a bad invocation answers without importing torch): a field is declared in one place, the
trainers' config module. The service's own sections are declared here.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainers import config as trainer_config
from trainers.config import DataConfig, LinearTeacherConfig, MnistMlpConfig, OptimizerConfig

OPTIMIZERS = tuple(trainer_config.OPTIMIZERS)
TRAINERS = tuple(trainer_config.TRAINER_CONFIGS)


def _mirror(cls: type, name: str) -> type:
    """A ConfigStore schema with exactly the fields, types and defaults of a trainer's dataclass.

    Why generated: the trainers' dataclasses are the one place a field is declared (adding one there
    is enough); Hydra then rejects unknown keys and wrong types while composing, and the values are
    checked by the trainers' own rules before anything starts (sweep/validate.py)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        kind = _omegaconf_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            spec = field(default_factory=kind)
        elif f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory)
        else:
            spec = field(default=f.default)
        fields.append((f.name, kind, spec))
    return dataclasses.make_dataclass(name, fields)


def _omegaconf_type(t):
    """`float | None` -> Optional[float], `list[int]` -> List[int], nested dataclasses mirrored too
    (OmegaConf 2.3 knows the typing spellings only)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return Optional[_omegaconf_type(inner[0])] if len(inner) == 1 else Any
    if origin is list:
        return List[_omegaconf_type(args[0])] if args else List[Any]
    if origin is dict:
        return Dict[str, Any]
    if dataclasses.is_dataclass(t):
        return _mirror(t, t.__name__.replace("Config", "Conf"))
    return t


OptimizerConf = _mirror(OptimizerConfig, "OptimizerConf")
LinearTeacherConf = _mirror(LinearTeacherConfig, "LinearTeacherConf")
MnistMlpConf = _mirror(MnistMlpConfig, "MnistMlpConf")
DataConf = _mirror(DataConfig, "DataConf")


@dataclass
class SweepConf:
    """The grid. `axes` (a product) and each `zip` group are nested mappings whose list leaves are
    the values of one config path (`optimizer` is the config group; anything else a field), e.g.
    `axes: {optimizer: [sgd, ngd_d], trainer: {gain: [1.0, 1.0e-2]}}`. A leaf may be
    `{only: [ngd_d], values: [...]}`: applied only at grid points whose optimizer is listed.
    `variants` maps an optimizer name to the field values it gets in this experiment (its lr, ...)."""
    seeds: List[int] = field(default_factory=lambda: [0])
    axes: Dict[str, Any] = field(default_factory=dict)
    zip: List[Any] = field(default_factory=list)
    variants: Dict[str, Any] = field(default_factory=dict)
    max_retries: int = 2
    # A protocol of several experiments run as one sweep (conf/experiment/paper.yaml): part name ->
    # {experiment: NAME, overrides: {BUDGET: [override, ...]}}. Each part is planned as
    # `+experiment=NAME` with the overrides of `budget` (as if written in its file) and the user's
    # command line; its trials' variants are prefixed "part/".
    parts: Dict[str, Any] = field(default_factory=dict)
    budget: str = "default"


@dataclass
class ResourcesConf:
    cpu: float = 1.0          # CPUs per trial (one worker actor per slot)
    gpu: float = 0.0          # GPUs per trial, fractional allowed (0.25 = four trials share one GPU)
    workers: Optional[int] = None  # worker actors; null = as many as the cluster's resources fit


@dataclass
class ClusterConf:
    address: Optional[str] = None   # null = start a local Ray on loopback; else host:port of a cluster
    num_cpus: Optional[int] = None  # local Ray only; null = all cores
    num_gpus: Optional[float] = None  # local Ray only; null = detected


@dataclass
class TrackingConf:
    uri: Optional[str] = None         # null = embedded `mlflow server` on loopback over results_dir
    experiment: Optional[str] = None  # null = the experiment's name
    retry_s: float = 300.0            # how long a failing tracking call is retried before the sweep fails


@dataclass
class ReportConf:
    enabled: bool = True


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"
    optimizer: OptimizerConf = MISSING
    trainer: Any = MISSING
    name: str = "sweep"               # the experiment's name (experiment configs set it)
    sweep: SweepConf = field(default_factory=SweepConf)
    resources: ResourcesConf = field(default_factory=ResourcesConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    report: ReportConf = field(default_factory=ReportConf)
    claims: Dict[str, Any] = field(default_factory=dict)  # paper claims checked by the report (sweep/claims.py)
    results_dir: str = "results"
    verbose: bool = False
    dry_run: bool = False             # print the trials of the grid and exit; starts nothing


# The fields of a config that make up one trial (Contract 1); the rest configures the service.
TRIAL_SECTIONS = ("seed", "device", "optimizer", "trainer")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="optimizer", name="optimizer_schema", node=OptimizerConf)
    cs.store(group="trainer", name="linear_teacher_schema", node=LinearTeacherConf)
    cs.store(group="trainer", name="mnist_mlp_schema", node=MnistMlpConf)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConf)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConf)
