"""Paper claims 2-4 measured with the real trainer (trainers.linear_teacher and its update rules) on the
trials of the experiments ``map_dynamics`` and ``update_speed``, composed exactly as ``python -m sweep``
composes them, and asserted against the paper's formulas (trainers.theory).

Tolerances come from the discretisation of the flow, not from these runs. Each experiment sets lr so that
the fastest mode's per-step rate rho = eta_bar sigma*_max^p is <= 0.01 (sgd 0.032). A discrete step
changes a balanced mode's layers by delta / sigma_i = (rho / d)(1 - x) x^(p-1) (x = sigma / sigma*), and
the map's step then differs from the flow's by a factor 1 + (d-1)/2 delta / sigma_i, plus Euler's
rho x^p (1 + p) / 2: ``_step_error`` below: at depth 4 0.039 for q = 1 (p = 0, at the window's low end),
0.009-0.012 for q = 1.5-4, 0.035 for sgd (at the top, Euler). A rate
error e across the window moves the fitted p by up to e / log(hi / lo) and eta_bar by about e. The
eq-17 reduction also ignores the random init's components off the teacher's modes: ``_alignment``, the
initial map's size gain^d relative to the weakest target: a scale, not a bound. Measured beyond it
(docs/trainers.md): sgd depth 4's fastest mode (p off by 0.020, allowance 0.018), qngd depth 4 q = 2's
middle mode (0.005 vs 0.004), and at depth 2 q = 4 other seeds' modes up to ~1.3x; none of these is in
the reduced grid, whose seed-0 trials sit inside it.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from trainers import run_trial, theory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_theory_claims import compose_trials, mode_histories  # noqa: E402

# the reduced grid (~30 s on 2 loaded cores): p = 0 at depth 2-4, every q at depth 2 but 4, p = 1/2 at depth 4
MAP_TRIALS = {(2, 1.0), (2, 1.5), (2, 2.0), (2, math.inf), (3, 1.0), (4, 1.0), (4, 1.5)}


def _alignment(cfg):
    tr = cfg["trainer"]
    return tr["gain"] ** tr["depth"] / min(tr["teacher_singular_values"])


def _step_error(d, q, lr, sigma_star):
    """Largest relative error of one discrete step's map update against the flow over the fit window."""
    p, rho = theory.map_exponent(d, q), theory.calibrated_lr(lr, d, q) * sigma_star ** theory.map_exponent(d, q)
    x = np.linspace(*theory.WINDOW, 81)
    return float(np.max((d - 1) / (2 * d) * rho * (1 - x) * x ** (p - 1) + rho * x ** p * (1 + p) / 2))


@pytest.fixture(scope="module")
def map_runs():
    out = {}
    for trial in compose_trials("map_dynamics"):
        cfg = trial.config
        key = (cfg["trainer"]["depth"], float(cfg["optimizer"]["q"]))
        if key in MAP_TRIALS:
            out[key] = (cfg, list(run_trial(cfg)))
    assert set(out) == MAP_TRIALS
    return out


def _modes(cfg, records):
    steps, modes = mode_histories(records, cfg["trainer"]["rank"])
    return steps, list(zip(cfg["trainer"]["teacher_singular_values"], modes))


def test_map_dynamics_experiment_is_the_eq17_setting():
    """15 trials: depth 2, 3, 4 x q 1, 1.5, 2, 4, inf, whitened, noiseless, exactly balanced, small init."""
    trials = compose_trials("map_dynamics")
    grid = sorted((t.config["trainer"]["depth"], float(t.config["optimizer"]["q"])) for t in trials)
    assert grid == sorted((d, q) for d in (2, 3, 4) for q in (1.0, 1.5, 2.0, 4.0, math.inf))
    for t in trials:
        tr = t.config["trainer"]
        assert tr["noise_std"] == 0 and tr["whiten"] and tr["balanced"] and tr["log_eval"]
        assert tr["gain"] ** tr["depth"] < theory.WINDOW[0] * min(tr["teacher_singular_values"])
        d, q, lr = tr["depth"], float(t.config["optimizer"]["q"]), t.config["optimizer"]["lr"]
        rho = theory.calibrated_lr(lr, d, q) * max(tr["teacher_singular_values"]) ** theory.map_exponent(d, q)
        assert rho <= (0.033 if math.isinf(q) else 0.0105)


def test_measured_exponent_and_rate_match_eq17(map_runs):
    """Table 1 measured: every mode's fitted p and eta_bar against 2(d-1)(q-1)/(dq) and lr d^(1-1/q)."""
    log_range = math.log(theory.WINDOW[1] / theory.WINDOW[0])
    for (d, q), (cfg, records) in map_runs.items():
        assert records[-1]["converged"], (d, q)
        lr = cfg["optimizer"]["lr"]
        steps, modes = _modes(cfg, records)
        for sigma_star, values in modes:
            p, eta = theory.history_map_exponent(steps, values, lr, sigma_star)
            err = _step_error(d, q, lr, sigma_star)
            assert p == pytest.approx(theory.map_exponent(d, q), abs=err / log_range + _alignment(cfg)), (d, q, sigma_star)
            assert eta == pytest.approx(theory.calibrated_lr(lr, d, q), rel=err + _alignment(cfg)), (d, q, sigma_star)


def test_closed_forms_follow_the_simulation(map_runs):
    """Fig 2: p = 0 (q = 1, every depth), p = 1/2 (depth 2 q = 2, depth 4 q = 1.5), p = 1 (depth 2 sgd):
    the closed form from the window's entry, with the theory's eta_bar, stays within the accumulated
    step error of the trajectory (a rate error e moves sigma by at most e x (1 - x) <= e / 4 of sigma*,
    for every p the trajectory integrates)."""
    seen = set()
    for (d, q), (cfg, records) in map_runs.items():
        p = theory.map_exponent(d, q)
        if not any(abs(p - c) < 1e-12 for c in theory.CLOSED_FORM_P):
            continue
        seen.add(round(p, 6))
        steps, modes = _modes(cfg, records)
        for sigma_star, values in modes:
            err = theory.history_closed_form_error(steps, values, cfg["optimizer"]["lr"], d, q, sigma_star)
            assert err <= _step_error(d, q, cfg["optimizer"]["lr"], sigma_star) / 4 + _alignment(cfg), (d, q, sigma_star, err)
    assert seen == {0.0, 0.5, 1.0}


def test_time_scale_of_learning_follows_the_target(map_runs):
    """Fig 2's half-max scaling. The time from 0.1 sigma* to sigma*/2 is C(p) / (eta_bar sigma*^p) for every
    p (slope -p against sigma*, eq 17's scale invariance). From the init, NGD (p = 0) learns every mode on
    the same time scale (section 4.2): t_half = log(2 (1 - sigma0/sigma*)) / eta_bar with each mode's own
    initial projection sigma0, slope ~0 (the clipped first steps delay all modes alike). For p > 0 the
    half-max from the init also holds the escape from the saddle, set by the sign and size of each
    mode's random initial projection: reported (docs/trainers.md), not asserted."""
    for (d, q), (cfg, records) in map_runs.items():
        p, lr = theory.map_exponent(d, q), cfg["optimizer"]["lr"]
        rate = theory.calibrated_lr(1.0, d, q)
        steps, modes = _modes(cfg, records)
        targets = [s for s, _ in modes]
        windows = [theory.history_window_time(steps, v, lr, s) for s, v in modes]
        err = max(_step_error(d, q, lr, s) for s in targets) + _alignment(cfg)
        for s, w in zip(targets, windows):
            ref = theory.half_max_time_theory(p, s, rate, theory.WINDOW[0] * s)
            assert w == pytest.approx(ref, rel=err), (d, q, s)
        assert theory.fit_power(targets, windows) == pytest.approx(-p, abs=2 * err / math.log(4)), (d, q)
        if p == 0:
            halves = [theory.history_half_max_time(steps, v, lr, s) for s, v in modes]
            refs = [theory.half_max_time_theory(0.0, s, rate, v[0]) for s, v in modes]
            assert theory.fit_power(targets, halves) == pytest.approx(theory.fit_power(targets, refs), abs=0.02)
            assert abs(theory.fit_power(targets, halves)) < 0.05


def _speed_trials():
    return [t for t in compose_trials("update_speed") if t.config["seed"] == 0]


def test_update_speed_exponents_as_the_gain_vanishes():
    """Eq 7, 11, 13, 14 and 19-21 on the real rules at depth 4, gains 1e-1 ... 1e-4, undamped: speed =
    update_norm / lr at step 1 ~ gain^k with k = (d-1)(1 - 2/q): SGD +3, NGD and NGD-d -3, sqrtNGD and
    sqrtNGD-d 0. Only Delta = wbar(0) - wbar* changes with the gain besides the curvature, by ~gain^4 of
    ||wbar*||: slopes exact to 1e-3. sqrtNGD's speed is eta ||Delta|| itself (eq 14; the block rule's too,
    eq 21: sum_i ||P_i Delta||^2 / d): ||wbar*||_F = sqrt(3^2 + 2^2 + 1^2) at vanishing gain. NGD-d moves
    faster than NGD (section 5, Jensen's inequality) at every gain."""
    speeds: dict[str, dict[float, float]] = {}
    for trial in _speed_trials():
        cfg = trial.config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExplodingUpdateWarning: NGD's explosion is what is measured
            records = list(run_trial(cfg))
        first = next(r for r in records if r["kind"] == "eval" and r["step"] == 1)
        speeds.setdefault(cfg["optimizer"]["name"], {})[cfg["trainer"]["gain"]] = \
            first["metrics"]["update_norm"] / cfg["optimizer"]["lr"]
        depth, rule = cfg["trainer"]["depth"], cfg["optimizer"]
    assert depth == 4 and rule["damping"] == 0 and rule["clip"] is None
    structure = {"sgd": (math.inf, "full"), "ngd": (1, "full"), "sqrt_ngd": (2, "full"), "ngd_d": (1, "block"),
                 "sqrt_ngd_d": (2, "block")}
    assert set(speeds) == set(structure)
    for name, by_gain in speeds.items():
        gains = sorted(by_gain)
        k = theory.fit_power(gains, [by_gain[g] for g in gains])
        assert k == pytest.approx(theory.speed_exponent(depth, *structure[name]), abs=1e-3), name
    target_norm = math.sqrt(14.0)
    for name in ("sqrt_ngd", "sqrt_ngd_d"):
        assert speeds[name][1e-4] == pytest.approx(target_norm, rel=1e-6)
    for g in speeds["ngd"]:
        assert speeds["ngd_d"][g] > speeds["ngd"][g]
