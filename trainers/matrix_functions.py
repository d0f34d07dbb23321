"""Pure linear algebra for curvature corrections: fractional powers of PSD matrices.

Knows nothing about training. Every rule of the family is ``f(H) g`` with the spectral function

    f(lam) = (lam + damping) ** (-1/q)             (damping > 0, Levenberg-Marquardt)
    f(lam) = lam ** (-1/q) if lam > rtol * lam_max else 0   (damping == 0, Moore-Penrose)

and ``f = 1`` for ``q = inf`` (plain gradient). With no damping the null space is dropped, never
inverted. The default ``rtol`` is ``n * eps(dtype)`` for an ``n x n`` operator decomposed in ``dtype``
(float64 unless a caller opts into float32), i.e. what ``torch.linalg.matrix_rank`` uses.

Why float64 and trace normalisation: at an initial gain of 1e-6 the curvature of a 4-layer net is
~1e-36, below float32's normal range, and float32 ``eigh`` then fails or returns garbage. Every
decomposition here therefore runs on the matrix divided by its trace (the scale is folded back into
the eigenvalues) in ``COMPUTE_DTYPE``, and retries in float64 if a lower precision was asked for
and LAPACK fails to converge.
"""

from __future__ import annotations

import math
import warnings

import torch

COMPUTE_DTYPE = torch.float64


class CurvatureOverflowError(FloatingPointError):
    """The corrected direction is not finite (e.g. q=1 NGD at tiny weights without damping)."""


class ExplodingUpdateWarning(RuntimeWarning):
    """The corrected direction is enormous compared with the residual it corrects."""


def validate_rule(q, damping, rtol) -> float:
    """Check the family's settings before any work; return q as a float."""
    try:
        q = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"optimizer.q must be a number >= 1 or inf, got {q!r}") from None
    if math.isnan(q) or q < 1.0:
        raise ValueError(f"optimizer.q must be >= 1 (q=1 NGD, q=2 sqrtNGD) or inf (SGD), got {q!r}")
    if damping is None or not math.isfinite(float(damping)) or float(damping) < 0:
        raise ValueError(f"optimizer.damping must be a finite number >= 0, got {damping!r}")
    if rtol is not None and (not math.isfinite(float(rtol)) or float(rtol) < 0):
        raise ValueError(f"optimizer.rtol must be null or a finite number >= 0, got {rtol!r}")
    return q


def default_rtol(n: int, dtype: torch.dtype = COMPUTE_DTYPE) -> float:
    """Moore-Penrose cut-off relative to the largest eigenvalue, as torch.linalg.matrix_rank's."""
    return max(int(n), 1) * torch.finfo(dtype).eps


def depth_scale(q: float, d: int) -> float:
    """The block rule's 1/d^(1/q) (paper eq 19, 21); 1 for q = inf."""
    return 1.0 if math.isinf(q) else float(d) ** (-1.0 / q)


def eigh_psd(mat: torch.Tensor, *, dtype: torch.dtype = COMPUTE_DTYPE, scale=None):
    """Eigen-decomposition of a symmetric PSD matrix at any scale.

    Returns ``(evals, evecs)``: evals ascending, clamped at 0, always float64 (so tiny scales never
    underflow); evecs in ``dtype``. The matrix is divided by its trace before ``eigh`` (the scale goes
    back into evals) so 1e-36 matrices work; ``scale`` says the matrix was already divided by it. A
    LAPACK failure in a lower precision is retried in float64.
    """
    m = mat.to(dtype)
    m = 0.5 * (m + m.mT)
    n = m.shape[-1]
    trace = m.diagonal().abs().sum()
    if not torch.isfinite(trace):
        raise CurvatureOverflowError(
            "curvature matrix has NaN/Inf entries: the weights or inputs are not finite "
            "(the run has diverged; lower optimizer.lr, set optimizer.clip, or add optimizer.damping)")
    if trace == 0:
        return torch.zeros(n, dtype=torch.float64, device=m.device), torch.eye(n, dtype=dtype, device=m.device)
    try:
        evals, evecs = torch.linalg.eigh(m / trace)
    except torch.linalg.LinAlgError:
        if dtype == torch.float64:
            raise CurvatureOverflowError("eigh failed on the curvature matrix (NaN/Inf inside?)") from None
        evals, evecs = torch.linalg.eigh((m / trace).to(torch.float64))
        evecs = evecs.to(dtype)
    total = trace.to(torch.float64) * (1.0 if scale is None else float(scale))
    return evals.to(torch.float64).clamp_min(0) * total, evecs


def spectral_factor(evals: torch.Tensor, q: float, damping: float, rtol: float) -> torch.Tensor:
    """f(lam) of the module docstring, elementwise (any shape; lam_max over all entries)."""
    if math.isinf(q):
        return torch.ones_like(evals)
    evals = evals.clamp_min(0)
    if damping > 0:
        return _neg_root(evals + damping, q)
    lam_max = evals.max() if evals.numel() else evals.new_zeros(())
    keep = evals > rtol * lam_max
    safe = torch.where(keep, evals, torch.ones_like(evals))
    return _neg_root(safe, q) * keep


def _neg_root(x: torch.Tensor, q: float) -> torch.Tensor:
    """x^(-1/q); the common q = 1, 2 without the (slower) general pow."""
    if q == 1.0:
        return x.reciprocal()
    if q == 2.0:
        return x.rsqrt()
    return x ** (-1.0 / q)


def psd_power_apply(mat: torch.Tensor, rhs: torch.Tensor, q: float, damping: float = 0.0,
                    rtol: float | None = None, *, dtype: torch.dtype = COMPUTE_DTYPE,
                    scale=None) -> torch.Tensor:
    """``f(mat) @ rhs`` for a symmetric PSD ``mat`` (n x n) and ``rhs`` (n or n x k), in ``dtype``.

    ``scale``: the true matrix is ``scale * mat`` (lets callers pass a normalised matrix).
    """
    if math.isinf(q):
        return rhs.to(dtype)
    n = mat.shape[-1]
    rtol = default_rtol(n, dtype) if rtol is None else rtol
    evals, evecs = eigh_psd(mat, dtype=dtype, scale=scale)
    f = spectral_factor(evals, q, damping, rtol)
    coef = (evecs.mT @ rhs.to(dtype)).to(torch.float64)
    coef = coef * (f if coef.dim() == 1 else f[:, None])
    return evecs @ coef.to(dtype)


def kron_power_apply(left, right, g: torch.Tensor, q: float, damping: float = 0.0,
                     rtol: float | None = None) -> torch.Tensor:
    """``f(L (x) R)`` applied to the matrix ``g`` as the operator ``g -> L g R``, without forming it.

    ``left = (mu, U_L)`` and ``right = (lam, U_R)`` are eigen-decompositions of the two PSD factors
    (``U_R`` may be thin, i.e. span only the factor's range, when ``g``'s rows lie in that range).
    Returns ``U_L [(U_L^T g U_R) * F] U_R^T`` with ``F_ba = f(mu_b lam_a)``; with no damping the
    products ``<= rtol * max product`` are dropped (default rtol: max factor size * eps(evecs dtype)).
    Eigenvalues and F stay float64, so factors of 1e-36 each never underflow.
    """
    (mu, u_left), (lam, u_right) = left, right
    dtype = u_left.dtype
    if rtol is None:
        rtol = default_rtol(max(u_left.shape[0], u_right.shape[0]), dtype)
    gd = g.to(dtype)
    if math.isinf(q):
        return gd
    f = spectral_factor(mu[:, None] * lam[None, :], q, damping, rtol)
    core = u_left.mT @ (gd @ u_right) if u_right.shape[1] < u_right.shape[0] else (u_left.mT @ gd) @ u_right
    core = (core.to(torch.float64) * f).to(dtype)
    return (u_left @ core) @ u_right.mT


def finish_directions(directions, *, out_dtype, residual_norm: float, q: float, damping: float,
                      what: str = "direction"):
    """Cast back to the caller's dtype; refuse NaN/Inf; warn when the update speed explodes.

    The warning threshold is |D| > |residual| / sqrt(eps(out_dtype)): q-NGD's speed scales as
    |residual| * |J|^(1 - 2/q), which explodes for q < 2 at small weights (paper section 3, S.I.3).
    """
    out = [dd.to(out_dtype) for dd in directions]
    norm = math.sqrt(sum(float(dd.double().square().sum()) for dd in out))   # NaN/Inf propagate
    if not math.isfinite(norm):
        hint = ("set optimizer.damping > 0 (paper S.I.3 used 1e-3..1e-7 for NGD-d)" if damping == 0
                else "increase optimizer.damping")
        raise CurvatureOverflowError(
            f"the q={q:g} {what} is not finite in {out_dtype}: the curvature is too small to invert "
            f"at this weight scale; {hint}, or use q >= 2 (sqrtNGD stays finite at tiny weights)")
    if damping == 0 and not math.isinf(q) and residual_norm > 0:
        limit = residual_norm / math.sqrt(torch.finfo(out_dtype).eps)
        if norm > limit:
            # a constant text, so Python's default filter shows it once per call site, not every step
            warnings.warn(
                f"the q={q:g} {what} is over 1/sqrt(eps) times the residual: the update speed explodes "
                f"at small weights without damping; set optimizer.damping > 0 and/or optimizer.clip",
                ExplodingUpdateWarning, stacklevel=3)
    return out
