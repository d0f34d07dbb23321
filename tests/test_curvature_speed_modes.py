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


def dense_factors_and_grads(model, x, y):
    """Per Linear layer: A = mean abar abar^T, G = mean_n J_z^T H_n J_z, and the autograd gradient [W | b]."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
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
                h = hessian(lambda f: F.cross_entropy(f[None], y[n:n + 1]))(model(x[n:n + 1])[0])
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
