"""The trial config's dataclasses and every rule on them (docs/DESIGN.md Contract 1), without torch.

Why a module of its own: the sweep driver checks every grid point with these rules before anything starts
(``check_config``), and a bad invocation must answer in about a second, without the seconds ``import
torch`` costs. The trainers build their configs from here (``config_from_dict``), so each rule lives once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["OPTIMIZERS", "PRECISIONS", "TRAINER_CONFIGS", "OptimizerConfig", "LinearTeacherConfig", "MnistMlpConfig",
           "DataConfig", "check_config", "check_common", "check_speed_modes", "config_from_dict"]

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
    (block rules, mnist_mlp): 1 = exact curvature every step; k > 1 keeps the output factors'
    eigenbases for up to k steps, their eigenvalues refreshed per batch, under a refresh rule
    (trainers.mlp_curvature). ``precision``:
    ``float64`` (exact) or ``mixed`` (float32 decompositions where a condition estimate says they
    match float64, float64 otherwise; block and full rules, mnist_mlp)."""

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
        if cfg.precision != "float64" and math.isinf(cfg.q):
            raise ValueError(f"optimizer.precision={cfg.precision!r} needs a curvature rule (q < inf: ngd, sqrt_ngd, "
                             f"qngd, ngd_d, sqrt_ngd_d, qngd_d); {cfg.name} with q=inf is plain SGD and has no "
                             f"decomposition: use precision float64")
        return cfg


PRECISIONS = ("float64", "mixed")


def config_from_dict(cls, raw: Mapping, where: str):
    """Build dataclass ``cls`` from a mapping; an unknown key is a ValueError naming ``where.key``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown field {where}.{unknown[0]}; known fields: {sorted(names)}")
    return cls(**raw)


@dataclass(frozen=True)
class LinearTeacherConfig:
    name: str = "linear_teacher"
    gain: float = 0.1
    steps: int = 3000
    eval_every: int = 10
    log_eval: bool = False
    max_weight_norm: float = 1.0e4
    width: int = 16
    depth: int = 4
    rank: int = 3
    teacher_singular_values: list[float] = field(default_factory=lambda: [3.0, 2.0, 1.0])
    train_samples: int = 16
    noise_std: float = 0.3
    whiten: bool = True
    input_cov_cond: float = 1.0
    init: str = "gaussian"
    balanced: bool = False
    converge_tol: float | None = 1.0e-6

    def __post_init__(self):
        f = "trainer."
        if self.name != "linear_teacher":
            raise ValueError(f"{f}name={self.name!r}: this is the linear_teacher trainer")
        check_common(self)
        for key in ("width", "depth", "rank", "train_samples"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{f}{key}={getattr(self, key)!r} must be a positive integer")
        if self.rank > self.width:
            raise ValueError(f"{f}rank={self.rank} must be <= width={self.width}")
        s = list(self.teacher_singular_values)
        if len(s) != self.rank or not all(math.isfinite(v) and v > 0 for v in s):
            raise ValueError(f"{f}teacher_singular_values={s} must be {self.rank} (= rank) positive numbers")
        if self.whiten and self.train_samples < self.width:
            raise ValueError(f"{f}whiten=true needs train_samples >= width ({self.train_samples} < {self.width}): "
                             "fewer samples than dimensions cannot have Sigma_x = I; set whiten: false")
        if not (self.input_cov_cond >= 1 and math.isfinite(self.input_cov_cond)):
            raise ValueError(f"{f}input_cov_cond={self.input_cov_cond} must be a finite number >= 1 "
                             "(1 = isotropic inputs)")
        if self.whiten and self.input_cov_cond != 1:
            raise ValueError(f"{f}input_cov_cond={self.input_cov_cond} needs whiten: false (whitened training "
                             "inputs are not samples of an anisotropic population)")
        if self.converge_tol is not None and not 0 < self.converge_tol < 1:
            raise ValueError(f"{f}converge_tol={self.converge_tol} must be in (0, 1), or null to run all steps")
        if not self.noise_std >= 0:
            raise ValueError(f"{f}noise_std={self.noise_std} must be >= 0")
        if self.init not in ("gaussian", "orthogonal"):
            raise ValueError(f"{f}init={self.init!r} must be gaussian or orthogonal")


def check_common(cfg) -> None:
    """The fields both trainers share (used by trainers.mnist_mlp too)."""
    f = "trainer."
    if not (cfg.gain > 0 and math.isfinite(cfg.gain)):
        raise ValueError(f"{f}gain={cfg.gain} must be a positive finite number")
    if not isinstance(cfg.steps, int) or cfg.steps < 0:
        raise ValueError(f"{f}steps={cfg.steps!r} must be a non-negative integer")
    if not isinstance(cfg.eval_every, int) or cfg.eval_every < 1:
        raise ValueError(f"{f}eval_every={cfg.eval_every!r} must be a positive integer")
    if not cfg.max_weight_norm > 0:
        raise ValueError(f"{f}max_weight_norm={cfg.max_weight_norm} must be > 0")


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist"
    root: str | None = None
    cache_dir: str | None = None

    def __post_init__(self):
        if self.name not in ("mnist", "fashion_mnist"):
            raise ValueError(f"trainer.data.name={self.name!r} must be mnist or fashion_mnist")


@dataclass(frozen=True)
class MnistMlpConfig:
    name: str = "mnist_mlp"
    gain: float = 1.0
    steps: int = 1000
    eval_every: int = 100
    log_eval: bool = False
    max_weight_norm: float = 1.0e4
    layers: list[int] = field(default_factory=lambda: [784, 300, 100, 30, 10])
    batch_size: int = 128
    epochs: float | None = None
    loss: str = "cross_entropy"
    train_subset: int | None = None
    test_subset: int | None = None
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        f = "trainer."
        if self.name != "mnist_mlp":
            raise ValueError(f"{f}name={self.name!r}: this is the mnist_mlp trainer")
        check_common(self)
        if isinstance(self.data, Mapping):
            object.__setattr__(self, "data", config_from_dict(DataConfig, self.data, "trainer.data"))
        layers = list(self.layers)
        if len(layers) < 2 or layers[0] != 784 or layers[-1] != 10 or not all(
                isinstance(n, int) and n > 0 for n in layers):
            raise ValueError(f"{f}layers={layers} must be positive integers from 784 (28x28 pixels) to 10 (classes)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"{f}batch_size={self.batch_size!r} must be a positive integer")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"{f}epochs={self.epochs} must be > 0, or null to use steps")
        if self.loss not in ("cross_entropy", "mse"):
            raise ValueError(f"{f}loss={self.loss!r} must be cross_entropy or mse")
        for key, top in (("train_subset", 60_000), ("test_subset", 10_000)):
            n = getattr(self, key)
            if n is not None and (not isinstance(n, int) or not 1 <= n <= top):
                raise ValueError(f"{f}{key}={n!r} must be an integer in 1..{top}, or null for all")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ValueError(f"{f}train_subset={self.train_subset} must be >= batch_size={self.batch_size}")

    def total_steps(self, n_train: int) -> int:
        return self.steps if self.epochs is None else int(math.ceil(self.epochs * n_train / self.batch_size))


# trainer name -> its config dataclass (trainers.TRAINERS maps the same names to their modules)
TRAINER_CONFIGS = {"linear_teacher": LinearTeacherConfig, "mnist_mlp": MnistMlpConfig}


def check_config(config: Mapping) -> None:
    """Apply every rule of ``run_trial`` that needs no data and no device: the trainer's and the
    optimizer's dataclasses (unknown keys included). Raises the same ``ValueError`` a worker would;
    the sweep driver calls it on every grid point before anything starts."""
    trainer = (config.get("trainer") or {}).get("name")
    if trainer not in TRAINER_CONFIGS:
        raise ValueError(f"trainer.name={trainer!r} is not known; use one of {list(TRAINER_CONFIGS)}")
    unknown = sorted(set(config) - {"seed", "device", "optimizer", "trainer"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]}; a trial config has seed, device, optimizer, trainer")
    config_from_dict(TRAINER_CONFIGS[trainer], config["trainer"], "trainer")
    check_speed_modes(trainer, OptimizerConfig.from_dict(config.get("optimizer")))


def check_speed_modes(trainer: str, opt: OptimizerConfig) -> None:
    """``curvature_every`` (block rules) / ``precision`` (block and full rules) exist for the MLP only
    (trainers.mlp_curvature)."""
    if trainer != "mnist_mlp" and (opt.curvature_every != 1 or opt.precision != "float64"):
        raise ValueError(f"optimizer.curvature_every and optimizer.precision apply to trainer mnist_mlp only; "
                         f"the {trainer} rule is exact in float64: use 1 and float64")
