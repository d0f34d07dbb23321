"""The paper's claims, checked on a protocol sweep's records (`python -m sweep +experiment=paper`).

Each claim reads the trials of the protocol parts it needs (sweep.parts; conf/experiment/paper.yaml),
computes what the paper says it should, and compares it with a threshold fixed in that config before
anything ran (`claims.thresholds`, each with a comment saying why that value). A claim that does not hold
is a row with its numbers and ✗; one that cannot be measured (trials missing, failed, diverged or not
converged where convergence is the budget) is a row with its reason and "?" -- never dropped.

Input is plain data, so the logic is tested on synthetic records (tests/test_claims.py):
`Records(trials, histories)`: one row per trial (tags: parts, optimizer, variant, gain, seed, status,
run_status; config params as `config.<path>` strings; the latest value of each metric) and the long
history table (run_id, key, step, value). Output: `Row`s, written as claims.md and claims.json.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd


MARK = {True: "✓", False: "✗", None: "?"}
FULL, BLOCK = ("sgd", "ngd", "sqrt_ngd"), ("ngd_d", "sqrt_ngd_d")


@dataclass
class Row:
    id: str                 # "1a": claim number (issue 9's list) and sub-claim
    paper: str              # where the paper says it
    claim: str              # what the paper says, one line
    measured: str           # what was measured, over which trials
    threshold: str          # the pass criterion, as fixed in the config
    value: str              # the measured value(s), mean ± std over seeds
    holds: bool | None      # None: could not be measured (see value)
    numbers: dict = field(default_factory=dict)   # the raw numbers behind `value` (claims.json)
    figures: list = field(default_factory=list)   # files (relative to the report dir) that back the row


class NotMeasured(Exception):
    """A claim's trials are missing or unusable: the row says why instead of a verdict."""


# ---------------------------------------------------------------- the records
@dataclass
class Records:
    trials: pd.DataFrame
    histories: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["run_id", "key", "step", "value"]))
    cache: dict = field(default_factory=dict, repr=False)  # measurements several claims and figures share

    def part(self, name: str, converged: bool = False) -> pd.DataFrame:
        """The usable trials of one protocol part: finished (not diverged or failed) and, with
        `converged`, judged converged. NotMeasured when the part has no trials at all."""
        df = self.trials
        if df.empty or "parts" not in df:
            raise NotMeasured(f"no trials of part {name!r}")
        df = df[in_part(df, name)]
        if df.empty:
            raise NotMeasured(f"no trials of part {name!r}")
        ok = (df["status"] == "finished") & (df["run_status"] == "FINISHED")
        if converged:
            ok &= pd.to_numeric(df.get("converged"), errors="coerce") == 1.0
        return df[ok]

    def history(self, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        h = self.histories
        sel = h[(h["run_id"] == run_id) & (h["key"] == key)].sort_values("step")
        return sel["step"].to_numpy(dtype=float), sel["value"].to_numpy(dtype=float)


def config_value(row: pd.Series, path: str) -> float:
    """A numeric config param of a trial (MLflow keeps params as strings; "inf" is q of SGD)."""
    return float(json.loads(row[f"config.{path}"]) if row[f"config.{path}"] not in ("inf", "-inf") else row[f"config.{path}"])


def rule_values(df: pd.DataFrame, optimizer: str, metric: str) -> pd.Series:
    """Per seed: `metric` of the trials of one optimizer (index = seed)."""
    sel = df[df["optimizer"] == optimizer]
    if sel.empty:
        raise NotMeasured(f"no usable {optimizer} trial")
    return pd.to_numeric(sel.set_index("seed")[metric], errors="coerce").sort_index()


def pm(values) -> str:
    """mean ± std over seeds (ddof=0), 3 significant digits."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return "-"
    mean, std = v.mean(), v.std()
    if len(v) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g}±{std:.2g}"


def half_fit_time(steps: np.ndarray, values: np.ndarray, lr: float) -> float:
    """Time t = lr * step at which a fitted fraction (signal_fit / noise_fit: 0 at a small start, 1 when
    the target's modes are learnt) first reaches one half, linear between evaluations; NotMeasured when
    it never does (or too little was recorded)."""
    from trainers import theory
    try:
        t = theory.history_half_max_time(steps, values, lr, 1.0)
    except ValueError:
        raise NotMeasured("no signal_fit / noise_fit history") from None
    if not math.isfinite(t):
        raise NotMeasured("a fitted fraction never reached 1/2")
    return t


def in_part(df: pd.DataFrame, name: str) -> pd.Series:
    """Which trials belong to protocol part `name` (the `parts` column: comma-separated names)."""
    return df["parts"].fillna("").str.split(",").apply(lambda parts: name in parts)


def _ratio_text(values: dict) -> str:
    return ", ".join(f"{k} {pm(v)}" for k, v in values.items())


# ---------------------------------------------------------------- 1. conservation law (Thm 1, eq 15)
def conservation(rec: Records, th: dict) -> list[Row]:
    out = []
    lr_df = rec.part("conservation_lr")
    ratios, small = {}, {}
    for rule in FULL + BLOCK:
        sel = lr_df[lr_df["optimizer"] == rule]
        if sel.empty:
            raise NotMeasured(f"no usable {rule} trial in part conservation_lr")
        lrs = sel.apply(lambda r: config_value(r, "optimizer.lr"), axis=1)
        hi, lo = lrs.max(), lrs.min()
        a = sel[lrs == hi].set_index("seed")["max_conservation_drift"].astype(float)
        b = sel[lrs == lo].set_index("seed")["max_conservation_drift"].astype(float)
        ratios[rule] = (a / b).dropna()
        small[rule] = b
        factor = hi / lo
    full_ok = all((ratios[r] >= th["full_lr_ratio_min"]).all() and len(ratios[r]) for r in FULL)
    out.append(Row("1a", "Thm 1, eq 15; §3.1", "full rules conserve c_i: drift falls with lr (first order)",
                   f"max conservation drift at lr / drift at lr/{factor:g}, same time lr·steps",
                   f"≥ {th['full_lr_ratio_min']:g} for sgd, ngd, sqrt_ngd (first order: {factor:g})",
                   _ratio_text({r: ratios[r] for r in FULL}), full_ok,
                   {r: ratios[r].tolist() for r in FULL}, ["parts/conservation_lr/drift_and_norm_excess.png"]))
    full_small = max(float(small[r].max()) for r in FULL)
    block_ok = all(len(ratios[r]) and (ratios[r] <= th["block_lr_ratio_max"]).all()
                   and (small[r] >= th["block_over_full_min"] * full_small).all() for r in BLOCK)
    out.append(Row("1b", "§5, Fig 5C", "block rules break the law (drift stays as lr → 0)",
                   f"the same ratio; block drift at lr/{factor:g} over the full rules' largest",
                   f"ratio ≤ {th['block_lr_ratio_max']:g} and drift ≥ {th['block_over_full_min']:g}× full",
                   _ratio_text({r: ratios[r] for r in BLOCK})
                   + "; over full: " + _ratio_text({r: small[r] / full_small for r in BLOCK}), block_ok,
                   {r: {"lr_ratio": ratios[r].tolist(), "drift_small_lr": small[r].tolist()} for r in BLOCK}
                   | {"full_max_drift_small_lr": full_small}, ["parts/conservation_lr/drift_and_norm_excess.png"]))
    ts = rec.part("teacher_student", converged=True)
    ngd_d, sqrt_d = rule_values(ts, "ngd_d", "conservation_drift"), rule_values(ts, "sqrt_ngd_d", "conservation_drift")
    r = (ngd_d / sqrt_d).dropna()
    out.append(Row("1c", "§5, Fig 5C", "NGD-d's drift well above sqrtNGD-d's",
                   "final conservation drift, NGD-d / sqrtNGD-d per seed (teacher_student, converged)",
                   f"≥ {th['ngd_d_over_sqrt_ngd_d_min']:g} on every seed",
                   f"{pm(r)} (NGD-d {pm(ngd_d)}, sqrtNGD-d {pm(sqrt_d)})",
                   bool(len(r)) and bool((r >= th["ngd_d_over_sqrt_ngd_d_min"]).all()),
                   {"ratio": r.tolist(), "ngd_d": ngd_d.tolist(), "sqrt_ngd_d": sqrt_d.tolist()},
                   ["parts/teacher_student/drift_and_norm_excess.png"]))
    return out


# ---------------------------------------------------------------- 2, 3. map dynamics (eq 17, Table 1, Fig 2)
def _mode_summaries(rec: Records) -> pd.DataFrame:
    """One row per (trial, teacher mode) of part map_dynamics: depth, q, seed, sigma*, and what
    trainers.theory measures on the mode's history beside the theory (p, eta_bar, closed form, times)."""
    if "modes" in rec.cache:
        return rec.cache["modes"]
    from trainers import theory
    df = rec.part("map_dynamics", converged=True)
    if df.empty:
        raise NotMeasured("no converged trial in part map_dynamics")
    out = []
    for _, run in df.iterrows():
        d, q, lr = int(config_value(run, "trainer.depth")), config_value(run, "optimizer.q"), config_value(run, "optimizer.lr")
        for k, s in enumerate(json.loads(run["config.trainer.teacher_singular_values"]), start=1):
            steps, values = rec.history(run["run_id"], f"signal_mode.k{k}")
            if len(steps) < 3:
                raise NotMeasured(f"no signal_mode.k{k} history of {run['variant']}")
            try:
                m = theory.history_mode_summary(steps, values, lr, d, q, float(s))
            except ValueError as e:
                raise NotMeasured(f"{run['variant']} mode {k}: {e}") from None
            out.append({"depth": d, "q": q, "seed": run["seed"], "k": k, "sigma_star": float(s), "lr": lr,
                        "run_id": run["run_id"], **m})
    rec.cache["modes"] = pd.DataFrame(out)
    return rec.cache["modes"]


def _q_label(q: float) -> str:
    return "∞" if math.isinf(q) else f"{q:g}"


def map_exponent(rec: Records, th: dict) -> list[Row]:
    m = _mode_summaries(rec)
    m["p_err"] = (m["p"] - m["p_theory"]).abs()
    m["eta_err"] = (m["eta_bar"] / m["eta_bar_theory"] - 1).abs()
    cells = m.groupby(["depth", "q"]).agg(p=("p", "mean"), p_std=("p", "std"), p_theory=("p_theory", "first"),
                                          eta=("eta_bar", "mean"), eta_theory=("eta_bar_theory", "first"))
    worst_p = m.loc[m["p_err"].idxmax()]
    worst_eta = m.loc[m["eta_err"].idxmax()]
    numbers = {f"d={d} q={_q_label(q)}": {"p": r.p, "p_theory": r.p_theory, "eta_bar": r.eta,
                                           "eta_bar_theory": r.eta_theory} for (d, q), r in cells.iterrows()}
    return [Row("2a", "eq 17, Table 1", "map exponent p = 2(d-1)(q-1)/(dq)",
                "p fitted to each teacher mode's σ̄(t) (d 2-4 × q 1, 1.5, 2, 4, ∞)",
                f"|p − theory| ≤ {th['p_abs_err']:g} for every mode", f"max |Δp| {m['p_err'].max():.3f} "
                f"(d={worst_p.depth} q={_q_label(worst_p.q)}), mean {m['p_err'].mean():.3f}",
                bool((m["p_err"] <= th["p_abs_err"]).all()), numbers, ["claims_table1.md", "claims_fig2.png"]),
            Row("2b", "eq 17", "depth-calibrated rate η̄ = η d^(1-1/q)", "η̄ fitted with p, per mode",
                f"|η̄ / theory − 1| ≤ {th['eta_rel_err']:g} for every mode",
                f"max {m['eta_err'].max():.3f} (d={worst_eta.depth} q={_q_label(worst_eta.q)}), "
                f"mean {m['eta_err'].mean():.3f}", bool((m["eta_err"] <= th["eta_rel_err"]).all()), numbers,
                ["claims_table1.md"])]


def closed_forms(rec: Records, th: dict) -> list[Row]:
    from trainers import theory
    m = _mode_summaries(rec)
    closed = m[m["closed_form_error"].notna()]
    if closed.empty:
        raise NotMeasured("no map_dynamics trial with p in {0, 1/2, 1}")
    by_p = {f"p={p:g}": closed.loc[np.isclose(closed["p_theory"], p), "closed_form_error"] for p in theory.CLOSED_FORM_P}
    rows = [Row("3a", "Fig 2", "closed forms for p = 0, ½, 1 match the dynamics",
                "max |σ̄(t) − closed form| / σ̄* from σ̄ = 0.1 σ̄* on (theory's p and η̄, nothing fitted)",
                f"≤ {th['closed_form_max_err']:g} for every mode", _ratio_text(by_p),
                bool((closed["closed_form_error"] <= th["closed_form_max_err"]).all()),
                {k: v.tolist() for k, v in by_p.items()}, ["claims_fig2.png"])]
    slopes = []
    for (d, q, seed), g in m.groupby(["depth", "q", "seed"]):
        if len(g) < 2:
            continue
        slopes.append({"depth": d, "q": q, "p": g["p_theory"].iloc[0],
                       "window": theory.fit_power(g["sigma_star"], g["t_window"]),
                       "init": theory.fit_power(g["sigma_star"], g["t_half"]) if (g["t_half"] > 0).all() else math.nan})
    if not slopes:
        raise NotMeasured("map_dynamics needs two or more teacher modes per trial")
    s = pd.DataFrame(slopes)
    s["window_err"] = (s["window"] + s["p"]).abs()
    small = s[s["p"] < 1]
    rows.append(Row("3b", "§4.2, Fig 2", "learning time scales as σ̄*^(-p)",
                    "slope of log time (0.1 σ̄* → σ̄*/2) vs log σ̄* over the modes of one trial",
                    f"|slope + p| ≤ {th['slope_abs_err']:g} for every (d, q)",
                    f"max |slope + p| {s['window_err'].max():.3f}", bool((s["window_err"] <= th["slope_abs_err"]).all()),
                    {"slopes": s.to_dict("records")}, ["claims_table1.md"]))
    rows.append(Row("3c", "§4.2", "from a small init: half-max time ∝ σ̄*^(-p) for p < 1; escape dominates for p ≥ 1",
                    "slope of log half-max time (from the init) vs log σ̄*",
                    f"|slope + p| ≤ {th['slope_abs_err']:g} where p < 1 (p ≥ 1: listed, escape-dominated)",
                    f"p<1: max |slope + p| {(small['init'] + small['p']).abs().max():.2f} "
                    f"(NGD, p=0: {(small.loc[small['p'] == 0, 'init']).abs().max():.2f}); p≥1: slopes "
                    f"{s.loc[s['p'] >= 1, 'init'].max():+.2f} to {s.loc[s['p'] >= 1, 'init'].min():+.2f}",
                    bool(len(small)) and bool(((small["init"] + small["p"]).abs() <= th["slope_abs_err"]).all()),
                    {"slopes": s.to_dict("records")}, ["claims_table1.md"]))
    return rows


# ---------------------------------------------------------------- 4. update speed as ||j|| -> 0
def update_speed(rec: Records, th: dict) -> list[Row]:
    from trainers import theory
    df = rec.part("update_speed")
    measured, expected, numbers = {}, {}, {}
    for rule in FULL + BLOCK:
        sel = df[df["optimizer"] == rule]
        if sel["gain"].nunique() < 2:
            raise NotMeasured(f"update_speed needs {rule} at two or more gains")
        ks = [theory.speed_exponent_measured(g["gain"], g["update_norm"], config_value(g.iloc[0], "optimizer.lr"))
              for _, g in sel.groupby("seed")]
        r0 = sel.iloc[0]
        expected[rule] = theory.speed_exponent(int(config_value(r0, "trainer.depth")), config_value(r0, "optimizer.q"),
                                               "block" if rule.endswith("_d") else "full")
        measured[rule] = pd.Series(ks)
        numbers[rule] = {"measured": ks, "theory": expected[rule]}
    err = max(float((measured[r] - expected[r]).abs().max()) for r in measured)
    return [Row("4", "eq 7, 11, 13, 14, 19-20", "update speed vanishes (SGD), explodes (NGD, NGD-d), stays finite (sqrtNGD, -d)",
                "k in speed ~ gain^k as gain → 0 (first step, gains 1e-1…1e-4)",
                f"|k − theory| ≤ {th['exponent_abs_err']:g} for every rule and seed",
                ", ".join(f"{r} {pm(measured[r])} ({expected[r]:+g})" for r in measured), err <= th["exponent_abs_err"],
                numbers, ["claims_speed.png"])]


# ---------------------------------------------------------------- 5. Fig 4: early stopping, mode order
def early_stopping(rec: Records, th: dict) -> list[Row]:
    ts = rec.part("teacher_student", converged=True)
    benefit = {r: rule_values(ts, r, "final_test_loss") - rule_values(ts, r, "early_stop_test_loss")
               for r in ("sgd", "sqrt_ngd", "sqrt_ngd_d", "ngd", "ngd_d")}
    learners = min(float(benefit[r].mean()) for r in ("sgd", "sqrt_ngd", "sqrt_ngd_d"))
    worst = max(float(benefit[r].mean()) for r in ("ngd", "ngd_d"))
    return [Row("5a", "§6, Fig 4C", "early stopping helps SGD, sqrtNGD, sqrtNGD-d; NGD, NGD-d overfit from the start",
                "benefit = final test loss − lowest test loss (teacher_student, converged)",
                f"NGD's and NGD-d's mean benefit ≤ {th['benefit_ratio_max']:g}× the smallest of the others'",
                _ratio_text(benefit), learners > 0 and worst <= th["benefit_ratio_max"] * learners,
                {r: v.tolist() for r, v in benefit.items()}, ["parts/teacher_student/learning_curves.png"])]


def mode_order(rec: Records, th: dict) -> list[Row]:
    ts = rec.part("teacher_student", converged=True)
    order = {}
    for rule in ("sgd", "sqrt_ngd", "ngd"):
        sel = ts[ts["optimizer"] == rule]
        if sel.empty:
            raise NotMeasured(f"no usable {rule} trial in part teacher_student")
        order[rule] = pd.Series([half_fit_time(*rec.history(run["run_id"], "noise_fit"), config_value(run, "optimizer.lr"))
                                 / half_fit_time(*rec.history(run["run_id"], "signal_fit"), config_value(run, "optimizer.lr"))
                                 for _, run in sel.iterrows()], dtype=float)
    m = th["mode_order_ratio"]
    holds = bool((order["sgd"] >= m).all() and (order["sqrt_ngd"] >= m).all() and (order["ngd"] < m).all())
    return [Row("5b", "§6, Fig 4D", "SGD, sqrtNGD learn signal modes before noise; NGD all at once",
                    "time to fit half the training target's noise modes / its weakest signal mode",
                    f"≥ {m:g} for sgd and sqrt_ngd, < {m:g} for ngd",
                    _ratio_text(order), holds, {r: v.tolist() for r, v in order.items()},
                    ["claims_fig4d.png"])]


# ---------------------------------------------------------------- 6. Fig 5: norms
def norms(rec: Records, th: dict) -> list[Row]:
    ts = rec.part("teacher_student", converged=True)
    excess = {r: rule_values(ts, r, "final_norm_excess") for r in ("ngd_d", "sqrt_ngd_d", "sgd", "ngd", "sqrt_ngd")}
    others = pd.concat([excess[r] for r in excess if r != "ngd_d"], axis=1).max(axis=1)
    above = (excess["ngd_d"] > others).dropna()
    holds = bool(len(above) and above.all() and excess["ngd_d"].mean() >= th["ngd_d_norm_excess_min"])
    return [Row("6", "§5, Fig 3A, Fig 5", "NGD-d converges to larger-norm solutions than sqrtNGD-d and full rules",
                "final norm excess Σ||w_i||² / its minimum on the symmetry orbit (1 = balanced)",
                f"NGD-d above every other rule on every seed, mean ≥ {th['ngd_d_norm_excess_min']:g}",
                _ratio_text(excess), holds, {r: v.tolist() for r, v in excess.items()},
                ["parts/teacher_student/drift_and_norm_excess.png"])]


# ---------------------------------------------------------------- 7. S.I.1: non-whitened inputs
def nonwhite(rec: Records, th: dict) -> list[Row]:
    white, other = rec.part("teacher_student", converged=True), rec.part("teacher_student_nonwhite", converged=True)
    ratio = {}
    for rule in ("ngd", "sqrt_ngd", "ngd_d", "sqrt_ngd_d"):
        gap = lambda df: rule_values(df, rule, "final_test_loss") - rule_values(df, rule, "final_train_loss")  # noqa: E731
        ratio[rule] = (gap(other) / gap(white)).dropna()
    holds = all(len(v) and (v >= th["gap_ratio_min"]).all() for v in ratio.values())
    return [Row("7", "S.I.1, Fig S.I.1", "non-whitened inputs give a generalisation gap",
                "test − train loss, non-whitened (cond 100) / whitened, per seed (converged)",
                f"≥ {th['gap_ratio_min']:g} for every curvature rule and seed",
                _ratio_text(ratio), holds, {r: v.tolist() for r, v in ratio.items()},
                ["parts/teacher_student_nonwhite/learning_curves.png"])]


# ---------------------------------------------------------------- 8. S.I.3: gains on MNIST
def gains(rec: Records, th: dict) -> list[Row]:
    df = rec.part("mnist_gain")
    small = [float(g) for g in th["small_gains"]]

    def loss(rule, gain):
        sel = df[(df["optimizer"] == rule) & np.isclose(df["gain"], gain)]
        if sel.empty:
            raise NotMeasured(f"no usable {rule} trial at gain {gain:g} in part mnist_gain")
        return pd.to_numeric(sel["final_test_loss"], errors="coerce")

    all_gains = sorted(df.loc[df["optimizer"] == "sqrt_ngd_d", "gain"].unique(), reverse=True)
    if not all_gains:
        raise NotMeasured("no usable sqrt_ngd_d trial in part mnist_gain")
    trained = {f"g{g:g}": loss("sqrt_ngd_d", g) for g in all_gains}
    rows = [Row("8a", "S.I.3, Fig S.I.2", "sqrtNGD-d trains at every gain, one lr, no damping",
                "final test loss of sqrtNGD-d per gain (chance level ln 10 = 2.30)",
                f"≤ {th['trained_max']:g} at every gain and seed", _ratio_text(trained),
                all((v <= th["trained_max"]).all() for v in trained.values()),
                {k: v.tolist() for k, v in trained.items()}, ["parts/mnist_gain/learning_curves.png"])]
    stuck = {f"{r} g{g:g}": loss(r, g) for r in ("sgd", "ngd_d") for g in small}
    rows.append(Row("8b", "S.I.3, Fig S.I.2", "SGD and damped NGD-d struggle at small gains",
                    f"final test loss of SGD and NGD-d at gains {', '.join(f'{g:g}' for g in small)}",
                    f"≥ {th['stuck_min']:g} (near chance) on every seed", _ratio_text(stuck),
                    all((v >= th["stuck_min"]).all() for v in stuck.values()),
                    {k: v.tolist() for k, v in stuck.items()}, ["parts/mnist_gain/learning_curves.png"]))
    return rows


# ---------------------------------------------------------------- the suite
CLAIMS: list[tuple[str, str, str, Callable[[Records, dict], list[Row]]]] = [
    # (threshold section, id, paper, claim function), in the order of issue 9's list
    ("conservation", "1", "Thm 1, eq 15", conservation),
    ("map_exponent", "2", "eq 17, Table 1", map_exponent),
    ("closed_forms", "3", "Fig 2", closed_forms),
    ("update_speed", "4", "eq 7-20", update_speed),
    ("early_stopping", "5a", "Fig 4C", early_stopping),
    ("early_stopping", "5b", "Fig 4D", mode_order),
    ("norms", "6", "Fig 5", norms),
    ("nonwhite", "7", "S.I.1", nonwhite),
    ("gains", "8", "S.I.3", gains),
]


def evaluate(rec: Records, thresholds: dict) -> list[Row]:
    """Every claim with thresholds in the config, in order; one that cannot be measured is a "?" row."""
    rows = []
    for section, cid, paper, check in CLAIMS:
        if section not in thresholds:
            continue
        try:
            rows += check(rec, thresholds[section])
        except NotMeasured as e:
            rows.append(Row(cid, paper, check.__name__.replace("_", " "), "-", "-", f"not measured: {e}", None))
    return sorted(rows, key=lambda r: (int("".join(c for c in r.id if c.isdigit()) or 0), r.id))


# ---------------------------------------------------------------- figures
def plot_fig4d(rec: Records, path: Path) -> bool:
    """Fig 4D as measured: the fitted fraction of the training target's signal modes (the weakest) and
    noise modes (their mean) vs time t = lr * step, per rule, one line per seed; 1/2 is where 5b reads
    the times."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        ts = rec.part("teacher_student", converged=True)
    except NotMeasured:
        return False
    rules = [r for r in ("sgd", "sqrt_ngd", "sqrt_ngd_d", "ngd", "ngd_d") if (ts["optimizer"] == r).any()]
    if not rules or not rec.histories["key"].isin(["signal_fit", "noise_fit"]).any():
        return False
    fig, axes = plt.subplots(1, len(rules), figsize=(3.1 * len(rules), 3.2), sharey=True, squeeze=False)
    for ax, rule in zip(axes[0], rules):
        for _, run in ts[ts["optimizer"] == rule].iterrows():
            lr = config_value(run, "optimizer.lr")
            for key, color in (("signal_fit", "tab:blue"), ("noise_fit", "crimson")):
                steps, values = rec.history(run["run_id"], key)
                keep = steps > 0
                ax.plot(lr * steps[keep], values[keep], color=color, lw=1.4, alpha=0.8,
                        label=("weakest signal mode" if key == "signal_fit" else "noise modes (mean)"))
        ax.axhline(0.5, color="0.4", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(rule)
        ax.set_xlabel("time t = lr · step")
        ax.grid(alpha=0.3, lw=0.5)
    axes[0][0].set_ylabel("fitted fraction of the target")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles[:2], labels[:2], loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Fig 4D, measured (teacher_student): signal before noise?", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def table1_markdown(rec: Records) -> str | None:
    """The measured Table 1: p (mean over modes and seeds) and eta_bar / theory per depth x q."""
    try:
        m = _mode_summaries(rec)
    except NotMeasured:
        return None
    qs = sorted(m["q"].unique())
    lines = ["## Table 1, measured (map_dynamics)", "",
             "p fitted to each teacher mode's σ̄(t) (mean over modes and seeds; theory in brackets), then "
             "η̄ measured / η̄ = η d^(1-1/q):", "",
             "| d | " + " | ".join(f"q = {_q_label(q)}" for q in qs) + " |", "|---|" + "---:|" * len(qs)]
    for d in sorted(m["depth"].unique()):
        cells = []
        for q in qs:
            g = m[(m["depth"] == d) & (m["q"] == q)]
            cells.append("" if g.empty else f"{g['p'].mean():.3f} ({g['p_theory'].iloc[0]:.3f}); "
                         f"η̄ {(g['eta_bar'] / g['eta_bar_theory']).mean():.3f}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_fig2(rec: Records, path: Path) -> bool:
    """Fig 2 as measured: sigma(t) / sigma* of each mode with p in {0, 1/2, 1} (solid) and the closed form
    started where the mode enters the fit window (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainers import theory
    try:
        m = _mode_summaries(rec)
    except NotMeasured:
        return False
    m = m[m["closed_form_error"].notna() & (m["seed"] == m["seed"].min())]
    if m.empty:
        return False
    ps = [p for p in theory.CLOSED_FORM_P if np.isclose(m["p_theory"], p).any()]
    fig, axes = plt.subplots(1, len(ps), figsize=(4.2 * len(ps), 3.3), squeeze=False)
    for ax, p in zip(axes[0], ps):
        sel = m[np.isclose(m["p_theory"], p)]
        (d, q), first = next(iter(sel.groupby(["depth", "q"])))
        for i, (_, r) in enumerate(first.iterrows()):
            steps, values = rec.history(r["run_id"], f"signal_mode.k{int(r['k'])}")
            t, s = r["lr"] * steps, values / r["sigma_star"]
            color = plt.get_cmap("viridis")(0.25 * i)
            ax.plot(t[t > 0], s[t > 0], color=color, lw=2, label=f"σ̄* = {r['sigma_star']:g}")
            start = int(np.argmax(s >= theory.WINDOW[0]))
            rate = theory.calibrated_lr(1.0, int(d), float(q))
            model = theory.closed_form(p, r["sigma_star"], rate, t[start:] - t[start], min(values[start], r["sigma_star"] * (1 - 1e-12)))
            ax.plot(t[start:], model / r["sigma_star"], color="black", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"p = {p:g} (d = {d}, q = {_q_label(q)})", fontsize=9)
        ax.set_xlabel("time t = lr · step")
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("σ̄(t) / σ̄*")
    fig.suptitle("Fig 2, measured: the trainer's modes (solid) and the closed forms (dashed, from σ̄ = 0.1 σ̄*)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speed(rec: Records, path: Path) -> bool:
    """Update speed ||D|| at the first step vs gain, per rule (seed mean), with the theory's slope."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainers import theory
    try:
        df = rec.part("update_speed")
    except NotMeasured:
        return False
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for i, rule in enumerate(FULL + BLOCK):
        sel = df[df["optimizer"] == rule]
        if sel.empty:
            continue
        lr = config_value(sel.iloc[0], "optimizer.lr")
        g = (pd.to_numeric(sel["update_norm"]) / lr).groupby(sel["gain"]).mean().sort_index()
        k = theory.speed_exponent(int(config_value(sel.iloc[0], "trainer.depth")), config_value(sel.iloc[0], "optimizer.q"),
                                  "block" if rule.endswith("_d") else "full")
        color = plt.get_cmap("tab10")(i)
        ax.plot(g.index, g.values, "o-" if rule in FULL else "s--", color=color, label=f"{rule} (theory k = {k:+g})")
        ax.plot(g.index, g.values[-1] * (g.index / g.index[-1]) ** k, color=color, lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("initial gain (||j|| ~ gain^(d-1))")
    ax.set_ylabel("update speed ||D|| (first step)")
    ax.set_title("eq 7-14, 19-20: update speed as the weights → 0 (dotted: theory's slope)", fontsize=9)
    ax.grid(alpha=0.3, which="both", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


FIGURES = {"claims_fig2.png": plot_fig2, "claims_speed.png": plot_speed, "claims_fig4d.png": plot_fig4d}


def figures(rec: Records, out_dir: Path) -> list[Path]:
    """The claims' own figures (those with something to draw) and the measured Table 1."""
    out = [out_dir / name for name, draw in FIGURES.items() if draw(rec, out_dir / name)]
    table = table1_markdown(rec)
    if table:
        (out_dir / "claims_table1.md").write_text(table)
        out.append(out_dir / "claims_table1.md")
    return out


# ---------------------------------------------------------------- output
def markdown(rows: list[Row], title: str, extra: str = "") -> str:
    held = sum(r.holds is True for r in rows)
    lines = [f"# {title}", "", f"{held} of {len(rows)} claims hold "
             f"({sum(r.holds is False for r in rows)} do not, {sum(r.holds is None for r in rows)} not measured). "
             "Thresholds were fixed in the config before running (conf/experiment/paper.yaml).", "",
             "| # | paper | claim | measured | threshold | value (mean±std over seeds) | holds |",
             "|---|---|---|---|---|---|:---:|"]
    def cell(text: str) -> str:  # a "|" in a value (|Δp|) would end the Markdown cell
        return str(text).replace("|", "\\|")

    for r in rows:
        figs = " ".join(f"[fig]({f})" for f in r.figures)
        lines.append(f"| {r.id} | {r.paper} | {cell(r.claim)} | {cell(r.measured)} | {cell(r.threshold)} | "
                     f"{cell(r.value)} {figs} | {MARK[r.holds]} |")
    return "\n".join(lines + ["", extra]).rstrip() + "\n"


def write(rows: list[Row], out_dir: Path, title: str, extra: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "claims.md", out_dir / "claims.json"
    md.write_text(markdown(rows, title, extra))
    js.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=_json) + "\n")
    return [md, js]


def _json(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(repr(x))


def table(rows: list[Row], width: int = 80):
    """The console view: id, claim, value, mark, sized for `width` columns (claims.md has the rest)."""
    from rich import box
    from rich.table import Table
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, width=width)
    t.add_column("#", no_wrap=True)
    t.add_column("claim", ratio=3)
    t.add_column("measured value", ratio=4)
    t.add_column("", no_wrap=True)
    for r in rows:
        t.add_row(r.id, r.claim, r.value, MARK[r.holds])
    return t
