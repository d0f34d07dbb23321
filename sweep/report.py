"""The comparison, read back from MLflow after the sweep (so resumed and reused trials count as much as
new ones), or re-rendered later by `python -m sweep report` without Ray.

Per trial: `norm_excess_vs_full` = a block rule's final `norm_excess` / that of its full counterpart
(NGD-d / NGD, sqrtNGD-d / sqrtNGD, qngd_d / qngd at the same q) at the same gain and seed, only where
both finished and (where judged) converged, so no ratio rests on a stuck or unfinished reference
(logged on the child runs too, through the tracker's queue). Per variant x gain:
mean and std (over seeds, ddof=0) of the summary metrics: all of them in summary.csv; the headline
metric as a variant x gain pivot and the other `METRICS` in a second table, both sized for 80 columns.
Figures, as in the paper (Fig 4, Fig S.I.2): train / test loss (and accuracy) per gain, band = the
table's mean ± std; drift and norm excess; the teacher-student mode magnitudes against the teacher's
singular values. Histories come from the records the driver streamed, else one bulk read per metric.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from . import claims  # noqa: E402

# Every summary metric a trial may report (summary.csv keeps them all).
SUMMARY_METRICS = ("final_test_loss", "early_stop_test_loss", "early_stop_step", "final_train_loss",
                   "test_accuracy", "weight_norm_growth", "norm_excess", "norm_excess_vs_full",
                   "max_conservation_drift", "converged", "rescaled_time", "clipped_updates", "steps_per_second", "trial_seconds")
# The printed ones: metric -> (short column label, what it means). The first is the headline (the pivot);
# a metric no trial reported is left out, so new metrics slot in by adding a line here.
METRICS = {
    "final_test_loss": ("test loss", "final test loss"),
    "early_stop_test_loss": ("best loss", "early stopping: the lowest test loss"),
    "early_stop_step": ("best step", "the step of the lowest test loss"),
    "test_accuracy": ("accuracy", "final test accuracy"),
    "norm_excess": ("norm exc.", "sum ||W||^2 over its minimum on the symmetry orbit (1 = balanced)"),
    "norm_excess_vs_full": ("blk/full", "norm exc. of a block rule / its full counterpart's (same gain, "
                                        "seed; both converged)"),
    "converged": ("converged", "fraction of seeds that converged"),
    "max_conservation_drift": ("drift", "largest conservation-law drift"),
}
HEADLINE = next(iter(METRICS))
WIDTH = 80  # the tables are built to be read in an 80-column terminal
MODES_WRAP = 6  # modes figure with one gain: at most this many variant panels per row
CURVES = (("train_loss", "train loss"), ("test_loss", "test loss"), ("test_accuracy", "test accuracy"))


# ---------------------------------------------------------------- labels and numbers
def fmt_gain(g: float) -> str:
    """One format for every gain: 1, 1e-1, 1e-2, 5e-3, 1e-6 (never 0.0001 next to 1e-06)."""
    if not (isinstance(g, (int, float)) and math.isfinite(g)) or g == 0:
        return f"{g:g}"
    e = math.floor(math.log10(abs(g)) + 1e-9)
    m = round(g / 10 ** e, 6)
    ms = f"{m:g}"
    return ms if e == 0 else f"{ms}e{e}"


def fmt_pm(mean: float, std: float, integer: bool = False) -> str:
    """mean±std with the same decimals on both, 3 significant digits of the mean (compact exponents
    for very small or large means: 5.8e-4±2.1e-4)."""
    if mean is None or not np.isfinite(mean):
        return "-"
    std = 0.0 if std is None or not np.isfinite(std) else std
    a = abs(mean)
    if integer and a < 1e6:
        return f"{mean:.0f}±{std:.0f}"
    if a >= 1e4 or 0 < a < 1e-3:
        return f"{_sci(mean)}±{_sci(std)}"
    decimals = min(4, max(0, 2 - math.floor(math.log10(a)))) if a > 0 else 3
    return f"{mean:.{decimals}f}±{std:.{decimals}f}"


def _sci(x: float) -> str:
    if x == 0:
        return "0"
    m, e = f"{x:.1e}".split("e")
    return f"{m}e{int(e)}"


def _cell(r, metric: str) -> str:
    return fmt_pm(r[f"{metric}_mean"], r[f"{metric}_std"], integer=metric.endswith("_step"))


# ---------------------------------------------------------------- the data
@dataclass
class Source:
    """What a report reads: the tracker, the sweep's parent run, its trials' order, and the histories
    the driver already holds (run handle, [(key, value, step)]) so they are not read back."""
    tracker: object
    exp_id: str
    parent_id: str
    experiment: str
    sweep_id: str
    order: list = field(default_factory=list)       # trial keys in grid order
    streamed: list = field(default_factory=list)    # [(RunHandle, [(key, value, step), ...]), ...]
    claims: dict = field(default_factory=dict)      # the config's `claims` (thresholds) of a protocol sweep
    parts_of: dict = field(default_factory=dict)    # trial key -> its protocol parts, as planned now (else the tag)

    @classmethod
    def of(cls, sweep) -> "Source":
        from omegaconf import OmegaConf
        return cls(sweep.tracker, sweep.exp_id, sweep.parent_id, sweep.experiment, sweep.sweep_id,
                   [t.key for t in sweep.trials], list(getattr(sweep, "streamed", [])),
                   OmegaConf.to_container(sweep.cfg.claims, resolve=True),
                   {t.key: ",".join(t.parts) for t in sweep.trials})


def trial_table(tracker, exp_id: str, parent_id: str, sweep_id: str | None = None) -> pd.DataFrame:
    """One row per trial of the sweep (its own child runs and the finished runs it reused): tags, the
    params we group by, and the latest value of each metric."""
    runs = tracker.children(exp_id, parent_id)
    if sweep_id and hasattr(tracker, "reused_runs"):
        runs += tracker.reused_runs(exp_id, sweep_id)
    rows = []
    for run in runs:
        tags, m, p = run.data.tags, run.data.metrics, run.data.params
        rows.append({"run_id": run.info.run_id, "run_name": run.info.run_name, "run_status": run.info.status,
                     "variant": tags.get("variant"), "optimizer": tags.get("optimizer"),
                     "gain": float(tags.get("gain", "nan")), "seed": int(tags.get("seed", "-1")),
                     "status": tags.get("status"), "trial_key": tags.get("trial.key"), "parts": tags.get("parts", ""),
                     "teacher_singular_values": p.get("trainer.teacher_singular_values"), **m,
                     **{f"config.{k}": v for k, v in p.items()}})
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.drop_duplicates("trial_key", keep="first")
    return df


def full_counterpart(variant: str) -> str | None:
    """The full-structure variant a block variant compares with: "ngd_d" -> "ngd",
    "qngd_d q=1.5" -> "qngd q=1.5"; None for a full variant."""
    head, *rest = variant.split(" ")
    return " ".join([head[:-2], *rest]) if head.endswith("_d") else None


def _comparable(df: pd.DataFrame) -> pd.Series:
    """Trials a ratio may use: finished (not diverged or failed) and, where judged, converged."""
    ok = (df["status"] == "finished") & (df["run_status"] == "FINISHED")
    if "converged" in df:
        ok &= pd.to_numeric(df["converged"], errors="coerce").fillna(1.0) != 0
    return ok


def add_block_ratio(df: pd.DataFrame) -> pd.DataFrame:
    """`norm_excess_vs_full` per block trial (module docstring); NaN where either side is missing,
    diverged or unconverged."""
    df["norm_excess_vs_full"] = np.nan
    if "norm_excess" not in df:
        return df
    ok = _comparable(df)
    base = df[ok].set_index(["variant", "gain", "seed"])["norm_excess"]
    ratios = []
    for i, (variant, gain, seed, value) in enumerate(zip(df["variant"], df["gain"], df["seed"], df["norm_excess"])):
        ref = full_counterpart(variant)
        ratios.append(value / base.get((ref, gain, seed), np.nan) if ref and ok.iloc[i] else np.nan)
    df["norm_excess_vs_full"] = ratios
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


# ---------------------------------------------------------------- tables at 80 columns
def _shown(summary: pd.DataFrame) -> list[str]:
    return [c for c in METRICS if f"{c}_mean" in summary and summary[f"{c}_mean"].notna().any()]


def _mark(r) -> str:
    return "†" if r["diverged"] else ("‡" if r["failed"] else "")


def _fit(title: str, keys: list[str], values: list[str], rows: list[tuple[list[str], list[str]]],
         width: int) -> list:
    """Tables with the key columns and as many value columns as fit in `width` (the rest in more tables):
    no cell is ever cut or wrapped; the title is a line of its own (a table's title wraps to its width)."""
    def build(cols: list[int], part: str) -> Table:
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for k in keys:
            t.add_column(k, justify="left", no_wrap=True)
        for i in cols:
            t.add_column(values[i], justify="right", no_wrap=True)
        for kc, vc in rows:
            t.add_row(*kc, *[vc[i] for i in cols])
        return t
    measure = Console(width=10_000)
    chunks, cur = [], []
    for i in range(len(values)):
        trial = build(cur + [i], "")
        if cur and measure.measure(trial).maximum > width:
            chunks.append(cur)
            cur = [i]
        else:
            cur.append(i)
    if cur:
        chunks.append(cur)
    from rich.console import Group
    from rich.text import Text
    return [Group(Text(title + (f" ({n + 1}/{len(chunks)})" if len(chunks) > 1 else ""), style="bold"), build(c, ""))
            for n, c in enumerate(chunks)]


def summary_tables(summary: pd.DataFrame, width: int = WIDTH) -> tuple[list[Table], list[str]]:
    """(tables, footnotes): the headline metric as variant x gain, then the other metrics per variant x gain."""
    shown = _shown(summary)
    if not shown:
        return [], []
    variants = list(dict.fromkeys(summary["variant"]))
    gains = sorted(summary["gain"].unique(), reverse=True)
    by = {(r["variant"], r["gain"]): r for _, r in summary.iterrows()}
    head = shown[0]
    rows = []
    for v in variants:
        cells = []
        for g in gains:
            r = by.get((v, g))
            cells.append("" if r is None else _cell(r, head) + _mark(r))
        rows.append(([v], cells))
    n = summary["trials"].max()
    tables = _fit(f"{METRICS[head][1]} (mean±std over {n} seeds), by gain", ["variant"],
                  [f"gain {fmt_gain(g)}" for g in gains], rows, width)
    other = shown[1:]
    if other:
        rows = [([r["variant"], fmt_gain(r["gain"])],
                 [_cell(r, c) for c in other]) for _, r in summary.iterrows()]
        tables += _fit("other metrics (mean±std over seeds)", ["variant", "gain"],
                       [METRICS[c][0] for c in other], rows, width)
    notes = [f"{METRICS[c][0]}: {METRICS[c][1]}" for c in other]
    div = [f"{r['variant']} at gain {fmt_gain(r['gain'])} ({r['diverged']}/{r['trials']})"
           for _, r in summary.iterrows() if r["diverged"]]
    if div:
        notes.append("† some seeds diverged: " + ", ".join(div))
    if (summary["failed"] > 0).any():
        notes.append("‡ some trials failed (their metrics are missing)")
    return tables, notes


def print_summary(summary: pd.DataFrame, console, title: str) -> None:
    tables, notes = summary_tables(summary)
    console.print(f"[bold]{title}[/]", highlight=False)
    for t in tables:
        console.print(t)
    for line in notes:
        console.print(line, highlight=False)


def summary_markdown(summary: pd.DataFrame, title: str) -> str:
    """The parent run's description (`mlflow.note.content`): the same tables in Markdown."""
    shown = _shown(summary)
    gains = sorted(summary["gain"].unique(), reverse=True)
    by = {(r["variant"], r["gain"]): r for _, r in summary.iterrows()}
    lines = [f"### {title}", ""]
    if shown:
        head = shown[0]
        lines += [f"**{METRICS[head][1]}**, mean ± std over seeds", "",
                  "| variant | " + " | ".join(f"gain {fmt_gain(g)}" for g in gains) + " |",
                  "|---|" + "---:|" * len(gains)]
        for v in dict.fromkeys(summary["variant"]):
            cells = [_cell(by[(v, g)], head) + _mark(by[(v, g)]) if (v, g) in by else "" for g in gains]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines += ["", "| variant | gain | trials | diverged | " + " | ".join(METRICS[c][0] for c in shown) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(shown)]
        for _, r in summary.iterrows():
            lines.append(f"| {r['variant']} | {fmt_gain(r['gain'])} | {r['trials']} | {r['diverged']} | "
                         + " | ".join(_cell(r, c) for c in shown) + " |")
        lines += [""] + [f"- {METRICS[c][0]}: {METRICS[c][1]}" for c in shown]
    lines += ["", "Figures and the full table (summary.csv, trials.csv): this run's artifacts under `report/`."]
    return "\n".join(lines)


def parent_metrics(summary: pd.DataFrame) -> list[tuple[str, float, int]]:
    """Headline numbers on the parent run: `<metric>/<variant>/g<gain>` = the seed mean."""
    shown = _shown(summary)
    out = []
    for _, r in summary.iterrows():
        for c in shown[:2]:
            v = r[f"{c}_mean"]
            if np.isfinite(v):
                name = f"{c}/{r['variant']}/g{fmt_gain(r['gain'])}".replace("=", ":")
                out.append((name, float(v), 0))
    return out


# ---------------------------------------------------------------- histories
def streamed_histories(streamed: list, keys: set[str]) -> pd.DataFrame:
    """Long table (run_id, key, step, value) of what the driver logged itself (no read back)."""
    rows = [(h.run_id, k, s, v) for h, metrics in streamed if h.run_id and not h.deleted
            for k, v, s in metrics if k in keys]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def fetch_histories(tracker, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """The same table read back in bulk: one request per metric per <= 100 runs (not one per run)."""
    rows = []
    for key in keys:
        todo = [list(run_ids[i:i + 100]) for i in range(0, len(run_ids), 100)]
        while todo:
            chunk = todo.pop()
            got, capped = _bulk(tracker, chunk, key)
            if capped and len(chunk) > 1:  # the server caps one answer at 25,000 points: split and ask again
                todo += [chunk[:len(chunk) // 2], chunk[len(chunk) // 2:]]
                continue
            rows += got
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


_BULK_MAX = 25_000


def _bulk(tracker, run_ids: list[str], key: str) -> tuple[list, bool]:
    uri = str(tracker.uri)
    if uri.startswith(("http://", "https://")):
        import requests

        def get():
            r = requests.get(f"{uri}/ajax-api/2.0/mlflow/metrics/get-history-bulk", timeout=60,
                             params=[*(("run_id", r) for r in run_ids), ("metric_key", key),
                                     ("max_results", _BULK_MAX)])
            r.raise_for_status()
            return r.json().get("metrics", [])
        ms = tracker.call(get)
        return [(m["run_id"], key, int(m.get("step", 0)), float(m["value"])) for m in ms], len(ms) >= _BULK_MAX
    store = tracker.client._tracking_client.store  # a database store read directly (no server)
    if hasattr(store, "get_metric_history_bulk"):
        ms = store.get_metric_history_bulk(run_ids, key, _BULK_MAX)
        return [(m.run_id, key, m.step, m.value) for m in ms], len(ms) >= _BULK_MAX
    return [(r, key, m.step, m.value) for r in run_ids for m in tracker.client.get_metric_history(r, key)], False


def histories(tracker, df: pd.DataFrame, keys: list[str], streamed: list = ()) -> pd.DataFrame:
    have = streamed_histories(list(streamed), set(keys))
    missing = [r for r in df["run_id"] if r not in set(have["run_id"])]
    if missing:
        have = pd.concat([have, fetch_histories(tracker, missing, keys)], ignore_index=True)
    have = have.astype({"step": "int64", "value": "float64"})
    return have[have["run_id"].isin(set(df["run_id"]))]


# ---------------------------------------------------------------- figures
def _style(variants: list[str]) -> dict:
    """Colour, dash, marker and width per variant: curves that coincide stay distinguishable (the
    first drawn is the widest, later ones dashed and thinner on top of it)."""
    cmap = plt.get_cmap("tab10")
    dashes = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1))]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    return {v: dict(color=cmap(i % 10), ls=dashes[i % len(dashes)], marker=markers[i % len(markers)],
                    lw=max(2.8 - 0.45 * i, 1.1), zorder=2 + i, markersize=4.5,
                    markevery=(0.03 * (i % 4), 0.12))  # markers of coinciding curves do not hide each other
            for i, v in enumerate(variants)}


def _seed_stats(h: pd.DataFrame, run_ids, key: str, absolute: bool = False):
    """Mean and std (ddof=0, as in the table) over seeds at each step; None when nothing was logged."""
    sel = h[(h["key"] == key) & h["run_id"].isin(set(run_ids))]
    sel = sel[np.isfinite(sel["value"])]
    if sel.empty:
        return None
    values = sel["value"].abs() if absolute else sel["value"]
    g = values.groupby(sel["step"])
    return g.mean(), g.std(ddof=0).fillna(0.0)


def _log_spaced(steps) -> bool:
    """Evaluations log-spaced (several per decade at the start): draw time on a log axis."""
    s = np.unique(np.asarray(steps, dtype=float))
    s = s[s > 0]
    return len(s) >= 4 and (s < s.max() / 10).sum() >= 4


def _axes_scale(ax, x_log: bool, values) -> None:
    if x_log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0])
    if len(v) and v.max() / v.min() > 30:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both", lw=0.5)


def _band(ax, x, mean, std, st, label, y_log: bool) -> None:
    lo = mean - std
    if y_log:
        lo = np.maximum(lo, mean * 1e-3)
    ax.fill_between(x, lo, mean + std, color=st["color"], alpha=0.15, lw=0, zorder=1)
    ax.plot(x, mean, label=label, **st)


def _overlaps(curves: dict) -> list[list[str]]:
    """Groups of variants whose mean curves agree within 1 % at every common step."""
    groups: list[list[str]] = []
    for v, s in curves.items():
        for grp in groups:
            ref = curves[grp[0]]
            common = s.index.intersection(ref.index)
            if len(common) and np.allclose(s[common], ref[common], rtol=1e-2, atol=1e-6):
                grp.append(v)
                break
        else:
            groups.append([v])
    return [g for g in groups if len(g) > 1]


def _moved(run: pd.Series, h0: float | None) -> bool:
    """An early-stopping point worth marking: after step 0 and below the starting loss by > 1 %."""
    step, loss = run.get("early_stop_step"), run.get("early_stop_test_loss")
    if step is None or loss is None or not np.isfinite(step) or not np.isfinite(loss) or step <= 0:
        return False
    return h0 is None or not np.isfinite(h0) or loss < 0.99 * h0


def _panel_grid(df, h, rows: list[tuple[str, str]], path: Path, suptitle: str, draw, extra_handles=()) -> None:
    """One row per metric, one column per gain, one shared legend of the variants: the layout of every
    per-gain figure. `draw(ax, key, gain, variants, style, x_log)` fills one panel."""
    gains = sorted(df["gain"].unique(), reverse=True)
    variants = list(dict.fromkeys(df["variant"]))
    style = _style(variants)
    x_log = _log_spaced(h["step"])
    fig, axes = plt.subplots(len(rows), len(gains), figsize=(max(3.9 * len(gains), 7.0), 2.9 * len(rows) + 0.9),
                             squeeze=False, sharex=True)
    for c, gain in enumerate(gains):
        for r, (key, label) in enumerate(rows):
            ax = axes[r][c]
            draw(ax, key, gain, variants, style, x_log)
            if r == 0:
                ax.set_title(f"gain {fmt_gain(gain)}")
            if r == len(rows) - 1:
                ax.set_xlabel("step" + (" (log)" if x_log else ""))
            if c == 0:
                ax.set_ylabel(label)
    handles = [Line2D([], [], **{k: v for k, v in style[v].items() if k not in ("zorder", "markevery")}, label=v)
               for v in variants] + list(extra_handles)
    fig.suptitle(suptitle, fontsize=11)
    _legend_below(fig, handles, [h.get_label() for h in handles])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_below(fig, handles, labels, titled_rows: bool = False) -> None:
    """The shared legend under the panels, in as many columns as the figure's width holds for its
    longest label (a fixed 5 columns ran off both edges with labels like 'qngd_d q=1.5 damping=0
    clip=None'), and margins fixed in inches around the panels: room for the suptitle, the panel
    titles (`titled_rows`: above every row), the tick and axis labels and as many legend rows as the
    legend needs. Fixed, not tight_layout: that drew every figure once more just to measure it (0.6 s
    of the report's 2 s on a 100-trial `smoke` sweep)."""
    width, height = fig.get_size_inches()
    entry_in = 0.75 + 0.062 * max(len(str(l)) for l in labels)   # handle + text at fontsize 8
    ncol = max(1, min(len(labels), 5, int(width // entry_in)))
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    bottom_in = 0.62 + 0.2 * rows                                  # x tick labels, x label, legend rows
    fig.subplots_adjust(left=1.0 / width, right=1 - 0.3 / width, top=1 - 0.62 / height,
                        bottom=min(0.45, bottom_in / height), wspace=0.28, hspace=0.42 if titled_rows else 0.16)


def plot_curves(df, h, path: Path, title: str) -> bool:
    """Fig 4B-C / Fig S.I.2: rows train loss, test loss (and accuracy), one column per gain."""
    rows = [(k, label) for k, label in CURVES if (h["key"] == k).any()]
    if not rows:
        return False

    def draw(ax, key, gain, variants, style, x_log):
        curves, seen = {}, []
        for v in variants:
            runs = df[(df["variant"] == v) & (df["gain"] == gain)]
            stats = _seed_stats(h, runs["run_id"], key)
            if stats is None:
                continue
            mean, std = stats
            keep = mean.index > 0 if x_log else mean.index >= 0
            curves[v] = mean[keep]
            seen += list(mean[keep].values)
        y_log = key != "test_accuracy" and len(seen) and np.nanmax(seen) / max(np.nanmin(
            [s for s in seen if s > 0] or [1]), 1e-300) > 30
        for v, mean in curves.items():
            runs = df[(df["variant"] == v) & (df["gain"] == gain)]
            std = _seed_stats(h, runs["run_id"], key)[1].reindex(mean.index).fillna(0.0)
            n_div = int((runs["status"] == "diverged").sum())
            _band(ax, mean.index, mean.values, std.values, style[v],
                  v + (f" ({n_div} diverged)" if n_div else ""), y_log)
            if key == "test_loss" and "early_stop_step" in runs:
                first = _seed_stats(h, runs["run_id"], key)[0]
                h0 = float(first.iloc[0]) if len(first) and first.index[0] == 0 else None
                es = runs[[_moved(run, h0) for _, run in runs.iterrows()]]
                ax.scatter(es["early_stop_step"], es["early_stop_test_loss"], marker="v", s=40,
                           color=style[v]["color"], edgecolor="black", linewidth=0.6, zorder=20)
        _axes_scale(ax, x_log, seen if key != "test_accuracy" else [])
        # each note wrapped to the panel's width (7-point text: ~18 characters an inch)
        chars = max(20, int(ax.get_position().width * ax.figure.get_size_inches()[0] * 18))
        lines_above = {True: 0, False: 0}
        for grp in _overlaps(curves):
            # the note goes to the half of the panel away from the curves it names
            ax.autoscale_view()
            last = curves[grp[0]]
            y = ax.transAxes.inverted().transform(ax.transData.transform((last.index[-1], last.values[-1])))[1]
            top = y < 0.5
            note = textwrap.fill("overlap: " + ", ".join(grp), chars, subsequent_indent="  ")
            shift = 0.02 + 0.06 * lines_above[top]
            lines_above[top] += note.count("\n") + 1.4
            ax.text(0.02, (0.97 - shift) if top else (0.03 + shift), note,
                    transform=ax.transAxes, fontsize=7, ha="left", va="top" if top else "bottom", color="0.2",
                    bbox=dict(facecolor="white", alpha=0.75, lw=0, pad=1))

    early = Line2D([], [], marker="v", ls="", color="0.4", markeredgecolor="black", label="early stopping (per seed)")
    _panel_grid(df, h, rows, path, f"{title}: mean over seeds, band = ±1 std (as in the table)", draw, [early])
    return True


def plot_norms(df, h, path: Path, title: str) -> bool:
    """Fig 5: conservation-law drift and norm excess, one column per gain."""
    rows = [(k, label) for k, label in (("conservation_drift", "conservation drift"),
                                         ("norm_excess", "norm excess (1 = balanced)")) if (h["key"] == k).any()]
    if not rows:
        return False

    def draw(ax, key, gain, variants, style, x_log):
        seen = []
        for v in variants:
            stats = _seed_stats(h, df[(df["variant"] == v) & (df["gain"] == gain)]["run_id"], key)
            if stats is None:
                continue
            mean, std = stats
            keep = (mean.index > 0 if x_log else mean.index >= 0) & (mean.values > 0)
            _band(ax, mean.index[keep], mean.values[keep], std.values[keep], style[v], v, True)
            seen += list(mean.values[keep])
        _axes_scale(ax, x_log, seen)

    _panel_grid(df, h, rows, path, f"{title}: conservation-law drift and norm excess (mean over seeds, "
                "band = ±1 std)", draw)
    return True


def _teacher_values(df) -> list[float]:
    import json
    for s in df.get("teacher_singular_values", pd.Series(dtype=object)).dropna():
        try:
            return [float(x) for x in json.loads(s)]
        except (ValueError, TypeError):
            continue
    return []


def plot_modes(df, h, path: Path, title: str, signal_keys: list[str]) -> bool:
    """Fig 4D: per variant (columns; wrapped when there is one gain) and gain (rows), the magnitude of
    the map along each teacher mode (signal) and its largest component outside them (noise) vs step,
    seed mean ± std; dotted lines at the teacher's singular values (what the signal modes approach)."""
    if not (h["key"].isin(signal_keys) & h["run_id"].isin(set(df["run_id"]))).any():
        return False
    gains = sorted(df["gain"].unique(), reverse=True)
    variants = list(dict.fromkeys(df["variant"]))
    teacher = _teacher_values(df)
    x_log = _log_spaced(h["step"])
    shades = plt.get_cmap("viridis")(np.linspace(0.0, 0.75, max(len(signal_keys), 1)))
    # One row per gain; with a single gain, the variants wrap into rows of at most MODES_WRAP panels (a
    # 12-variant grid in one row was 4,000 px wide)
    ncols = len(variants) if len(gains) > 1 else min(len(variants), MODES_WRAP)
    nrows = len(gains) if len(gains) > 1 else -(-len(variants) // ncols)
    panel_w = 3.2 if ncols <= 4 else 2.7
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(panel_w * ncols, 7.0), 2.8 * nrows + 0.9),
                             squeeze=False, sharey=True, sharex=True)
    cells = [(gain, v, r, c) for r, gain in enumerate(gains) for c, v in enumerate(variants)] if len(gains) > 1 \
        else [(gains[0], v, i // ncols, i % ncols) for i, v in enumerate(variants)]
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for gain, v, r, c in cells:
        ax, seen = axes[r][c], []
        run_ids = df[(df["variant"] == v) & (df["gain"] == gain)]["run_id"]
        lines = [(k, dict(color=shades[i], ls="-", lw=1.7), f"signal {k.split('.')[-1]}")
                 for i, k in enumerate(signal_keys)] + [("noise_mode", dict(color="crimson", ls="--", lw=1.7),
                                                        "noise")]
        for key, st, label in lines:
            stats = _seed_stats(h, run_ids, key, absolute=True)
            if stats is None:
                continue
            mean, std = stats
            keep = (mean.index > 0 if x_log else mean.index >= 0) & (mean.values > 0)
            lo = np.maximum(mean.values[keep] - std.values[keep], mean.values[keep] * 1e-3)
            ax.fill_between(mean.index[keep], lo, mean.values[keep] + std.values[keep], color=st["color"],
                            alpha=0.15, lw=0)
            ax.plot(mean.index[keep], mean.values[keep], label=label, **st)
            seen += list(mean.values[keep])
        for s in teacher:
            ax.axhline(s, color="0.35", ls=":", lw=1.0, zorder=0)
        _axes_scale(ax, x_log, seen + teacher)
        if r == 0 or len(gains) == 1:
            ax.set_title(v, fontsize=9 if ncols > 4 else 11)
        if r == nrows - 1 or (len(gains) == 1 and (r + 1) * ncols + c >= len(variants)):
            ax.set_xlabel("step" + (" (log)" if x_log else ""))
            ax.xaxis.set_tick_params(labelbottom=True)   # sharex hides them above an empty panel
        if c == 0:
            ax.set_ylabel(f"gain {fmt_gain(gain)}\n|mode| of the map")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if teacher:
        handles.append(Line2D([], [], color="0.35", ls=":", lw=1.0))
        labels.append("teacher's singular values " + ", ".join(f"{s:g}" for s in teacher))
    fig.suptitle(f"{title}: signal and noise modes of the input-output map (|value|, mean ± std over seeds)",
                 fontsize=11)
    _legend_below(fig, handles, labels, titled_rows=len(gains) == 1 and nrows > 1)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- the report
def report(src, console, out_dir: Path) -> pd.DataFrame | None:
    """Compute, print, write and log the comparison; returns the summary table. `src` is a Source (or a
    runner Sweep, converted)."""
    if not isinstance(src, Source):
        src = Source.of(src)
    tr = src.tracker
    df = trial_table(tr, src.exp_id, src.parent_id, src.sweep_id)
    if df.empty:
        return None
    order = {k: i for i, k in enumerate(src.order)}
    df = df.assign(_order=[order.get(k, len(order)) for k in df["trial_key"]]).sort_values("_order", kind="stable")
    df = df.drop(columns="_order").reset_index(drop=True)
    if src.parts_of:  # a reused run carries the parts of the sweep that ran it; a trial's parts are this plan's
        df["parts"] = [src.parts_of.get(k, p) for k, p in zip(df["trial_key"], df["parts"])]
    df = add_block_ratio(df)
    for run_id, value in zip(df["run_id"], df["norm_excess_vs_full"]):
        if np.isfinite(value):  # queued: written while the figures render
            tr.log_metrics(_handle(run_id), [("norm_excess_vs_full", float(value), 0)])
    summary = summarize(df)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out_dir / "summary.csv", index=False)
    df.to_csv(out_dir / "trials.csv", index=False)
    title = f"{src.experiment} (sweep {src.sweep_id})"
    parts = list(dict.fromkeys(p for ps in df["parts"].fillna("") for p in ps.split(",") if p))
    if not parts:  # a protocol prints its claims instead (each part's table is in parts/<part>/summary.csv)
        print_summary(summary, console, f"{title}: mean ± std over seeds")
    import json
    tags = {"sweep.variants": json.dumps(list(dict.fromkeys(df["variant"])))[:7900]}
    if not parts:  # a protocol's description is its claims.md (below)
        tags["mlflow.note.content"] = summary_markdown(summary, title)[:7900]
    tr.set_tags(_handle(src.parent_id), tags)
    tr.log_metrics(_handle(src.parent_id), parent_metrics(summary))

    signal_keys = sorted(c for c in df.columns if c.startswith("signal_mode."))
    keys = [k for k in ("train_loss", "test_loss", "test_accuracy", "conservation_drift", "norm_excess",
                        "noise_mode", "update_norm", "signal_fit", "noise_fit", *signal_keys) if k in df]
    h = histories(tr, df, keys, src.streamed)
    if parts:  # a protocol: each part's own table and figures, then the claims
        files = []
        for part in parts:
            sub = df[claims.in_part(df, part)].copy()
            sub["variant"] = sub["variant"].str.replace(r"^[^/]+/", "", regex=True)
            part_dir = out_dir / "parts" / part
            part_dir.mkdir(parents=True, exist_ok=True)
            summarize(sub).to_csv(part_dir / "summary.csv", index=False)
            files += [part_dir / "summary.csv", *figures(sub, h, part_dir, f"{src.experiment}: {part}", signal_keys)]
        records = claims.Records(df, h)
        rows = claims.evaluate(records, src.claims.get("thresholds", {}))
        files += claims.figures(records, out_dir)
        files += claims.write(rows, out_dir, f"Paper claims: {title}", claims.table1_markdown(records) or "")
        console.print(f"[bold]{title}: paper claims[/] (claims.md has the thresholds and figures)", highlight=False)
        console.print(claims.table(rows, WIDTH))
        tr.set_tags(_handle(src.parent_id), {"mlflow.note.content": (out_dir / "claims.md").read_text()[:7900]})
    else:
        files = figures(df, h, out_dir, src.experiment, signal_keys)
    for path in [out_dir / "summary.csv", out_dir / "trials.csv", *files]:
        tr.log_artifact(src.parent_id, path, str(Path("report") / path.parent.relative_to(out_dir)))
    console.print(f"report: {out_dir} (also the parent run's artifacts under report/)", highlight=False)
    return summary


def figures(df, h, out_dir: Path, title: str, signal_keys: list[str]) -> list[Path]:
    """The report's figures of one experiment (those with something to draw)."""
    plots = []
    for name, draw in (("learning_curves.png", lambda p: plot_curves(df, h, p, title)),
                       ("drift_and_norm_excess.png", lambda p: plot_norms(df, h, p, title)),
                       ("modes.png", lambda p: plot_modes(df, h, p, title, signal_keys))):
        if draw(out_dir / name):
            plots.append(out_dir / name)
    return plots


def _handle(run_id: str):
    from .tracking import RunHandle
    return RunHandle(run_id=run_id)


# ---------------------------------------------------------------- `python -m sweep report`
def main(argv: list[str]) -> int:
    """Re-render a sweep's report from MLflow alone (no Ray, no trials): tables, figures, summary.csv."""
    import argparse
    import json
    import sys
    import time

    from .tracking import PARENT_TAG, Tracker
    from .ui import experiment_id, runs_url, store_of, ui_command
    ap = argparse.ArgumentParser(prog="python -m sweep report", description=main.__doc__)
    ap.add_argument("--results", default="results", help="the sweep's results_dir (default: results)")
    ap.add_argument("--tracking-uri", help="a running MLflow server instead of the store under --results")
    ap.add_argument("--experiment", help="experiment (default: the most recently used)")
    ap.add_argument("--sweep", help="sweep.id (default: the experiment's latest sweep)")
    ap.add_argument("--out", help="output directory (default: RESULTS/reports/<sweep.id>)")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    results = Path(a.results).resolve()
    if a.tracking_uri:
        tracker = Tracker(a.tracking_uri, retry_s=30)
    else:
        backend, artifacts = store_of(results)
        tracker = Tracker(backend, retry_s=30, artifacts_dir=artifacts)
    console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)
    try:
        exp_id, exp_name = experiment_id(tracker.client, a.experiment)
        parents = [r for r in tracker.search(exp_id, "tags.`sweep.id` != ''") if PARENT_TAG not in r.data.tags]
        if a.sweep:
            parents = [r for r in parents if r.data.tags.get("sweep.id", "").startswith(a.sweep)]
        if not parents:
            raise SystemExit(f"error: no sweep{' ' + a.sweep if a.sweep else ''} in experiment '{exp_name}'. "
                             "Fix: check --experiment / --sweep (the sweep.id tag of its parent run)")
        parent = max(parents, key=lambda r: r.info.start_time or 0)
        sweep_id = parent.data.tags["sweep.id"]
        variant_order = json.loads(parent.data.tags.get("sweep.variants", "[]"))
        df = trial_table(tracker, exp_id, parent.info.run_id, sweep_id)
        rank = {v: i for i, v in enumerate(variant_order)}
        if not df.empty:
            df = df.assign(_v=[rank.get(v, len(rank)) for v in df["variant"]]).sort_values(
                ["_v", "gain", "seed"], ascending=[True, False, True], kind="stable")
        src = Source(tracker, exp_id, parent.info.run_id, exp_name, sweep_id, list(df.get("trial_key", [])),
                     claims=json.loads(parent.data.tags.get("sweep.claims", "{}")))
        out = Path(a.out) if a.out else results / "reports" / sweep_id
        if report(src, console, out) is None:
            raise SystemExit(f"error: sweep {sweep_id} has no trials yet")
        tracker.flush()
    finally:
        tracker.close(timeout=30)
    console.print(f"re-rendered in {time.monotonic() - t0:.1f} s without Ray. Runs table: "
                  + (runs_url(a.tracking_uri, exp_id) if a.tracking_uri else ui_command(results, exp_name)),
                  highlight=False)
    return 0
