"""The report's tables, figures and progress estimates on synthetic trials whose numbers the tests
compute themselves (numpy), without Ray or MLflow."""
from __future__ import annotations

import re
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from sweep import report
from sweep.progress import SweepProgress
from sweep.tracking import RunHandle

VARIANTS = ["sgd", "ngd_d", "sqrt_ngd_d", "sqrt_ngd", "qngd_d q=1.5"]
GAINS = [1.0, 1e-2, 1e-4, 1e-6]


def _trials(seeds=(0, 1, 2)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for v in VARIANTS:
        for g in GAINS:
            for s in seeds:
                rows.append({"run_id": f"{v}-{g}-{s}", "run_status": "FINISHED", "variant": v,
                             "optimizer": v.split()[0], "gain": g, "seed": s,
                             "status": "diverged" if (v == "sgd" and g == 1e-6 and s == 0) else "finished",
                             "final_test_loss": 2.302585 if v in ("sgd", "ngd_d") and g < 1 else rng.uniform(0.2, 0.4),
                             "early_stop_test_loss": rng.uniform(0.1, 0.3), "early_stop_step": float(rng.integers(10, 100)),
                             "test_accuracy": rng.uniform(0.8, 0.95), "weight_norm": rng.uniform(1, 3),
                             "norm_excess": rng.uniform(1, 3),
                             "max_conservation_drift": rng.uniform(1e-6, 1e-4)})
    return pd.DataFrame(rows)


def _render(tables, notes, width=80) -> str:
    console = Console(width=width, record=True, force_terminal=False)
    for t in tables:
        console.print(t)
    for n in notes:
        console.print(n)
    return console.export_text()


def test_gain_labels_are_uniform():
    assert [report.fmt_gain(g) for g in (1.0, 0.1, 1e-2, 1e-4, 1e-6, 5e-3, 10.0)] == \
        ["1", "1e-1", "1e-2", "1e-4", "1e-6", "5e-3", "1e1"]


def test_numbers_keep_their_precision():
    assert report.fmt_pm(0.25712, 0.01234) == "0.257±0.012"
    assert report.fmt_pm(2.302585, 0.0) == "2.30±0.00"
    assert report.fmt_pm(5.8e-4, 2.1e-4) == "5.8e-4±2.1e-4"
    assert report.fmt_pm(52.5, 3.4, integer=True) == "52±3"
    assert report.fmt_pm(float("nan"), 0.0) == "-"


def test_summary_tables_fit_80_columns_and_match_numpy():
    df = report.add_block_ratio(_trials())
    summary = report.summarize(df)
    tables, notes = report.summary_tables(summary)
    text = _render(tables, notes)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    for v in VARIANTS:  # labels never cut: each variant appears whole at the start of its rows
        assert any(re.match(rf"\s*{re.escape(v)}\s", line) for line in lines), v
    for g in ("1", "1e-2", "1e-4", "1e-6"):
        assert f"gain {g}" in text
    # the pivot's cell = mean ± std (ddof=0) over seeds, computed here independently
    x = df[(df["variant"] == "sqrt_ngd_d") & (df["gain"] == 1e-4)]["final_test_loss"].to_numpy()
    cell = f"{x.mean():.3f}±{np.std(x):.3f}"
    row = next(line for line in lines if line.strip().startswith("sqrt_ngd_d ") and "±" in line)
    assert cell in row
    # diverged seeds are marked and explained
    assert "†" in text and "sgd at gain 1e-6 (1/3)" in text
    # blk/full = a block rule's norm excess / its full counterpart's at the same gain and seed
    r = df[(df["variant"] == "sqrt_ngd_d") & (df["gain"] == 1.0) & (df["seed"] == 2)].iloc[0]
    base = df[(df["variant"] == "sqrt_ngd") & (df["gain"] == 1.0) & (df["seed"] == 2)].iloc[0]
    assert r["norm_excess_vs_full"] == pytest.approx(r["norm_excess"] / base["norm_excess"], rel=1e-12)
    assert df[df["variant"] == "ngd_d"]["norm_excess_vs_full"].isna().all()   # no full NGD in this grid


def test_markdown_and_parent_metrics_carry_the_headline():
    summary = report.summarize(report.add_block_ratio(_trials()))
    md = report.summary_markdown(summary, "mnist_gain (sweep x)")
    assert "| variant | gain 1 | gain 1e-2 | gain 1e-4 | gain 1e-6 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| sgd | "))
    assert row.endswith(" | 2.30±0.00 | 2.30±0.00 | 2.30±0.00† |"), row
    metrics = dict((k, v) for k, v, _ in report.parent_metrics(summary))
    assert metrics["final_test_loss/sgd/g1e-2"] == pytest.approx(2.302585)
    assert "final_test_loss/qngd_d q:1.5/g1" in metrics  # '=' is not allowed in MLflow metric names


def _histories(df: pd.DataFrame, steps) -> pd.DataFrame:
    rows = []
    for _, r in df.iterrows():
        for s in steps:
            stuck = r["variant"] in ("sgd", "ngd_d") and r["gain"] < 1
            loss = 2.302585 if stuck else 2.302585 * np.exp(-s / 30) + 0.25
            rows += [(r["run_id"], "test_loss", s, loss), (r["run_id"], "train_loss", s, loss * 0.9),
                     (r["run_id"], "test_accuracy", s, 0.1 if stuck else 0.9 - 0.8 * np.exp(-s / 30))]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def test_curves_png_and_overlap_detection(tmp_path):
    df = _trials()
    steps = sorted({0, *np.unique(np.round(np.logspace(0, 2, 30)).astype(int))})
    h = _histories(df, steps)
    assert report._log_spaced(h["step"]) and not report._log_spaced(range(0, 101, 10))
    assert report.plot_curves(df, h, tmp_path / "c.png", "synthetic")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mean = {v: report._seed_stats(h, df[(df["variant"] == v) & (df["gain"] == 1e-6)]["run_id"], "test_loss")[0]
            for v in VARIANTS}
    groups = report._overlaps(mean)
    assert ["sgd", "ngd_d"] in groups and len(groups) == 2  # the three learning ones coincide here too


def test_no_early_stopping_marker_on_a_curve_that_never_moved():
    assert not report._moved(pd.Series({"early_stop_step": 90.0, "early_stop_test_loss": 2.3020}), 2.302585)
    assert not report._moved(pd.Series({"early_stop_step": 0.0, "early_stop_test_loss": 1.0}), 2.3)
    assert report._moved(pd.Series({"early_stop_step": 50.0, "early_stop_test_loss": 0.26}), 2.302585)


def test_streamed_records_are_used_without_reading_back():
    a, b, gone = RunHandle("a"), RunHandle("b"), RunHandle("c", deleted=True)
    h = report.streamed_histories([(a, [("test_loss", 1.0, 0), ("other", 5.0, 0)]), (b, [("test_loss", 2.0, 10)]),
                                   (gone, [("test_loss", 9.0, 0)])], {"test_loss"})
    assert sorted(map(tuple, h.to_numpy().tolist())) == [("a", "test_loss", 0, 1.0), ("b", "test_loss", 10, 2.0)]


def test_eta_from_per_variant_costs():
    trial = lambda k, v: SimpleNamespace(key=k, variant=v)  # noqa: E731
    todo = [trial("s1", "sgd"), trial("s2", "sgd"), trial("s3", "sgd"), trial("s4", "sgd"),
            trial("n1", "ngd"), trial("n2", "ngd"), trial("n3", "ngd")]
    console = Console(file=open("/dev/null", "w"), force_terminal=False)
    p = SweepProgress(todo, skipped=0, workers=2, console=console)
    assert p.eta() is None  # nothing known yet: no made-up number
    p.started(todo[0], "sgd s1")
    p.ended(todo[0], "finished", {"final_test_loss": 1.0}, 2.0)
    p.started(todo[4], "ngd n1")
    p.ended(todo[4], "finished", {"final_test_loss": 1.0}, 10.0)
    # queued: 3 sgd x 2 s + 2 ngd x 10 s, on 2 workers
    assert p.eta() == pytest.approx((3 * 2 + 2 * 10) / 2)
    p.started(todo[5], "ngd n2")
    time.sleep(0.2)
    assert p.eta() == pytest.approx((3 * 2 + 1 * 10 + 10 - 0.2) / 2, abs=0.05)


@pytest.mark.parametrize("n_labels, width", [(3, 7.0), (13, 7.0), (13, 16.0)])
def test_shared_legend_stays_inside_the_figure_and_below_the_panels(n_labels, width):
    """Long variant labels ('qngd_d q=1.5 damping=0 clip=None', fractional_q's 12 variants) ran off both
    edges of a 7-inch figure with a fixed 5-column legend; measured here with the drawn extents."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 1, figsize=(width, 6.7), squeeze=False)
    for ax in axes.flat:
        ax.set_xlabel("step (log)")
    labels = [f"qngd_d q={q} damping=1e-05 clip=0.1" for q in range(n_labels)]
    report._legend_below(fig, [Line2D([], [], label=l) for l in labels], labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert 0 <= legend.x0 and legend.x1 <= fig.bbox.x1 and 0 <= legend.y0, (legend, fig.bbox)
    lowest_panel = min(ax.get_tightbbox(renderer).y0 for ax in axes.flat)   # x label included
    assert legend.y1 <= lowest_panel, (legend.y1, lowest_panel)
    plt.close(fig)


@pytest.mark.parametrize("gains", [GAINS, [1.0]])
def test_curves_figure_keeps_every_label_inside_and_the_legend_below(tmp_path, monkeypatch, gains):
    """The panels' margins are fixed in inches (no tight_layout pass): nothing the figure draws may fall
    outside it, and the legend sits under the lowest panel's x label; extents measured as drawn."""
    df = _trials()
    df = df[df["gain"].isin(gains)].assign(variant=lambda d: d["variant"] + " damping=1e-05 clip=None")
    h = _histories(df, sorted({0, *np.unique(np.round(np.logspace(0, 2, 30)).astype(int))}))
    kept = []
    monkeypatch.setattr(report.plt, "close", kept.append)
    assert report.plot_curves(df, h, tmp_path / "c.png", "synthetic")
    fig = kept[0]
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    for ax in fig.axes:
        b = ax.get_tightbbox(renderer)   # tick labels, axis labels and title included
        assert box.x0 - 1 <= b.x0 and b.x1 <= box.x1 + 1 and box.y0 - 1 <= b.y0 and b.y1 <= box.y1 + 1, b
    legend = fig.legends[0].get_window_extent(renderer)
    assert box.x0 <= legend.x0 and legend.x1 <= box.x1 and box.y0 <= legend.y0
    assert legend.y1 <= min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)
    monkeypatch.undo()
    report.plt.close(fig)
