"""Structured config schemas (Hydra ConfigStore) for `python -m sweep`.

Why: Hydra checks every key and type against these dataclasses while composing, so an unknown key or a
wrong type fails before anything starts. Field names mirror the trainers' dataclasses
(`trainers.linear_teacher.LinearTeacherConfig`, `trainers.mnist_mlp.MnistMlpConfig`) exactly;
tests/test_sweep_config.py compares them so the two cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

OPTIMIZERS = ("sgd", "ngd", "sqrt_ngd", "ngd_d", "sqrt_ngd_d", "qngd", "qngd_d")
TRAINERS = ("linear_teacher", "mnist_mlp")


@dataclass
class OptimizerConf:
    name: str = MISSING
    q: float = float("inf")
    structure: str = "full"
    lr: float = MISSING
    damping: float = 0.0
    clip: Optional[float] = None
    rtol: Optional[float] = None


@dataclass
class TrainerCommon:
    name: str = MISSING
    gain: float = 1.0
    steps: int = 1000
    eval_every: int = 10
    log_eval: bool = False
    max_weight_norm: float = 1.0e4


@dataclass
class LinearTeacherConf(TrainerCommon):
    name: str = "linear_teacher"
    gain: float = 0.1
    max_weight_norm: float = 1.0e4
    width: int = 16
    depth: int = 4
    rank: int = 3
    teacher_singular_values: List[float] = field(default_factory=lambda: [3.0, 2.0, 1.0])
    train_samples: int = 16
    test_samples: int = 160
    noise_std: float = 0.3
    whiten: bool = True
    init: str = "gaussian"
    balanced: bool = False


@dataclass
class DataConf:
    name: str = "mnist"
    root: Optional[str] = None
    cache_dir: Optional[str] = None


@dataclass
class MnistMlpConf(TrainerCommon):
    name: str = "mnist_mlp"
    layers: List[int] = field(default_factory=lambda: [784, 300, 100, 30, 10])
    batch_size: int = 128
    epochs: Optional[float] = None
    loss: str = "cross_entropy"
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    data: DataConf = field(default_factory=DataConf)


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
    reference: str = "sgd"   # optimizer (or variant label) weight_norm_divergence divides by
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
