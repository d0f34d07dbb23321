"""The comparison, read back from MLflow after the sweep (so resumed trials count as much as new ones).

Per trial: `weight_norm_divergence` = its final weight_norm / that of the reference optimizer at the
same gain and seed (logged on the child runs too). Per variant x gain: mean and std over seeds of the
summary metrics (summary.csv, printed). Plots a researcher would otherwise make by hand: test loss vs
step per variant with one panel per gain (seed mean, min-max band, early-stopping points marked);
conservation drift and weight norm vs step on log axes; for the teacher-student task, the signal and
noise mode trajectories of the input-output map. All land in the parent run's `report/` artifacts.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rich.table import Table  # noqa: E402

SUMMARY_METRICS = ("final_test_loss", "early_stop_test_loss", "early_stop_step", "final_train_loss",
                   "test_accuracy", "weight_norm_growth", "weight_norm_divergence", "max_conservation_drift",
                   "clipped_updates", "steps_per_second", "trial_seconds")
SHOWN = ("final_test_loss", "early_stop_test_loss", "early_stop_step", "test_accuracy", "weight_norm_divergence",
         "max_conservation_drift")


def trial_table(tracker, exp_id: str, parent_id: str) -> pd.DataFrame:
    """One row per visible child run: tags, params we group by, and the latest value of each metric."""
    rows = []
    for run in tracker.children(exp_id, parent_id):
        tags, m = run.data.tags, run.data.metrics
        rows.append({"run_id": run.info.run_id, "run_status": run.info.status, "variant": tags.get("variant"),
                     "optimizer": tags.get("optimizer"), "gain": float(tags.get("gain", "nan")),
                     "seed": int(tags.get("seed", "-1")), "status": tags.get("status"),
                     "trial_key": tags.get("trial.key"), **m})
    return pd.DataFrame(rows)


def reference_variant(df: pd.DataFrame, reference: str) -> str | None:
    """`report.reference` names a variant label, or an optimizer with a plain variant of that name."""
    variants = set(df["variant"])
    if reference in variants:
        return reference
    named = sorted(v for v in variants if v.split(" ")[0] == reference)
    return named[0] if len(named) == 1 else None


def add_divergence(df: pd.DataFrame, reference: str) -> pd.DataFrame:
    ref = reference_variant(df, reference)
    df["weight_norm_divergence"] = np.nan
    if ref is None or "weight_norm" not in df:
        return df
    base = df[df["variant"] == ref].set_index(["gain", "seed"])["weight_norm"]
    key = list(zip(df["gain"], df["seed"]))
    df["weight_norm_divergence"] = [df["weight_norm"].iloc[i] / base.get(k, np.nan) for i, k in enumerate(key)]
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per variant x gain; counts of trials, diverged and failed ones."""
    cols = [c for c in SUMMARY_METRICS if c in df]
    out = []
    for (variant, gain), g in df.groupby(["variant", "gain"], sort=False):
        row = {"variant": variant, "gain": gain, "trials": len(g),
               "diverged": int((g["status"] == "diverged").sum()), "failed": int((g["run_status"] != "FINISHED").sum())}
        for c in cols:
            v = pd.to_numeric(g[c], errors="coerce")
            row[f"{c}_mean"] = v.mean()
            row[f"{c}_std"] = v.std(ddof=0) if v.notna().sum() > 1 else (0.0 if v.notna().any() else np.nan)
        out.append(row)
    return pd.DataFrame(out).sort_values("gain", ascending=False, kind="stable")  # variants in grid order


def print_summary(summary: pd.DataFrame, console, title: str) -> None:
    table = Table(title=title, show_lines=False)
    shown = [c for c in SHOWN if f"{c}_mean" in summary]
    for col in ("variant", "gain", "n", "diverged", *shown):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for _, r in summary.iterrows():
        cells = [str(r["variant"]), f"{r['gain']:g}", str(r["trials"]),
                 f"[red]{r['diverged']}[/]" if r["diverged"] else "0"]
        cells += [_pm(r[f"{c}_mean"], r[f"{c}_std"]) for c in shown]
        table.add_row(*cells)
    console.print(table)


def _pm(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.3g} ± {std:.2g}"


def histories(tracker, df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Long table (run_id, key, step, value) of the metric histories the plots need."""
    from concurrent.futures import ThreadPoolExecutor

    def fetch(run_key):
        run_id, key = run_key
        return [(run_id, key, m.step, m.value) for m in tracker.call(tracker.client.get_metric_history, run_id, key)]
    with ThreadPoolExecutor(4) as pool:  # round trips overlap; the server answers from one process
        chunks = pool.map(fetch, [(r, k) for r in df["run_id"] for k in keys])
        rows = [row for chunk in chunks for row in chunk]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def _seed_band(h: pd.DataFrame, runs: pd.DataFrame, key: str):
    """Mean, min and max over the seeds of `runs` at each step (steps a diverged seed lacks use the rest)."""
    sel = h[(h["key"] == key) & h["run_id"].isin(runs["run_id"])]
    sel = sel[np.isfinite(sel["value"])]
    if sel.empty:
        return None
    g = sel.groupby("step")["value"]
    return g.mean(), g.min(), g.max()


def _colors(variants: list[str]) -> dict:
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def _variants(df) -> list[str]:
    """Variants in grid order (the frame is sorted that way), so colours match across plots."""
    return list(dict.fromkeys(df["variant"]))


def _log_x(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_test_loss(df, h, path: Path, title: str) -> None:
    gains = sorted(df["gain"].unique(), reverse=True)
    variants = _variants(df)
    color = _colors(variants)
    fig, axes = plt.subplots(1, len(gains), figsize=(max(4.2 * len(gains), 7.5), 3.8), squeeze=False, sharey=False)
    for ax, gain in zip(axes[0], gains):
        for v in variants:
            runs = df[(df["variant"] == v) & (df["gain"] == gain)]
            band = _seed_band(h, runs, "test_loss")
            if band is None:
                continue
            mean, lo, hi = band
            keep = mean.index > 0  # log-spaced time: the dynamics span decades of steps
            n_div = int((runs["status"] == "diverged").sum())
            label = v + (f" ({n_div} diverged)" if n_div else "")
            ax.plot(mean.index[keep], mean.values[keep], color=color[v], label=label, lw=1.5)
            ax.fill_between(mean.index[keep], lo.values[keep], hi.values[keep], color=color[v], alpha=0.18, lw=0)
            if "early_stop_step" in runs:  # each seed's early-stopping point
                es = runs.dropna(subset=["early_stop_step", "early_stop_test_loss"])
                ax.scatter(es["early_stop_step"], es["early_stop_test_loss"], marker="v", s=28, color=color[v],
                           edgecolor="black", linewidth=0.5, zorder=3)
        _log_x(ax)
        ax.set_yscale("log")
        ax.set_title(f"gain {gain:g}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both", lw=0.5)
    axes[0][0].set_ylabel("test loss (mean over seeds, band = min-max)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}: test loss; triangles = early-stopping points", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_norms(df, h, path: Path, title: str) -> None:
    gains = sorted(df["gain"].unique(), reverse=True)
    keys = [("conservation_drift", "conservation drift"), ("weight_norm", "weight norm  sum_i ||w_i||_F")]
    variants = _variants(df)
    color = _colors(variants)
    fig, axes = plt.subplots(2, len(gains), figsize=(max(4.2 * len(gains), 7.5), 6.6), squeeze=False)
    for col, gain in enumerate(gains):
        for row, (key, label) in enumerate(keys):
            ax = axes[row][col]
            for v in variants:
                band = _seed_band(h, df[(df["variant"] == v) & (df["gain"] == gain)], key)
                if band is None:
                    continue
                mean, lo, hi = band
                keep = (mean.index > 0) & (mean.values > 0)
                ax.plot(mean.index[keep], mean.values[keep], color=color[v], label=v, lw=1.5)
                ax.fill_between(mean.index[keep], np.maximum(lo.values[keep], 1e-300), hi.values[keep],
                                color=color[v], alpha=0.18, lw=0)
            _log_x(ax)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both", lw=0.5)
            if row == 0:
                ax.set_title(f"gain {gain:g}")
            if row == 1:
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel(label)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}: conservation-law drift and weight norm (seed mean, band = min-max)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_modes(df, h, path: Path, title: str, signal_keys: list[str]) -> None:
    """Fig 4D: per variant, the map's singular values along the teacher's modes (signal) and the
    largest component outside them (noise), vs step; seed mean; the first (largest) gain."""
    gain = sorted(df["gain"].unique(), reverse=True)[0]
    variants = _variants(df)
    fig, axes = plt.subplots(1, len(variants), figsize=(max(3.6 * len(variants), 7.5), 3.4), squeeze=False,
                             sharey=True)
    shades = plt.get_cmap("viridis")(np.linspace(0.0, 0.8, max(len(signal_keys), 1)))
    for ax, v in zip(axes[0], variants):
        runs = df[(df["variant"] == v) & (df["gain"] == gain)]
        for i, key in enumerate(signal_keys):
            band = _seed_band(h, runs, key)
            if band is not None:
                mean = band[0]
                keep = mean.index > 0
                ax.plot(mean.index[keep], mean.values[keep], color=shades[i], lw=1.6, label=key.split(".")[-1])
        band = _seed_band(h, runs, "noise_mode")
        if band is not None:
            mean = band[0]
            keep = mean.index > 0
            ax.plot(mean.index[keep], mean.values[keep], color="crimson", ls="--", lw=1.6, label="noise")
        _log_x(ax)
        ax.set_yscale("log")
        ax.set_title(v)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both", lw=0.5)
    axes[0][0].set_ylabel("mode strength of the input-output map")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}: signal vs noise modes (gain {gain:g}, seed mean)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(sweep, console, out_dir: Path) -> pd.DataFrame | None:
    """Compute, print, write and log the comparison; returns the summary table."""
    tr, cfg = sweep.tracker, sweep.cfg
    df = trial_table(tr, sweep.exp_id, sweep.parent_id)
    if df.empty:
        return None
    order = {t.key: i for i, t in enumerate(sweep.trials)}
    df = df.assign(_order=[order.get(k, len(order)) for k in df["trial_key"]]).sort_values("_order", kind="stable")
    df = df.drop(columns="_order").reset_index(drop=True)
    df = add_divergence(df, cfg.report.reference)
    ref = reference_variant(df, cfg.report.reference)
    for run_id, value in zip(df["run_id"], df["weight_norm_divergence"]):
        if np.isfinite(value):
            tr.call(tr.client.log_metric, run_id, "weight_norm_divergence", float(value))
    summary = summarize(df)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out_dir / "summary.csv", index=False)
    df.to_csv(out_dir / "trials.csv", index=False)
    title = f"{sweep.experiment} (sweep {sweep.sweep_id})"
    note = "" if ref else f" (no weight_norm_divergence: reference '{cfg.report.reference}' is not in this grid)"
    print_summary(summary, console, f"{title}: mean ± std over seeds{note}")

    signal_keys = sorted(c for c in df.columns if c.startswith("signal_mode."))
    keys = [k for k in ("test_loss", "conservation_drift", "weight_norm", "noise_mode", *signal_keys) if k in df]
    h = histories(tr, df, keys)
    plots = []
    if "test_loss" in keys:
        plots.append(out_dir / "test_loss.png")
        plot_test_loss(df, h, plots[-1], sweep.experiment)
    if "weight_norm" in keys and "conservation_drift" in keys:
        plots.append(out_dir / "drift_and_weight_norm.png")
        plot_norms(df, h, plots[-1], sweep.experiment)
    if signal_keys:
        plots.append(out_dir / "modes.png")
        plot_modes(df, h, plots[-1], sweep.experiment, signal_keys)
    for path in [out_dir / "summary.csv", out_dir / "trials.csv", *plots]:
        tr.call(tr.client.log_artifact, sweep.parent_id, str(path), "report")
    console.print(f"report: {out_dir} (also the parent run's artifacts under report/)")
    return summary
