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
    "teacher_modes", "divergence_reason", "flat_norm", "EvalSchedule", "SummaryTracker",
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
    """sum_i ||w_i||_F^2 / (d * sum_k sigma_k(wbar)^(2/d)): 1 for the balanced minimum-norm factorisation
    of the same map (each layer then carries sigma_k^(1/d) on mode k), larger for any other."""
    d = len(weights)
    s = torch.linalg.svdvals(wbar.double())
    denom = d * float((s ** (2.0 / d)).sum())
    total = sum(float(w.double().square().sum()) for w in weights)
    return total / denom if denom > 0 else math.inf


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
    evaluation and ``summary`` once at the end (also after a divergence)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.initial_weight_norm: float | None = None
        self.last: dict[str, float] = {}
        self.best_step: int | None = None
        self.best_test_loss = math.inf
        self.max_drift = 0.0
        self.clipped = 0

    def eval(self, step: int, metrics: dict[str, float]) -> dict:
        if self.initial_weight_norm is None:
            self.initial_weight_norm = metrics["weight_norm"]
        test_loss = metrics.get("test_loss", math.nan)
        if math.isfinite(test_loss) and test_loss < self.best_test_loss:
            self.best_step, self.best_test_loss = step, test_loss
        drift = metrics.get("conservation_drift", 0.0)
        if math.isfinite(drift):
            self.max_drift = max(self.max_drift, drift)
        self.clipped = int(metrics.get("clipped_updates", self.clipped))
        self.last = metrics
        return {"kind": "eval", "step": step, "metrics": metrics}

    def summary(self, step: int, *, clipped_updates: int, diverged_reason: str | None = None,
                steps_done: int | None = None, weight_norm: float | None = None) -> dict:
        elapsed = time.perf_counter() - self.start
        steps_done = step if steps_done is None else steps_done
        final_norm = self.last.get("weight_norm", math.nan) if weight_norm is None else weight_norm
        init = self.initial_weight_norm
        metrics = {
            "early_stop_step": self.best_step,
            "early_stop_test_loss": self.best_test_loss if self.best_step is not None else math.nan,
            "final_train_loss": self.last.get("train_loss", math.nan),
            "final_test_loss": self.last.get("test_loss", math.nan),
            "weight_norm_growth": final_norm / init if init else math.nan,
            "max_conservation_drift": self.max_drift,
            "steps_per_second": steps_done / elapsed if elapsed > 0 else math.nan,
            "clipped_updates": clipped_updates,
        }
        diverged = diverged_reason is not None
        return {"kind": "summary", "status": "diverged" if diverged else "finished", "step": step,
                "metrics": metrics, "diverged_step": step if diverged else None, "reason": diverged_reason}
