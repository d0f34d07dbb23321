"""Measure paper claims 2-4 with the real trainer, in-process, on the trials of the experiments
``map_dynamics`` and ``update_speed`` composed exactly as ``python -m sweep`` composes them.

Prints the measured Table 1 (p and eta_bar per depth x q and teacher mode, against eq 17), the Fig 2
closed-form errors (p = 0, 1/2, 1), the half-max and window-time slopes against sigma*, the update
speed exponents per rule, and the wall time of each trial. The last line is a JSON object.

Usage: python bench/bench_theory_claims.py [--only map_dynamics|update_speed]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainers import run_trial, theory  # noqa: E402


def compose_trials(name: str) -> list:
    """The experiment's grid.Trial objects, exactly as the sweep driver builds them (device cpu)."""
    from hydra import compose, initialize_config_dir

    from sweep import grid, schema
    from sweep.cli import CONF_DIR

    schema.register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"+experiment={name}"])
        trials = grid.expand(cfg, lambda ch: compose("config", [f"+experiment={name}",
                                                               *(f"{g}={v}" for g, v in ch.items())]), set(), set())
    for t in trials:
        t.config["device"] = "cpu"
    return trials


def mode_histories(records: list[dict], rank: int):
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r["step"] for r in evals]
    return steps, [[r["metrics"][f"signal_mode.k{k}"] for r in evals] for k in range(1, rank + 1)]


def map_dynamics() -> dict:
    rows = []
    for trial in compose_trials("map_dynamics"):
        cfg = trial.config
        opt, tr = cfg["optimizer"], cfg["trainer"]
        d, q, lr = tr["depth"], float(opt["q"]), opt["lr"]
        start = time.perf_counter()
        records = list(run_trial(cfg))
        wall = time.perf_counter() - start
        steps, modes = mode_histories(records, tr["rank"])
        targets = tr["teacher_singular_values"]
        p_th, eta_th = theory.map_exponent(d, q), theory.calibrated_lr(lr, d, q)
        row = {"variant": trial.variant, "depth": d, "q": q, "lr": lr, "p_theory": p_th, "eta_bar_theory": eta_th,
               "steps": records[-1]["step"], "converged": records[-1]["converged"], "wall_s": round(wall, 2),
               "max_conservation_drift": records[-1]["metrics"]["max_conservation_drift"], "modes": []}
        for s, values in zip(targets, modes):
            mode = {"sigma_star": s, "sigma0": values[0], **theory.history_mode_summary(steps, values, lr, d, q, s)}
            mode["eta_bar_ratio"] = mode["eta_bar"] / eta_th
            row["modes"].append(mode)
        row["half_max_slope"] = theory.fit_power(targets, [m["t_half"] for m in row["modes"]])
        row["window_slope"] = theory.fit_power(targets, [m["t_window"] for m in row["modes"]])
        rows.append(row)
        print(f"{trial.variant:50s} p_th {p_th:.4f} | " + " | ".join(
            f"s*={m['sigma_star']:g}: p {m['p']:.4f} eta/th {m['eta_bar_ratio']:.4f}"
            + (f" cf {m['closed_form_error']:.1e}" if m["closed_form_error"] is not None else "") for m in row["modes"])
            + f" | slopes half {row['half_max_slope']:+.3f} window {row['window_slope']:+.3f} (-p {-p_th:+.3f})"
            + f" | {row['steps']} steps {wall:.1f} s", flush=True)
    return {"trials": rows, "wall_s": round(sum(r["wall_s"] for r in rows), 1)}


def update_speed() -> dict:
    by_rule: dict[tuple, list] = {}
    wall = 0.0
    for trial in compose_trials("update_speed"):
        cfg = trial.config
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExplodingUpdateWarning: NGD's explosion is the measurement
            records = list(run_trial(cfg))
        wall += time.perf_counter() - start
        first = next(r for r in records if r["kind"] == "eval" and r["step"] >= 1)
        key = (cfg["optimizer"]["name"], cfg["seed"])
        by_rule.setdefault(key, []).append((cfg["trainer"]["gain"], first["metrics"]["update_norm"], cfg))
    rows = []
    for (rule, seed), points in by_rule.items():
        cfg = points[0][2]
        gains = [g for g, _, _ in points]
        norms = [u for _, u, _ in points]
        lr, d = cfg["optimizer"]["lr"], cfg["trainer"]["depth"]
        k = theory.speed_exponent_measured(gains, norms, lr)
        k_th = theory.speed_exponent(d, float(cfg["optimizer"]["q"]), cfg["optimizer"]["structure"])
        rows.append({"rule": rule, "seed": seed, "k": k, "k_theory": k_th,
                     "speed": {f"{g:g}": u / lr for g, u in zip(gains, norms)}})
        print(f"{rule:11s} seed {seed}: k {k:+.4f} (theory {k_th:+.0f}) speeds "
              + " ".join(f"{g:g}:{u / lr:.3e}" for g, u in zip(gains, norms)), flush=True)
    return {"trials": rows, "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["map_dynamics", "update_speed"])
    args = ap.parse_args()
    out = {}
    if args.only in (None, "update_speed"):
        out["update_speed"] = update_speed()
    if args.only in (None, "map_dynamics"):
        out["map_dynamics"] = map_dynamics()
    out["load_average"] = os.getloadavg()
    print(json.dumps(out, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x))


if __name__ == "__main__":
    main()
