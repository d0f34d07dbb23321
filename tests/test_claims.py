"""The claim logic on synthetic records (sweep/claims.py): a claim that must hold holds, one that must
fail fails, one whose trials are missing or unusable says so; and the protocol planner (sweep.parts)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from sweep import claims
from sweep.claims import Records

TH = {
    "conservation": {"full_lr_ratio_min": 2.0, "block_lr_ratio_max": 2.0, "block_over_full_min": 10.0,
                     "ngd_d_over_sqrt_ngd_d_min": 2.0},
    "early_stopping": {"benefit_ratio_max": 0.5, "mode_order_ratio": 1.5},
    "norms": {"ngd_d_norm_excess_min": 1.05},
    "nonwhite": {"gap_ratio_min": 2.0},
    "gains": {"trained_max": 1.15, "stuck_min": 2.07, "small_gains": [1e-4, 1e-6]},
}
SEEDS = (0, 1)


def row(part, optimizer, seed=0, *, gain=0.1, lr=0.05, status="finished", converged=1.0, **metrics):
    return {"run_id": f"{part}|{optimizer}|{seed}|{gain}|{lr}", "parts": part, "optimizer": optimizer,
            "variant": f"{part}/{optimizer}", "gain": gain, "seed": seed, "status": status,
            "run_status": "FINISHED" if status != "failed" else "FAILED", "converged": converged,
            "config.optimizer.lr": json.dumps(lr), **metrics}


def conservation_rows(full_ratio=4.0, block_ratio=1.1, block_drift=0.04):
    out = []
    for seed in SEEDS:
        for rule in claims.FULL:
            out += [row("conservation_lr", rule, seed, lr=0.05, max_conservation_drift=1e-3 * full_ratio),
                    row("conservation_lr", rule, seed, lr=0.0125, max_conservation_drift=1e-3)]
        for rule in claims.BLOCK:
            out += [row("conservation_lr", rule, seed, lr=0.05, max_conservation_drift=block_drift * block_ratio),
                    row("conservation_lr", rule, seed, lr=0.0125, max_conservation_drift=block_drift)]
    return out


def teacher_rows(part="teacher_student", ngd_d_drift=0.08, benefit=None, ngd_d_excess=1.2, gap=0.7, converged=1.0):
    benefit = benefit or {"sgd": 0.47, "sqrt_ngd": 0.43, "sqrt_ngd_d": 0.43, "ngd": 0.03, "ngd_d": 0.03}
    excess = {"sgd": 1.0, "ngd": 1.0, "sqrt_ngd": 1.0, "sqrt_ngd_d": 1.007, "ngd_d": ngd_d_excess}
    drift = {"sgd": 1e-4, "ngd": 1e-4, "sqrt_ngd": 1e-4, "sqrt_ngd_d": 0.01, "ngd_d": ngd_d_drift}
    return [row(part, r, s, converged=converged, conservation_drift=drift[r], final_norm_excess=excess[r],
                early_stop_test_loss=0.3, final_test_loss=0.3 + benefit[r], final_train_loss=0.3 + benefit[r] - gap)
            for s in SEEDS for r in excess]


def by(rows_, rid):
    return next(r for r in rows_ if r.id == rid)


# ---------------------------------------------------------------- 1. conservation
def test_conservation_holds_and_fails_on_the_numbers():
    rec = Records(pd.DataFrame(conservation_rows() + teacher_rows()))
    got = claims.conservation(rec, TH["conservation"])
    assert [r.holds for r in got] == [True, True, True]
    assert by(got, "1a").numbers["sgd"] == pytest.approx([4.0, 4.0])
    assert by(got, "1c").numbers["ratio"] == pytest.approx([8.0, 8.0])
    # a full rule whose drift does not fall with lr, a block rule whose drift does, NGD-d barely above
    bad = Records(pd.DataFrame(conservation_rows(full_ratio=1.2, block_ratio=3.9) + teacher_rows(ngd_d_drift=0.015)))
    assert [r.holds for r in claims.conservation(bad, TH["conservation"])] == [False, False, False]
    # block drift that falls like the full rules' is not "broken" either, even with a ratio near 1
    small = Records(pd.DataFrame(conservation_rows(block_drift=2e-3) + teacher_rows()))
    assert by(claims.conservation(small, TH["conservation"]), "1b").holds is False


def test_a_claim_without_usable_trials_is_a_row_that_says_why():
    rows_ = teacher_rows(converged=0.0) + conservation_rows()
    out = claims.evaluate(Records(pd.DataFrame(rows_)), {"conservation": TH["conservation"], "norms": TH["norms"]})
    assert [(r.id, r.holds) for r in out] == [("1", None), ("6", None)]
    # one claim's missing records do not hide its neighbour: 5a is measured, 5b (no histories) is not
    split = claims.evaluate(Records(pd.DataFrame(teacher_rows())), {"early_stopping": TH["early_stopping"]})
    assert [(r.id, r.holds) for r in split] == [("5a", True), ("5b", None)]
    assert "no usable ngd_d trial" in out[0].value and out[0].value.startswith("not measured")
    failed = [dict(r, status="failed") if r["optimizer"] == "ngd_d" else r for r in teacher_rows()]
    out = claims.evaluate(Records(pd.DataFrame(failed)), {"norms": TH["norms"]})
    assert out[0].holds is None and "ngd_d" in out[0].value
    out = claims.evaluate(Records(pd.DataFrame(teacher_rows())), {"gains": TH["gains"]})
    assert out[0].holds is None and "mnist_gain" in out[0].value


# ---------------------------------------------------------------- 2, 3, 4 (map dynamics, update speed)
def map_rows(p_shift=0.0, rate_factor=1.0, depths=(2, 4), qs=(1.0, 2.0, math.inf), sigmas=(4.0, 2.0, 1.0)):
    """map_dynamics trials whose mode histories are eq 17 integrated numerically (scipy, tight tolerances)
    from a small start, with the exponent shifted by `p_shift` and the rate scaled by `rate_factor`:
    0 and 1 give the paper's dynamics, anything else a rule that does not follow it."""
    from scipy.integrate import solve_ivp

    from trainers import theory
    trials, hist = [], []
    lr = 0.01
    for d in depths:
        for q in qs:
            p, eta = theory.map_exponent(d, q) + p_shift, rate_factor * theory.calibrated_lr(1.0, d, q)
            r = row("map_dynamics", "sgd" if math.isinf(q) else "qngd", 0, lr=lr, converged=1.0)
            r.update({"run_id": f"map|{d}|{q}", "config.trainer.depth": str(d), "config.optimizer.q": str(q),
                      "config.trainer.teacher_singular_values": json.dumps(list(sigmas))})
            trials.append(r)
            for k, s in enumerate(sigmas, start=1):
                t_end = 20 / (eta * s ** p) + (2 / (eta * s ** p * 1e-3 ** (p - 1)) if p > 1 else 0)
                sol = solve_ivp(lambda t, y: eta * (s - y) * np.abs(y) ** p, (0, t_end), [1e-3 * s], rtol=1e-10,
                                atol=1e-14, dense_output=True, method="DOP853")
                steps = np.unique(np.round(np.concatenate([np.geomspace(1, t_end / lr, 200),
                                                           np.linspace(1, t_end / lr, 4000)])).astype(int))
                hist += [(r["run_id"], f"signal_mode.k{k}", int(st), float(sol.sol(lr * st)[0])) for st in steps]
    return trials, pd.DataFrame(hist, columns=["run_id", "key", "step", "value"])


TH_MAP = {"p_abs_err": 0.05, "eta_rel_err": 0.05}
TH_CLOSED = {"closed_form_max_err": 0.01, "slope_abs_err": 0.05}


def test_map_exponent_and_closed_forms_on_eq17_trajectories():
    trials, hist = map_rows()
    rec = Records(pd.DataFrame(trials), hist)
    a, b = claims.map_exponent(rec, TH_MAP)
    assert (a.holds, b.holds) == (True, True), (a.value, b.value)
    assert a.numbers["d=4 q=2"]["p"] == pytest.approx(0.75, abs=0.01)
    closed, window, init = claims.closed_forms(rec, TH_CLOSED)
    assert closed.holds is True and window.holds is True, (closed.value, window.value)
    assert set(closed.numbers) == {"p=0", "p=0.5", "p=1"}
    # a rule whose exponent is 0.1 off Table 1, or whose rate is 10 % slow, fails the claims
    trials, hist = map_rows(p_shift=0.1)
    rec = Records(pd.DataFrame(trials), hist)
    assert claims.map_exponent(rec, TH_MAP)[0].holds is False
    assert claims.closed_forms(rec, TH_CLOSED)[0].holds is False
    trials, hist = map_rows(rate_factor=0.9)
    assert claims.map_exponent(Records(pd.DataFrame(trials), hist), TH_MAP)[1].holds is False
    md = claims.table1_markdown(Records(pd.DataFrame(trials), hist))
    assert "| 4 |" in md and "q = ∞" in md


def test_update_speed_exponents():
    from trainers import theory

    def speed_rows(wrong: str | None = None):
        out = []
        for rule in claims.FULL + claims.BLOCK:
            q = {"sgd": math.inf, "ngd": 1.0, "sqrt_ngd": 2.0, "ngd_d": 1.0, "sqrt_ngd_d": 2.0}[rule]
            k = theory.speed_exponent(4, q, "block" if rule.endswith("_d") else "full") + (0.5 if rule == wrong else 0)
            for seed in SEEDS:
                for g in (1e-1, 1e-2, 1e-3, 1e-4):
                    r = row("update_speed", rule, seed, gain=g, lr=0.01, converged=None,
                            update_norm=0.01 * 3.7 * g ** k)
                    r.update({"config.trainer.depth": "4", "config.optimizer.q": str(q)})
                    out.append(r)
        return Records(pd.DataFrame(out))
    (ok,) = claims.update_speed(speed_rows(), {"exponent_abs_err": 0.05})
    assert ok.holds is True and ok.numbers["sgd"]["theory"] == 3 and ok.numbers["ngd_d"]["theory"] == -3
    assert ok.numbers["sgd"]["measured"] == pytest.approx([3.0, 3.0])
    (bad,) = claims.update_speed(speed_rows(wrong="sqrt_ngd_d"), {"exponent_abs_err": 0.05})
    assert bad.holds is False


# ---------------------------------------------------------------- 5. early stopping, mode order
def rise(t, t_half):
    """A fitted fraction rising as a logistic from ~0 to 1, crossing 1/2 at t_half."""
    return 1 / (1 + np.exp(-8 * (t - t_half)))


def fit_histories(recs: list[dict], noise_half: dict, lr=0.05):
    out = []
    steps = np.arange(0, 2001)
    for r in recs:
        for key, th in (("signal_fit", 2.0), ("noise_fit", noise_half[r["optimizer"]])):
            out += [(r["run_id"], key, int(s), float(v)) for s, v in zip(steps, rise(lr * steps, th))]
    return pd.DataFrame(out, columns=["run_id", "key", "step", "value"])


def test_half_fit_time_of_a_known_curve():
    steps = np.arange(0, 1001)
    assert claims.half_fit_time(steps, rise(0.01 * steps, 3.21), 0.01) == pytest.approx(3.21, abs=1e-4)
    with pytest.raises(claims.NotMeasured, match="never reached"):
        claims.half_fit_time(steps, 0.4 * rise(0.01 * steps, 3.21), 0.01)


def test_early_stopping_and_mode_order():
    recs = teacher_rows()
    ordered = {"sgd": 6.0, "sqrt_ngd": 4.0, "ngd": 2.1, "ngd_d": 2.0, "sqrt_ngd_d": 4.0}
    rec = Records(pd.DataFrame(recs), fit_histories(recs, ordered))
    (a,), (b,) = claims.early_stopping(rec, TH["early_stopping"]), claims.mode_order(rec, TH["early_stopping"])
    assert (a.holds, b.holds) == (True, True)
    assert b.numbers["sgd"] == pytest.approx([3.0, 3.0], rel=1e-3)
    assert b.numbers["ngd"] == pytest.approx([1.05, 1.05], rel=1e-3)
    # SGD learning its noise with the weakest signal; NGD overfitting no less than sqrtNGD gains
    same = dict(ordered, sgd=2.1)
    rec = Records(pd.DataFrame(teacher_rows(benefit={"sgd": 0.4, "sqrt_ngd": 0.4, "sqrt_ngd_d": 0.4, "ngd": 0.3,
                                                     "ngd_d": 0.03})), fit_histories(recs, same))
    (a,), (b,) = claims.early_stopping(rec, TH["early_stopping"]), claims.mode_order(rec, TH["early_stopping"])
    assert (a.holds, b.holds) == (False, False)


# ---------------------------------------------------------------- 6, 7, 8
def test_norms_nonwhite_and_gains():
    white = teacher_rows()
    rec = Records(pd.DataFrame(white + teacher_rows("teacher_student_nonwhite", gap=5.0)))
    assert claims.norms(rec, TH["norms"])[0].holds is True
    assert claims.nonwhite(rec, TH["nonwhite"])[0].holds is True
    assert claims.nonwhite(rec, TH["nonwhite"])[0].numbers["ngd"] == pytest.approx([5 / 0.7] * 2)
    rec = Records(pd.DataFrame(teacher_rows(ngd_d_excess=1.003) + teacher_rows("teacher_student_nonwhite", gap=1.0)))
    assert claims.norms(rec, TH["norms"])[0].holds is False       # above the others, but not by 5 %
    assert claims.nonwhite(rec, TH["nonwhite"])[0].holds is False  # 1.0 / 0.7 < 2

    def mnist(sqrt_small=0.26, sgd_small=2.302):
        out = []
        for g, sgd, ngd_d, sq in ((1.0, 0.57, 0.21, 0.24), (1e-2, 2.30, 2.30, 0.25), (1e-4, sgd_small, 2.30, 0.25),
                                  (1e-6, sgd_small, 2.30, sqrt_small)):
            for s in SEEDS:
                out += [row("mnist_gain", "sgd", s, gain=g, converged=None, final_test_loss=sgd),
                        row("mnist_gain", "ngd_d", s, gain=g, converged=None, final_test_loss=ngd_d),
                        row("mnist_gain", "sqrt_ngd_d", s, gain=g, converged=None, final_test_loss=sq)]
        return Records(pd.DataFrame(out))
    assert [r.holds for r in claims.gains(mnist(), TH["gains"])] == [True, True]
    assert [r.holds for r in claims.gains(mnist(sqrt_small=1.9, sgd_small=0.9), TH["gains"])] == [False, False]


# ---------------------------------------------------------------- output
def test_claims_files_and_an_80_column_table(tmp_path):
    recs = teacher_rows() + teacher_rows("teacher_student_nonwhite", gap=5.0) + conservation_rows()
    rows_ = claims.evaluate(Records(pd.DataFrame(recs), fit_histories(teacher_rows(), {
        "sgd": 6.0, "sqrt_ngd": 4.0, "ngd": 2.1, "ngd_d": 2.0, "sqrt_ngd_d": 4.0})), TH)
    assert [r.id for r in rows_] == ["1a", "1b", "1c", "5a", "5b", "6", "7", "8"]
    md, js = claims.write(rows_, tmp_path, "Paper claims: test")
    text = md.read_text()
    assert "7 of 8 claims hold (0 do not, 1 not measured)" in text
    assert text.count("| ✓ |") == 7 and text.count("| ? |") == 1
    data = json.loads(js.read_text())
    assert [d["id"] for d in data] == [r.id for r in rows_] and data[0]["numbers"]["sgd"] == pytest.approx([4, 4])
    console = Console(width=80, record=True)
    console.print(claims.table(rows_))
    lines = console.export_text().splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert sum("✓" in ln for ln in lines) == 7


# ---------------------------------------------------------------- the protocol planner
def plan(*args):
    from sweep.cli import check_args
    return check_args(["+experiment=paper", *args])


def test_protocol_plans_every_part_with_its_budget():
    trials = plan("sweep.budget=ci")
    parts = {}
    for t in trials:
        for p in t.parts:
            parts.setdefault(p, []).append(t)
    assert set(parts) == {"teacher_student", "teacher_student_nonwhite", "conservation_lr", "map_dynamics",
                          "update_speed", "mnist_gain"}
    assert {t.config["trainer"]["depth"] for t in parts["map_dynamics"]} == {2}  # the ci budget: depth 2 only
    assert {t.seed for t in parts["teacher_student"]} == {0}                  # the ci budget's seeds
    assert {t.optimizer for t in parts["teacher_student_nonwhite"]} == {"ngd", "sqrt_ngd", "ngd_d", "sqrt_ngd_d"}
    assert all(t.variant.startswith(t.parts[0] + "/") for t in trials)
    nonwhite = parts["teacher_student_nonwhite"][0].config["trainer"]
    assert (nonwhite["whiten"], nonwhite["input_cov_cond"]) == (False, 100.0)  # each part's own experiment file
    assert {t.config["trainer"]["steps"] for t in parts["mnist_gain"]} == {40}
    default = plan()
    assert len(default) > len(trials) and {t.seed for t in default if "teacher_student" in t.parts} == {0, 1, 2}
    # the user's command line wins in every part
    assert {t.config["trainer"]["gain"] for t in plan("sweep.budget=ci", "trainer.gain=0.2")} == {0.2}


def test_a_trial_two_parts_share_runs_once():
    trials = plan("sweep.budget=ci", "+sweep.parts.again={experiment:conservation_lr}")
    shared = [t for t in trials if "again" in t.parts]
    assert len(shared) == 10 and all(t.parts == ("conservation_lr", "again") for t in shared)
    assert len({t.key for t in trials}) == len(trials)


@pytest.mark.parametrize("args,message", [
    (["sweep.budget=huge"], "sweep.budget is 'huge'. Fix: use one of ci, default, paper"),
    (["+sweep.parts.x={experiment:nope}"], "sweep.parts.x.experiment is 'nope', not an experiment"),
    (["+sweep.parts.x={experiment:smoke,extra:1}"], "sweep.parts.x must be {experiment: NAME"),
    (["+sweep.parts.x={experiment:smoke,overrides:{default:['trainer.stepz=3']}}"], "sweep.parts.x.overrides.default cannot be composed"),
    (["+sweep.parts.x={experiment:smoke,overrides:{default:['trainer.steps=-3']}}"], "(in sweep.parts.x)"),
])
def test_bad_protocols_fail_before_anything_starts(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        plan(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


# ---------------------------------------------------------------- the suite, end to end
def test_the_suite_end_to_end_at_the_ci_budget(mlflow_server, experiment_name, tmp_path):
    """`python -m sweep +experiment=paper sweep.budget=ci` on a real Ray and `mlflow server`: every claim
    is a measured row (✓ or ✗, none "not measured"), in claims.md / claims.json, on the parent run, and in
    an 80-column table on the console; `python -m sweep report` re-renders the same verdicts without Ray."""
    from mlflow.tracking import MlflowClient

    from services import run_sweep
    results = tmp_path / "results"
    args = ["+experiment=paper", "sweep.budget=ci", f"tracking.uri={mlflow_server.uri}",
            f"tracking.experiment={experiment_name}", f"results_dir={results}"]
    proc, seconds = run_sweep(args, tmp_path, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    (report_dir,) = (results / "reports").iterdir()
    rows_ = json.loads((report_dir / "claims.json").read_text())
    ids = [r["id"] for r in rows_]
    assert {"1a", "1b", "1c", "2a", "2b", "3a", "3b", "3c", "4", "5a", "5b", "6", "7", "8a", "8b"} <= set(ids), ids
    assert all(r["holds"] in (True, False) for r in rows_), [(r["id"], r["value"]) for r in rows_ if r["holds"] is None]
    md = (report_dir / "claims.md").read_text()
    assert all(f"| {r['id']} |" in md for r in rows_)
    table = out[out.index("paper claims"):out.index("report: ")]
    from rich.cells import cell_len  # columns on a terminal: σ̄ is two code points but one column
    assert max(cell_len(ln) for ln in table.splitlines()[1:]) <= 80, table
    assert all(f" {r['id']} " in table for r in rows_)
    for r in rows_:
        for fig in r["figures"]:
            assert (report_dir / fig).is_file(), fig
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment_name)
    (parent,) = [r for r in client.search_runs([exp.experiment_id], "tags.`sweep.id` != ''")
                 if "mlflow.parentRunId" not in r.data.tags]
    assert {"report/claims.md", "report/claims.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "claims hold" in parent.data.tags["mlflow.note.content"]
    import subprocess

    from services import PYTHON, sweep_env
    rerender = subprocess.run([PYTHON, "-m", "sweep", "report", "--tracking-uri", mlflow_server.uri, "--experiment",
                               experiment_name, "--out", str(tmp_path / "again")], cwd=tmp_path, env=sweep_env(),
                              capture_output=True, text=True, timeout=600)
    assert rerender.returncode == 0, rerender.stdout[-3000:] + rerender.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "claims.json").read_text())
    assert [(r["id"], r["holds"], r["value"]) for r in again] == [(r["id"], r["holds"], r["value"]) for r in rows_]
