"""The block rule's fast paths (issue 11) vs dense references built here with torch.func.

The reference Kronecker factors come from explicit Jacobians (jacrev) and output Hessians (hessian),
the gradient from autograd, the power from eigh of the dense Kronecker product: nothing is shared
with the code under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev

from dense_reference import dense_power
from trainers.mlp_curvature import CurvaturePreconditioner

F64 = torch.float64


def mlp(seed, widths=(12, 6, 5, 3), dtype=F64):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(dtype)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.uniform_(0.2, 0.6)     # ReLUs mostly on, away from the kink
    return model


def data(bsz, seed, n_in=12, n_out=3, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, n_in, generator=gen, dtype=dtype), torch.randint(0, n_out, (bsz,), generator=gen)


def sample_loss(loss, f, y):
    return F.cross_entropy(f[None], y[None]) if loss == "cross_entropy" else 0.5 * (f - y).square().sum()


def dense_factors_and_grads(model, x, y, loss="cross_entropy"):
    """Per Linear layer: A = mean abar abar^T, G = mean_n J_z^T H_n J_z, and the autograd gradient [W | b]."""
    model.zero_grad()
    out = model(x)
    (sum(sample_loss(loss, out[n], y[n]) for n in range(len(x))) / len(x)).backward()
    out = []
    with torch.no_grad():
        for idx, m in enumerate(model):
            if not isinstance(m, nn.Linear):
                continue
            inp = model[:idx](x)
            abar = torch.cat([inp, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            z = model[:idx + 1](x)
            g = 0
            for n in range(len(x)):
                jz = jacrev(model[idx + 1:])(z[n])
                h = hessian(lambda f: sample_loss(loss, f, y[n]))(model(x[n:n + 1])[0])
                g = g + jz.T @ h @ jz / len(x)
            out.append((abar.T @ abar / len(x), g, torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone()))
    return out


def block_reference(factors, grads, q, eps):
    """f(G (x) A) g / d^(1/q) per layer, row-major vec of the (out, in+1) layout."""
    d = len(factors)
    return [dense_power(torch.kron(gf, a), g.reshape(-1), q, eps).reshape(g.shape) * d ** (-1 / q)
            for (a, gf), g in zip(factors, grads)]


def directions(model):
    return [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for m in model if isinstance(m, nn.Linear)]


def rel(got, want):
    num = sum(float((a - b).square().sum()) for a, b in zip(got, want))
    return math.sqrt(num / sum(float(b.square().sum()) for b in want))


@pytest.mark.parametrize("bsz", [1, 4, 9])
def test_gradient_comes_from_the_root_backpropagation_and_the_direction_is_exact(bsz):
    """B < 13 inputs: layer 1's input factor goes through the B x B Gram (thin); B = 9 > 6 + 1 makes the
    deeper layers use their dense input factor: both branches against the dense Kronecker power."""
    model = mlp(0)
    x, y = data(bsz, 1)
    ref = dense_factors_and_grads(model, x, y)
    for q, eps in [(2.0, 0.0), (1.0, 1e-3), (3.0, 0.0)]:
        pre = CurvaturePreconditioner(model, q=q, structure="block", damping=eps)
        model.zero_grad()
        pre.forward_backward(x, y)
        assert rel(directions(model), [g for _, _, g in ref]) < 1e-12       # .grad = autograd's gradient
        pre.precondition()
        want = block_reference([(a, gf) for a, gf, _ in ref], [g for _, _, g in ref], q, eps)
        assert rel(directions(model), want) < 1e-9, (q, eps)


def test_a_gradient_changed_after_forward_backward_is_the_one_preconditioned():
    """A caller may edit .grad between the two calls (here: doubled, plus a random part in A's range);
    the direction is the rule applied to that gradient (Moore-Penrose: nothing outside the range)."""
    model = mlp(2)
    x, y = data(4, 3)
    ref = dense_factors_and_grads(model, x, y)
    pre = CurvaturePreconditioner(model, q=2.0, structure="block")
    model.zero_grad()
    pre.forward_backward(x, y)
    gen = torch.Generator().manual_seed(4)
    edited = []
    for m, (a, _, g) in zip([m for m in model if isinstance(m, nn.Linear)], ref):
        extra = torch.randn(g.shape, generator=gen, dtype=F64) @ a        # rows in range(A)
        new = 2 * g + extra
        m.weight.grad.copy_(new[:, :-1])
        m.bias.grad.copy_(new[:, -1])
        edited.append(new)
    pre.precondition()
    want = block_reference([(a, gf) for a, gf, _ in ref], edited, 2.0, 0.0)
    assert rel(directions(model), want) < 1e-9


def step(pre, model, x, y):
    model.zero_grad()
    pre.forward_backward(x, y)
    pre.precondition()
    return directions(model)


def exact_reference(model, x, y, q=2.0, loss="cross_entropy"):
    ref = dense_factors_and_grads(model, x, y, loss)
    return block_reference([(a, gf) for a, gf, _ in ref], [g for _, _, g in ref], q, 0.0)


def test_amortised_refreshes_by_age_and_a_stale_factor_is_exact_when_nothing_moved():
    model = mlp(5)
    x, y = data(9, 6)
    want = exact_reference(model, x, y)
    pre = CurvaturePreconditioner(model, q=2.0, structure="block", curvature_every=2)
    for expected in ([True] * 3, [False] * 3, [True] * 3):       # refresh, reuse (same batch), age k = 2
        assert rel(step(pre, model, x, y), want) < 1e-9
        assert pre.last_info["refreshed"] == expected


def test_a_stale_output_factor_follows_a_pure_scale_change_without_a_refresh():
    """mse (output Hessian I): scaling the last layer by 10 multiplies G_1, G_2 by exactly 100 (same
    shape): the stale decomposition rescaled by the fresh trace is exact, so no refresh, exact direction."""
    model = mlp(7)
    x, _ = data(9, 8)
    y = torch.randn(9, 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    pre = CurvaturePreconditioner(model, q=2.0, structure="block", curvature_every=5, loss="mse")
    step(pre, model, x, y)
    with torch.no_grad():
        model[-1].weight.mul_(10.0)
    want = exact_reference(model, x, y, loss="mse")
    got = step(pre, model, x, y)
    assert pre.last_info["refreshed"][:2] == [False, False]
    assert rel(got, want) < 1e-9


def ekfac_factor(g_old, g_new):
    """Dense reference of the stale factor: g_old's eigenbasis Q, g_new's curvature on it,
    Q diag(Q^T g_new Q) Q^T; and the off-diagonal mass ||offdiag(Q^T g_new Q)||_F / ||g_new||_F."""
    _, qb = torch.linalg.eigh(g_old)
    rot = qb.T @ g_new @ qb
    off = float((rot - torch.diag(rot.diagonal())).norm() / g_new.norm())
    return qb @ torch.diag(rot.diagonal()) @ qb.T, off


def curvature_ratio(d, g_new, g_hat, a):
    """tr(D^T G D A) / tr(D^T G_hat D A): the step's curvature under the exact G over G_hat's."""
    return float(torch.trace(d.T @ g_new @ d @ a) / torch.trace(d.T @ g_hat @ d @ a))


def test_a_stale_output_factor_is_the_dense_eigenvalue_corrected_kronecker_power_or_refreshed():
    """After an SGD-sized change of the weights and a new batch, each layer's direction is either
    c f(A_fresh (x) G_hat) g_fresh with G_hat = Q diag(Q^T G_fresh Q) Q^T (Q: the old G's eigenbasis,
    all from dense Jacobians at the old and new weights) and c = rho^(-1/2), rho the reported
    curvature ratio along the step; or, where the rule refreshed it, the exact f(A_fresh (x) G_fresh)
    g_fresh. The reported off-diagonal mass is the dense one; rho estimates the dense curvature ratio.
    A drastic change of the layers above (new random weights) must refresh."""
    model = mlp(9)
    x0, y0 = data(9, 10)
    old = dense_factors_and_grads(model, x0, y0)
    pre = CurvaturePreconditioner(model, q=2.0, structure="block", curvature_every=10)
    step(pre, model, x0, y0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x1, y1 = data(9, 11)
    new = dense_factors_and_grads(model, x1, y1)
    got = step(pre, model, x1, y1)
    am = pre.amortised
    flags = pre.last_info["refreshed"]
    d = len(new)
    for i, ((a, gf, g), (_, g_old, _)) in enumerate(zip(new, old)):
        g_hat, off = ekfac_factor(g_old, gf)
        assert am.offdiag[i] == pytest.approx(off, rel=1e-9, abs=1e-12), i
        if flags[i]:
            want = dense_power(torch.kron(gf, a), g.reshape(-1), 2.0, 0.0).reshape(g.shape) / math.sqrt(d)
            assert rel([got[i]], [want]) < 1e-8, (i, flags)
            continue
        raw = dense_power(torch.kron(g_hat, a), g.reshape(-1), 2.0, 0.0).reshape(g.shape) / math.sqrt(d)
        assert rel([got[i]], [raw * am.rho[i] ** -0.5]) < 1e-8, (i, flags)
        assert am.rho[i] == pytest.approx(curvature_ratio(raw, gf, g_hat, a), rel=0.3), i
    assert not all(flags)                                        # a small change reuses something
    with torch.no_grad():                                        # the layers above replaced: refresh
        for m in [m for m in model if isinstance(m, nn.Linear)][1:]:
            m.weight.copy_(torch.randn_like(m.weight))
    want = exact_reference(model, x1, y1)
    got = step(pre, model, x1, y1)
    assert pre.last_info["refreshed"][:2] == [True, True]
    assert rel(got[:2], want[:2]) < 1e-9


def test_a_basis_that_no_longer_diagonalises_g_is_decomposed_afresh():
    """Built to need a refresh: mse, every ReLU on (biases 5), so layer 2's output factor is
    G_2 = W_3^T W_3 whatever the batch; W_3 <- W_3 R^T with R a 45-degree rotation of G_2's largest and
    smallest nonzero eigenvectors turns it into R G_2 R^T: same spectrum and trace, so a trace rescale would
    see nothing, but the old basis no longer diagonalises it (dense off-diagonal mass > OFFDIAG).
    The rule must report that mass, decompose afresh and give the exact direction."""
    model = mlp(15)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.fill_(5.0)
                m.weight.mul_(0.3)
        gen = torch.Generator().manual_seed(15)          # W_3 with one dominant direction: G_2's spectrum 4, .04, .01
        u3 = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=F64))[0]
        v3 = torch.linalg.qr(torch.randn(5, 3, generator=gen, dtype=F64))[0]
        model[4].weight.copy_(u3 @ torch.diag(torch.tensor([2.0, 0.2, 0.1], dtype=F64)) @ v3.T)
    x, _ = data(9, 16)
    y = torch.randn(9, 3, generator=torch.Generator().manual_seed(16), dtype=F64)
    pre = CurvaturePreconditioner(model, q=2.0, structure="block", curvature_every=10, loss="mse")
    step(pre, model, x, y)
    g_old = dense_factors_and_grads(model, x, y, "mse")[1][1]
    evals, vecs = torch.linalg.eigh(g_old)
    top, low = vecs[:, -1], vecs[:, 2]                  # G_2 has rank 3 (W_3 is 3 x 5): the range's ends
    c = math.sqrt(0.5)
    rot = torch.eye(5, dtype=F64) + (c - 1) * (torch.outer(top, top) + torch.outer(low, low)) \
        + c * (torch.outer(low, top) - torch.outer(top, low))
    with torch.no_grad():
        model[4].weight.copy_(model[4].weight @ rot.T)
    new = dense_factors_and_grads(model, x, y, "mse")
    g_new = new[1][1]
    assert torch.allclose(g_new, rot @ g_old @ rot.T, atol=1e-12)     # the case is what it claims
    _, off = ekfac_factor(g_old, g_new)
    assert off > pre.amortised.OFFDIAG
    want = exact_reference(model, x, y, loss="mse")
    got = step(pre, model, x, y)
    assert pre.amortised.offdiag[1] == pytest.approx(off, rel=1e-9)
    assert pre.last_info["refreshed"][1]
    assert rel([got[1]], [want[1]]) < 1e-9


def test_mixed_precision_matches_float64_within_its_tolerance_and_falls_back_where_float32_cannot_tell():
    """Full-rank, well-conditioned factors go float32 (direction within 1e-3 of the float64 dense
    reference, the stated tolerance); rank-deficient ones (the softmax factor, rank C - 1; every factor
    of a batch made of two samples, each twice) are redone in float64, which keeps the direction exact."""
    model = mlp(11, dtype=torch.float32)
    x, y = data(16, 12, dtype=torch.float32)
    want = exact_reference(model.double(), x.double(), y)
    model = model.float()
    pre = CurvaturePreconditioner(model, q=2.0, structure="block", precision="mixed")
    got = [d.double() for d in step(pre, model, x, y)]
    assert 0 < pre.last_info["float64_fallbacks"] < 6
    assert rel(got, want) < 1e-3
    model = mlp(13)
    x, y = data(2, 14)
    x, y = torch.cat([x, x]), torch.cat([y, y])
    want = exact_reference(model, x, y)
    pre = CurvaturePreconditioner(model, q=2.0, structure="block", precision="mixed")
    got = step(pre, model, x, y)
    assert pre.last_info["float64_fallbacks"] == 6
    assert rel(got, want) < 1e-9


def test_amortised_and_mixed_settings_are_checked():
    with pytest.raises(ValueError, match="curvature_every"):
        CurvaturePreconditioner(mlp(0), q=2.0, structure="block", curvature_every=0)
    with pytest.raises(ValueError, match="block"):
        CurvaturePreconditioner(mlp(0), q=2.0, structure="full", curvature_every=4)
    with pytest.raises(ValueError, match="precision"):
        CurvaturePreconditioner(mlp(0), q=2.0, structure="block", precision="bf16")
    with pytest.raises(ValueError, match="optimizer.precision"):
        CurvaturePreconditioner(mlp(0), q=2.0, structure="full", precision="float32")


def test_speed_modes_are_refused_where_they_do_not_apply():
    from trainers import check_config
    base = {"seed": 0, "device": "cpu", "trainer": {"name": "mnist_mlp"}}
    check_config({**base, "optimizer": {"name": "sqrt_ngd_d", "lr": 0.1, "curvature_every": 10, "precision": "mixed"}})
    with pytest.raises(ValueError, match="optimizer.curvature_every"):
        check_config({**base, "optimizer": {"name": "sqrt_ngd", "lr": 0.1, "curvature_every": 10}})
    with pytest.raises(ValueError, match="optimizer.precision"):
        check_config({**base, "optimizer": {"name": "sqrt_ngd_d", "lr": 0.1, "precision": "half"}})
    check_config({**base, "optimizer": {"name": "sqrt_ngd", "lr": 0.1, "precision": "mixed"}})   # full rule too
    with pytest.raises(ValueError, match="optimizer.precision.*plain SGD"):
        check_config({**base, "optimizer": {"name": "sgd", "lr": 0.1, "precision": "mixed"}})
    with pytest.raises(ValueError, match="mnist_mlp only"):
        check_config({"seed": 0, "device": "cpu", "trainer": {"name": "linear_teacher"},
                      "optimizer": {"name": "sqrt_ngd", "lr": 0.1, "precision": "mixed"}})
    with pytest.raises(ValueError, match="mnist_mlp only"):
        check_config({"seed": 0, "device": "cpu", "trainer": {"name": "linear_teacher"},
                      "optimizer": {"name": "sqrt_ngd_d", "lr": 0.1, "curvature_every": 10}})
