"""Deep linear teacher–student task (paper §6, Fig 4–5; non-whitened inputs: S.I.1).

A rank-r teacher map ``T = U_r diag(s) V_r^T`` (N x N) labels P training inputs, ``y = T x + z`` with
Gaussian noise ``z ~ N(0, noise_std^2 I)``; a depth-d, width-N linear student ``wbar = w_d ... w_1``
learns it full-batch by minimising ``L = 1/2 E_D ||wbar x - y||^2`` with one of the update rules of
``trainers.curvature`` (``natural_direction`` + ``clip_update``). Computations are in float64.

Config (``trainer:``; defaults in :class:`LinearTeacherConfig`, the one place they live)::

    name: linear_teacher
    gain: 0.1                # initial gain: each layer's singular values ~ gain (map ~ gain^depth)
    steps: 3000              # step cap: full-batch steps at most (the trial stops earlier once converged)
    eval_every: 10           # evaluate every this many steps (plus step 0 and the last step)
    log_eval: false          # also evaluate at 20 log-spaced steps per decade
    max_weight_norm: 1.0e4   # sum_i ||w_i||_F above this ends the trial as diverged
    width: 16                # N: input, hidden and output width
    depth: 4                 # d: number of weight matrices
    rank: 3                  # r: teacher rank
    teacher_singular_values: [3.0, 2.0, 1.0]   # s_1..s_r (length = rank)
    train_samples: 16        # P (P = N: the setting most prone to overfitting)
    noise_std: 0.3           # label noise on training targets
    whiten: true             # whiten training inputs so the empirical Sigma_x = I exactly (needs P >= N)
    input_cov_cond: 1.0      # condition number of the input population's covariance (1 = isotropic)
    init: gaussian           # gaussian: w_i ~ gain * N(0, 1/N) entries; orthogonal: gain * random orthogonal
    balanced: false          # true: rotate the layers so c_i = w_(i+1)^T w_(i+1) - w_i w_i^T = 0 exactly
    converge_tol: 1.0e-6     # stop once (L - L*) / (L(0) - L*) <= this; null = run all steps

Data. Inputs come from a population with covariance Sigma_x: the identity, or with ``input_cov_cond``
= c > 1 (needs ``whiten: false``) ``O diag(lam) O^T`` with lam log-spaced from sqrt(c) to 1/sqrt(c)
along a random basis O (paper S.I.1's non-whitened inputs). With ``whiten`` the P training inputs are
transformed by the inverse square root of their empirical covariance. **Test loss is exact**: the
population loss against the clean teacher, ``test_loss = 1/2 tr(Delta Sigma_x Delta^T)``, Delta =
wbar - T, so a perfect student scores 0; ``test_loss_noisy`` = test_loss + 1/2 N noise_std^2 is the
expected loss on fresh noisy targets. ``train_loss`` is against the noisy training targets.

Convergence. L* = the train loss of the least-squares map ``target_map`` (0 when P = N, whitened).
``excess_train_loss`` = (L - L*) / (L(0) - L*); the first step where it is <= ``converge_tol`` ends the
trial with ``converged: true`` (evaluated there); a trial that reaches ``steps`` first ends with
``converged: false``. The early-stopping point is the step (any step, not only evaluations) of
minimum ``test_loss``; ``rescaled_time`` = eta_bar * final step, eta_bar = lr * d^(1 - 1/q) (eq 17).

Metrics per evaluation: the common ones (``train_loss``, ``test_loss``, ``weight_norm[.l{i}]``,
``conservation_drift[.l{i}]``, ``update_norm`` = ||lr * D|| of the last step, ``clipped_updates``),
``excess_train_loss``, ``test_loss_noisy`` and ``signal_mode.k{k}`` / ``noise_mode`` / ``norm_excess``
(see ``trainers.diagnostics.teacher_modes`` and ``norm_excess``), ``signal_fit`` / ``noise_fit`` (the
fitted fraction of the training target's signal and noise modes, Fig 4D: ``diagnostics.target_fit``). The trial ends ``diverged`` at the
first step whose loss or weights are not finite or whose weight norm exceeds ``max_weight_norm``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from trainers import flush_denormals, resolve_device
from trainers.config import LinearTeacherConfig, OptimizerConfig, check_speed_modes, config_from_dict
from trainers import diagnostics as diag

__all__ = ["LinearTeacherConfig", "TeacherTask", "make_task", "init_student", "run"]

DTYPE = torch.float64


@dataclass
class TeacherTask:
    teacher: torch.Tensor      # T, N x N, rank r
    u: torch.Tensor            # U_r, N x r
    v: torch.Tensor            # V_r, N x r
    x_train: torch.Tensor      # N x P
    y_train: torch.Tensor      # N x P (noisy)
    sigma_x: torch.Tensor      # empirical E[x x^T] of the training inputs
    target_map: torch.Tensor   # wbar* = E[y x^T] Sigma_x^+ (what the training loss pulls wbar to)
    sigma_pop: torch.Tensor    # population covariance of the inputs (identity unless input_cov_cond > 1)
    sigma_pop_half: torch.Tensor  # its symmetric square root


def population_covariance(cfg: LinearTeacherConfig, gen: torch.Generator) -> torch.Tensor:
    """Sigma_x of the input population: ``O diag(lam) O^T`` with eigenvalues log-spaced from
    sqrt(cond) down to 1/sqrt(cond) (geometric mean 1; cond = ``input_cov_cond``) along a Haar-random
    basis O drawn from the seed; exactly the identity (no draw) when cond = 1."""
    n = cfg.width
    if cfg.input_cov_cond == 1:
        return torch.eye(n, dtype=DTYPE)
    basis = _orthogonal(n, n, gen)
    lam = cfg.input_cov_cond ** (0.5 - torch.arange(n, dtype=DTYPE) / max(n - 1, 1))
    return basis @ torch.diag(lam) @ basis.T


def _orthogonal(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """n x m with orthonormal columns (n >= m) or rows, Haar-distributed (QR with sign fix)."""
    a = torch.randn(max(n, m), min(n, m), generator=gen, dtype=DTYPE)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    return q if n >= m else q.T


def make_task(cfg: LinearTeacherConfig, gen: torch.Generator) -> TeacherTask:
    n, p = cfg.width, cfg.train_samples
    u, v = _orthogonal(n, cfg.rank, gen), _orthogonal(n, cfg.rank, gen)
    teacher = u @ torch.diag(torch.tensor(cfg.teacher_singular_values, dtype=DTYPE)) @ v.T
    sigma_pop = population_covariance(cfg, gen)
    evals, evecs = torch.linalg.eigh(sigma_pop)
    half = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    x = torch.randn(n, p, generator=gen, dtype=DTYPE)
    if cfg.input_cov_cond != 1:
        x = half @ x
    if cfg.whiten:
        evals, evecs = torch.linalg.eigh(x @ x.T / p)
        x = evecs @ torch.diag(evals.rsqrt()) @ evecs.T @ x
    y = teacher @ x + cfg.noise_std * torch.randn(n, p, generator=gen, dtype=DTYPE)
    sigma_x = x @ x.T / p
    target_map = (y @ x.T / p) @ torch.linalg.pinv(sigma_x, hermitian=True)
    return TeacherTask(teacher, u, v, x, y, sigma_x, target_map, sigma_pop, half)


def init_student(cfg: LinearTeacherConfig, gen: torch.Generator) -> list[torch.Tensor]:
    n, d = cfg.width, cfg.depth
    if cfg.init == "gaussian":
        first = cfg.gain * torch.randn(n, n, generator=gen, dtype=DTYPE) / math.sqrt(n)
        rest = [cfg.gain * torch.randn(n, n, generator=gen, dtype=DTYPE) / math.sqrt(n) for _ in range(d - 1)]
    else:
        first = cfg.gain * _orthogonal(n, n, gen)
        rest = [cfg.gain * _orthogonal(n, n, gen) for _ in range(d - 1)]
    if not cfg.balanced:
        return [first, *rest]
    # Exactly balanced: every layer carries the singular values S of the first draw, neighbours'
    # singular vectors aligned through random rotations O_i: w_1 = O_1 S V^T, w_i = O_i S O_(i-1)^T,
    # w_d = U S O_(d-1)^T, so w_(i+1)^T w_(i+1) = O_i S^2 O_i^T = w_i w_i^T.
    u, s, vh = torch.linalg.svd(first)
    rots = [_orthogonal(n, n, gen) for _ in range(d - 1)] + [u]
    left = [vh.T] + rots[:-1]
    return [rots[i] @ torch.diag(s) @ left[i].T for i in range(d)]


def _product(weights: list[torch.Tensor]) -> torch.Tensor:
    wbar = weights[0]
    for w in weights[1:]:
        wbar = w @ wbar
    return wbar


def run(config: Mapping) -> Iterator[dict]:
    """Validate ``config`` now; return the generator of records (Contract 2)."""
    cfg = config_from_dict(LinearTeacherConfig, config["trainer"], "trainer")
    opt = OptimizerConfig.from_dict(config.get("optimizer"))
    check_speed_modes("linear_teacher", opt)
    device = resolve_device(config.get("device", "auto"))
    seed = int(config.get("seed", 0))
    from trainers.curvature import clip_update, natural_direction  # the update rules (issue 2)

    return _train(cfg, opt, device, seed, natural_direction, clip_update)


def _train(cfg, opt, device, seed, natural_direction, clip_update) -> Iterator[dict]:
    with flush_denormals():
        yield from _steps(cfg, opt, device, seed, natural_direction, clip_update)


def _steps(cfg, opt, device, seed, natural_direction, clip_update) -> Iterator[dict]:
    gen = torch.Generator().manual_seed(seed)
    task = make_task(cfg, gen)
    weights = init_student(cfg, gen)
    task = TeacherTask(*(t.to(device) for t in vars(task).values()))
    weights = [w.to(device) for w in weights]
    sigma_x = None if cfg.whiten else task.sigma_x  # whitened: exactly the identity by construction
    pop_half = None if cfg.input_cov_cond == 1 else task.sigma_pop_half
    noise_floor = 0.5 * cfg.width * cfg.noise_std ** 2  # E 1/2 ||z||^2 of a fresh noisy target

    def loss(wbar, x, y):
        return float(0.5 * (wbar @ x - y).square().sum(0).mean())

    target_u, target_s, target_vh = torch.linalg.svd(task.target_map)  # its modes: signal_fit / noise_fit
    min_train_loss = loss(task.target_map, task.x_train, task.y_train)  # L*, the least-squares map's
    initial_train_loss = loss(_product(weights), task.x_train, task.y_train)
    schedule = diag.EvalSchedule(cfg.steps, cfg.eval_every, cfg.log_eval)
    tracker = diag.SummaryTracker()
    c_init = diag.conservation_linear(weights)
    eta_bar = opt.lr * cfg.depth ** (1.0 - 1.0 / opt.q)  # the paper's depth-calibrated rate (eq 17)
    clipped, update_norm = 0, 0.0
    converged = None if cfg.converge_tol is None else False

    def summary(step, **kw):
        rec = tracker.summary(step, clipped_updates=clipped, converged=converged, **kw)
        rec["metrics"]["rescaled_time"] = eta_bar * step
        return rec

    for step in range(cfg.steps + 1):
        wbar = _product(weights)
        train_loss = loss(wbar, task.x_train, task.y_train)
        test_loss = diag.population_loss(wbar - task.teacher, pop_half)
        tracker.test_loss_at(step, test_loss)  # the early-stopping point, resolved to the step
        excess = diag.excess_train_loss(train_loss, min_train_loss, initial_train_loss)
        if cfg.converge_tol is not None and excess <= cfg.converge_tol:
            converged = True
        if step in schedule or converged:  # the schedule holds the last step too
            norms = diag.weight_norms(weights)
            reason = diag.divergence_reason(train_loss, norms["weight_norm"], cfg.max_weight_norm)
            if reason:
                yield summary(step, diverged_reason=reason)
                return
            squared = sum(float(w.square().sum()) for w in weights)
            metrics = {"train_loss": train_loss, "excess_train_loss": excess, "test_loss": test_loss,
                       "test_loss_noisy": test_loss + noise_floor, **norms,
                       **diag.conservation_drift(diag.conservation_linear(weights), c_init, squared),
                       "update_norm": update_norm, "clipped_updates": clipped,
                       **diag.teacher_modes(wbar, task.u, task.v),
                       **diag.target_fit(wbar, target_u, target_s, target_vh.T, cfg.rank),
                       "norm_excess": diag.norm_excess(weights, wbar)}
            yield tracker.eval(step, metrics)
        else:
            norm = sum(float(torch.linalg.matrix_norm(w)) for w in weights)
            reason = diag.divergence_reason(train_loss, norm, cfg.max_weight_norm)
            if reason:
                yield summary(step, diverged_reason=reason)
                return
        if step == cfg.steps or converged:
            yield summary(step)
            return
        try:
            directions = natural_direction(weights, wbar - task.target_map, q=opt.q, structure=opt.structure,
                                           damping=opt.damping, sigma_x=sigma_x, rtol=opt.rtol,
                                           damping_form=opt.damping_form)
        except (RuntimeError, ArithmeticError) as e:  # CurvatureOverflowError, a failing eigensolver
            yield summary(step, diverged_reason=f"update rule failed: {e}")
            return
        if opt.clip is not None:
            directions, was_clipped = clip_update(directions, opt.lr, opt.clip)
            clipped += int(was_clipped)
        weights = [w - opt.lr * dw for w, dw in zip(weights, directions)]
        update_norm = opt.lr * diag.flat_norm(directions)
