"""`python -m sweep +experiment=NAME [overrides]`: compose, validate, run on Ray, track in MLflow, report."""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from . import grid, schema
from .validate import ConfigError, check_optimizer_name, check_service

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("sweep")
schema.register()


def _cli_overrides() -> tuple[list[str], set[str], set[str]]:
    """The user's command-line overrides, the config groups they choose and the fields they set."""
    task = list(HydraConfig.get().overrides.task)
    groups, values = set(), set()
    for o in OverridesParser.create().parse_overrides(task):
        key = o.key_or_group
        if (CONF_DIR / key).is_dir():
            groups.add(key)
        else:
            values.add(key)
    return task, groups, values


def _composer(task: list[str]):
    """compose(group_choices) -> the root config with those group options and the user's overrides."""
    def compose(choices: dict) -> DictConfig:
        overrides = [*task, *(f"{g}={v}" for g, v in choices.items())]
        try:
            return hydra.compose(config_name="config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError("sweep.axes", f"cannot compose {choices}: {str(e).strip().splitlines()[0]}",
                              "check the option names in conf/") from None
    return compose


def plan(cfg: DictConfig) -> list[grid.Trial]:
    """Everything that can be wrong with the config, found before anything starts."""
    task, cli_groups, cli_values = _cli_overrides()
    product, zips = grid.grid_axes(cfg.sweep)
    for axis in product + [a for g in zips for a in g]:
        if axis.path == "optimizer":
            for v in axis.values:
                check_optimizer_name(v, "sweep.axes.optimizer")
        for v in axis.only or ():
            check_optimizer_name(v, f"sweep ({axis.path}).only")
        if axis.path == "trainer":
            for v in axis.values:
                if v not in schema.TRAINERS:
                    raise ConfigError("sweep.axes.trainer", f"has {v!r}", f"use one of {', '.join(schema.TRAINERS)}")
    check_service(cfg)
    trials = grid.expand(cfg, _composer(task), cli_values, cli_groups)
    return trials


def sweep_id(experiment: str, trials: list[grid.Trial]) -> str:
    blob = json.dumps([experiment, sorted(t.key for t in trials)])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    tty = sys.stdout.isatty()
    console = Console(width=None if tty else 160, soft_wrap=not tty)  # logs and tests: lines stay whole
    t0 = time.monotonic()
    try:
        trials = plan(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.dry_run:
        _print_plan(cfg, trials, console)
        return
    from .runner import run_sweep  # heavy imports (ray, mlflow) only once the config is known good
    code = run_sweep(cfg, trials, console, started=t0)
    sys.exit(code)


def _print_plan(cfg: DictConfig, trials: list[grid.Trial], console: Console) -> None:
    from rich.table import Table
    table = Table(title=f"{cfg.name}: {len(trials)} trials (dry run: nothing started)")
    for col in ("variant", "gain", "seed", "lr", "damping", "clip", "trial.key"):
        table.add_column(col)
    for t in trials:
        o = t.config["optimizer"]
        table.add_row(t.variant, f"{t.gain:g}", str(t.seed), f"{o['lr']:g}", f"{o['damping']:g}",
                      str(o["clip"]), t.key)
    console.print(table)


def entry() -> None:
    # Hydra's own messages for a bad group option or an unknown key exit 1; ours exit 2.
    main()
