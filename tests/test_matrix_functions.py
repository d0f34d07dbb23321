"""Pure matrix functions vs torch.linalg references (pinv, solve, matrix_rank, dense kron)."""

import math

import pytest
import torch

from trainers.matrix_functions import (
    default_rtol,
    eigh_psd,
    kron_power_apply,
    mixed_eigh_psd,
    psd_power_apply,
    spectral_factor,
    validate_rule,
)

F64 = torch.float64


def rank_deficient_psd(gen, n, rank, scale=1.0):
    z = torch.randn(n, rank, generator=gen, dtype=F64)
    return scale * z @ z.T


def test_ngd_power_is_the_moore_penrose_inverse():
    gen = torch.Generator().manual_seed(0)
    a = rank_deficient_psd(gen, 7, 4)
    b = torch.randn(7, 3, generator=gen, dtype=F64)
    got = psd_power_apply(a, b, q=1.0)
    assert torch.allclose(got, torch.linalg.pinv(a, hermitian=True) @ b, rtol=1e-9, atol=1e-10)


def test_sqrt_power_squares_to_the_pseudo_inverse():
    gen = torch.Generator().manual_seed(1)
    a = rank_deficient_psd(gen, 6, 3)
    half = psd_power_apply(a, torch.eye(6, dtype=F64), q=2.0)
    assert torch.allclose(half @ half, torch.linalg.pinv(a, hermitian=True), rtol=1e-9, atol=1e-10)
    q3 = psd_power_apply(a, torch.eye(6, dtype=F64), q=3.0)
    assert torch.allclose(q3 @ q3 @ q3, torch.linalg.pinv(a, hermitian=True), rtol=1e-8, atol=1e-10)


def test_damping_is_levenberg_marquardt():
    gen = torch.Generator().manual_seed(2)
    a = rank_deficient_psd(gen, 5, 2)
    b = torch.randn(5, generator=gen, dtype=F64)
    got = psd_power_apply(a, b, q=1.0, damping=1e-3)
    assert torch.allclose(got, torch.linalg.solve(a + 1e-3 * torch.eye(5, dtype=F64), b), rtol=1e-9)
    assert torch.equal(psd_power_apply(a, b, q=math.inf), b)


def test_default_cutoff_counts_rank_like_matrix_rank():
    gen = torch.Generator().manual_seed(3)
    for n, r in [(8, 3), (20, 11), (5, 5)]:
        a = rank_deficient_psd(gen, n, r)
        evals, _ = eigh_psd(a)
        kept = int((spectral_factor(evals, 1.0, 0.0, default_rtol(n)) > 0).sum())
        assert kept == int(torch.linalg.matrix_rank(a, hermitian=True)) == r


@pytest.mark.parametrize("scale", [1e-36, 1e-300, 1.0, 1e30])
def test_eigh_works_at_any_scale_even_from_float32(scale):
    gen = torch.Generator().manual_seed(4)
    a = rank_deficient_psd(gen, 6, 4)
    ref_evals = torch.linalg.eigvalsh(a)
    src = (a * scale).float() if 1e-37 < scale < 1e37 else a * scale   # float32 where representable
    evals, vecs = eigh_psd(src)
    tol = 1e-5 if src.dtype == torch.float32 else 1e-10
    assert torch.allclose(evals / scale, ref_evals.clamp_min(0), rtol=tol, atol=tol * float(ref_evals.max()))
    assert torch.allclose(vecs.T @ vecs, torch.eye(6, dtype=F64), atol=1e-10)


def test_zero_matrix_gives_zero_not_nan():
    evals, vecs = eigh_psd(torch.zeros(4, 4))
    f = spectral_factor(evals, 1.0, 0.0, default_rtol(4))
    assert torch.equal(f, torch.zeros(4, dtype=F64))
    assert torch.equal(psd_power_apply(torch.zeros(3, 3), torch.ones(3), q=2.0), torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("q, eps", [(1.0, 0.0), (2.0, 0.0), (1.5, 1e-3), (3.0, 1e-2)])
def test_kronecker_power_matches_the_dense_kronecker_product(q, eps):
    """f(L (x) R) applied as g -> L g R equals the dense f(kron(L, R)) on row-major vec(g)."""
    gen = torch.Generator().manual_seed(5)
    left, right = rank_deficient_psd(gen, 4, 3), rank_deficient_psd(gen, 5, 2)
    g = torch.randn(4, 5, generator=gen, dtype=F64)
    got = kron_power_apply(eigh_psd(left), eigh_psd(right), g, q, eps)
    want = psd_power_apply(torch.kron(left, right), g.reshape(-1), q, eps).reshape(4, 5)
    # the dense path's own reference: explicit pseudo-inverse for q = 1
    if q == 1.0:
        pinv = torch.linalg.pinv(torch.kron(left, right), hermitian=True)
        assert torch.allclose(want, (pinv @ g.reshape(-1)).reshape(4, 5), rtol=1e-8, atol=1e-10)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-10)


def test_settings_are_validated_by_name():
    assert validate_rule(2, 0.0, None) == 2.0
    assert math.isinf(validate_rule(float("inf"), 0.0, None))
    for q in [0.5, float("nan"), "two", None]:
        with pytest.raises(ValueError, match="q"):
            validate_rule(q, 0.0, None)
    with pytest.raises(ValueError, match="damping"):
        validate_rule(2.0, -1e-3, None)
    with pytest.raises(ValueError, match="rtol"):
        validate_rule(2.0, 0.0, -1.0)


def test_graded_power_apply_matches_80_digit_reference_across_40_decades():
    """Issue 10: f(sum_t F_t F_t^T) over terms 1 ... 1e-34 (one float64 sum keeps only the first), with a
    Gram-only middle term, a term whose own spectrum straddles a grade gap (1e-24 and 1e-34: its weak
    direction is passed on to the next grade) and a null space. Reference: mpmath at 80 digits on the
    exact sum of the same float64 factors; each term's K_t f(M) rhs = F_t^T f(M) rhs must match."""
    import mpmath as mp

    from trainers.matrix_functions import GramTerm, graded_power_apply

    gen = torch.Generator().manual_seed(3)
    n = 14
    z = lambda r: torch.randn(n, r, generator=gen, dtype=F64)  # noqa: E731
    factors = [z(2), z(3) * 1e-7, z(2) * torch.tensor([1e-12, 1e-17], dtype=F64), z(4) * 1e-17]
    gram_only = [False, True, False, True]
    terms = [GramTerm(f @ f.T, None if g else f) for f, g in zip(factors, gram_only)]
    rhs = torch.randn(n, generator=gen, dtype=F64)
    mp.mp.dps = 80
    fm = [mp.matrix(f.tolist()) for f in factors]
    m = sum((f * f.T for f in fm[1:]), fm[0] * fm[0].T)
    evals, evecs = mp.eigsy(m)
    coef = evecs.T * mp.matrix(rhs.tolist())
    for q, eps in [(2.0, 0.0), (1.0, 0.0), (3.0, 1e-25)]:
        f = [(max(v, 0) + eps) ** (-mp.mpf(1) / q) if eps > 0 else
             (v ** (-mp.mpf(1) / q) if v > mp.mpf(10) ** -55 * max(evals) else 0) for v in evals]
        ref = evecs * mp.matrix([f[i] * coef[i] for i in range(n)])
        ws, sizes = graded_power_apply(terms, rhs, q, eps)
        assert sizes == [2, 3, 1, 8], sizes     # 1e-34 of term 2 joins the last grade (8 = complement)
        for t, (fac, fmt) in enumerate(zip(factors, fm)):
            want = torch.tensor([float(v) for v in fmt.T * ref], dtype=F64)
            got = fac.T @ ws[t]
            assert float((got - want).norm() / want.norm()) <= 1e-9, (q, eps, t)
    # one float64 matrix for the same sum loses every term but the first
    single = psd_power_apply(sum(t.gram for t in terms), rhs, 2.0)
    ws, _ = graded_power_apply(terms, rhs, 2.0)
    assert float((factors[3].T @ single).norm()) < 1e-3 * float((factors[3].T @ ws[3]).norm())


def psd_with_spectrum(gen, lam):
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=gen, dtype=F64))
    return (q * torch.as_tensor(lam, dtype=F64)) @ q.T


def test_mixed_eigh_uses_float32_only_where_the_spectrum_f_sees_is_well_conditioned():
    """Condition 1e3 at scale 1e-30: float32, f(M) v within 1e-4 of float64's (cond * eps32 ~ 1e-4);
    condition 1e6 or rank-deficient: float64, eigh_psd's result bit for bit; the same 1e6 matrix damped by
    1e-2 of lam_max: certified; an rtol of 1e-3 (a cut-off inside the spectrum): refused."""
    gen = torch.Generator().manual_seed(40)
    n = 60
    v = torch.randn(n, generator=gen, dtype=F64)
    good = psd_with_spectrum(gen, torch.logspace(0, -3, n)) * 1e-30
    lam, vecs, f32 = mixed_eigh_psd(good, cond_max=1e4, rtol=default_rtol(n))
    assert f32 and vecs.dtype == F64
    e, u = torch.linalg.eigh(good * 1e30)
    want = u @ (e.rsqrt() * (u.T @ v))
    got = vecs @ ((lam * 1e30).rsqrt() * (vecs.T @ v))
    assert float((got - want).norm() / want.norm()) < 1e-4
    bad = psd_with_spectrum(gen, torch.logspace(0, -6, n))
    for mat in (bad, rank_deficient_psd(gen, n, n - 5)):
        lam, vecs, f32 = mixed_eigh_psd(mat, cond_max=1e4, rtol=default_rtol(n))
        ref = eigh_psd(mat)
        assert not f32 and torch.equal(lam, ref[0]) and torch.equal(vecs, ref[1])
    assert mixed_eigh_psd(bad, cond_max=1e4, damping=1e-2)[2]
    assert not mixed_eigh_psd(good * 1e30, cond_max=1e4, rtol=1e-3)[2]
    assert not mixed_eigh_psd(good * 1e30, cond_max=1e4, cut=1e-3)[2]
