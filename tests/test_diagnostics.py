"""trainers.diagnostics against hand-built references."""

from __future__ import annotations

import math

import pytest
import torch

from trainers import diagnostics as diag



@pytest.fixture(autouse=True)
def float64():
    """Exact references in float64; restore the default so other test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _orth(n, gen):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def test_weight_norms():
    ws = [torch.full((2, 3), 2.0), torch.eye(2) * 3]
    got = diag.weight_norms(ws)
    assert got["weight_norm.l1"] == pytest.approx(math.sqrt(6 * 4))
    assert got["weight_norm.l2"] == pytest.approx(math.sqrt(18))
    assert got["weight_norm"] == pytest.approx(math.sqrt(24) + math.sqrt(18))


def test_linear_conservation_and_drift_by_hand():
    w1, w2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    (c,) = diag.conservation_linear([w1, w2])
    torch.testing.assert_close(c, torch.diag(torch.tensor([9.0 - 1.0, 1.0 - 4.0])))
    c0 = [torch.zeros(2, 2)]
    got = diag.conservation_drift([c], c0, squared_norm=10.0)
    assert got["conservation_drift"] == pytest.approx(math.sqrt(64 + 9) / 10)
    assert got["conservation_drift.l1"] == got["conservation_drift"]


def test_balanced_factorisation_has_zero_c_and_unit_norm_excess():
    gen = torch.Generator().manual_seed(0)
    n, d = 5, 4
    u, v = _orth(n, gen), _orth(n, gen)
    s = torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1])
    rots = [v] + [_orth(n, gen) for _ in range(d - 1)] + [u]
    ws = [rots[i + 1] @ torch.diag(s ** (1 / d)) @ rots[i].T for i in range(d)]
    wbar = ws[3] @ ws[2] @ ws[1] @ ws[0]
    torch.testing.assert_close(wbar, u @ torch.diag(s) @ v.T)
    assert max(float(c.abs().max()) for c in diag.conservation_linear(ws)) < 1e-12
    assert diag.norm_excess(ws, wbar) == pytest.approx(1.0, abs=1e-12)
    # moving scale a between two layers keeps the map but not the balance: excess > 1
    a = 2.0
    unbalanced = [ws[0] * a, ws[1] / a, ws[2], ws[3]]
    expected = (sum(float((w ** 2).sum()) for w in unbalanced)) / (d * float((s ** (2 / d)).sum()))
    assert diag.norm_excess(unbalanced, wbar) == pytest.approx(expected) and expected > 1.2


def test_relu_conservation_changes_only_at_second_order_under_gradient_flow():
    """For a ReLU MLP with biases, c_i[j] = ||w_(i+1)[:, j]||^2 - ||w_i[j, :]||^2 - b_i[j]^2 is
    conserved by gradient flow: one SGD step changes it by O(lr^2), so the change shrinks 100x
    when lr shrinks 10x. Leaving the bias out would make the change first order (10x)."""
    gen = torch.Generator().manual_seed(1)
    sizes = [6, 5, 4, 3]
    ws = [torch.randn(o, i, generator=gen) for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [torch.randn(o, generator=gen) for o in sizes[1:]]
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)

    def change(lr, with_bias=True):
        params = [t.clone().requires_grad_() for t in ws + bs]
        w, b = params[:3], params[3:]
        h = x
        for i in range(3):
            h = h @ w[i].T + b[i]
            if i < 2:
                h = torch.relu(h)
        torch.nn.functional.cross_entropy(h, y).backward()
        c0 = diag.conservation_relu(ws, bs if with_bias else [None] * 3)
        new = [p.detach() - lr * p.grad for p in params]
        c1 = diag.conservation_relu(new[:3], new[3:] if with_bias else [None] * 3)
        return max(float((a - b_).abs().max()) for a, b_ in zip(c1, c0))

    ratio = change(1e-3) / change(1e-4)
    assert 90 < ratio < 110, ratio
    no_bias_ratio = change(1e-3, with_bias=False) / change(1e-4, with_bias=False)
    assert 9 < no_bias_ratio < 11, no_bias_ratio


def test_teacher_modes_signal_and_noise():
    gen = torch.Generator().manual_seed(2)
    n, r = 6, 2
    u_full, v_full = _orth(n, gen), _orth(n, gen)
    u, v = u_full[:, :r], v_full[:, :r]
    teacher = u @ torch.diag(torch.tensor([4.0, 2.0])) @ v.T
    noise = u_full[:, r:] @ torch.diag(torch.tensor([0.3, 0.1, 0.05, 0.0])) @ v_full[:, r:].T
    got = diag.teacher_modes(0.5 * teacher + noise, u, v)
    assert got["signal_mode.k1"] == pytest.approx(2.0) and got["signal_mode.k2"] == pytest.approx(1.0)
    assert got["noise_mode"] == pytest.approx(0.3)
    # a cross term (teacher input direction -> non-signal output direction) counts as noise too
    cross = 0.7 * u_full[:, r:r + 1] @ v[:, :1].T
    assert diag.teacher_modes(teacher + cross, u, v)["noise_mode"] == pytest.approx(0.7)


def test_target_fit_is_the_fitted_fraction_of_each_target_mode():
    """A map that carries fraction f_k of each singular mode of the target (plus a component off every
    mode's diagonal, which fits nothing): signal_fit = min f_k over the signal modes, noise_fit = the
    mean over the rest."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 2.0, 0.4, 0.3, 0.1], dtype=torch.float64)
    f = torch.tensor([0.9, 0.7, 0.8, 0.1, 0.2, 0.6], dtype=torch.float64)
    off = torch.zeros(6, 6, dtype=torch.float64)
    off[0, 4] = off[5, 1] = 0.5
    wbar = u @ (torch.diag(f * s) + off) @ v.T
    got = diag.target_fit(wbar, u, s, v, rank=3)
    assert got["signal_fit"] == pytest.approx(0.7, abs=1e-12)
    assert got["noise_fit"] == pytest.approx(0.3, abs=1e-12)


def test_divergence_reason():
    assert diag.divergence_reason(1.0, 2.0, 10.0) is None
    assert "loss is nan" in diag.divergence_reason(math.nan, 2.0, 10.0)
    assert "loss is inf" in diag.divergence_reason(math.inf, 2.0, 10.0)
    assert "weight_norm is nan" in diag.divergence_reason(1.0, math.nan, 10.0)
    assert "max_weight_norm" in diag.divergence_reason(1.0, 11.0, 10.0)


def test_eval_schedule():
    s = diag.EvalSchedule(1000, 250, log_eval=False)
    assert s.steps == [0, 250, 500, 750, 1000]
    s = diag.EvalSchedule(1003, 500, log_eval=False)
    assert s.steps == [0, 500, 1000, 1003]
    s = diag.EvalSchedule(1000, 1000, log_eval=True)
    assert {0, 1, 2, 10, 100, 1000} <= set(s.steps) and 50 < len(s.steps) < 62  # 20 per decade


def test_summary_tracker():
    t = diag.SummaryTracker()
    for step, test_loss, drift in [(0, 3.0, 0.0), (10, 1.0, 0.2), (20, 2.0, 0.1)]:
        rec = t.eval(step, {"train_loss": 1.0 / (step + 1), "test_loss": test_loss, "weight_norm": 2.0 + step,
                            "conservation_drift": drift, "clipped_updates": step // 10})
        assert rec == {"kind": "eval", "step": step, "metrics": rec["metrics"]}
    s = t.summary(20, clipped_updates=2)
    m = s["metrics"]
    assert s["status"] == "finished" and s["diverged_step"] is None and s["reason"] is None
    assert m["early_stop_step"] == 10 and m["early_stop_test_loss"] == 1.0
    assert m["final_test_loss"] == 2.0 and m["final_train_loss"] == pytest.approx(1 / 21)
    assert m["weight_norm_growth"] == pytest.approx(22 / 2) and m["max_conservation_drift"] == 0.2
    assert m["clipped_updates"] == 2 and m["steps_per_second"] > 0
    d = t.summary(25, clipped_updates=2, diverged_reason="loss is nan")
    assert d["status"] == "diverged" and d["diverged_step"] == 25 and d["reason"] == "loss is nan"


# ------------------------------------------------------ weight-norm divergence against brute force
def _lbfgs(params, objective, steps=400):
    opt = torch.optim.LBFGS(params, lr=1, max_iter=steps, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = objective()
        f.backward()
        return f
    opt.step(closure)
    with torch.no_grad():
        return float(objective())


def test_linear_norm_excess_is_the_minimum_over_the_symmetry_orbit():
    """Brute force: minimise sum_i ||G_i w_i G_(i-1)^-1||^2 over invertible G_1..G_(d-1) (G_0 = G_d = I),
    which leaves the map unchanged, with a generic optimiser from several starts; norm_excess must be
    the current squared norm over that minimum."""
    gen = torch.Generator().manual_seed(3)
    n, d = 3, 3
    ws = [torch.randn(n, n, generator=gen) * s for s in (0.3, 1.5, 0.8)]
    wbar = ws[2] @ ws[1] @ ws[0]
    total = sum(float(w.square().sum()) for w in ws)
    best = math.inf
    for start in range(3):
        g = [(torch.eye(n) + 0.1 * start * torch.randn(n, n, generator=gen)).requires_grad_() for _ in range(d - 1)]

        def objective():
            mats = [torch.eye(n), *g, torch.eye(n)]
            return sum((mats[i + 1] @ ws[i] @ torch.linalg.inv(mats[i])).square().sum() for i in range(d))
        best = min(best, _lbfgs(g, objective))
        mats = [torch.eye(n), *[x.detach() for x in g], torch.eye(n)]
        moved = [mats[i + 1] @ ws[i] @ torch.linalg.inv(mats[i]) for i in range(d)]
        torch.testing.assert_close(moved[2] @ moved[1] @ moved[0], wbar)  # same map
    assert diag.norm_excess(ws, wbar) == pytest.approx(total / best, rel=1e-6)
    assert total / best > 1.1  # the test case is far from balanced


def _relu_forward(ws, bs, x):
    h = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        h = h @ w.T + b
        if i < len(ws) - 1:
            h = torch.relu(h)
    return h


def _rescaled(ws, bs, scales):
    """Hidden neuron j of layer i scaled by scales[i][j] > 0: row j of W_i and b_i[j] times a, column j
    of W_(i+1) divided by a (the ReLU commutes with positive scaling)."""
    ws, bs = [w.clone() for w in ws], [b.clone() for b in bs]
    for i, a in enumerate(scales):
        ws[i] = ws[i] * a[:, None]
        bs[i] = bs[i] * a
        ws[i + 1] = ws[i + 1] / a[None, :]
    return ws, bs


def test_relu_norm_excess_is_the_minimum_over_per_neuron_rescalings():
    """Brute force over the rescaling symmetry of a [3, 2, 2, 2] ReLU MLP with biases: a grid over the
    four log-scales, refined by a generic optimiser on the rescaled weights themselves. The exact
    minimum must match, the rescaling must leave the function unchanged, and at the minimum every
    hidden neuron is balanced (the ReLU conservation quantity is 0)."""
    gen = torch.Generator().manual_seed(4)
    sizes = [3, 2, 2, 2]
    ws = [torch.randn(o, i, generator=gen) * s for i, o, s in zip(sizes[:-1], sizes[1:], (3.0, 0.2, 1.0))]
    bs = [torch.randn(o, generator=gen) * 0.5 for o in sizes[1:]]
    x = torch.randn(50, 3, generator=gen)

    def norm2(w_, b_):
        return sum(w.square().sum() for w in w_) + sum(b.square().sum() for b in b_[:-1])

    grid = torch.linspace(-3, 3, 25)
    u = torch.cartesian_prod(grid, grid, grid, grid)                     # (25^4, 4)
    a = torch.exp(u)
    # vectorised grid: the objective of every grid point from the rescaled entries
    s1, s2 = a[:, :2], a[:, 2:]
    vals = ((ws[0][None] * s1[:, :, None]).square().sum((1, 2)) + (bs[0][None] * s1).square().sum(1)
            + (ws[1][None] * s2[:, :, None] / s1[:, None, :]).square().sum((1, 2)) + (bs[1][None] * s2).square().sum(1)
            + (ws[2][None] / s2[:, None, :]).square().sum((1, 2)))
    start = u[int(vals.argmin())].clone().requires_grad_()

    def objective():
        sc = torch.exp(start)
        return norm2(*_rescaled(ws, bs, [sc[:2], sc[2:]]))
    brute = min(float(vals.min()), _lbfgs([start], objective))
    exact = diag.min_rescaled_sq_norm(ws, bs)
    assert exact == pytest.approx(brute, rel=1e-7)
    assert exact <= brute * (1 + 1e-9)
    total = float(norm2(ws, bs))
    assert diag.relu_norm_excess(ws, bs) == pytest.approx(total / brute, rel=1e-7) and total / brute > 1.5
    sc = torch.exp(start.detach())
    w2, b2 = _rescaled(ws, bs, [sc[:2], sc[2:]])
    torch.testing.assert_close(_relu_forward(w2, b2, x), _relu_forward(ws, bs, x))    # the same function
    assert max(float(c.abs().max()) for c in diag.conservation_relu(w2, b2)) < 1e-6    # balanced
    # already balanced nets have excess 1; scaling one neuron by 10 raises it
    assert diag.relu_norm_excess(w2, b2) == pytest.approx(1.0, abs=1e-9)
    w3, b3 = _rescaled(w2, b2, [torch.tensor([10.0, 1.0]), torch.ones(2)])
    assert diag.relu_norm_excess(w3, b3) > 1.5


def test_relu_norm_excess_on_an_mnist_sized_net_is_fast_and_exact_in_balance():
    """The MNIST shapes [784, 300, 100, 30, 10]: the Newton solve reaches balance to 1e-9 relative."""
    gen = torch.Generator().manual_seed(5)
    sizes = [784, 300, 100, 30, 10]
    ws = [torch.randn(o, i, generator=gen) / math.sqrt(i) * (1 + j) for j, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))]
    bs = [0.1 * torch.randn(o, generator=gen) for o in sizes[1:]]
    got = diag.min_rescaled_sq_norm(ws, bs)
    # a Sinkhorn-style reference: alternately balance every neuron in closed form, many sweeps
    sq = [w.square() for w in ws]
    u = [torch.zeros(n) for n in sizes[1:-1]]
    for _ in range(1500):
        for i in range(len(u)):
            below = torch.zeros(sizes[0]) if i == 0 else u[i - 1]
            above = torch.zeros(sizes[-1]) if i == len(u) - 1 else u[i + 1]
            inc = (sq[i] * torch.exp(-2 * below)[None, :]).sum(1) + bs[i].square()
            out = (sq[i + 1] * torch.exp(2 * above)[:, None]).sum(0)
            u[i] = 0.25 * torch.log(out / inc)
    w2, b2 = _rescaled(ws, bs, [torch.exp(x) for x in u])
    ref = float(sum(w.square().sum() for w in w2) + sum(b.square().sum() for b in b2[:-1]))
    assert got == pytest.approx(ref, rel=1e-9)
