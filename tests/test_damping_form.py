"""The two damping forms of the update rules (paper S.I.2) against dense parameter-space matrices built
here: "lm" = (H+ + eps)^(-1/q) g (Levenberg-Marquardt; -> 0 as eps -> inf) and "interpolate" =
((1 + eps) / (H+ + eps))^(1/q) g, for q = 1 exactly the paper's (eps + 1)(eps I + H+)^-1 g, which tends
to SGD as eps -> inf (block: SGD / d^(1/q))."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev

from trainers import OptimizerConfig
from trainers.curvature import natural_direction

F64 = torch.float64


def dense_h_and_g(ws, delta, sigma):
    """H+ = J^T M J and g = J^T M vec(delta) with the explicit Jacobian of vec(wbar) (row-major)."""
    shapes, sizes = [w.shape for w in ws], [w.numel() for w in ws]

    def wbar_flat(theta):
        m = None
        for p, s in zip(torch.split(theta, sizes), shapes):
            m = p.reshape(s) if m is None else p.reshape(s) @ m
        return m.reshape(-1)
    jt = jacrev(wbar_flat)(torch.cat([w.reshape(-1) for w in ws]))
    metric = torch.kron(torch.eye(ws[-1].shape[0], dtype=F64), sigma)
    return jt.T @ metric @ jt, jt.T @ metric @ delta.reshape(-1), sizes, shapes


def dense_interpolating(h, g, q, eps):
    """(eps + 1)^(1/q) (eps I + h)^(-1/q) g by an explicit matrix power (q = 1: an explicit inverse)."""
    n = h.shape[0]
    if q == 1.0:
        return (eps + 1) * torch.linalg.solve(eps * torch.eye(n, dtype=F64) + h, g)
    e, v = torch.linalg.eigh(eps * torch.eye(n, dtype=F64) + h)
    return (eps + 1) ** (1 / q) * (v @ torch.diag(e ** (-1 / q)) @ v.T @ g)


def reference(ws, delta, sigma, q, eps, structure):
    h, g, sizes, shapes = dense_h_and_g(ws, delta, sigma)
    if structure == "full":
        flat = dense_interpolating(h, g, q, eps)
    else:
        parts, o = [], 0
        for s in sizes:
            parts.append(len(ws) ** (-1 / q) * dense_interpolating(h[o:o + s, o:o + s], g[o:o + s], q, eps))
            o += s
        flat = torch.cat(parts)
    return [p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes)], g


def rel_err(got, want):
    num = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(got, want)))
    return num / math.sqrt(sum(float(b.square().sum()) for b in want))


def net(gen, widths):
    return [torch.randn(o, i, generator=gen, dtype=F64) / math.sqrt(i) for i, o in zip(widths[:-1], widths[1:])]


@pytest.mark.parametrize("structure", ["full", "block"])
@pytest.mark.parametrize("q", [1.0, 2.0, 3.0])
def test_interpolating_damping_matches_dense_matrices(structure, q):
    gen = torch.Generator().manual_seed(int(10 * q) + (structure == "block"))
    for widths in ([3, 4, 2], [2, 3, 3, 2], [3, 2, 4]):  # includes a bottleneck: rank-deficient H+
        ws = net(gen, widths)
        delta = torch.randn(widths[-1], widths[0], generator=gen, dtype=F64)
        a = torch.randn(widths[0], widths[0], generator=gen, dtype=F64)
        sigma = a @ a.T / widths[0] + 0.3 * torch.eye(widths[0], dtype=F64)
        for eps in (1e-4, 0.1, 10.0):
            got = natural_direction(ws, delta, q=q, structure=structure, damping=eps, sigma_x=sigma,
                                    damping_form="interpolate")
            want, _ = reference(ws, delta, sigma, q, eps, structure)
            assert rel_err(got, want) < 1e-9, (widths, eps)
            lm = natural_direction(ws, delta, q=q, structure=structure, damping=eps, sigma_x=sigma)
            # the forms differ by the factor (1 + eps)^(1/q) where H+ is invertible, elsewhere not at all
            assert rel_err(lm, want) > 1e-6


@pytest.mark.parametrize("q", [1.0, 2.0])
def test_interpolating_damping_tends_to_sgd_and_lm_to_zero(q):
    gen = torch.Generator().manual_seed(7)
    ws = net(gen, [3, 4, 2])
    delta = torch.randn(2, 3, generator=gen, dtype=F64)
    sgd = natural_direction(ws, delta, q=math.inf)
    _, g = reference(ws, delta, torch.eye(3, dtype=F64), q, 1.0, "full")
    torch.testing.assert_close(torch.cat([s.reshape(-1) for s in sgd]), g)   # the dense gradient
    errs = []
    for eps in (1e2, 1e4, 1e8):
        full = natural_direction(ws, delta, q=q, damping=eps, damping_form="interpolate")
        errs.append(rel_err(full, sgd))
        block = natural_direction(ws, delta, q=q, structure="block", damping=eps, damping_form="interpolate")
        assert rel_err(block, [2 ** (-1 / q) * s for s in sgd]) < 10 * errs[-1] + 1e-12
        lm = natural_direction(ws, delta, q=q, damping=eps)
        assert math.sqrt(sum(float(t.square().sum()) for t in lm)) < 1.01 * eps ** (-1 / q) * float(g.norm())
    assert errs[-1] < 1e-7 and errs[0] > errs[1] > errs[2]   # converges to SGD as eps grows, like 1/eps


def test_without_damping_both_forms_are_moore_penrose():
    gen = torch.Generator().manual_seed(8)
    ws = net(gen, [3, 2, 3])
    delta = torch.randn(3, 3, generator=gen, dtype=F64)
    a = natural_direction(ws, delta, q=1.0, damping=0.0, damping_form="interpolate")
    b = natural_direction(ws, delta, q=1.0, damping=0.0)
    assert rel_err(a, b) == 0.0


def test_damping_form_is_validated():
    with pytest.raises(ValueError, match="optimizer.damping_form='tikhonov'"):
        OptimizerConfig.from_dict({"name": "ngd", "damping_form": "tikhonov"})
    with pytest.raises(ValueError, match="damping_form"):
        natural_direction([torch.eye(2, dtype=F64)], torch.eye(2, dtype=F64), q=1.0, damping_form="x")
    assert OptimizerConfig.from_dict({"name": "ngd"}).damping_form == "lm"
