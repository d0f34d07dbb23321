"""Exact q-NGD preconditioning of ReLU MLPs: rewrite ``.grad``, let a stock optimizer step.

Usage (kfac-pytorch's pattern)::

    pre = CurvaturePreconditioner(model, q=2.0, structure="block")   # sqrtNGD-d
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in loader:
        opt.zero_grad()
        loss = pre.forward_backward(x, y)   # loss, plain gradients in .grad, curvature of this batch
        pre.precondition()                  # .grad <- q-NGD direction
        opt.step()

The model is an ``nn.Sequential`` of ``nn.Linear`` (with bias) and ``nn.ReLU`` (``nn.Flatten`` allowed
in front). Loss ``"cross_entropy"`` (y = class indices) or ``"mse"`` (``0.5 * mean_n ||f(x_n) - y_n||^2``,
y = targets). Curvature is the Gauss-Newton matrix of the batch-mean loss,
``G = 1/B sum_n J_n^T H_n J_n`` with ``H_n`` the per-sample output Hessian (softmax:
``diag(p) - p p^T``; mse: ``I``). Write ``H_n = S_n S_n^T`` (softmax: ``S = diag(sqrt p) - p sqrt(p)^T``)
and back-propagate the columns of ``S_n`` to every layer's pre-activation: ``delta_{n,c,l}``.

``block`` (NGD-d, sqrtNGD-d): Kronecker-factored per-layer blocks ``A_l (x) G_l`` with the input factor
``A_l = mean_n abar abar^T`` (layer input with a bias 1 appended) and the *exact* Gauss-Newton output
factor ``G_l = mean_n sum_c delta delta^T`` (square-root back-propagation of the output Hessian, Botev
et al. 2017), not a sampled Fisher: without damping, a 1-sample Monte-Carlo Fisher made sqrtNGD-d
diverge at small gain here, because its rank-deficient, noisy factor gets inverted. The factorisation
``mean(A_n (x) G_n) ~ mean(A_n) (x) mean(G_n)`` is exact for batch 1 only (K-FAC's approximation).
``A_l`` has rank <= B (785 x 785 for MNIST's first layer at B = 128): it is decomposed through the
B x B Gram of the batch activations (its thin eigen-decomposition), and the gradient's rows lie in that
range, so nothing is lost. The step carries the depth scaling ``1/d^(1/q)``, d = number of Linear layers.

``full``: exact q-NGD on the batch. With ``K = J^T S / sqrt(B)`` (P x BC), ``G = K K^T`` and the gradient
is ``K u`` (softmax: ``S_n u_n = p_n - onehot_n``, solvable because ``p - onehot`` is orthogonal to 1).
The direction ``K (K^T K + damping)^(-1/q) u`` needs only the (BC)^2 output-space Gram
``K^T K[(n,c),(m,c')] = 1/B sum_l (abar_n . abar_m)(delta_{n,c,l} . delta_{m,c',l})``; the BC x P
Jacobian is never formed.

All curvature algebra runs in float64 (``compute_dtype``) on trace-normalised matrices, so gain 1e-6
(factors ~1e-36) works; directions are cast back to the parameters' dtype. NaN/Inf directions raise
``CurvatureOverflowError`` (q=1 without damping at tiny weights) instead of reaching the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers.curvature import STRUCTURES
from trainers.matrix_functions import (
    COMPUTE_DTYPE,
    default_rtol,
    depth_scale,
    eigh_psd,
    GramTerm,
    finish_directions,
    graded_power_apply,
    kron_power_apply,
    one_grade,
    psd_power_apply,
    validate_rule,
)

LOSSES = ("cross_entropy", "mse")


class CurvaturePreconditioner:
    """Rewrites ``.grad`` of an MLP with the q-NGD direction (see module docstring)."""

    def __init__(self, model, *, q, structure, damping=0.0, loss="cross_entropy", rtol=None,
                 compute_dtype=COMPUTE_DTYPE):
        self.q = validate_rule(q, damping, rtol)
        if structure not in STRUCTURES:
            raise ValueError(f"optimizer.structure must be one of {STRUCTURES}, got {structure!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float64 (default) or torch.float32, got {compute_dtype!r}")
        self.layers = _parse_model(model)
        self.model, self.structure, self.loss = model, structure, loss
        self.damping = float(damping)
        self.rtol = None if rtol is None else float(rtol)
        self.compute_dtype = compute_dtype
        self.d = sum(1 for kind, _ in self.layers if kind == "linear")
        self.last_info: dict = {}
        self._batch = None

    # ------------------------------------------------------------------ forward / backward
    def forward_backward(self, x, y):
        """Mean loss of the batch (detached); plain gradients accumulate in ``.grad``; the curvature
        ingredients (layer inputs, back-propagated Hessian square roots) are kept for precondition()."""
        inputs, masks, h = [], [], x
        for kind, mod in self.layers:
            if kind == "linear":
                inputs.append(h.detach())
            elif kind == "relu":
                masks.append(h.detach() > 0)
            h = mod(h)
        if self.loss == "cross_entropy":
            if y.dim() != 1 or y.dtype.is_floating_point or y.shape[0] != h.shape[0]:
                raise ValueError(f"cross_entropy targets y must be {h.shape[0]} integer class indices, got "
                                 f"shape {tuple(y.shape)} {y.dtype} (use loss='mse' for one-hot targets)")
            loss = F.cross_entropy(h, y)
        else:
            if y.shape != h.shape:
                raise ValueError(f"mse targets y must have the model output's shape {tuple(h.shape)}, got {tuple(y.shape)}")
            loss = 0.5 * (h - y).square().sum(dim=1).mean()
        loss.backward()
        self._batch = None
        if not math.isinf(self.q):
            self._batch = self._curvature_ingredients(h.detach(), y, inputs, masks)
        return loss.detach()

    def _curvature_ingredients(self, out, y, inputs, masks):
        cd = self.compute_dtype
        bsz = out.shape[0]
        roots, u = _output_hessian_roots(out.to(torch.float64), y, self.loss)
        u = (u / math.sqrt(bsz)).to(cd)
        # back-propagate the columns of S_n: delta[n, c, :] at each Linear output (pre-activation)
        delta = roots.mT.to(cd).contiguous()                                          # (B, cols, C)
        deltas, abars = [], []
        mask_i, lin_i = len(masks), len(inputs)
        for kind, mod in reversed(self.layers):
            if kind == "linear":
                lin_i -= 1
                deltas.append(delta)
                a = inputs[lin_i].reshape(bsz, -1).to(cd)
                abars.append(torch.cat([a, a.new_ones(bsz, 1)], dim=1))
                if lin_i > 0:
                    delta = delta @ mod.weight.detach().to(cd)
            elif kind == "relu":
                mask_i -= 1
                if lin_i > 0:
                    delta = delta * masks[mask_i].reshape(bsz, 1, -1).to(cd)
        deltas.reverse()
        abars.reverse()
        return {"deltas": deltas, "abars": abars, "u": u, "bsz": bsz}

    # ------------------------------------------------------------------ the update
    def precondition(self):
        """Replace ``.grad`` by the q-NGD direction of the last ``forward_backward`` batch."""
        if math.isinf(self.q):
            self.last_info = {"structure": self.structure, "q": self.q}
            return
        if self._batch is None:
            raise RuntimeError("call forward_backward(x, y) before precondition()")
        linears = [mod for kind, mod in self.layers if kind == "linear"]
        if self.structure == "block":
            dirs = self._block_directions(linears)
        else:
            dirs = self._full_directions()
        out_dtype = linears[0].weight.dtype
        dirs = finish_directions(dirs, out_dtype=out_dtype, residual_norm=float(self._batch["u"].norm()),
                                 q=self.q, damping=self.damping, what=f"{self.structure} MLP direction")
        with torch.no_grad():
            for mod, dd in zip(linears, dirs):
                _set_grad(mod.weight, dd[:, :-1])
                _set_grad(mod.bias, dd[:, -1])
        self._batch = None

    def kronecker_factors(self):
        """Dense ``(A_l, G_l)`` of the last batch (for tests and diagnostics; precondition() never forms A_1)."""
        b = self._batch
        out = []
        for ab, dl in zip(b["abars"], b["deltas"]):
            flat = dl.reshape(-1, dl.shape[-1])
            out.append((ab.mT @ ab / b["bsz"], flat.mT @ flat / b["bsz"]))
        return out

    def _block_directions(self, linears):
        b, cd = self._batch, self.compute_dtype
        bsz, scale = b["bsz"], depth_scale(self.q, self.d)
        dirs, ranks = [], []
        for mod, ab, dl in zip(linears, b["abars"], b["deltas"]):
            g = torch.cat([mod.weight.grad, mod.bias.grad[:, None]], dim=1).to(cd)
            n_out, n_in = g.shape
            rtol = default_rtol(max(n_out, n_in), cd) if self.rtol is None else self.rtol
            right = _thin_gram_eig(ab, bsz, rtol)
            left = _thin_gram_eig(dl.reshape(-1, n_out), bsz, rtol)
            ranks.append((left[0].numel(), right[0].numel()))
            dirs.append(scale * kron_power_apply(left, right, g, self.q, self.damping, rtol))
        self.last_info = {"structure": "block", "q": self.q, "factor_ranks": ranks}
        return dirs

    def _full_directions(self):
        b, cd = self._batch, self.compute_dtype
        bsz, u = b["bsz"], b["u"]
        ncol = u.shape[1]
        rtol = default_rtol(bsz * ncol, cd) if self.rtol is None else self.rtol
        if not one_grade(_term_scales(b["abars"], b["deltas"], bsz)):
            return self._graded_full_directions(rtol)
        gram = torch.zeros(bsz, ncol, bsz, ncol, dtype=torch.float64, device=u.device)
        for ab, dl in zip(b["abars"], b["deltas"]):
            sa, sd = _max_abs(ab), _max_abs(dl)
            if sa == 0 or sd == 0:
                continue
            flat = dl.reshape(bsz * ncol, -1) / sd      # normalised: float32 products never underflow
            an = ab / sa
            term = (flat @ flat.mT).reshape(bsz, ncol, bsz, ncol) * (an @ an.mT)[:, None, :, None]
            gram += term.to(torch.float64) * (sa * sa * sd * sd / bsz)
        gram = gram.reshape(bsz * ncol, bsz * ncol)
        top = float(gram.abs().max())
        if top == 0:
            w = torch.zeros_like(u)
        else:
            w = psd_power_apply((gram / top).to(cd), u.reshape(-1), self.q, self.damping, rtol,
                                dtype=cd, scale=top).reshape(bsz, ncol)
        self.last_info = {"structure": "full", "q": self.q, "gram_size": bsz * ncol, "grades": [bsz * ncol]}
        # K w at layer l: 1/sqrt(B) sum_{n,c} w_{n,c} delta_{n,c,l} abar_{n,l}^T
        return [torch.einsum("nc,nco->on", w, dl) @ ab / math.sqrt(bsz)
                for ab, dl in zip(b["abars"], b["deltas"])]

    def _graded_full_directions(self, rtol):
        """The same direction when the layers' Gram terms span more scales than float64 holds (tiny
        gains): every layer's bias term (thin factor delta / sqrt(B)) and weight term (Gram
        (a a^T) * (delta delta^T) / B) is its own term of ``graded_power_apply``."""
        b = self._batch
        bsz, u = b["bsz"], b["u"].to(torch.float64)
        ncol = u.shape[1]
        n = bsz * ncol
        terms = []
        for ab, dl in zip(b["abars"], b["deltas"]):
            flat = dl.to(torch.float64).reshape(n, -1) / math.sqrt(bsz)
            a = ab[:, :-1].to(torch.float64)
            ff = flat @ flat.mT
            terms.append(GramTerm(ff, flat))                                               # bias
            terms.append(GramTerm((ff.reshape(bsz, ncol, bsz, ncol) * (a @ a.mT)[:, None, :, None]).reshape(n, n)))
        ws, sizes = graded_power_apply(terms, u.reshape(-1), self.q, self.damping, rtol)
        self.last_info = {"structure": "full", "q": self.q, "gram_size": n, "grades": sizes}
        dirs = []
        for l, (ab, dl) in enumerate(zip(b["abars"], b["deltas"])):
            d64 = dl.to(torch.float64)
            wb, ww = ws[2 * l].reshape(bsz, ncol), ws[2 * l + 1].reshape(bsz, ncol)
            bias = torch.einsum("nc,nco->o", wb, d64) / math.sqrt(bsz)
            weight = torch.einsum("nc,nco->on", ww, d64) @ ab[:, :-1].to(torch.float64) / math.sqrt(bsz)
            dirs.append(torch.cat([weight, bias[:, None]], dim=1))
        return dirs


def _term_scales(abars, deltas, bsz):
    """Largest diagonal entry of each layer's bias and weight Gram term (what decides the grading)."""
    scales = []
    for ab, dl in zip(abars, deltas):
        rows = dl.to(torch.float64).square().sum(dim=2) / bsz                            # (B, cols)
        act = ab[:, :-1].to(torch.float64).square().sum(dim=1)                          # (B,)
        scales += [float(rows.max()), float((rows * act[:, None]).max())]
    return scales


def _output_hessian_roots(f, y, loss):
    """Per-sample square roots R_n (B, C, r) of the output Hessian and u_n with R_n u_n = grad_f loss_n.

    Softmax: H = diag(p) - p p^T has null vector 1 and rank C-1. S = diag(sqrt p) - p sqrt(p)^T has
    S S^T = H and S sqrt(p) = 0; a Householder reflection Q_n swapping sqrt(p_n) and e_k (k = argmin p)
    gives R_n = S_n Q_n without its (zero) k-th column: C-1 columns, so the output-space Gram is
    B(C-1) square. u_n = Q_n^T (sqrt(p_n) - e_y / sqrt(p_y)) minus entry k, the min-norm solution
    (1/sqrt(p_y) from log-softmax, finite for any float64 logits). Mse: R_n = I, u_n = f_n - y_n.
    """
    bsz, c = f.shape
    if loss == "mse":
        return torch.eye(c, dtype=f.dtype, device=f.device).expand(bsz, -1, -1), f - y.to(f.dtype)
    rows = torch.arange(bsz, device=f.device)
    logp = torch.log_softmax(f, dim=1)
    p, sp = logp.exp(), (0.5 * logp).exp()
    roots = torch.diag_embed(sp) - p[:, :, None] * sp[:, None, :]                    # S_n
    u = sp.clone()
    u[rows, y] -= (-0.5 * logp[rows, y]).exp()
    k = p.argmin(dim=1)
    v = sp.clone()
    v[rows, k] -= 1.0                                                                 # sqrt(p) - e_k
    v = v / v.norm(dim=1, keepdim=True)
    house = torch.eye(c, dtype=f.dtype, device=f.device) - 2 * v[:, :, None] * v[:, None, :]
    keep = torch.ones(bsz, c, dtype=torch.bool, device=f.device)
    keep[rows, k] = False
    roots = (roots @ house).mT[keep].reshape(bsz, c - 1, c).mT                        # (B, C, C-1)
    u = (house @ u[:, :, None])[:, :, 0][keep].reshape(bsz, c - 1)
    return roots, u


def _max_abs(t):
    return float(torch.linalg.vector_norm(t, ord=float("inf"))) if t.numel() else 0.0


def _thin_gram_eig(rows, bsz, rtol):
    """Eigen-pairs of ``rows^T rows / bsz`` on its range, via the smaller of the two Gram matrices.

    For B x 785 activations this is a B x B eigh (the thin SVD of ``rows``) instead of 785 x 785.
    Eigenvalues <= rtol * max are dropped here: the gradient has no component there. Below float64,
    rows are divided by their largest entry first so float32 Grams of 1e-24 activations do not underflow.
    """
    n, m = rows.shape
    top = 1.0 if rows.dtype == torch.float64 else _max_abs(rows)   # float64 squares of 1e-24 are fine
    if top == 0:
        return torch.zeros(0, dtype=torch.float64, device=rows.device), rows.new_zeros(m, 0)
    r = rows if top == 1.0 else rows / top
    scale = top * top / bsz
    if m <= n:
        return eigh_psd(r.mT @ r, dtype=rows.dtype, scale=scale)
    lam, vecs = eigh_psd(r @ r.mT, dtype=rows.dtype, scale=scale)
    keep = lam > rtol * lam.max()
    lam, vecs = lam[keep], vecs[:, keep]
    return lam, (r.mT @ vecs) / (lam / scale).sqrt().to(rows.dtype)


def _set_grad(param, value):
    if param.grad is None:
        param.grad = value.clone()
    else:
        param.grad.copy_(value)


def _parse_model(model):
    if not isinstance(model, nn.Sequential):
        raise ValueError("model must be an nn.Sequential of nn.Linear (with bias) and nn.ReLU layers")
    layers = []
    for idx, mod in enumerate(model):
        if isinstance(mod, nn.Linear):
            if mod.bias is None:
                raise ValueError(f"model[{idx}] is nn.Linear without bias: use bias=True (the factors carry a bias column)")
            layers.append(("linear", mod))
        elif isinstance(mod, nn.ReLU):
            layers.append(("relu", mod))
        elif isinstance(mod, nn.Flatten) and not any(k == "linear" for k, _ in layers):
            layers.append(("flatten", mod))
        else:
            raise ValueError(f"model[{idx}] is {type(mod).__name__}: CurvaturePreconditioner supports "
                             f"nn.Linear (bias=True) and nn.ReLU only (nn.Flatten allowed before the first Linear)")
    if not any(k == "linear" for k, _ in layers):
        raise ValueError("model has no nn.Linear layer")
    return layers
