"""trainers.theory against independent references: the paper's Table 1 and section 4 statements, the
singular-mode equations 12, 16, 20, 21 evaluated layer by layer, high-precision integration of eq 17
(mpmath's Taylor-series ``odefun`` at 25 digits, scipy's DOP853 at rtol 1e-12) and quadrature."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from trainers import theory as th


def test_table1_and_section4_exponents():
    """Table 1 and section 4.2: d = 1 -> 0; NGD 0; d = 2: sqrtNGD 1/2, SGD 1; SGD 2 - 2/d; sqrtNGD
    1 - 1/d; d -> inf: 0, 1, 2 for q = 1, 2, inf."""
    for q in (1, 1.5, 2, 4, math.inf):
        assert th.map_exponent(1, q) == 0
    assert th.map_exponent(2, 1) == 0 and th.map_exponent(2, 2) == 0.5 and th.map_exponent(2, math.inf) == 1
    for d in (2, 3, 4, 7):
        assert th.map_exponent(d, 1) == 0
        assert th.map_exponent(d, math.inf) == pytest.approx(2 - 2 / d, abs=1e-15)
        assert th.map_exponent(d, 2) == pytest.approx(1 - 1 / d, abs=1e-15)
    big = 10 ** 9
    assert [round(th.map_exponent(big, q), 6) for q in (1, 2, math.inf)] == [0, 1, 2]


def test_effective_depth_reproduces_the_exponent():
    """Eq 18: curvature correction q at depth d is SGD at depth d_eff = dq / (d + q - 1)."""
    for d in (2, 3, 4, 9):
        for q in (1, 1.5, 2, 4, 16):
            d_eff = d * q / (d + q - 1)
            assert th.map_exponent(d, q) == pytest.approx(2 * (d_eff - 1) / d_eff, rel=1e-13, abs=1e-15)


def test_calibrated_rate_is_eq16_evaluated_layer_by_layer():
    """Eq 16 with balanced layers sigma_i = sigma^(1/d): sum_i sigma_i_dot j_i = -eta sigma_Delta ||j||^(2(1-1/q))
    must equal eq 17's -eta_bar sigma_Delta sigma^p."""
    for d in (2, 3, 4):
        for q in (1, 1.5, 2, 4, math.inf):
            for sigma in (1e-3, 0.3, 2.5):
                layers = np.full(d, sigma ** (1 / d))
                j = np.array([np.prod(np.delete(layers, i)) for i in range(d)])  # j_i = prod_(k != i) sigma_k
                expo = 0 if math.isinf(q) else 2 / q
                rate16 = np.sum(j * j / np.linalg.norm(j) ** expo)              # eq 12 into eq 16
                rate17 = th.calibrated_lr(1.0, d, q) * sigma ** th.map_exponent(d, q)
                assert rate16 == pytest.approx(rate17, rel=1e-12)
    assert th.calibrated_lr(0.05, 4, 2) == pytest.approx(0.1)


def _mode_speed(gain, d, q, structure, delta=-1.0):
    """||sigma_dot|| of one singular mode with every layer at `gain`, from the paper's equations:
    full eq 12; block eq 20 (q = 1), eq 21 (q = 2), the plain gradient for q = inf."""
    layers = np.full(d, gain)
    j = np.array([np.prod(np.delete(layers, i)) for i in range(d)])
    if math.isinf(q):
        return np.linalg.norm(delta * j)
    if structure == "full":
        return np.linalg.norm(delta * j / np.linalg.norm(j) ** (2 / q))
    if q == 1:
        return np.linalg.norm(delta / (d * j))
    assert q == 2
    return np.linalg.norm(delta * np.sign(j) / math.sqrt(d))


@pytest.mark.parametrize("d", [2, 3, 4])
def test_speed_exponents_from_the_mode_equations(d):
    """k of speed ~ gain^k (gain 1e-3 .. 1e-5) from eq 12, 20, 21; and the paper's verdicts: SGD vanishes
    (eq 7), NGD and NGD-d explode (eq 11, 20), sqrtNGD and sqrtNGD-d stay finite (eq 14, 21)."""
    gains = np.array([1e-3, 1e-4, 1e-5])
    for q, structure in [(math.inf, "full"), (1, "full"), (1.5, "full"), (2, "full"), (4, "full"),
                         (1, "block"), (2, "block")]:
        speeds = [_mode_speed(g, d, q, structure) for g in gains]
        assert th.fit_power(gains, speeds) == pytest.approx(th.speed_exponent(d, q, structure), abs=1e-9)
    assert th.speed_exponent(d, math.inf) == d - 1 > 0
    assert th.speed_exponent(d, 1) == th.speed_exponent(d, 1, "block") == -(d - 1) < 0
    assert th.speed_exponent(d, 2) == th.speed_exponent(d, 2, "block") == 0


def _mp_solution(p, sigma_star, eta_bar, sigma0, times, dps=25):
    with mp.workdps(dps):
        s, eta, p_ = mp.mpf(sigma_star), mp.mpf(eta_bar), mp.mpf(p)
        f = mp.odefun(lambda t, y: eta * (s - y) * y ** p_, 0, mp.mpf(sigma0))
        return np.array([float(f(mp.mpf(t))) for t in times])


@pytest.mark.parametrize("p", th.CLOSED_FORM_P)
def test_closed_forms_match_high_precision_integration(p):
    """Fig 2's closed forms, shifted to start at sigma(0) = sigma0, against mpmath odefun of eq 17."""
    for sigma_star, eta_bar, sigma0 in [(2.0, 1.3, 0.02), (0.5, 0.7, 0.2)]:
        scale = 1 / (eta_bar * sigma_star ** p)
        times = scale * np.array([0.3, 1.0, 3.0, 8.0])
        ref = _mp_solution(p, sigma_star, eta_bar, sigma0, times)
        got = th.closed_form(p, sigma_star, eta_bar, times, sigma0)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_closed_forms_from_zero_are_the_papers():
    """sigma(0) = 0 reproduces the printed forms: sigma*(1 - e^(-eta t)), sigma* tanh^2(eta sqrt(sigma*) t / 2)."""
    t = np.linspace(0, 5, 11)
    s, eta = 3.0, 0.8
    np.testing.assert_allclose(th.closed_form(0, s, eta, t), s * (1 - np.exp(-eta * t)), rtol=1e-14)
    np.testing.assert_allclose(th.closed_form(0.5, s, eta, t), s * np.tanh(eta * np.sqrt(s) * t / 2) ** 2,
                               rtol=1e-14, atol=1e-300)
    with pytest.raises(ValueError, match="fixed point"):
        th.closed_form(1, s, eta, t, 0.0)
    with pytest.raises(ValueError, match="no closed form"):
        th.closed_form(0.75, s, eta, t, 0.1)


@pytest.mark.parametrize("p", [0.0, 1 / 3, 0.5, 0.75, 1.0, 9 / 8, 1.5])
def test_half_max_time_theory_is_the_integral(p):
    """t_half = (1 / (eta_bar sigma*^p)) int_(x0)^(1/2) dx / ((1 - x) x^p), x0 = sigma0 / sigma*, by the
    antiderivative F(x) = x^a / a 2F1(a, 1; a + 1; x), a = 1 - p (log((1-x0)/x0) at p = 1), in mpmath at
    30 digits."""
    for sigma_star, eta_bar, sigma0 in [(2.0, 1.3, 0.02), (0.5, 0.7, 1e-4), (4.0, 2.0, 0.0)]:
        if sigma0 == 0 and p >= 1:
            assert th.half_max_time_theory(p, sigma_star, eta_bar, sigma0) == math.inf
            continue
        with mp.workdps(30):
            x0, a = mp.mpf(sigma0) / sigma_star, 1 - mp.mpf(p)
            if p == 1:
                integral = mp.log((1 - x0) / x0)
            else:
                anti = lambda x: 0 if x == 0 else x ** a / a * mp.hyp2f1(a, 1, a + 1, x)  # noqa: E731
                integral = anti(mp.mpf(0.5)) - anti(x0)
            ref = integral / (eta_bar * mp.mpf(sigma_star) ** p)
        assert th.half_max_time_theory(p, sigma_star, eta_bar, sigma0) == pytest.approx(float(ref), rel=1e-9)


def test_half_max_scaling_with_the_target():
    """Fig 2: t_half ~ sigma*^(-p) from sigma(0) = 0 for p < 1 (exact slope -p, read off the closed forms'
    sampled curves). For p >= 1 the escape from a fixed sigma(0) sets the slope instead: at p = 1,
    t_half = log(sigma*/sigma0 - 1) / (eta_bar sigma*), slope -1 + 1/log(sigma*/sigma0) (not -p); at
    p > 1, t_half -> sigma0^(1-p) / ((p-1) eta_bar sigma*) as sigma0 -> 0, slope -1 (not -p)."""
    targets = np.array([1.0, 2.0, 4.0])
    for p in (0.0, 0.5):
        t = np.linspace(0, 20, 200001)
        halves = [th.half_max_time(t, th.closed_form(p, s, 1.0, t), s) for s in targets]
        assert th.fit_power(targets, halves) == pytest.approx(-p, abs=1e-6)
    sigma0 = 1e-3
    halves = [th.half_max_time_theory(1.0, s, 1.0, sigma0) for s in targets]
    assert th.fit_power(targets, halves) == pytest.approx(-1 + 1 / math.log(2.0 / sigma0), abs=0.01)  # -0.87
    halves = [th.half_max_time_theory(1.5, s, 1.0, 1e-8) for s in targets]
    assert th.fit_power(targets, halves) == pytest.approx(-1, abs=0.01)


def _integrated(p, sigma_star, eta_bar, sigma0, t):
    sol = solve_ivp(lambda _, y: eta_bar * (sigma_star - y) * np.abs(y) ** p, (0, t[-1]), [sigma0],
                    t_eval=t, method="DOP853", rtol=1e-12, atol=1e-15)
    assert sol.success
    return sol.y[0]


@pytest.mark.parametrize("p", [0.0, 1 / 3, 0.5, 0.75, 1.0, 1.5])
def test_fit_recovers_p_and_rate_from_integrated_trajectories(p):
    """fit_map_exponent on eq 17 integrated by DOP853, sampled at dt = 0.01 / (eta_bar sigma*^p):
    the finite-difference error is ~ (rate dt)^2 / 6 ~ 2e-5, so 1e-3 is a wide margin."""
    for sigma_star, eta_bar in [(4.0, 1.7), (0.5, 0.3)]:
        dt = 0.01 / (eta_bar * sigma_star ** p)
        x0 = 0.01
        horizon = th.half_max_time_theory(p, sigma_star, eta_bar, x0 * sigma_star) + 6 / (eta_bar * sigma_star ** p)
        t = np.arange(0, horizon, dt)
        sigma = _integrated(p, sigma_star, eta_bar, x0 * sigma_star, t)
        p_fit, eta_fit = th.fit_map_exponent(t, sigma, sigma_star)
        assert p_fit == pytest.approx(p, abs=1e-3)
        assert eta_fit == pytest.approx(eta_bar, rel=1e-3)


def test_history_functions_on_an_integrated_mode():
    """The history_* functions on a mode integrated in step units (rate eta_bar = lr d^(1-1/q) per step),
    recorded at uneven steps: p, eta_bar per step, closed-form error, window time = theory."""
    lr, d, q, sigma_star = 2e-3, 2, 2.0, 2.0
    p, rate = th.map_exponent(d, q), th.calibrated_lr(lr, d, q)
    steps = np.unique(np.concatenate([np.arange(0, 4000, 5), np.round(np.logspace(0, np.log10(3999), 60))])).astype(int)
    values = _integrated(p, sigma_star, rate, 0.01, steps.astype(float))
    p_fit, eta_fit = th.history_map_exponent(steps, values, lr, sigma_star)
    assert p_fit == pytest.approx(p, abs=1e-3) and eta_fit == pytest.approx(rate, rel=1e-3)
    assert th.history_closed_form_error(steps, values, lr, d, q, sigma_star) < 1e-9
    # the wrong rule (q = inf, p = 1 at d = 2) misses by a lot: the check can fail
    assert th.history_closed_form_error(steps, values, lr, d, math.inf, sigma_star) > 0.05
    shuffled = np.random.default_rng(0).permutation(len(steps))  # a store may return records out of order
    assert th.history_map_exponent(steps[shuffled], values[shuffled], lr, sigma_star) == (p_fit, eta_fit)
    t_half = th.history_half_max_time(steps, values, lr, sigma_star)
    assert t_half == pytest.approx(th.half_max_time_theory(p, sigma_star, rate / lr, 0.01), rel=1e-3)
    summary = th.history_mode_summary(steps, values, lr, d, q, sigma_star)
    assert (summary["p"], summary["eta_bar"], summary["t_half"]) == (p_fit, eta_fit, t_half)
    assert summary["p_theory"] == p and summary["eta_bar_theory"] == rate and summary["closed_form_error"] < 1e-9
    assert th.history_mode_summary(steps, values, lr, d, 4.0, sigma_star)["closed_form_error"] is None  # p = 3/4
    window = th.history_window_time(steps, values, lr, sigma_star)
    assert window == pytest.approx(th.half_max_time_theory(p, sigma_star, rate / lr, th.WINDOW[0] * sigma_star),
                                   rel=1e-3)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="q=0.5 must be >= 1"):
        th.map_exponent(2, 0.5)
    with pytest.raises(ValueError, match="depth"):
        th.calibrated_lr(0.1, 0, 2)
    with pytest.raises(ValueError, match="structure"):
        th.speed_exponent(2, 2, "diagonal")
    t = np.linspace(0, 1, 50)
    with pytest.raises(ValueError, match="only 0 samples"):
        th.fit_map_exponent(t, 0.01 * t, 1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        th.fit_map_exponent(t[::-1], t, 1.0)
    with pytest.raises(ValueError, match="lr="):
        th.history_half_max_time([0, 1, 2], [0, 0.5, 1], 0.0, 1.0)
    with pytest.raises(ValueError, match="never reaches"):
        th.history_closed_form_error([0, 1, 2], [0, 0.01, 0.02], 0.1, 2, 1, 1.0)
    assert math.isnan(th.half_max_time(t, 0.1 * t, 1.0))
