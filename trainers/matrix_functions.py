"""Pure linear algebra for curvature corrections: fractional powers of PSD matrices.

Knows nothing about training. Every rule of the family is ``f(H) g`` with the spectral function

    f(lam) = (lam + damping) ** (-1/q)             (damping > 0, form "lm": Levenberg-Marquardt;
                                                    -> 0 as damping -> inf)
    f(lam) = ((1 + damping) / (lam + damping)) ** (1/q)   (damping > 0, form "interpolate": paper
                                                    S.I.2's (eps+1)(eps I + H+)^-1 for q = 1;
                                                    -> 1, i.e. SGD, as damping -> inf)
    f(lam) = lam ** (-1/q) if lam > rtol * lam_max else 0   (damping == 0, Moore-Penrose, either form)

and ``f = 1`` for ``q = inf`` (plain gradient). With no damping the null space is dropped, never
inverted. The default ``rtol`` is ``n * eps(dtype)`` for an ``n x n`` operator decomposed in ``dtype``
(float64 unless a caller opts into float32), i.e. what ``torch.linalg.matrix_rank`` uses.

Why float64 and trace normalisation: at an initial gain of 1e-6 the curvature of a 4-layer net is
~1e-36, below float32's normal range, and float32 ``eigh`` then fails or returns garbage. Every
decomposition here therefore runs on the matrix divided by its trace (the scale is folded back into
the eigenvalues) in ``COMPUTE_DTYPE``, and retries in float64 if a lower precision was asked for
and LAPACK fails to converge.

Trace normalisation does not help when a matrix is a *sum* of terms whose scales differ by more than
1e16: the small ones are lost in the sum. ``graded_power_apply`` takes such a sum term by term.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

COMPUTE_DTYPE = torch.float64
DAMPING_FORMS = ("lm", "interpolate")


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


def mixed_eigh_psd(mat: torch.Tensor, *, cond_max: float, damping: float = 0.0, rtol: float = 0.0,
                   cut: float = 0.0, scale=None):
    """``eigh_psd`` in float32 where a cheap certificate says float32 resolves what ``f`` needs, else in float64.

    Returns ``(evals float64, evecs float64, float32_used)``; when not certified the result is
    ``eigh_psd(mat, scale=scale)`` itself (float64, bit for bit). ``damping`` and the cut-offs are those
    ``f`` will use: ``rtol`` relative to the largest eigenvalue, ``cut`` absolute (both only without damping).

    Why this certificate: float32 eigen-errors are ~ eps32 * lam_max (backward stable), so float32 can tell
    neither float64's kept spectrum (down to n * eps64 * lam_max) from its dropped one nor a small kept
    eigenvalue's size; sqrtNGD weights every kept direction O(1) however small its eigenvalue. It is
    therefore used only when the spectrum ``f`` sees is well conditioned: ``lam_min + damping >=
    (lam_max + damping) / cond_max`` and, undamped, ``lam_min >= 2 * max(rtol * lam_max, cut)`` (every
    eigenvalue kept in both precisions, none near the cut-off). Then the relative eigen-errors, hence the
    direction's, are ~ cond * eps32 * a few (<= 1e-2 at cond_max = 1e4). The certificate is that test on
    the float32 eigenvalues; a cheap filter runs first so that a rank-deficient or ill-conditioned matrix
    goes to float64 without a wasted float32 eigh: a float32 Cholesky of ``M - tau I`` (~3 % of a float64
    eigh at n = 1152), tau from a power-iteration estimate of lam_max (``||M v||`` for a unit v, <= lam_max:
    the filter never refuses a matrix the certificate would accept, up to rounding).
    """
    m = mat.to(torch.float64)
    m = 0.5 * (m + m.mT)
    trace = m.diagonal().abs().sum()
    if not torch.isfinite(trace) or trace == 0:
        return (*eigh_psd(mat, scale=scale), False)             # its error / its zero matrix
    total = trace * (1.0 if scale is None else float(scale))
    m32 = (m / trace).to(torch.float32)
    eps_n = float(damping / total)
    floor = 1.0 / cond_max if damping > 0 else max(1.0 / cond_max, 2.0 * rtol)
    low = 2.0 * float(cut / total) if damping == 0 else 0.0
    v = m32.sum(dim=1)                            # a few power steps: lam_est = ||M v|| (|v| = 1) <= lam_max
    for _ in range(8):
        v = m32 @ (v / v.norm().clamp_min(torch.finfo(v.dtype).tiny))
    lam_est = float(v.norm())
    tau = max(floor * (lam_est + eps_n) - eps_n, low)
    ok = tau <= 0 or int(torch.linalg.cholesky_ex(
        m32 - tau * torch.eye(m32.shape[0], dtype=m32.dtype, device=m32.device)).info) == 0
    if ok:
        try:
            lam, vecs = torch.linalg.eigh(m32)
        except torch.linalg.LinAlgError:
            ok = False
    if ok:
        lam = lam.to(torch.float64).clamp_min(0)
        lo, hi = float(lam[0]), float(lam[-1])
        ok = lo + eps_n >= floor * (hi + eps_n) and lo >= low
    if not ok:
        return (*eigh_psd(mat, scale=scale), False)
    return lam * total, vecs.to(torch.float64), True


def spectral_factor(evals: torch.Tensor, q: float, damping: float, rtol: float,
                    form: str = "lm") -> torch.Tensor:
    """f(lam) of the module docstring, elementwise (any shape; lam_max over all entries)."""
    if math.isinf(q):
        return torch.ones_like(evals)
    evals = evals.clamp_min(0)
    if damping > 0:
        if form == "interpolate":
            return _neg_root((evals + damping) / (1.0 + damping), q)
        if form != "lm":
            raise ValueError(f"optimizer.damping_form must be one of {DAMPING_FORMS}, got {form!r}")
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
                    scale=None, form: str = "lm") -> torch.Tensor:
    """``f(mat) @ rhs`` for a symmetric PSD ``mat`` (n x n) and ``rhs`` (n or n x k), in ``dtype``.

    ``scale``: the true matrix is ``scale * mat`` (lets callers pass a normalised matrix).
    """
    if math.isinf(q):
        return rhs.to(dtype)
    n = mat.shape[-1]
    rtol = default_rtol(n, dtype) if rtol is None else rtol
    evals, evecs = eigh_psd(mat, dtype=dtype, scale=scale)
    f = spectral_factor(evals, q, damping, rtol, form)
    coef = (evecs.mT @ rhs.to(dtype)).to(torch.float64)
    coef = coef * (f if coef.dim() == 1 else f[:, None])
    return evecs @ coef.to(dtype)


def kron_power_apply(left, right, g: torch.Tensor, q: float, damping: float = 0.0,
                     rtol: float | None = None, form: str = "lm") -> torch.Tensor:
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
    f = spectral_factor(mu[:, None] * lam[None, :], q, damping, rtol, form)
    core = u_left.mT @ (gd @ u_right) if u_right.shape[1] < u_right.shape[0] else (u_left.mT @ gd) @ u_right
    core = (core.to(torch.float64) * f).to(dtype)
    return (u_left @ core) @ u_right.mT


def finish_directions(directions, *, out_dtype, residual_norm, q: float, damping: float,
                      what: str = "direction"):
    """Cast back to the caller's dtype; refuse NaN/Inf; warn when the update speed explodes.

    The warning threshold is |D| > |residual| / sqrt(eps(out_dtype)): q-NGD's speed scales as
    |residual| * |J|^(1 - 2/q), which explodes for q < 2 at small weights (paper section 3, S.I.3).
    ``residual_norm`` may be a float or a 0-d tensor: both norms reach the host in one transfer (one
    sync per step on a GPU).
    """
    out = [dd.to(out_dtype) for dd in directions]
    # squared norm in float64 without a float64 copy of each direction (NaN/Inf propagate)
    total = sum(torch.linalg.vector_norm(dd, dtype=torch.float64).square() for dd in out)
    both = torch.stack([torch.as_tensor(total, dtype=torch.float64),
                        torch.as_tensor(residual_norm, dtype=torch.float64, device=torch.as_tensor(total).device)])
    norm, residual_norm = both.tolist()
    norm = math.sqrt(norm) if norm >= 0 else norm
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


# ---------------------------------------------------------------------------------------------------
# Graded sums: f(M) for M = sum_t M_t whose terms differ in scale by more than float64 can hold together
# ---------------------------------------------------------------------------------------------------

GRADE_GAP = math.sqrt(torch.finfo(torch.float64).eps)
"""Terms within this ratio of a grade's largest share one float64 matrix: the smallest of them still
keeps half of float64's digits (relative rounding error <= eps / GRADE_GAP = 1.5e-8 of its own size)."""


class GramTerm(NamedTuple):
    """One term ``M_t = K_t^T K_t`` of a graded Gram: ``gram`` (n x n, float64) and, when the caller has
    it, a thin ``factor`` (n x r) with ``factor @ factor.T == gram`` (so ``K_t = factor^T``)."""
    gram: torch.Tensor
    factor: torch.Tensor | None = None


def term_scale(term: GramTerm) -> float:
    """The largest diagonal entry: a lower bound on ``lambda_max(M_t)`` within a factor n, cheap."""
    return float(term.gram.diagonal().max()) if term.gram.numel() else 0.0


def one_grade(scales, gap: float = GRADE_GAP) -> bool:
    """True when all non-zero scales fit in one float64 matrix (ratio to the largest >= gap)."""
    nonzero = [s for s in scales if s > 0]
    return not nonzero or min(nonzero) >= gap * max(nonzero)


def graded_power_apply(terms, rhs: torch.Tensor, q: float, damping: float = 0.0, rtol: float | None = None,
                       gap: float = GRADE_GAP, last_eigh=None):
    """Per term t a vector ``w_t`` with ``K_t w_t = K_t f(M) rhs``, ``M = sum_t K_t^T K_t``, exact where the
    terms' scales span far more than float64's 1e-16 (docs/curvature.md, "Graded full rule").

    Graded deflation: take the largest terms (all within ``gap`` of the largest remaining one), decompose
    their sum restricted to the orthogonal complement of the directions resolved so far -- from their own
    factors (thin SVD) or their own Gram on an explicit complement basis, never by subtracting from a
    sum -- keep the *strong* directions (eigenvalue >= next scale / gap) as the next grade's basis ``V_k``,
    pass the *weak* ones (between the cut-off and that) on as a new term, repeat; the last grade is the
    whole remaining complement. In the basis ``V = [V_0, ...]`` the Gram's block (i, j) is assembled only
    from the terms that reach grade max(i, j) (a term has no component beyond its last grade: those blocks
    are exactly 0, which keeps the 1e-36 grades clean of the O(1) terms' rounding), and ``f`` is applied by
    block Riccati decoupling (:func:`_graded_blocks_apply`). ``K_t`` only sees ``V`` up to its last grade.

    Moore-Penrose cut-off: an eigenvalue is dropped when <= ``rtol`` times the largest of its own grade
    (default ``n * eps``), the rounding level of that grade (with damping too: such directions' exact
    contribution is below sqrt(rtol) of their grade's). Returns ``(ws, sizes)``, sizes = rank per grade.

    ``last_eigh(h, cut)`` (default ``eigh_psd(h)``) decomposes the last grade's decoupled block, the one
    large eigh of this path; ``cut`` is its absolute cut-off. A caller may pass a mixed-precision one
    (:func:`mixed_eigh_psd`); the grades' own splits stay float64 (they separate eigenvalues down to the
    cut-off, which float32 cannot resolve).
    """
    n = rhs.shape[0]
    rtol = default_rtol(n) if rtol is None else rtol
    dtype = torch.float64
    rhs = rhs.to(dtype)
    pending = [(term_scale(t), t.gram.to(dtype), None if t.factor is None else t.factor.to(dtype), {i})
               for i, t in enumerate(terms)]
    pending = [p for p in pending if p[0] > 0]
    basis, reach, last_ref = [], {}, 0.0
    while pending:
        top = max(p[0] for p in pending)
        group = [p for p in pending if p[0] >= gap * top]
        pending = [p for p in pending if p[0] < gap * top]
        next_top = max((p[0] for p in pending), default=0.0)
        prev = torch.cat(basis, dim=1) if basis else None
        origins = set().union(*(p[3] for p in group))
        scale = max(p[0] for p in group)
        if not pending and prev is not None and any(p[2] is None for p in group):
            # last grade: the whole complement; its cut-off is applied after decoupling (one eigh, not two)
            q_full, _ = torch.linalg.qr(prev, mode="complete")
            vecs, last_ref = q_full[:, prev.shape[1]:], scale
            if vecs.shape[1]:
                basis.append(vecs)
                reach.update({t: len(basis) for t in origins})
            break
        lam, vecs = _complement_decomposition(group, prev)
        keep = lam > rtol * max(float(lam.max()) if lam.numel() else 0.0, scale)
        strong = keep & (lam >= next_top / gap)
        weak = keep & ~strong
        if strong.any():
            basis.append(vecs[:, strong])
            reach.update({t: len(basis) for t in origins})
        if weak.any():
            f = vecs[:, weak] * lam[weak].sqrt()
            pending.append((float(lam[weak].max()), f @ f.mT, f, origins))
    if not basis:
        return [torch.zeros_like(rhs) for _ in terms], []
    v = torch.cat(basis, dim=1)
    sizes = [b.shape[1] for b in basis]
    ends = [sum(sizes[:k]) for k in range(1, len(sizes) + 1)]
    h = torch.zeros(v.shape[1], v.shape[1], dtype=dtype, device=v.device)
    grams = {}                                    # Gram-only terms summed per reach (same grade: same scale)
    for i, k in reach.items():
        t = terms[i]
        e = ends[k - 1]
        if t.factor is not None:
            a = v[:, :e].mT @ t.factor.to(dtype)
            h[:e, :e] += a @ a.mT
        else:
            grams[k] = grams.get(k, 0) + t.gram.to(dtype)
    for k, g in grams.items():
        e = ends[k - 1]
        h[:e, :e] += v[:, :e].mT @ (g @ v[:, :e])
    h = 0.5 * (h + h.mT)
    y = _graded_blocks_apply(h, sizes, v.mT @ rhs, q, damping, rtol * last_ref, last_eigh)
    ws = []
    for i in range(len(terms)):
        e = ends[reach[i] - 1] if i in reach else 0
        ws.append(v[:, :e] @ y[:e])
    return ws, sizes


def _complement_decomposition(group, prev):
    """Eigen-pairs (lam, vecs in the full space) of the group's summed Gram restricted to the complement
    of ``prev``'s columns: from the thin factors when all have one (SVD of the projected factor, projected
    twice), else from the summed Grams on an explicit orthonormal complement basis (eigh)."""
    if all(p[2] is not None for p in group):
        f = torch.cat([p[2] for p in group], dim=1)
        if prev is not None:
            for _ in range(2):                                  # "twice is enough" (Kahan, Parlett)
                f = f - prev @ (prev.mT @ f)
        u, s, _ = torch.linalg.svd(f, full_matrices=False)
        return s.square(), u
    g = sum(p[1] for p in group)
    if prev is None:
        return eigh_psd(g)
    q_full, _ = torch.linalg.qr(prev, mode="complete")
    comp = q_full[:, prev.shape[1]:]
    lam, w = eigh_psd(comp.mT @ g @ comp)
    return lam, comp @ w


def _graded_blocks_apply(h, sizes, rhs, q, damping, last_cut=0.0, last_eigh=None):
    """``f(h) rhs`` for a PSD ``h`` whose diagonal blocks (``sizes``) are graded: block 0's eigenvalues exceed
    everything coupled to it by >= 1/GRADE_GAP, and so on down. No entry ever mixes two grades.

    Block 0 is split off exactly (:func:`_split_grade`: the orthogonal Riccati decoupling), then the rest
    is treated the same way. Small grades' entries are only multiplied by the coupling, never added to
    large ones. Eigenvalues of the last block <= ``last_cut`` are dropped.
    """
    if len(sizes) == 1:
        lam, vecs = eigh_psd(h) if last_eigh is None else last_eigh(h, last_cut)
        f = spectral_factor(lam, q, damping, 0.0) * (lam > last_cut)
        return vecs @ (f * (vecs.mT @ rhs))
    k = sizes[0]
    top, rest, x, n0, z = _split_grade(h, k)
    r0, r1 = rhs[:k], rhs[k:]
    b0 = n0 @ (r0 + x.mT @ r1)
    b1 = r1 - x @ r0
    b1 = b1 + z @ (x.mT @ b1)
    lam, vecs = eigh_psd(top)
    a0 = vecs @ (spectral_factor(lam, q, damping, 0.0) * (vecs.mT @ b0))
    a1 = _graded_blocks_apply(rest, sizes[1:], b1, q, damping, last_cut, last_eigh)
    n1a1 = a1 + z @ (x.mT @ a1)
    n0a0 = n0 @ a0
    return torch.cat([n0a0 - x.mT @ n1a1, x @ n0a0 + n1a1])


def _split_grade(h, k):
    """Split the first ``k`` coordinates (the strongest grade) off a graded PSD ``h`` exactly: returns
    ``(top, rest, x, n0, z)`` with ``U^T h U = diag(top, rest)`` for the orthogonal ``U = [[I, -X^T],
    [X, I]] diag(N0, N1)``, ``N0 = n0 = (I + X^T X)^(-1/2)``, ``N1 = (I + X X^T)^(-1/2) = I + z X^T``, X
    solving the Riccati equation ``X h00 = h10 + h11 X - X h01 X`` (fixed point from ``h10 h00^-1``; each
    sweep gains about the grade ratio). ``rest`` is formed from the weak block and products of the
    coupling only, so its entries keep their own scale."""
    h00, h01, h11 = h[:k, :k], h[:k, k:], h[k:, k:]
    lam0, vec0 = eigh_psd(h00)
    h00_inv = (vec0 / lam0.clamp_min(torch.finfo(h.dtype).tiny)) @ vec0.mT
    x = h01.mT @ h00_inv
    for _ in range(30):
        x_new = (h01.mT + h11 @ x - x @ (h01 @ x)) @ h00_inv
        row = x_new.norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
        done = bool(((x_new - x).norm(dim=1) <= 4 * torch.finfo(x.dtype).eps * row).all())
        x = x_new
        if done:
            break
    ev, evec = torch.linalg.eigh(x.mT @ x)
    ev = ev.clamp_min(0)
    n0 = (evec * (1 + ev).rsqrt()) @ evec.mT
    z = x @ ((evec * (-1.0 / ((1 + ev).sqrt() * (1 + (1 + ev).sqrt())))) @ evec.mT)  # N1 = I + z x^T
    top = n0 @ (h00 + h01 @ x + x.mT @ h01.mT + x.mT @ (h11 @ x)) @ n0
    xh01 = x @ h01
    a = h11 - xh01 - xh01.mT + x @ (h00 @ x.mT)
    ax = a @ x
    rest = a + z @ ax.mT + ax @ z.mT + z @ (x.mT @ ax) @ z.mT
    return 0.5 * (top + top.mT), 0.5 * (rest + rest.mT), x, n0, z


def graded_eigh(h, sizes):
    """Eigen-decomposition of a PSD ``h`` whose diagonal blocks (``sizes``) are graded as for
    :func:`_graded_blocks_apply`, every eigen-pair accurate relative to its own grade (one ``eigh`` of
    the whole would resolve the weak grades only to ~eps of the strongest). Returns ``(evals, evecs,
    grade)``: evals float64, evecs orthonormal, ``grade[j]`` the block eigen-pair j belongs to. The
    weak grades' eigenvectors reach the strong coordinates only through the coupling X (~ the grade
    ratio), so they must be used in this basis, not summed into a coarser one."""
    if len(sizes) == 1:
        lam, vecs = eigh_psd(h)
        return lam, vecs, torch.zeros(len(lam), dtype=torch.long, device=h.device)
    k = sizes[0]
    top, rest, x, n0, z = _split_grade(h, k)
    lam0, w0 = eigh_psd(top)
    lam1, w1, grade1 = graded_eigh(rest, sizes[1:])
    v0 = n0 @ w0
    n1w1 = w1 + z @ (x.mT @ w1)
    vecs = torch.cat([torch.cat([v0, x @ v0]), torch.cat([-x.mT @ n1w1, n1w1])], dim=1)
    grade = torch.cat([torch.zeros(k, dtype=torch.long, device=h.device), grade1 + 1])
    return torch.cat([lam0, lam1]), vecs, grade
