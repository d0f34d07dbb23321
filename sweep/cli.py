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
    from rich import box
    from rich.table import Table

    from .report import fmt_gain
    table = Table(title=f"{cfg.name}: {len(trials)} trials (dry run: nothing started)", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False)
    for col in ("variant", "gain", "seed", "lr", "damping", "clip", "trial.key"):
        table.add_column(col, no_wrap=True)
    for t in trials:
        o = t.config["optimizer"]
        table.add_row(t.variant, fmt_gain(t.gain), str(t.seed), f"{o['lr']:g}", f"{o['damping']:g}",
                      str(o["clip"]), t.key)
    console.print(table)
    _print_costs(cfg, trials, console)


def _print_costs(cfg: DictConfig, trials: list[grid.Trial], console: Console) -> None:
    """Estimated cost per variant, from the finished trials of this experiment already in the store
    (the same per-trial seconds the scheduler learns while it runs)."""
    from rich import box
    from rich.table import Table

    from .progress import estimate
    est = estimate(cfg, trials)
    if est is None:
        console.print("estimated cost: unknown until a trial of each variant has run (no finished trials of "
                      "this experiment in the store yet); the sweep learns it from its first trials", highlight=False)
        return
    per_variant, workers, where = est
    table = Table(title=f"estimated cost (from {where})", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("variant", "trials", "to run", "s/trial", "total s"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    total, unknown = 0.0, []
    for v, (n, todo, s) in per_variant.items():
        table.add_row(v, str(n), str(todo), "?" if s is None else f"{s:.1f}", "?" if s is None else f"{s * todo:.0f}")
        if s is None:
            unknown.append(v)
        else:
            total += s * todo
    console.print(table)
    console.print(f"about {total / workers:.0f} s of trials on {workers} workers"
                  + (f" plus {', '.join(unknown)} (no earlier trials)" if unknown else "")
                  + "; Ray and MLflow start in ~10-20 s", highlight=False)


def entry() -> None:
    """`python -m sweep ui|report ...` are plain commands (no Hydra); anything else is the sweep."""
    argv = sys.argv[1:]
    if argv[:1] == ["ui"]:
        from .ui import main as ui_main
        sys.exit(ui_main(argv[1:]))
    if argv[:1] == ["report"]:
        from .report import main as report_main
        sys.exit(report_main(argv[1:]))
    if "--help" in argv or "-h" in argv:
        _help()
        return
    # Hydra's own messages for a bad group option or an unknown key exit 1; ours exit 2.
    main()


def _help() -> None:
    """Hydra's --help without the internal `*_schema` options (they validate configs; nobody picks them)."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main()
        except SystemExit:
            pass
    out = []
    for line in buf.getvalue().splitlines():
        if ": " in line and "_schema" in line and not line.startswith(" "):
            group, options = line.split(": ", 1)
            line = f"{group}: " + ", ".join(o for o in options.split(", ") if not o.endswith("_schema"))
        out.append(line)
    print("\n".join(out))
    print("\nOther commands:\n  python -m sweep ui [--results DIR] [--experiment NAME] [--port P]   "
          "the MLflow UI on the results\n  python -m sweep report [--results DIR] [--experiment NAME]        "
          "re-render the report (no Ray)")
