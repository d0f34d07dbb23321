"""The grid: one fully resolved plain-dict trial config per grid point, composed on the driver.

Why on the driver: workers receive plain dicts (Contract 1) and never see Hydra, so what a trial
ran with is exactly what it logged. Precedence, lowest first: the experiment's config, the optimizer
group chosen by the grid, `sweep.variants[optimizer]`, the grid point's values, the user's
command-line overrides (a field you override on the command line is that value at every point;
points that become identical collapse into one trial).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import TRIAL_SECTIONS
from .validate import ConfigError, check_trial

GROUPS = ("optimizer", "trainer")  # axes with these names choose a config group option


@dataclass(frozen=True)
class Axis:
    path: str                  # "optimizer" (group choice) or a dotted field path
    values: tuple
    only: tuple | None = None  # optimizer names this axis applies to; None = all


@dataclass
class Trial:
    key: str          # stable hash of the resolved config: resume and dedup use it
    config: dict      # Contract 1, plain and resolved
    point: dict       # the grid values that define it (path -> value), for labels
    variant: str      # optimizer name plus non-gain axis values, e.g. "qngd_d q=1.5"
    parts: tuple = () # the protocol parts (sweep.parts) this trial belongs to; () outside a protocol

    @property
    def optimizer(self) -> str:
        return self.config["optimizer"]["name"]

    @property
    def gain(self) -> float:
        return float(self.config["trainer"]["gain"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])


def trial_key(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    raise TypeError(f"not JSON serialisable: {x!r}")


def _leaves(node: Any, prefix: str, field: str) -> list[Axis]:
    """Nested mapping -> axes: list leaves are values; `{only:, values:}` is a conditional leaf."""
    if isinstance(node, (list, ListConfig)):
        values = tuple(OmegaConf.to_container(node) if isinstance(node, ListConfig) else node)
        if not values:
            raise ConfigError(field + (f".{prefix}" if prefix else ""), "is an empty list of values",
                              "give it at least one value, or remove the axis")
        return [Axis(prefix, values)]
    if isinstance(node, (dict, DictConfig)):
        keys = set(node.keys())
        if keys == {"only", "values"}:
            inner = _leaves(node["values"], prefix, field)[0]
            only = node["only"]
            only = tuple([only] if isinstance(only, str) else list(only))
            return [Axis(prefix, inner.values, only)]
        if not keys:
            raise ConfigError(f"{field}.{prefix}" if prefix else field, "is empty",
                              "give it at least one axis, e.g. {optimizer: [sgd, ngd]}")
        out = []
        for k, v in node.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k), field)
        return out
    raise ConfigError(f"{field}.{prefix}", f"must be a list of values, got {node!r}",
                      f"write it as a list, e.g. {prefix}: [{node!r}]")


def grid_axes(sweep: DictConfig) -> tuple[list[Axis], list[list[Axis]]]:
    """The product axes and the zip groups (each a list of equal-length axes)."""
    product = _leaves(sweep.axes, "", "sweep.axes") if len(sweep.axes) else []
    zips = []
    for i, group in enumerate(sweep.zip):
        axes = _leaves(group, "", f"sweep.zip[{i}]")
        lengths = {a.path: len(a.values) for a in axes}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"sweep.zip[{i}]", f"zips axes of different lengths {lengths}",
                              "give every axis in a zip group the same number of values")
        zips.append(axes)
    return product, zips


def grid_points(product: list[Axis], zips: list[list[Axis]], seeds: Iterable[int]) -> list[list[tuple[Axis, Any]]]:
    """Cartesian product of the product axes, the zip groups (as one axis each) and the seeds."""
    dims = [[[(a, v)] for v in a.values] for a in product]
    dims += [[[(a, a.values[i]) for a in group] for i in range(len(group[0].values))] for group in zips]
    dims.append([[(Axis("seed", ()), s)] for s in seeds])
    return [sum(combo, []) for combo in itertools.product(*dims)]


def variant_label(optimizer: str, point: dict, follows_gain: set[str]) -> str:
    """Name of a variant in reports: the optimizer plus its grid values other than gain, seed and
    values zipped with gain (those are per-gain settings of one variant), e.g. "qngd_d q=1.5"."""
    extra = [f"{p.split('.')[-1]}={_fmt(v)}" for p, v in point.items()
             if p not in ("optimizer", "seed", "trainer.gain") and p not in follows_gain]
    return " ".join([optimizer, *extra])


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def expand(cfg: DictConfig, compose: Callable[[dict], DictConfig], cli_value_keys: set[str],
           cli_groups: set[str]) -> list[Trial]:
    """All trials of the sweep, validated. `compose(group_choices)` returns the composed config with the
    user's command line applied; `cli_value_keys`/`cli_groups` are what the user set there (they win)."""
    sweep = cfg.sweep
    if len(sweep.seeds) == 0:
        raise ConfigError("sweep.seeds", "is empty", "give at least one seed, e.g. sweep.seeds=[0]")
    product, zips = grid_axes(sweep)
    follows_gain = {a.path for g in zips if any(a.path == "trainer.gain" for a in g) for a in g}
    trials: dict[str, Trial] = {}
    bases: dict[tuple, _Base] = {}
    for point in grid_points(product, zips, sweep.seeds):
        groups = {a.path: v for a, v in point if a.path in GROUPS and a.path not in cli_groups}
        gkey = tuple(sorted(groups.items()))
        if gkey not in bases:
            bases[gkey] = _Base(compose(groups))
        base = bases[gkey]
        opt = base.optimizer
        values: list[tuple[str, Any]] = []
        if opt in sweep.variants:
            values += base.variant_values(sweep.variants, opt)
        values += [(a.path, v) for a, v in point
                   if a.path not in GROUPS and (a.only is None or opt in a.only)]
        trial_cfg = base.trial([(p, v) for p, v in values if p not in cli_value_keys])
        label_point = {a.path: (trial_cfg["optimizer"]["name"] if a.path == "optimizer" else v)
                       for a, v in point if a.only is None or opt in a.only}
        key = trial_key(trial_cfg)
        if key not in trials:
            label = variant_label(opt, label_point, follows_gain)
            check_trial(trial_cfg, f"{label} gain={_fmt(trial_cfg['trainer'].get('gain'))} seed={trial_cfg['seed']}")
            trials[key] = Trial(key, trial_cfg, label_point, label)
    return list(trials.values())


class _Base:
    """One composed config (per group choice) and its trial sections as a plain dict.

    Why: planning must stay linear in the grid size. Each grid point is a deep copy of the plain dict with
    its values set; each distinct (path, value) is type-checked and converted once by OmegaConf against
    the schema (copying a DictConfig per point grew quadratically: 1000 seeds took 263 s)."""

    def __init__(self, composed: DictConfig):
        self.composed = composed
        self.plain = {k: OmegaConf.to_container(composed[k], resolve=True) if isinstance(composed[k], (DictConfig, ListConfig))
                      else composed[k] for k in TRIAL_SECTIONS}
        self.optimizer = self.plain["optimizer"]["name"]
        self._converted: dict[tuple, Any] = {}
        self._variants: list | None = None
        self._scratch: DictConfig | None = None

    def variant_values(self, variants: DictConfig, opt: str) -> list[tuple[str, Any]]:
        if self._variants is None:
            self._variants = _flatten(OmegaConf.to_container(variants[opt]), "")
        return self._variants

    def _convert(self, path: str, value: Any) -> Any:
        k = (path, json.dumps(value, sort_keys=True, default=repr))
        if k not in self._converted:
            if self._scratch is None:  # one copy to type-check values on; each set is read back at once
                self._scratch = copy.deepcopy(self.composed)
            _set(self._scratch, path, value)
            node = OmegaConf.select(self._scratch, path)
            self._converted[k] = OmegaConf.to_container(node, resolve=True) \
                if isinstance(node, (DictConfig, ListConfig)) else node
        return self._converted[k]

    def trial(self, values: list[tuple[str, Any]]) -> dict:
        out = copy.deepcopy(self.plain)
        for path, v in values:
            v = self._convert(path, v)
            head, *rest = path.split(".")
            if head not in out:
                continue  # a service field (not part of a trial)
            if not rest:
                out[head] = v
                continue
            node = out[head]
            for p in rest[:-1]:
                node = node[p]
            node[rest[-1]] = v
        return out


def _flatten(d: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, d)]


def _set(c: DictConfig, path: str, value: Any) -> None:
    try:
        OmegaConf.update(c, path, value, merge=False)
    except OmegaConfBaseException as e:
        raise ConfigError(path, f"cannot be set to {value!r} ({type(e).__name__}: {_first_line(e)})",
                          "check the field name and type in conf/ (python -m sweep --cfg job lists them)") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def flatten_params(config: dict) -> dict[str, str]:
    """Resolved trial config -> MLflow params ("optimizer.lr" -> "0.01"); lists as JSON."""
    out = {}
    for path, v in _flatten(config, ""):
        out[path] = json.dumps(v, default=_json_default) if isinstance(v, (list, dict)) else str(v)
    return out
