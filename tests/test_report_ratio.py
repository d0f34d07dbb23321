"""The report's block-vs-full norm-excess ratio and convergence counts, on a hand-built trial table."""
from __future__ import annotations

import math

import pandas as pd

from sweep.report import add_block_ratio, full_counterpart, summarize


def _row(variant, seed, excess, converged=1.0, status="finished", gain=0.1):
    return {"run_id": f"{variant}-{seed}-{gain}", "run_status": "FINISHED", "variant": variant, "gain": gain,
            "seed": seed, "status": status, "norm_excess": excess, "converged": converged}


def test_full_counterpart_names():
    assert full_counterpart("ngd_d") == "ngd" and full_counterpart("sqrt_ngd_d") == "sqrt_ngd"
    assert full_counterpart("qngd_d q=1.5 damping=0 clip=None") == "qngd q=1.5 damping=0 clip=None"
    assert full_counterpart("sgd") is None and full_counterpart("qngd q=2") is None


def test_block_over_full_same_gain_and_seed_only_when_both_converged():
    df = pd.DataFrame([
        _row("ngd", 0, 1.25), _row("ngd_d", 0, 2.5),                      # 2.5 / 1.25 = 2
        _row("ngd", 1, 1.0, converged=0.0), _row("ngd_d", 1, 3.0),        # reference unconverged: no ratio
        _row("ngd", 2, 1.0), _row("ngd_d", 2, 3.0, status="diverged"),     # block diverged: no ratio
        _row("sqrt_ngd", 0, 1.0), _row("sqrt_ngd_d", 0, 1.1),
        _row("sqrt_ngd_d", 0, 1.3, gain=0.01),                             # no counterpart at this gain
        _row("sgd", 0, 1.0),
    ])
    out = add_block_ratio(df).set_index(["variant", "seed", "gain"])["norm_excess_vs_full"]
    assert out["ngd_d", 0, 0.1] == 2.0
    assert math.isnan(out["ngd_d", 1, 0.1]) and math.isnan(out["ngd_d", 2, 0.1])
    assert abs(out["sqrt_ngd_d", 0, 0.1] - 1.1) < 1e-12
    assert math.isnan(out["sqrt_ngd_d", 0, 0.01])
    assert all(math.isnan(out[v, 0, 0.1]) for v in ("ngd", "sqrt_ngd", "sgd"))   # full rules have no ratio
    summary = summarize(df).set_index("variant")
    assert summary.loc["ngd", "converged_mean"] == 2 / 3 and summary.loc["ngd_d", "diverged"] == 1
    assert summary.loc["ngd_d", "norm_excess_vs_full_mean"] == 2.0   # the one comparable seed
