"""Exact q-NGD for deep linear nets vs independent references built here (issue 2, section 1).

References: a dense parameter-space Gauss-Newton matrix from an explicit Jacobian (torch.func),
central finite differences, the paper's singular-mode laws (eq 6, 12, 20, 21) and map dynamics (eq 17).
"""

import math
import warnings

import pytest
import torch
from torch.func import jacrev

from dense_reference import dense_power
from trainers.curvature import block_factors, clip_update, natural_direction
from trainers.matrix_functions import CurvatureOverflowError, ExplodingUpdateWarning

F64 = torch.float64
INF = float("inf")


# ---------------------------------------------------------------- independent dense reference
def wbar_of(ws):
    m = ws[0]
    for w in ws[1:]:
        m = w @ m
    return m


def dense_jacobian(ws):
    """J^T as a dense (N_d N_0) x P matrix: d vec(wbar) / d theta (row-major vec everywhere)."""
    shapes = [w.shape for w in ws]
    sizes = [w.numel() for w in ws]

    def wbar_flat(theta):
        return wbar_of([p.reshape(s) for p, s in zip(torch.split(theta, sizes), shapes)]).reshape(-1)

    return jacrev(wbar_flat)(torch.cat([w.reshape(-1) for w in ws])), sizes, shapes


def dense_reference(ws, delta, q, structure, eps, sigma):
    jt, sizes, shapes = dense_jacobian(ws)
    metric = torch.kron(torch.eye(ws[-1].shape[0], dtype=F64), sigma)     # X -> X Sigma, row-major vec
    h = jt.T @ metric @ jt
    g = jt.T @ metric @ delta.reshape(-1)
    if structure == "full":
        flat = dense_power(h, g, q, eps)
    else:
        parts, o = [], 0
        scale = 1.0 if math.isinf(q) else len(ws) ** (-1 / q)
        for s in sizes:
            parts.append(scale * dense_power(h[o:o + s, o:o + s], g[o:o + s], q, eps))
            o += s
        flat = torch.cat(parts)
    return [p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes)]


def random_net(gen, widths, dtype=F64):
    return [(torch.randn(widths[i + 1], widths[i], generator=gen, dtype=dtype) / math.sqrt(widths[i])
             + 0.5 * torch.eye(widths[i + 1], widths[i], dtype=dtype)) for i in range(len(widths) - 1)]


def random_sigma(gen, n):
    a = torch.randn(n, n, generator=gen, dtype=F64)
    return a @ a.T / n + 0.2 * torch.eye(n, dtype=F64)


def rel_err(got, want):
    num = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(got, want)))
    den = math.sqrt(sum(float(b.square().sum()) for b in want))
    return num / den


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("structure", ["full", "block"])
def test_natural_direction_matches_dense_parameter_space(d, structure):
    gen = torch.Generator().manual_seed(10 * d + (structure == "block"))
    worst = 0.0
    for case in range(8):
        # widths 2..5 include bottlenecks (rank-deficient H+ and factors) and expansions
        widths = [int(n) for n in torch.randint(2, 6, (d + 1,), generator=gen)]
        ws = random_net(gen, widths)
        delta = torch.randn(widths[-1], widths[0], generator=gen, dtype=F64)
        white = case % 2 == 0
        sigma = torch.eye(widths[0], dtype=F64) if white else random_sigma(gen, widths[0])
        for q in [1.0, 1.5, 2.0, 3.0, INF]:
            for eps in [0.0, 1e-3]:
                got = natural_direction(ws, delta, q=q, structure=structure, damping=eps,
                                        sigma_x=None if white else sigma)
                want = dense_reference(ws, delta, q, structure, eps, sigma)
                err = rel_err(got, want)
                assert err <= 1e-8, (widths, q, eps, white, err)
                worst = max(worst, err)
    assert worst < 1e-8


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    widths = [3, 4, 2, 5]
    ws = random_net(gen, widths)
    wstar = torch.randn(5, 3, generator=gen, dtype=F64)
    sigma = random_sigma(gen, 3)

    def loss(wl):
        dl = wbar_of(wl) - wstar
        return 0.5 * torch.trace(dl @ sigma @ dl.T)

    grads = natural_direction(ws, wbar_of(ws) - wstar, q=INF, sigma_x=sigma)
    h = 1e-6
    for i, w in enumerate(ws):
        fd = torch.zeros_like(w)
        for idx in range(w.numel()):
            plus = [x.clone() for x in ws]
            minus = [x.clone() for x in ws]
            plus[i].view(-1)[idx] += h
            minus[i].view(-1)[idx] -= h
            fd.view(-1)[idx] = (loss(plus) - loss(minus)) / (2 * h)
        assert torch.allclose(grads[i], fd, rtol=1e-7, atol=1e-9)


def test_each_kronecker_block_is_its_jacobian_block():
    gen = torch.Generator().manual_seed(2)
    widths = [3, 5, 2, 4, 3]
    ws = random_net(gen, widths)
    sigma = random_sigma(gen, 3)
    jt, sizes, _ = dense_jacobian(ws)
    metric = torch.kron(torch.eye(3, dtype=F64), sigma)
    o = 0
    for (a, b), s in zip(block_factors(ws, sigma), sizes):
        ji = jt[:, o:o + s]
        assert torch.allclose(torch.kron(b, a), ji.T @ metric @ ji, rtol=1e-12, atol=1e-12)
        o += s


# ---------------------------------------------------------------- conservation laws (Theorem 1)
def conservation(ws):
    return [ws[i + 1].T @ ws[i + 1] - ws[i] @ ws[i].T for i in range(len(ws) - 1)]


@pytest.mark.parametrize("q", [1.0, 1.5, 2.0, 3.0, INF])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_full_rules_conserve_c_to_second_order(q, eps):
    gen = torch.Generator().manual_seed(3)
    widths = [4, 5, 5, 3]
    ws = [gain * torch.randn(widths[i + 1], widths[i], generator=gen, dtype=F64) / math.sqrt(widths[i])
          for i, gain in enumerate([1.5, 0.7, 1.2])]                                   # unbalanced
    delta = wbar_of(ws) - torch.randn(3, 4, generator=gen, dtype=F64)
    lr = 1e-6
    dirs = natural_direction(ws, delta, q=q, structure="full", damping=eps, sigma_x=random_sigma(gen, 4))
    after = conservation([w - lr * dd for w, dd in zip(ws, dirs)])
    for c0, c1, dd in zip(conservation(ws), after, dirs):
        assert (c1 - c0).norm() / c0.norm() <= 1e-10
    assert max(float(dd.norm()) for dd in dirs) > 1e-3   # the step was not trivially zero


@pytest.mark.parametrize("q", [1.0, 2.0])
def test_block_rules_break_c_at_first_order(q):
    gen = torch.Generator().manual_seed(4)
    widths = [4, 5, 5, 3]
    ws = [torch.randn(widths[i + 1], widths[i], generator=gen, dtype=F64) for i in range(3)]
    delta = wbar_of(ws) - torch.randn(3, 4, generator=gen, dtype=F64)
    lr = 1e-6
    dirs = natural_direction(ws, delta, q=q, structure="block")
    after = conservation([w - lr * dd for w, dd in zip(ws, dirs)])
    changes = [float((c1 - c0).norm() / c0.norm()) for c0, c1 in zip(conservation(ws), after)]
    assert max(changes) > 1e-8           # O(lr) = 1e-6, far above the full rules' 1e-10


def aligned_net(gen, sigmas, sstar):
    """w_i = U_i diag(sigma_i) U_(i-1)^T with random orthogonal U; target U_d diag(s*) U_0^T."""
    d, n = sigmas.shape
    us = [torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0] for _ in range(d + 1)]
    ws = [us[i + 1] @ torch.diag(sigmas[i]) @ us[i].T for i in range(d)]
    return ws, us, us[d] @ torch.diag(sstar) @ us[0].T


def modes(ws, us):
    return torch.stack([torch.diagonal(us[i + 1].T @ w @ us[i]) for i, w in enumerate(ws)])


@pytest.mark.parametrize("rule", ["sgd", "ngd", "sqrt_ngd", "qngd3", "ngd_d", "sqrt_ngd_d"])
def test_aligned_singular_modes_follow_the_paper(rule):
    q, structure = {"sgd": (INF, "full"), "ngd": (1.0, "full"), "sqrt_ngd": (2.0, "full"),
                    "qngd3": (3.0, "full"), "ngd_d": (1.0, "block"), "sqrt_ngd_d": (2.0, "block")}[rule]
    gen = torch.Generator().manual_seed(5)
    sig = torch.tensor([[0.5, 1.2, 0.8], [1.1, 0.4, 0.9], [0.7, 0.9, 1.3]], dtype=F64)   # d=3 layers x 3 modes
    sstar = torch.tensor([2.0, -0.5, 1.0], dtype=F64)
    ws, us, wstar = aligned_net(gen, sig, sstar)
    lr = 1e-4
    dirs = natural_direction(ws, wbar_of(ws) - wstar, q=q, structure=structure)
    new = modes([w - lr * dd for w, dd in zip(ws, dirs)], us)
    # the step stays aligned (off-diagonal parts vanish)
    for i, (w, dd) in enumerate(zip(ws, dirs)):
        step = us[i + 1].T @ dd @ us[i]
        assert (step - torch.diag(torch.diagonal(step))).abs().max() < 1e-12
    # singular-mode speed: eq 5/12 (full), eq 20/21 generalised (block)
    sbar = sig.prod(0)
    s_delta = sbar - sstar
    j = sbar / sig
    if structure == "full":
        expected = s_delta * j / (j.square().sum(0) ** (1 / q))
    else:
        expected = s_delta * j.abs() ** (1 - 2 / q) * torch.sign(j) / 3 ** (1 / q)
    assert torch.allclose((sig - new) / lr, expected, rtol=1e-9, atol=1e-12)
    # constants of motion
    ratio = lambda s: s[:-1] / s[1:]
    absdiff = lambda s: s[:-1].abs() - s[1:].abs()
    sqdiff = lambda s: s[1:] ** 2 - s[:-1] ** 2
    kept = {"ngd_d": ratio, "sqrt_ngd_d": absdiff}.get(rule, sqdiff)
    rel = lambda fn: float(((fn(new) - fn(sig)) / fn(sig)).abs().max())
    assert rel(kept) < 1e-6                       # O(lr^2) at most (exact for the block rules)
    others = [fn for fn in (ratio, absdiff, sqdiff) if fn is not kept]
    assert min(rel(fn) for fn in others) > 1e-6   # the other quantities move at O(lr)


# ---------------------------------------------------------------- map dynamics (eq 17)
def scalar_trajectory(d, q, s0, sstar, *, lr=None, steps=None, rel_step=5e-3):
    """Euler-simulate a balanced chain of d 1x1 layers under natural_direction.

    Returns (times, sbar). With ``lr=None`` each step is sized to move sbar by ~rel_step (relative) until
    sbar passes s*/2, so small and large sbar are sampled alike; otherwise ``steps`` steps of size lr.
    """
    sig = torch.full((d,), s0 ** (1 / d), dtype=F64)
    target = torch.tensor([[sstar]], dtype=F64)
    times, sbars, t = [0.0], [s0], 0.0
    for _ in range(steps or 100000):
        ws = [s.reshape(1, 1) for s in sig]
        dirs = natural_direction(ws, wbar_of(ws) - target, q=q)
        dsig = -torch.stack([dd.reshape(()) for dd in dirs])
        if lr is None:
            rate = float((dsig * sig.prod() / sig).sum())      # only to size the step
            step = rel_step * float(sig.prod()) / abs(rate)
        else:
            step = lr
        sig = sig + step * dsig
        t += step
        times.append(t)
        sbars.append(float(sig.prod()))
        if lr is None and sbars[-1] > 0.5 * sstar:
            break
    return torch.tensor(times, dtype=F64), torch.tensor(sbars, dtype=F64)


@pytest.mark.parametrize("d", [2, 3, 4])
@pytest.mark.parametrize("q", [1.0, 2.0, 4.0, INF])
def test_map_dynamics_exponent(d, q):
    """Fit log(dsbar/dt / (eta_bar (s* - sbar))) = p log sbar from the simulated trajectory."""
    sstar = 1.0
    t, sbar = scalar_trajectory(d, q, 1e-3, sstar)
    rate = (sbar[1:] - sbar[:-1]) / (t[1:] - t[:-1])          # finite differences of the trajectory
    mid = 0.5 * (sbar[1:] + sbar[:-1])
    eta_bar = d ** (1 - 1 / q) if not math.isinf(q) else d
    y = torch.log(rate / (eta_bar * (sstar - mid)))
    design = torch.stack([torch.log(mid), torch.ones_like(mid)], 1)
    slope, intercept = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    p = 2 * (d - 1) * (q - 1) / (d * q) if not math.isinf(q) else 2 * (d - 1) / d
    assert len(sbar) > 100 and float(sbar[-1]) > 0.5       # spans sbar from 1e-3 to past s*/2
    assert abs(float(slope) - p) < 1e-2
    assert abs(float(intercept)) < 1e-2                    # eta_bar = eta d^(1 - 1/q)


@pytest.mark.parametrize("case", ["p0", "p_half", "p1"])
def test_map_dynamics_closed_forms(case):
    d, q = {"p0": (2, 1.0), "p_half": (2, 2.0), "p1": (2, INF)}[case]
    sstar, s0, lr, steps = 1.0, 1e-2, 1e-3, 4000
    eta_bar = d ** (1 - 1 / q) if not math.isinf(q) else d
    t, sbar = scalar_trajectory(d, q, s0, sstar, steps=steps, lr=lr)
    if case == "p0":       # sbar = s* - (s* - s0) e^(-eta_bar t)
        exact = sstar - (sstar - s0) * torch.exp(-eta_bar * t)
    elif case == "p_half":  # sbar = s* tanh^2(eta_bar sqrt(s*) (t + t0) / 2), t0 from sbar(0) = s0
        t0 = 2 * math.atanh(math.sqrt(s0 / sstar)) / (eta_bar * math.sqrt(sstar))
        exact = sstar * torch.tanh(eta_bar * math.sqrt(sstar) * (t + t0) / 2) ** 2
    else:                   # logistic
        exact = sstar / (1 + (sstar / s0 - 1) * torch.exp(-eta_bar * sstar * t))
    assert float(sbar[-1]) > 0.5 * sstar                 # the run crossed the transition
    assert float(((sbar - exact).abs() / exact).max()) < 1e-2


# ---------------------------------------------------------------- robustness at tiny weights
def orthogonal_net(gen, n, d, gain, dtype):
    return [gain * torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0].to(dtype) for _ in range(d)]


@pytest.mark.parametrize("structure", ["block", "full"])
def test_sqrt_ngd_is_finite_and_useful_at_gain_1e6(structure):
    gen = torch.Generator().manual_seed(6)
    n, d = 6, 4
    ws = orthogonal_net(gen, n, d, 1e-6, torch.float32)
    wstar = torch.randn(n, n, generator=gen).float()
    loss0 = 0.5 * float((wbar_of(ws) - wstar).square().sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no ExplodingUpdateWarning either
        for _ in range(150):
            dirs = natural_direction(ws, wbar_of(ws) - wstar, q=2.0, structure=structure)
            assert all(torch.isfinite(dd).all() for dd in dirs)
            ws = [w - 0.1 * dd for w, dd in zip(ws, dirs)]
    loss = 0.5 * float((wbar_of(ws) - wstar).square().sum())
    assert loss < 0.2 * loss0                     # escaped the saddle in finite time and learned


def test_ngd_d_at_tiny_weights_says_damping_is_needed():
    gen = torch.Generator().manual_seed(7)
    wstar = torch.randn(6, 6, generator=gen).float()
    ws = orthogonal_net(gen, 6, 4, 1e-6, torch.float32)
    with pytest.warns(ExplodingUpdateWarning, match="damping"):
        natural_direction(ws, wbar_of(ws) - wstar, q=1.0, structure="block")
    ws = orthogonal_net(gen, 6, 4, 1e-13, torch.float32)          # 1/j ~ 1e39 overflows float32
    with pytest.raises(CurvatureOverflowError, match="damping"):
        natural_direction(ws, wbar_of(ws) - wstar, q=1.0, structure="block")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dirs = natural_direction(ws, wbar_of(ws) - wstar, q=1.0, structure="block", damping=1e-3)
    assert all(torch.isfinite(dd).all() for dd in dirs)


@pytest.mark.parametrize("q", [1.0, 2.0, INF])
@pytest.mark.parametrize("structure", ["full", "block"])
def test_zero_weights_give_zero_not_nan(q, structure):
    ws = [torch.zeros(3, 2), torch.zeros(4, 3)]
    dirs = natural_direction(ws, torch.ones(4, 2), q=q, structure=structure)
    assert all(torch.equal(dd, torch.zeros_like(dd)) for dd in dirs)


def test_float32_in_float32_out_and_bad_input_named():
    gen = torch.Generator().manual_seed(8)
    ws = random_net(gen, [3, 4, 2], dtype=torch.float32)
    dirs = natural_direction(ws, torch.randn(2, 3), q=2.0)
    assert all(dd.dtype == torch.float32 for dd in dirs)
    with pytest.raises(ValueError, match="q"):
        natural_direction(ws, torch.randn(2, 3), q=0.5)
    with pytest.raises(ValueError, match="structure"):
        natural_direction(ws, torch.randn(2, 3), q=2.0, structure="diag")
    with pytest.raises(ValueError, match="damping"):
        natural_direction(ws, torch.randn(2, 3), q=2.0, damping=-1)
    with pytest.raises(ValueError, match="delta"):
        natural_direction(ws, torch.randn(3, 2), q=2.0)
    with pytest.raises(ValueError, match="w_2"):
        natural_direction([ws[0], torch.randn(2, 5)], torch.randn(2, 3), q=2.0)


# ---------------------------------------------------------------- clipping
def test_clip_update_caps_the_global_update_norm_in_place():
    dirs = [torch.full((2, 2), 3.0), torch.full((3,), 4.0)]
    total = math.sqrt(4 * 9 + 3 * 16)
    out, clipped = clip_update(dirs, 0.1, None)
    assert out is dirs and not clipped
    out, clipped = clip_update(dirs, 0.1, 10.0)                      # 0.1 * 9.17 < 10: untouched
    assert not clipped and float(dirs[0][0, 0]) == 3.0
    out, clipped = clip_update(dirs, 0.1, 0.5)
    assert clipped and out is dirs
    new_total = 0.1 * math.sqrt(sum(float(t.square().sum()) for t in dirs))
    assert new_total == pytest.approx(0.5, rel=1e-6)
    assert float(dirs[0][0, 0]) == pytest.approx(3.0 * 0.5 / (0.1 * total), rel=1e-6)
    grads = [torch.ones(2), None]                                     # .grad lists may hold None
    clip_update(grads, 1.0, 1.0)
    assert float(grads[0].norm()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="clip"):
        clip_update(dirs, 0.1, 0.0)
