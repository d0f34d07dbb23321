"""The paper's predictions for map dynamics and update speed (Huh, ICML 2020, sections 3-5), and the
estimators that measure them on a recorded trajectory. Pure numpy: no torch, no Ray, no MLflow.

Theory (singular-mode picture, balanced weights c_i = 0, eq 15-17)::

    d sigma/dt = -eta_bar (sigma - sigma*) sigma^p,   p = 2 (d - 1)(q - 1) / (d q),   eta_bar = eta d^(1 - 1/q)

and the parameter update speed ||d sigma_i/dt|| as the gain (each layer's singular value) goes to 0
(eq 7, 11, 13, 14 for the full rules, eq 19-21 for the block rules).

Units. The paper's continuous time counts steps with eta = the learning rate, so ``calibrated_lr(lr,
d, q)`` is the per-step rate. The ``history_*`` functions take a trainer's records (``steps``, the
``signal_mode.k{k}`` values) and report rates per step (comparable to ``calibrated_lr(lr, d, q)``)
and times in rescaled time ``t = lr * step`` (where eta = 1 and the rate is d^(1 - 1/q)).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["map_exponent", "calibrated_lr", "speed_exponent", "closed_form", "half_max_time_theory",
           "fit_map_exponent", "half_max_time", "fit_power", "CLOSED_FORM_P", "WINDOW",
           "history_map_exponent", "history_closed_form_error", "history_half_max_time",
           "history_window_time", "history_mode_summary", "speed_exponent_measured"]

CLOSED_FORM_P = (0.0, 0.5, 1.0)  # the exponents with the closed forms of Fig 2
WINDOW = (0.1, 0.9)              # default fit window of sigma / sigma* (see fit_map_exponent)


def _check_q(q: float) -> float:
    q = float(q)
    if not q >= 1:
        raise ValueError(f"q={q} must be >= 1 (1 = NGD, 2 = sqrtNGD) or math.inf (SGD)")
    return q


def _check_d(d: int) -> int:
    if isinstance(d, bool) or int(d) != d or d < 1:
        raise ValueError(f"d={d!r} (depth) must be a positive integer")
    return int(d)


def map_exponent(d: int, q: float) -> float:
    """p of eq 17 / Table 1: 2(d-1)(q-1)/(dq); q = inf (SGD) gives 2(d-1)/d."""
    d, q = _check_d(d), _check_q(q)
    return 2.0 * (d - 1) / d if math.isinf(q) else 2.0 * (d - 1) * (q - 1) / (d * q)


def calibrated_lr(lr: float, d: int, q: float) -> float:
    """eta_bar = lr d^(1 - 1/q) (eq 17): the map's rate per step; q = inf gives lr d."""
    d, q = _check_d(d), _check_q(q)
    return float(lr) * d ** (1.0 - (0.0 if math.isinf(q) else 1.0 / q))


def speed_exponent(d: int, q: float, structure: str = "full") -> float:
    """k in ``update speed ~ gain^k`` as gain -> 0 at fixed displacement sigma_Delta.

    Every layer's singular value is the gain g, so j_i = prod_(k != i) sigma_k = g^(d-1) and
    ||j|| = sqrt(d) g^(d-1).

    * full (eq 12-13): ||sigma_dot|| = eta |sigma_Delta| ||j||^(1 - 2/q), so k = (d-1)(1 - 2/q):
      SGD d-1 (eq 7, vanishing), NGD -(d-1) (eq 11, exploding), sqrtNGD 0 (eq 14, finite).
    * block: layer i's Gauss-Newton block is j_i^2 and its gradient sigma_Delta j_i, so the block q-rule
      (with the 1/d^(1/q) factor of eq 19) is sigma_i_dot = -eta d^(-1/q) sigma_Delta sign(j_i) |j_i|^(1-2/q)
      (q = 1: eq 20, sigma_Delta / (d j_i); q = 2: eq 21, sign(j_i) / sqrt(d)); hence
      ||sigma_dot|| = eta d^(-1/q) |sigma_Delta| (sum_i |j_i|^(2 - 4/q))^(1/2) and the same
      k = (d-1)(1 - 2/q): NGD-d explodes, sqrtNGD-d stays finite.

    The same k holds for the matrix rules at any small random init (not only the aligned modes):
    every block of H+ scales as g^(2(d-1)) and the gradient as g^(d-1).
    """
    d, q = _check_d(d), _check_q(q)
    if structure not in ("full", "block"):
        raise ValueError(f"structure={structure!r} must be full or block")
    return float(d - 1) * (1.0 - (0.0 if math.isinf(q) else 2.0 / q))


def _closed_form_p(p: float) -> float:
    for known in CLOSED_FORM_P:
        if abs(p - known) < 1e-12:
            return known
    raise ValueError(f"p={p} has no closed form here; use one of {CLOSED_FORM_P} (Fig 2)")


def closed_form(p: float, sigma_star: float, eta_bar: float, t, sigma0: float = 0.0) -> np.ndarray:
    """sigma(t) solving eq 17 for p in {0, 1/2, 1} (Fig 2) from sigma(0) = sigma0 < sigma* (sigma0 >= 0 for
    p > 0; the linear p = 0 dynamics also starts from a negative projection).

    The paper's forms start at sigma(0) = 0 (p < 1) and are shifted in time to start at sigma0:
    p = 0: sigma* - (sigma* - sigma0) e^(-eta_bar t);
    p = 1/2: sigma* tanh^2(eta_bar sqrt(sigma*) t / 2 + artanh sqrt(sigma0 / sigma*));
    p = 1: sigma* / (1 + (sigma* / sigma0 - 1) e^(-eta_bar sigma* t)) (needs sigma0 > 0: 0 is a fixed point).
    """
    p = _closed_form_p(p)
    s, eta, s0 = float(sigma_star), float(eta_bar), float(sigma0)
    if not s > 0:
        raise ValueError(f"sigma_star={s} must be > 0")
    if not (s0 < s and (s0 >= 0 or p == 0.0)):
        raise ValueError(f"sigma0={s0} must be in [0, sigma_star={s}) (p = 0: any value below sigma_star)")
    t = np.asarray(t, dtype=float)
    if p == 0.0:
        return s - (s - s0) * np.exp(-eta * t)
    if p == 0.5:
        return s * np.tanh(eta * math.sqrt(s) * t / 2 + math.atanh(math.sqrt(s0 / s))) ** 2
    if s0 == 0:
        raise ValueError("sigma0=0 is a fixed point of the p=1 dynamics (the saddle); give sigma0 > 0")
    return s / (1.0 + (s / s0 - 1.0) * np.exp(-eta * s * t))


def half_max_time_theory(p: float, sigma_star: float, eta_bar: float, sigma0: float = 0.0) -> float:
    """Time for eq 17 to go from sigma0 to sigma*/2: (1 / (eta_bar sigma*^p)) int_(x0)^(1/2) dx / ((1-x) x^p),
    x0 = sigma0 / sigma*. For sigma0 -> 0 this is C_p / (eta_bar sigma*^p) when p < 1 (so
    t_half ~ sigma*^(-p)), but diverges for p >= 1: the escape from the saddle dominates,
    log((1-x0)/x0) / (eta_bar sigma*) at p = 1 (slope d log t / d log sigma* = -1 + 1/log(sigma*/sigma0)
    at fixed sigma0), sigma0^(1-p) / ((p-1) eta_bar sigma*) at p > 1 as sigma0 -> 0 (slope -1, not -p).
    Closed for p in {0, 1/2, 1}; otherwise 200-point Gauss-Legendre in u = x^(1-p) (p < 1) or
    u = log x (p >= 1), which removes the x^(-p) end-point singularity.
    """
    s, eta, s0 = float(sigma_star), float(eta_bar), float(sigma0)
    if not (s > 0 and eta > 0 and s0 < s / 2 and (s0 >= 0 or abs(p) < 1e-12)):
        raise ValueError(f"need sigma_star > 0, eta_bar > 0, 0 <= sigma0 < sigma_star / 2 (p = 0: any sigma0 "
                         f"< sigma_star / 2); got {s}, {eta}, {s0}")
    x0 = s0 / s
    scale = 1.0 / (eta * s ** p)
    if abs(p) < 1e-12:
        return scale * math.log((1 - x0) / 0.5)
    if abs(p - 0.5) < 1e-12:
        return scale * 2 * (math.atanh(math.sqrt(0.5)) - math.atanh(math.sqrt(x0)))
    if abs(p - 1) < 1e-12:
        if x0 == 0:
            return math.inf
        return scale * math.log((1 - x0) / x0)
    nodes, weights = np.polynomial.legendre.leggauss(200)
    if p < 1:  # x = u^(1/(1-p)), dx / x^p = du / (1-p)
        a, b = x0 ** (1 - p), 0.5 ** (1 - p)
        u = 0.5 * (b - a) * nodes + 0.5 * (a + b)
        x = u ** (1 / (1 - p))
        return scale * 0.5 * (b - a) * float(np.sum(weights / (1 - x))) / (1 - p)
    if x0 == 0:
        return math.inf
    a, b = math.log(x0), math.log(0.5)  # x = e^u, dx / x^p = e^(u (1-p)) du
    u = 0.5 * (b - a) * nodes + 0.5 * (a + b)
    x = np.exp(u)
    return scale * 0.5 * (b - a) * float(np.sum(weights * x ** (1 - p) / (1 - x)))


def _trajectory(t, sigma):
    t = np.asarray(t, dtype=float)
    sigma = np.asarray(sigma, dtype=float)
    if t.ndim != 1 or t.shape != sigma.shape or t.size < 3:
        raise ValueError(f"t and sigma must be 1-D arrays of the same length >= 3, got {t.shape}, {sigma.shape}")
    if not np.all(np.diff(t) > 0):
        raise ValueError("t must be strictly increasing")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(sigma))):
        raise ValueError("t and sigma must be finite")
    return t, sigma


def fit_map_exponent(t, sigma, sigma_star: float, lo: float = WINDOW[0], hi: float = WINDOW[1]):
    """(p, eta_bar) of eq 17 measured on a trajectory sigma(t) of one singular mode.

    Least squares of log(sigma_dot / (sigma* - sigma)) = log eta_bar + p log sigma over the samples with
    lo <= sigma / sigma* <= hi; sigma_dot by second-order finite differences on the (possibly uneven)
    samples (``np.gradient``). eta_bar is in the units of 1/t.

    Why the default window [0.1, 0.9]: below ~0.1 sigma* a mode started from small random weights is
    still aligning with the teacher (its value is a projection of a map that is not yet rank-aligned,
    and the reduction of eq 16 to eq 17 does not hold); above ~0.9 sigma* - sigma is small, so the ratio
    amplifies finite-difference and discretisation errors. The window still spans a factor 9 in sigma
    (log-range 2.2), enough to separate p values 1/9 apart.
    """
    t, sigma = _trajectory(t, sigma)
    s = float(sigma_star)
    if not s > 0:
        raise ValueError(f"sigma_star={s} must be > 0")
    if not 0 < lo < hi < 1:
        raise ValueError(f"window lo={lo}, hi={hi} must satisfy 0 < lo < hi < 1")
    rate = np.gradient(sigma, t)
    keep = (sigma >= lo * s) & (sigma <= hi * s) & (rate > 0)
    if keep.sum() < 3:
        raise ValueError(f"only {int(keep.sum())} samples with {lo} <= sigma/sigma* <= {hi} and sigma rising; "
                         "evaluate more often (trainer.eval_every) or run longer")
    x = np.log(sigma[keep])
    y = np.log(rate[keep] / (s - sigma[keep]))
    p, log_eta = np.polyfit(x, y, 1)
    return float(p), float(math.exp(log_eta))


def half_max_time(t, sigma, sigma_star: float) -> float:
    """First time sigma reaches sigma*/2, linearly interpolated between samples; nan if it never does."""
    return _crossing(t, sigma, 0.5 * float(sigma_star))


def _crossing(t, sigma, level: float) -> float:
    t, sigma = _trajectory(t, sigma)
    above = np.nonzero(sigma >= level)[0]
    if above.size == 0:
        return math.nan
    i = int(above[0])
    if i == 0:
        return float(t[0])
    t0, t1, s0, s1 = t[i - 1], t[i], sigma[i - 1], sigma[i]
    return float(t0 + (level - s0) * (t1 - t0) / (s1 - s0))


def fit_power(x, y) -> float:
    """Slope of log y against log x (least squares): the exponent k of y ~ x^k."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.size < 2 or not (np.all(x > 0) and np.all(y > 0)):
        raise ValueError(f"x and y must be positive arrays of the same length >= 2, got {x.shape}, {y.shape}")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# --- on a trial's recorded history -------------------------------------------------------------------

def _history(steps, values, lr):
    """(t = lr * step, values), ordered by step (a tracking store need not return them in order)."""
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    if not (float(lr) > 0 and math.isfinite(float(lr))):
        raise ValueError(f"lr={lr} must be a positive finite number (optimizer.lr of the trial)")
    if steps.shape != values.shape:
        raise ValueError(f"steps and values must have the same length, got {steps.shape}, {values.shape}")
    order = np.argsort(steps, kind="stable")
    return _trajectory(float(lr) * steps[order], values[order])


def history_map_exponent(steps, values, lr: float, sigma_star: float, lo: float = WINDOW[0],
                         hi: float = WINDOW[1]) -> tuple[float, float]:
    """Measured (p, eta_bar) of one teacher mode from a linear_teacher trial.

    ``steps``: the eval records' steps; ``values``: ``signal_mode.k{k}`` at those steps; ``lr``:
    optimizer.lr; ``sigma_star``: teacher singular value k (trainer.teacher_singular_values[k-1]).
    eta_bar is per step: compare with ``calibrated_lr(lr, depth, q)`` and p with ``map_exponent(depth, q)``.
    """
    t, sigma = _history(steps, values, lr)
    p, eta = fit_map_exponent(t, sigma, sigma_star, lo, hi)
    return p, eta * float(lr)


def history_closed_form_error(steps, values, lr: float, depth: int, q: float, sigma_star: float,
                              lo: float = WINDOW[0]) -> float:
    """max |sigma(t) - closed form| / sigma* over the records from the first one with sigma >= lo sigma*.

    The closed form (``closed_form`` with the THEORY's p = map_exponent(depth, q) and eta_bar =
    calibrated_lr(lr, depth, q), nothing fitted) starts at that record's value and time, which skips the
    alignment phase of a small random init (see fit_map_exponent). Needs p in {0, 1/2, 1}: q = 1 (any
    depth), depth 2 with q = 2 or inf, depth 4 with q = 1.5, depth 3 with q = 4.
    """
    p = map_exponent(depth, q)
    _closed_form_p(p)
    t, sigma = _history(steps, values, lr)
    s = float(sigma_star)
    start = np.nonzero(sigma >= lo * s)[0]
    if start.size == 0:
        raise ValueError(f"the mode never reaches {lo} * sigma_star = {lo * s}: run longer")
    i = int(start[0])
    rate = calibrated_lr(1.0, depth, q)  # per unit of t = lr * step
    model = closed_form(p, s, rate, t[i:] - t[i], min(sigma[i], np.nextafter(s, 0)))
    return float(np.max(np.abs(sigma[i:] - model)) / s)


def history_half_max_time(steps, values, lr: float, sigma_star: float) -> float:
    """First time (t = lr * step, interpolated) the mode reaches sigma*/2; nan if it never does.

    Theory: ``half_max_time_theory(p, sigma*, calibrated_lr(1, d, q), sigma0)``: ~ sigma*^(-p) for
    p < 1; for p >= 1 the escape from the saddle (set by sigma0) dominates."""
    t, sigma = _history(steps, values, lr)
    return half_max_time(t, sigma, sigma_star)


def history_window_time(steps, values, lr: float, sigma_star: float, lo: float = WINDOW[0]) -> float:
    """Time (t = lr * step) from sigma = lo sigma* to sigma*/2. Eq 17 is invariant under sigma -> sigma* x,
    t -> t / sigma*^p, so this is exactly ``C(p, lo) / (eta_bar sigma*^p)`` for every p, free of the
    escape from the saddle (= half_max_time_theory(p, sigma*, eta_bar, lo * sigma*))."""
    t, sigma = _history(steps, values, lr)
    return _crossing(t, sigma, 0.5 * float(sigma_star)) - _crossing(t, sigma, lo * float(sigma_star))


def history_mode_summary(steps, values, lr: float, depth: int, q: float, sigma_star: float) -> dict:
    """Everything above for one teacher mode of one trial, with the theory beside each measurement:
    ``p``/``p_theory``, ``eta_bar``/``eta_bar_theory`` (per step), ``closed_form_error`` (None unless p
    is 0, 1/2 or 1), ``t_half`` (t = lr * step, from the init; escape-dominated for p > 0, see
    half_max_time_theory), ``t_window``/``t_window_theory`` (0.1 sigma* -> sigma*/2)."""
    p_th = map_exponent(depth, q)
    p, eta = history_map_exponent(steps, values, lr, sigma_star)
    closed = None
    if any(abs(p_th - c) < 1e-12 for c in CLOSED_FORM_P):
        closed = history_closed_form_error(steps, values, lr, depth, q, sigma_star)
    return {"p": p, "p_theory": p_th, "eta_bar": eta, "eta_bar_theory": calibrated_lr(lr, depth, q),
            "closed_form_error": closed, "t_half": history_half_max_time(steps, values, lr, sigma_star),
            "t_window": history_window_time(steps, values, lr, sigma_star),
            "t_window_theory": half_max_time_theory(p_th, sigma_star, calibrated_lr(1.0, depth, q),
                                                    WINDOW[0] * float(sigma_star))}


def speed_exponent_measured(gains, update_norms, lr: float) -> float:
    """k of speed = update_norm / lr ~ gain^k, from the first step's ``update_norm`` of trials that
    differ only in trainer.gain (compare with ``speed_exponent(depth, q, structure)``)."""
    if not (float(lr) > 0 and math.isfinite(float(lr))):
        raise ValueError(f"lr={lr} must be a positive finite number (optimizer.lr of the trials)")
    return fit_power(gains, np.asarray(update_norms, dtype=float) / float(lr))
