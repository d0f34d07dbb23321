"""Diagnostics shared by both trainers: weight norms, conservation-law drift, divergence, the summary.

Why here: the metric names below are the contract the sweep, the report and users rely on (issue 3 §3–§4,
docs/DESIGN.md Contract 2); one module computes each of them once, for both trainers.

Conservation law (paper §3.1, Theorem 1). Every full-structure update rule (SGD, NGD, q-NGD) keeps
``c_i = w_(i+1)^T w_(i+1) - w_i w_i^T`` constant in continuous time for a deep linear net; for a ReLU
net the symmetry is a per-neuron rescaling, so only ``c_i[j] = ||w_(i+1)[:, j]||^2 - ||w_i[j, :]||^2
- b_i[j]^2`` is conserved. ``conservation_drift = max_i ||c_i(t) - c_i(0)||_F / sum_i ||w_i(t)||_F^2``
is scale-free, so trials at different gains compare.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

__all__ = [
    "weight_norms", "conservation_linear", "conservation_relu", "conservation_drift", "norm_excess",
    "relu_norm_excess", "min_rescaled_sq_norm", "population_loss", "excess_train_loss", "teacher_modes",
    "divergence_reason", "flat_norm", "EvalSchedule", "SummaryTracker",
]


def weight_norms(weights: Sequence[torch.Tensor]) -> dict[str, float]:
    """``weight_norm`` = sum_i ||w_i||_F and ``weight_norm.l{i}`` (layers from 1)."""
    per_layer = [float(torch.linalg.matrix_norm(w)) for w in weights]
    out = {"weight_norm": sum(per_layer)}
    out.update({f"weight_norm.l{i}": n for i, n in enumerate(per_layer, start=1)})
    return out


def conservation_linear(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``c_i = w_(i+1)^T w_(i+1) - w_i w_i^T`` for each adjacent pair (i = 1 .. d-1)."""
    return [weights[i + 1].T @ weights[i + 1] - weights[i] @ weights[i].T for i in range(len(weights) - 1)]


def conservation_relu(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per hidden neuron j of layer i: ``||w_(i+1)[:, j]||^2 - ||w_i[j, :]||^2 - b_i[j]^2``."""
    out = []
    for i in range(len(weights) - 1):
        c = weights[i + 1].square().sum(0) - weights[i].square().sum(1)
        if biases[i] is not None:
            c = c - biases[i].square()
        out.append(c)
    return out


def conservation_drift(c_now: Sequence[torch.Tensor], c_init: Sequence[torch.Tensor],
                       squared_norm: float) -> dict[str, float]:
    """``conservation_drift`` (max over pairs) and ``conservation_drift.l{i}``, each divided by
    ``squared_norm`` = sum_i ||w_i(t)||_F^2 (plus the biases' squares for a ReLU net)."""
    per_pair = [float(torch.linalg.vector_norm(a - b)) / squared_norm for a, b in zip(c_now, c_init)]
    out = {"conservation_drift": max(per_pair, default=0.0)}
    out.update({f"conservation_drift.l{i}": v for i, v in enumerate(per_pair, start=1)})
    return out


def norm_excess(weights: Sequence[torch.Tensor], wbar: torch.Tensor) -> float:
    """Weight-norm divergence of a deep linear net (paper §5, Fig 3A/5): sum_i ||w_i||_F^2 over its minimum
    across every factorisation of the same map ``wbar``, d * sum_k sigma_k(wbar)^(2/d) (reached by the
    balanced factorisation, each layer carrying sigma_k^(1/d) on mode k). 1 = balanced, larger = excess
    norm in directions that do not change the map. Needs every hidden width >= rank(wbar)."""
    d = len(weights)
    s = torch.linalg.svdvals(wbar.double())
    denom = d * float((s ** (2.0 / d)).sum())
    total = sum(float(w.double().square().sum()) for w in weights)
    return total / denom if denom > 0 else math.inf


def min_rescaled_sq_norm(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                         *, tol: float = 1e-13, max_iter: int = 200) -> float:
    """Exact minimum of ``sum_i ||W_i||_F^2 + sum_hidden ||b_i||^2`` over the per-neuron positive
    rescalings of a ReLU MLP that leave its function unchanged: hidden neuron j of layer i scaled by
    a = exp(u_ij) multiplies row j of W_i and b_i[j] by a and column j of W_(i+1) by 1/a.

    Why exact and cheap: in log-scales u the objective is a sum of exponentials of linear functions
    of u, sum S_i[j,k] exp(2 u_ij - 2 u_(i-1)k) + b_i[j]^2 exp(2 u_ij) (u_0 = u_L = 0), hence convex;
    Newton's method with a backtracking line search on its dense (sum of hidden widths)^2 Hessian
    converges quadratically. The output bias does not rescale and is left out. At the minimum
    every hidden neuron is balanced (incoming norm^2 + bias^2 = outgoing norm^2: conservation_relu = 0).
    """
    sq = [w.detach().double().square() for w in weights]
    bsq = [(torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if b is None
            else b.detach().double().square()) for w, b in zip(weights[:-1], biases[:-1])]
    scale = float(sum(s.sum() for s in sq) + sum(b.sum() for b in bsq))
    if scale == 0 or not math.isfinite(scale):
        return scale
    sq, bsq = [s / scale for s in sq], [b / scale for b in bsq]
    sizes = [s.shape[0] for s in sq[:-1]]
    n = sum(sizes)
    if n == 0:
        return scale
    offs = [0]
    for k in sizes:
        offs.append(offs[-1] + k)
    dev = sq[0].device

    def split(u):
        zero_in = torch.zeros(sq[0].shape[1], dtype=torch.float64, device=dev)
        zero_out = torch.zeros(sq[-1].shape[0], dtype=torch.float64, device=dev)
        return [zero_in] + [u[offs[i]:offs[i + 1]] for i in range(len(sizes))] + [zero_out]

    def terms(u):
        us = split(u)
        mats = [s * torch.exp(2 * us[i + 1][:, None] - 2 * us[i][None, :]) for i, s in enumerate(sq)]
        bias = [b * torch.exp(2 * us[i + 1]) for i, b in enumerate(bsq)]
        return mats, bias

    def value(u):
        mats, bias = terms(u)
        return float(sum(m.sum() for m in mats) + sum(b.sum() for b in bias))

    u = torch.zeros(n, dtype=torch.float64, device=dev)
    f = value(u)
    for _ in range(max_iter):
        mats, bias = terms(u)
        grad = torch.zeros(n, dtype=torch.float64, device=dev)
        hess = torch.zeros(n, n, dtype=torch.float64, device=dev)
        for i in range(len(sizes)):  # hidden layer i+1 (1-based): rows of W_(i+1), columns of W_(i+2)
            lo, hi = offs[i], offs[i + 1]
            out_in = mats[i].sum(1) + bias[i]          # incoming weights and bias of each neuron
            in_out = mats[i + 1].sum(0)               # outgoing weights
            grad[lo:hi] = 2 * (out_in - in_out)
            hess[lo:hi, lo:hi] += torch.diag(4 * (out_in + in_out))
        for i in range(1, len(sizes)):  # coupling of hidden layers i and i+1 through W_(i+1)
            lo, hi, plo, phi = offs[i], offs[i + 1], offs[i - 1], offs[i]
            hess[lo:hi, plo:phi] -= 4 * mats[i]
            hess[plo:phi, lo:hi] -= 4 * mats[i].T
        ridge = 1e-14 * float(hess.diagonal().max())
        step = -torch.linalg.solve(hess + ridge * torch.eye(n, dtype=torch.float64, device=dev), grad)
        decrement = -float(grad @ step)
        if decrement <= tol * f:
            break
        t = 1.0
        while t > 1e-12:
            f_new = value(u + t * step)
            if f_new <= f - 0.25 * t * decrement:
                break
            t *= 0.5
        u, f = u + t * step, f_new
    return f * scale


def relu_norm_excess(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> float:
    """Weight-norm divergence of a ReLU MLP, the analogue of :func:`norm_excess` over the per-neuron
    rescaling symmetry: ``(sum_i ||W_i||^2 + sum_hidden ||b_i||^2) / min_rescaled_sq_norm``; 1 when
    every hidden neuron is balanced, larger when norm sits in rescalings that do not change the function."""
    total = sum(float(w.detach().double().square().sum()) for w in weights)
    total += sum(float(b.detach().double().square().sum()) for b in biases[:-1] if b is not None)
    minimum = min_rescaled_sq_norm(weights, biases)
    return total / minimum if minimum > 0 else math.inf


def population_loss(delta: torch.Tensor, sigma_half: torch.Tensor | None = None) -> float:
    """``1/2 tr(Delta Sigma Delta^T)`` = 1/2 E_x ||Delta x||^2 for x with covariance Sigma, given
    ``sigma_half`` = Sigma^(1/2) (None = identity): the exact expected loss of the map error Delta."""
    d = delta.double() if sigma_half is None else delta.double() @ sigma_half.double()
    return 0.5 * float(d.square().sum())


def excess_train_loss(train_loss: float, min_loss: float, initial_loss: float) -> float:
    """Convergence measure: (L - L*) / (L(0) - L*), L* the minimum of the training loss (the
    interpolating / least-squares map). 0 at the minimum, 1 at the start, scale-free."""
    gap = initial_loss - min_loss
    return (train_loss - min_loss) / gap if gap > 0 else 0.0


def teacher_modes(wbar: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Signal and noise in the student map, relative to the teacher's rank-r SVD ``U_r S V_r^T``.

    ``signal_mode.k{k}`` = u_k^T wbar v_k (k from 1, strongest teacher mode first). ``noise_mode`` = the
    largest singular value of wbar with its signal block removed, wbar - U_r (U_r^T wbar V_r) V_r^T:
    everything the student maps that the teacher's rank-r structure does not explain.
    """
    wbar, u, v = wbar.double(), u.double(), v.double()
    block = u.T @ wbar @ v
    out = {f"signal_mode.k{k}": float(block[k - 1, k - 1]) for k in range(1, u.shape[1] + 1)}
    out["noise_mode"] = float(torch.linalg.matrix_norm(wbar - u @ block @ v.T, ord=2))
    return out


def target_fit(wbar: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, rank: int) -> dict[str, float]:
    """How much of the training target the student map has fitted, mode by mode (paper Fig 4A, D): with
    ``U S V^T`` the SVD of the least-squares target map, mode k is fitted by ``u_k^T wbar v_k / s_k``
    (0 at a small start, 1 when learnt). ``signal_fit`` = the weakest of the first ``rank`` (signal)
    modes, ``noise_fit`` = the mean over the rest (the noise dimensions, s_k > 0)."""
    fit = torch.einsum("ik,ij,jk->k", u.double(), wbar.double(), v.double()) / s.double()
    noise = fit[rank:][s[rank:] > s[0] * 1e-12]
    return {"signal_fit": float(fit[:rank].min()), "noise_fit": float(noise.mean()) if len(noise) else math.nan}


def flat_norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(t.double().square().sum() for t in tensors)))


def divergence_reason(loss: float, weight_norm: float, max_weight_norm: float) -> str | None:
    """Why a trial must stop as diverged, or None. A NaN anywhere in the weights makes their norm NaN."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(weight_norm):
        return f"weight_norm is {weight_norm}"
    if weight_norm > max_weight_norm:
        return f"weight_norm {weight_norm:.4g} > max_weight_norm {max_weight_norm:.4g}"
    return None


class EvalSchedule:
    """Steps at which a trainer evaluates: 0, every ``eval_every`` steps, the last step and, with
    ``log_eval``, also 20 log-spaced steps per decade (the dynamics of interest span decades)."""

    PER_DECADE = 20

    def __init__(self, steps: int, eval_every: int, log_eval: bool):
        points = set(range(0, steps + 1, eval_every)) | {steps}
        if log_eval and steps > 0:
            n = int(math.ceil(math.log10(steps) * self.PER_DECADE)) + 1
            points |= {int(round(10 ** (k / self.PER_DECADE))) for k in range(n)}
        self.steps = sorted(p for p in points if 0 <= p <= steps)
        self._set = set(self.steps)

    def __contains__(self, step: int) -> bool:
        return step in self._set


class SummaryTracker:
    """Folds eval records into the summary record (Contract 2). The trainer calls ``eval`` at each
    evaluation, optionally ``test_loss_at`` at every step (then the early-stopping point is resolved
    to the step), and ``summary`` once at the end (also after a divergence).

    Early-stopping point: the step with the lowest ``test_loss`` among the steps the trainer scored
    (every step for the linear teacher, every evaluation for the MLP); ties go to the earliest."""

    def __init__(self):
        self.start = time.perf_counter()
        self.initial_weight_norm: float | None = None
        self.last: dict[str, float] = {}
        self.best_step: int | None = None
        self.best_test_loss = math.inf
        self.max_drift = 0.0
        self.clipped = 0

    def test_loss_at(self, step: int, test_loss: float) -> None:
        if math.isfinite(test_loss) and test_loss < self.best_test_loss:
            self.best_step, self.best_test_loss = step, test_loss

    def eval(self, step: int, metrics: dict[str, float]) -> dict:
        if self.initial_weight_norm is None:
            self.initial_weight_norm = metrics["weight_norm"]
        self.test_loss_at(step, metrics.get("test_loss", math.nan))
        drift = metrics.get("conservation_drift", 0.0)
        if math.isfinite(drift):
            self.max_drift = max(self.max_drift, drift)
        self.clipped = int(metrics.get("clipped_updates", self.clipped))
        self.last = metrics
        return {"kind": "eval", "step": step, "metrics": metrics}

    def summary(self, step: int, *, clipped_updates: int, diverged_reason: str | None = None,
                steps_done: int | None = None, weight_norm: float | None = None,
                converged: bool | None = None) -> dict:
        """``converged``: True/False when the trainer applies a convergence criterion (None: it does
        not, the budget alone ended the trial); a diverged trial is never converged."""
        elapsed = time.perf_counter() - self.start
        steps_done = step if steps_done is None else steps_done
        final_norm = self.last.get("weight_norm", math.nan) if weight_norm is None else weight_norm
        init = self.initial_weight_norm
        diverged = diverged_reason is not None
        if diverged and converged is not None:
            converged = False
        metrics = {
            "early_stop_step": self.best_step,
            "early_stop_test_loss": self.best_test_loss if self.best_step is not None else math.nan,
            "final_train_loss": self.last.get("train_loss", math.nan),
            "final_test_loss": self.last.get("test_loss", math.nan),
            "final_norm_excess": self.last.get("norm_excess", math.nan),
            "weight_norm_growth": final_norm / init if init else math.nan,
            "max_conservation_drift": self.max_drift,
            "steps_per_second": steps_done / elapsed if elapsed > 0 else math.nan,
            "clipped_updates": clipped_updates,
        }
        if converged is not None:
            metrics["converged"] = 1.0 if converged else 0.0
        return {"kind": "summary", "status": "diverged" if diverged else "finished", "step": step,
                "metrics": metrics, "diverged_step": step if diverged else None, "reason": diverged_reason,
                "converged": converged}
