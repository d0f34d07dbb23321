"""`python -m sweep +experiment=NAME [overrides]`: compose, validate, run on Ray, track in MLflow, report."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from . import grid, schema
from .validate import ConfigError, check_known_keys, check_optimizer_name, check_service, check_trial_data

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
    if len(cfg.sweep.parts):
        return _plan_parts(cfg, task, cli_groups, cli_values)
    return _plan_grid(cfg, task, cli_groups, cli_values)


def _plan_parts(cfg: DictConfig, task: list[str], cli_groups: set[str], cli_values: set[str]) -> list[grid.Trial]:
    """A protocol (sweep.parts): each part planned as its own experiment with the overrides of
    `sweep.budget`, then the user's command line; the union of their trials, variants "part/...". A trial
    two parts share (the same resolved config) runs once and belongs to both."""
    check_known_keys(cfg, schema.Config)
    check_service(cfg)
    def protocol_level(o: str) -> bool:  # the protocol's own choice and parts are not the parts' overrides
        key = o.split("=", 1)[0].lstrip("+~")
        return key == "experiment" or key == "sweep.parts" or key.startswith("sweep.parts.")
    rest = [o for o in task if not protocol_level(o)]
    budget = cfg.sweep.budget
    budgets = {b for part in cfg.sweep.parts.values() if isinstance(part, DictConfig)
               for b in (part.get("overrides") or {})} | {"default"}
    if budget not in budgets:
        raise ConfigError("sweep.budget", f"is {budget!r}", f"use one of {', '.join(sorted(budgets))}")
    trials: dict[str, grid.Trial] = {}
    for name, part in cfg.sweep.parts.items():
        field = f"sweep.parts.{name}"
        if not isinstance(part, DictConfig) or not isinstance(part.get("experiment"), str) \
                or set(part) - {"experiment", "overrides"}:
            raise ConfigError(field, "must be {experiment: NAME, overrides: {BUDGET: [...]}}",
                              "see conf/experiment/paper.yaml")
        if not (CONF_DIR / "experiment" / f"{part.experiment}.yaml").is_file():
            raise ConfigError(f"{field}.experiment", f"is {part.experiment!r}, not an experiment",
                              "name a file of conf/experiment/ (without .yaml)")
        part_task = [f"+experiment={part.experiment}", *list((part.get("overrides") or {}).get(budget) or []), *rest]
        try:
            part_cfg = hydra.compose(config_name="config", overrides=part_task)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"{field}.overrides.{budget}", f"cannot be composed: {str(e).strip().splitlines()[0]}",
                              f"check the overrides against `python -m sweep +experiment={part.experiment} --cfg job`") from None
        if len(part_cfg.sweep.parts):
            raise ConfigError(f"{field}.experiment", "is itself a protocol", "name a plain experiment")
        try:
            planned = _plan_grid(part_cfg, part_task, cli_groups, cli_values, service=False)
        except ConfigError as e:
            raise ConfigError(e.field, f"{e.problem} (in {field})", e.fix) from None
        for t in planned:
            if t.key in trials:
                trials[t.key].parts += (name,)
            else:
                t.variant, t.parts = f"{name}/{t.variant}", (name,)
                trials[t.key] = t
    return list(trials.values())


def _plan_grid(cfg: DictConfig, task: list[str], cli_groups: set[str], cli_values: set[str],
               service: bool = True) -> list[grid.Trial]:
    """One experiment's grid, every trial checked by the trainers' own rules. `service=False`: a protocol
    part, whose service settings (and their address handshakes) the protocol has checked once already."""
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
    check_known_keys(cfg, schema.Config)
    if service:
        check_service(cfg)
    trials = grid.expand(cfg, _composer(task), cli_values, cli_groups)
    if cfg.cluster.address is None:  # a local Ray's workers read this filesystem
        for root in {json.dumps(t.config["trainer"].get("data")) for t in trials}:
            check_trial_data({"trainer": {"data": json.loads(root)}})
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
    try:
        _precompose(argv)
        main()
    except KeyboardInterrupt:  # Ctrl-C while composing or planning: nothing has started yet
        print("interrupted before anything started", file=sys.stderr)
        sys.exit(130)


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


def _precompose(args: list[str]) -> None:
    """Compose once before Hydra does, so a bad override is one line naming the field (exit 2) rather
    than Hydra's multi-line report. Flags (--help, --cfg, -m ...) are left to Hydra."""
    if any(a.startswith("-") for a in args):
        return
    _compose_or_exit(args)


def _compose_or_exit(args: list[str], **kwargs) -> DictConfig:
    from hydra import compose, initialize_config_dir
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("config", args, **kwargs)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"error: {_unparsable(args) or hydra_error_line(e)}", file=sys.stderr)
        sys.exit(2)


def check_args(args: list[str]) -> list[grid.Trial]:
    """Everything `python -m sweep ARGS` checks before it starts anything, in this process: raises
    SystemExit(2) with the one-line message on stderr for a bad invocation. Tests call it for many
    invocations in one process."""
    from hydra import initialize_config_dir
    cfg = _compose_or_exit(args, return_hydra_config=True)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            return plan(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


def _unparsable(args: list[str]) -> str | None:
    """The first override Hydra's grammar cannot read, named by its key."""
    parser = OverridesParser.create()
    for a in args:
        try:
            parser.parse_overrides([a])
        except Exception:  # noqa: BLE001 - Hydra raises its own parse errors
            key = a.split("=", 1)[0]
            return (f"{key} cannot be parsed from {a!r} (Hydra's override grammar). Fix: write key=value with an "
                    "ASCII key; quote values with brackets, spaces or non-ASCII text, e.g. "
                    "'sweep.seeds=[0,1]' or 'name=\"résumé\"'")
    return None


def hydra_error_line(e: Exception) -> str:
    """Hydra's / OmegaConf's multi-line error as one line: the field, the problem, the fix."""
    text = str(e)
    cause = e.__cause__ or e.__context__
    if cause is not None and "full_key" in str(cause):
        text = str(cause) if "full_key" not in text else text
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = [ln for ln in lines[lines.index("Available options in " + f"'{group}':") + 1:]
                   if not ln.startswith(("Config search path", "provider="))] \
            if f"Available options in '{group}':" in lines else []
        options = [o for o in options if not o.endswith("_schema") and not o.startswith("Set the environment")]
        return (f"{group}={option} is not a config option. Fix: use one of {', '.join(options)}"
                if options else f"{group}={option} is not a config option. Fix: see conf/{group}/")
    first = lines[0] if lines else type(e).__name__
    if "no viable alternative" in text or "mismatched input" in text or "extraneous input" in text:
        return (f"cannot parse the command line ({first}). Fix: write overrides as key=value; quote values "
                "with brackets or spaces, e.g. 'sweep.seeds=[0,1]'")
    if full_key is None:
        return f"{first}. Fix: check the override against `python -m sweep --help`"
    if "not in" in text and "Key '" in text:
        return (f"{full_key} is not a field ({next(ln for ln in lines if ln.startswith('Key '))}). Fix: check "
                "the spelling (`python -m sweep +experiment=NAME --cfg job` lists the fields)")
    problem = next((ln for ln in lines if ln.startswith("Value ")), first)
    return f"{full_key}: {problem}. Fix: give {full_key} a value of the field's type"
