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
Jacobian is never formed. At small gains the layers' bias and weight terms of that sum span more scales
than one float64 matrix holds (last bias O(1), weights gain^(2(d-1))): then every term is kept in its own
scale and the direction comes from ``graded_power_apply`` (docs/curvature.md, "Graded full rule").

All curvature algebra runs in float64 (``compute_dtype``) on trace-normalised matrices, so gain 1e-6
(factors ~1e-36) works; directions are cast back to the parameters' dtype. ``precision="mixed"`` decomposes
in float32 only what a condition certificate accepts (block: each factor, ``_decompose``; full: the Gram or
the graded path's last grade, ``_mixed_eigh``), the rest in float64. NaN/Inf directions raise
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
    CurvatureOverflowError,
    default_rtol,
    depth_scale,
    GramTerm,
    finish_directions,
    graded_eigh,
    graded_power_apply,
    mixed_eigh_psd,
    one_grade,
    psd_power_apply,
    spectral_factor,
    validate_rule,
)

LOSSES = ("cross_entropy", "mse")
# precision="mixed": a factor (block) or the output-space Gram / its last grade (full) is decomposed in
# float32 only when its float32 spectrum has condition <= this (eigen-errors ~ cond * eps32 * a few:
# the direction within 1e-2 of float64); else float64
MIXED_COND_MAX = 1e4


class CurvaturePreconditioner:
    """Rewrites ``.grad`` of an MLP with the q-NGD direction (see module docstring)."""

    def __init__(self, model, *, q, structure, damping=0.0, loss="cross_entropy", rtol=None,
                 compute_dtype=COMPUTE_DTYPE, curvature_every=1, precision="float64"):
        self.q = validate_rule(q, damping, rtol)
        if structure not in STRUCTURES:
            raise ValueError(f"optimizer.structure must be one of {STRUCTURES}, got {structure!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float64 (default) or torch.float32, got {compute_dtype!r}")
        if isinstance(curvature_every, bool) or not isinstance(curvature_every, int) or curvature_every < 1:
            raise ValueError(f"optimizer.curvature_every must be an integer >= 1 (1 = exact every step), "
                             f"got {curvature_every!r}")
        if curvature_every > 1 and structure != "block":
            raise ValueError(f"optimizer.curvature_every={curvature_every} needs structure 'block' (ngd_d, "
                             f"sqrt_ngd_d, qngd_d); the full rule is exact per batch only: use 1")
        if precision not in ("float64", "mixed"):
            raise ValueError(f"optimizer.precision must be 'float64' or 'mixed', got {precision!r}")
        self.precision = precision
        self.layers = _parse_model(model)
        self.curvature_every = curvature_every
        self.amortised = _AmortisedOutputFactors(curvature_every) if curvature_every > 1 else None
        self.model, self.structure, self.loss = model, structure, loss
        self.damping = float(damping)
        self.rtol = None if rtol is None else float(rtol)
        self.compute_dtype = compute_dtype
        self.d = sum(1 for kind, _ in self.layers if kind == "linear")
        self._fallbacks = 0
        self.mixed_totals = [0, 0]            # precision="mixed": [steps, float64 fallbacks summed over them]
        self.last_info: dict = {}
        self._batch = None

    # ------------------------------------------------------------------ forward / backward
    def forward_backward(self, x, y):
        """Mean loss of the batch (detached); plain gradients accumulate in ``.grad``; the curvature
        ingredients (layer inputs, back-propagated Hessian square roots) are kept for precondition().

        With curvature (q < inf) there is no autograd pass: the output Hessian roots S_n and the
        loss gradient S_n u_n are back-propagated together, so the gradient comes from the same
        pass as the curvature (in float64) and is written to ``.grad``."""
        if math.isinf(self.q):
            h, _, _ = self._forward(x)
            loss = self._loss(h, y)
            loss.backward()
            self._batch = None
            return loss.detach()
        with torch.no_grad():
            h, inputs, masks = self._forward(x)
            loss = self._loss(h, y)
            self._batch = self._curvature_ingredients(h, y, inputs, masks)
            self._write_gradients()
        return loss

    def _forward(self, x):
        inputs, masks, h = [], [], x
        for kind, mod in self.layers:
            if kind == "linear":
                inputs.append(h.detach())
            elif kind == "relu":
                masks.append(h.detach() > 0)
            h = mod(h)
        return h, inputs, masks

    def _loss(self, h, y):
        if self.loss == "cross_entropy":
            if y.dim() != 1 or y.dtype.is_floating_point or y.shape[0] != h.shape[0]:
                raise ValueError(f"cross_entropy targets y must be {h.shape[0]} integer class indices, got "
                                 f"shape {tuple(y.shape)} {y.dtype} (use loss='mse' for one-hot targets)")
            return F.cross_entropy(h, y)
        if y.shape != h.shape:
            raise ValueError(f"mse targets y must have the model output's shape {tuple(h.shape)}, got {tuple(y.shape)}")
        return 0.5 * (h - y).square().sum(dim=1).mean()

    def _curvature_ingredients(self, out, y, inputs, masks):
        cd = self.compute_dtype
        bsz = out.shape[0]
        roots, u = _output_hessian_roots(out.to(torch.float64), y, self.loss)
        u = u / math.sqrt(bsz)
        # back-propagate the columns of S_n and, as one more column, S_n u_n (the loss gradient):
        # delta[c, n, :] at each Linear output (pre-activation). Columns outermost, so each layer's
        # root rows (cols * B, width) are one contiguous block: the block rule's Gram needs no copy.
        delta = torch.cat([roots.permute(2, 0, 1), (roots @ u[:, :, None]).permute(2, 0, 1)]).to(cd)  # (cols+1, B, C)
        rows, errors, abars, acts = [], [], [], []
        mask_i, lin_i = len(masks), len(inputs)
        for kind, mod in reversed(self.layers):
            if kind == "linear":
                lin_i -= 1
                rows.append(delta[:-1].reshape(-1, delta.shape[-1]))
                errors.append(delta[-1])
                acts.append(inputs[lin_i].reshape(bsz, -1))
                a = acts[-1].to(cd)
                abars.append(torch.cat([a, a.new_ones(bsz, 1)], dim=1))
                if lin_i > 0:
                    delta = delta @ mod.weight.detach().to(cd)
            elif kind == "relu":
                mask_i -= 1
                if lin_i > 0:
                    delta = delta * masks[mask_i].reshape(1, bsz, -1).to(cd)
        for lst in (rows, errors, abars, acts):
            lst.reverse()
        ncol = roots.shape[2]
        # deltas[l]: (B, cols, width) views of the rows, the layout the full rule indexes (n, c) by
        deltas = [r.reshape(ncol, bsz, -1).transpose(0, 1) for r in rows]
        # errors[l][n] / sqrt(B): d(mean loss)/d(pre-activation) of sample n, so grad_l = errors_l^T abar_l / sqrt(B)
        return {"deltas": deltas, "rows": rows, "errors": errors, "abars": abars, "acts": acts,
                "u": u.to(cd), "bsz": bsz}

    def _write_gradients(self):
        """``.grad`` = errors^T [a | 1] / sqrt(B), the weight part straight from the layer input in the
        parameters' dtype (as autograd's), written in place: no concatenated copy to slice."""
        b = self._batch
        root_b = math.sqrt(b["bsz"])
        written = []
        for mod, e, a in zip(self._linears(), b["errors"], b["acts"]):
            dt = mod.weight.dtype
            gw = (e.mT / root_b).to(dt) @ a.to(dt)
            gb = (e.sum(dim=0) / root_b).to(dt)
            for p, g in ((mod.weight, gw), (mod.bias, gb)):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            written += [(mod.weight.grad, mod.weight.grad._version), (mod.bias.grad, mod.bias.grad._version)]
        b["written"] = written

    def _linears(self):
        return [mod for kind, mod in self.layers if kind == "linear"]

    def _grads_untouched(self):
        """True when every ``.grad`` is still the tensor forward_backward wrote, unmodified (no sync)."""
        params = [p for mod in self._linears() for p in (mod.weight, mod.bias)]
        return all(p.grad is t and t._version == v for p, (t, v) in zip(params, self._batch["written"]))

    # ------------------------------------------------------------------ the update
    def precondition(self):
        """Replace ``.grad`` by the q-NGD direction of the last ``forward_backward`` batch."""
        if math.isinf(self.q):
            self.last_info = {"structure": self.structure, "q": self.q}
            return
        if self._batch is None:
            raise RuntimeError("call forward_backward(x, y) before precondition()")
        linears = self._linears()
        if self.structure == "block":
            dirs = self._block_directions(linears)
        else:
            dirs = self._full_directions()
        if "float64_fallbacks" in self.last_info:
            self.mixed_totals[0] += 1
            self.mixed_totals[1] += self.last_info["float64_fallbacks"]
        out_dtype = linears[0].weight.dtype
        dirs = finish_directions(dirs, out_dtype=out_dtype, residual_norm=self._batch["u"].norm(),
                                 q=self.q, damping=self.damping, what=f"{self.structure} MLP direction")
        with torch.no_grad():
            for mod, dd in zip(linears, dirs):
                _set_grad(mod.weight, dd[:, :-1])
                _set_grad(mod.bias, dd[:, -1])
        self._batch = None

    def fallbacks_per_step(self):
        """``precision='mixed'``: float64 fallbacks per step so far (block: of the up to 2 per layer decomposed
        this step; full: of 1), what the trainer records as ``float64_fallbacks_per_step``."""
        steps, fallbacks = self.mixed_totals
        return fallbacks / steps if steps else 0.0

    def kronecker_factors(self):
        """Dense ``(A_l, G_l)`` of the last batch (for tests and diagnostics; precondition() never forms A_1)."""
        b = self._batch
        out = []
        for ab, flat in zip(b["abars"], b["rows"]):
            out.append((ab.mT @ ab / b["bsz"], flat.mT @ flat / b["bsz"]))
        return out

    def _block_directions(self, linears):
        """Per layer ``f(A (x) G) g / d^(1/q)`` through the factors' eigen-decompositions.

        Input side: with ``abar`` (B x m) and m > B the B x B Gram ``K = abar abar^T / B = V diag(lam) V^T``
        gives A's thin eigenvectors ``abar^T V lam^(-1/2) / sqrt(B)``; the gradient is ``X abar / sqrt(B)``
        with ``X = errors^T`` (n x B), so ``g U_A = X V lam^(1/2)`` and the direction is
        ``U_G [(U_G^T X V) * F] V^T abar / sqrt(B)``: the m x r eigenvectors are never built and the
        lam^(+-1/2) cancel. If ``.grad`` was changed after forward_backward, X is recovered from it
        (``g abar^T V lam^+ V^T / sqrt(B)``: the same rule applied to that gradient's part in A's range).
        """
        b, cd = self._batch, self.compute_dtype
        bsz = b["bsz"]
        fused = self._grads_untouched()
        rows = b["rows"]
        thin = [ab.shape[1] > bsz for ab in b["abars"]]
        amort = self.amortised
        stale = amort.stale(rows, bsz) if amort is not None else [None] * len(rows)
        # each input factor's activation scale against its bias entry (1): one host sync for all layers
        covs = torch.stack([ab[:, :-1].to(torch.float64).square().mean(dim=0).max() for ab in b["abars"]]).tolist()
        graded = [None if one_grade([1.0, cov]) else _graded_input_factor(ab, bsz, t)   # None: one grade
                  for ab, t, cov in zip(b["abars"], thin, covs)]
        todo = [(r, False) for r, s in zip(rows, stale) if s is None] + \
            [(ab, t) for ab, t, gr in zip(b["abars"], thin, graded) if gr is None]
        eigs = self._decompose(todo, bsz)
        lefts = [s if s is not None else eigs.pop(0) for s in stale]
        rights = [gr if gr is not None else eigs.pop(0) for gr in graded]
        dirs, checks, ranks = [], [], []
        for i, mod in enumerate(linears):
            g = None if fused else torch.cat([mod.weight.grad, mod.bias.grad[:, None]], dim=1).to(cd)
            d, sketch = self._layer_direction(i, lefts[i], rights[i], thin[i], g, want_sketch=stale[i] is not None)
            dirs.append(d)
            checks.append(sketch)
            ranks.append((lefts[i][0], rights[i][0], self._rtol(i)))
        if amort is not None:
            redo = amort.check(rows, bsz, stale, lefts, checks)     # one host sync
            if redo:
                for i in redo:
                    left = amort.fresh(i)                            # eigh of the Gram stale() formed
                    amort.store(i, left)
                    dirs[i], _ = self._layer_direction(i, left, rights[i], thin[i], None if fused else
                                                       torch.cat([linears[i].weight.grad, linears[i].bias.grad[:, None]], 1).to(cd))
                    ranks[i] = (left[0], rights[i][0], self._rtol(i))
            for i, s in enumerate(stale):
                if s is None:
                    amort.store(i, lefts[i])
                elif not amort.refreshed[i]:                        # curvature-length of the step: G's
                    dirs[i] = dirs[i] * amort.rho[i] ** -0.5        # own, as the exact step's (see class)
        self.last_info = {"structure": "block", "q": self.q, "factor_ranks": _RanksOnDemand(ranks)}
        if amort is not None:
            self.last_info["refreshed"] = list(amort.refreshed)
        if self.precision == "mixed":
            self.last_info["float64_fallbacks"] = self._fallbacks
        return dirs

    def _rtol(self, i):
        dl, ab = self._batch["deltas"][i], self._batch["abars"][i]
        n = max(dl.shape[-1], ab.shape[1])
        return default_rtol(n, self.compute_dtype) if self.rtol is None else self.rtol

    def _decompose(self, mats, bsz):
        """Eigen-pairs of ``rows^T rows / B`` (or ``rows rows^T / B``) for each (rows, rows_side).

        ``precision='mixed'``: float32 first; a factor whose float32 spectrum is not certified (smallest
        eigenvalue below largest / MIXED_COND_MAX: rank-deficient or ill-conditioned, where float32
        cannot tell kept from dropped eigenvalues) is redone in float64. One host sync for all."""
        cd = self.compute_dtype
        if self.precision != "mixed":
            return [_gram_eig(r, bsz, cd, rows_side=side) for r, side in mats]
        out = [_gram_eig(r.to(torch.float32), bsz, torch.float32, rows_side=side) for r, side in mats]
        ok = torch.stack([lam[0] * MIXED_COND_MAX >= lam[-1] for lam, _ in out]).tolist() if out else []
        self._fallbacks = 0
        for i, ((r, side), good) in enumerate(zip(mats, ok)):
            if good:
                out[i] = (out[i][0], out[i][1].to(cd))
            else:
                out[i] = _gram_eig(r, bsz, cd, rows_side=side)
                self._fallbacks += 1
        return out

    def _layer_direction(self, i, left, right, thin, g, want_sketch=False):
        """One layer's direction, and (``want_sketch``) ``Y = C K W``: the direction's coefficients on a
        few random combinations of the batch, whose G-curvature ``||rows Y||^2 / B`` checks a stale G."""
        b, cd = self._batch, self.compute_dtype
        ab, e, bsz = b["abars"][i], b["errors"][i], b["bsz"]
        root_b, scale = math.sqrt(bsz), depth_scale(self.q, self.d)
        (mu, u_g), (lam, vecs, *graded) = left, right
        rtol = self._rtol(i)
        if graded:       # A's grades (bias; activations): the cut-off relative to each eigenvalue's own grade
            grade, ab, basis = graded[0]["grade"], graded[0]["abar"], graded[0]["basis"]
            lam_ref = torch.stack([lam[grade == k].max() for k in range(int(grade.max()) + 1)])[grade]
            kept = (lam > rtol * lam_ref)[None, :] & (mu > rtol * mu.max())[:, None]
            f = spectral_factor(mu[:, None] * lam[None, :], self.q, self.damping, 0.0) * kept
        else:
            f = spectral_factor(mu[:, None] * lam[None, :], self.q, self.damping, rtol)
        sketch = None
        if thin:                                                  # through the B x B Gram, vecs = V
            if g is None:
                x = e.mT if not graded else e.mT @ basis          # graded: V is in the basis [1/sqrt(B), Q]
            else:
                keep = lam > rtol * (lam_ref if graded else lam.max())
                inv = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).reciprocal(),
                                  torch.zeros_like(lam)).to(cd)
                x = ((g @ ab.mT) @ vecs) * inv / root_b @ vecs.mT
            core = (u_g.mT @ x @ vecs).to(torch.float64) * (f * (scale / root_b))
            coef = (u_g @ core.to(cd)) @ vecs.mT                  # direction = coef @ abar
            if want_sketch:                                       # abar A abar^T / B = B K^2 on the batch side
                w = _probes(bsz, coef)
                sketch = coef @ ((vecs * lam.to(cd)) @ (vecs.mT @ w))
            return _times_abar(coef, ab, self._linears()[i].weight.dtype), sketch
        if g is None:                                             # small input: A itself, vecs = U_A
            g = e.mT @ ab / root_b
        core = (u_g.mT @ g @ vecs).to(torch.float64) * (f * scale)
        d = (u_g @ core.to(cd)) @ vecs.mT
        if want_sketch:
            w = _probes(vecs.shape[0], d)
            sketch = d @ ((vecs * lam.sqrt().to(cd)) @ (vecs.mT @ w))
        return d, sketch

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
        self._fallbacks = 0
        if top == 0:
            w = torch.zeros_like(u)
        elif self.precision == "mixed":
            evals, evecs = self._mixed_eigh(gram / top, rtol=rtol, scale=top)
            f = spectral_factor(evals, self.q, self.damping, rtol)
            w = (evecs @ ((evecs.mT @ u.reshape(-1).to(torch.float64)) * f)).reshape(bsz, ncol).to(cd)
        else:
            w = psd_power_apply((gram / top).to(cd), u.reshape(-1), self.q, self.damping, rtol,
                                dtype=cd, scale=top).reshape(bsz, ncol)
        self.last_info = {"structure": "full", "q": self.q, "gram_size": bsz * ncol, "grades": [bsz * ncol]}
        if self.precision == "mixed":
            self.last_info["float64_fallbacks"] = self._fallbacks
        # K w at layer l: 1/sqrt(B) sum_{n,c} w_{n,c} delta_{n,c,l} abar_{n,l}^T
        return [torch.einsum("nc,nco->on", w, dl) @ ab / math.sqrt(bsz)
                for ab, dl in zip(b["abars"], b["deltas"])]

    def _mixed_eigh(self, mat, *, rtol=0.0, cut=0.0, scale=None):
        """``precision='mixed'``, full rule: the output-space Gram (one grade) or the last grade's block
        (graded path: the only large eigh there) in float32 when ``mixed_eigh_psd`` certifies it
        (condition of the damped spectrum <= MIXED_COND_MAX, nothing near the cut-off), else float64;
        fallbacks counted in ``last_info['float64_fallbacks']`` (0 or 1 per step)."""
        evals, evecs, f32 = mixed_eigh_psd(mat, cond_max=MIXED_COND_MAX, damping=self.damping, rtol=rtol,
                                           cut=cut, scale=scale)
        self._fallbacks += not f32
        return evals, evecs

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
        self._fallbacks = 0
        mixed = self.precision == "mixed"
        ws, sizes = graded_power_apply(terms, u.reshape(-1), self.q, self.damping, rtol,
                                       last_eigh=(lambda h, cut: self._mixed_eigh(h, cut=cut)) if mixed else None)
        self.last_info = {"structure": "full", "q": self.q, "gram_size": n, "grades": sizes}
        if mixed:
            self.last_info["float64_fallbacks"] = self._fallbacks
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


def _graded_input_factor(ab, bsz, thin):
    """A layer's input factor ``A = abar^T abar / B`` decomposed grade by grade, for when its bias and
    activation parts do not fit in one float64 matrix.

    ``abar = [a | 1]``: the bias entry of A is 1, the activations' covariance ~ a^2 (gain^(2(l-1)) for
    layer l at initial gain g: 1e-36 for layer 4 at 1e-6), so one eigh resolves the activation
    directions only to ~1e-16 of the bias's and the Moore-Penrose cut-off drops them: the deep layers'
    weight directions were 25-96 % off at gain 1e-6 (docs/curvature.md). Here the bias direction is split
    off exactly (:func:`graded_eigh`: two grades, the Riccati decoupling of the full rule):
    - small input (m <= B): A itself with the bias coordinate first (a permutation: the eigenvectors go
      back exactly);
    - thin (m > B): the B x B Gram in the orthonormal basis ``[1/sqrt(B), Q]`` of the batch (Q: the
      complement of the ones vector), where ``basis^T abar = [[sqrt(B) mean(a), sqrt(B)], [Q^T a, 0]]``
      holds the structural zero exactly, so no activation entry is ever added to a bias one. The
      eigenvectors stay in that basis: ``abar`` and the errors are rotated into it instead.
    Used where ``mean(a^2)`` of some activation is below ``GRADE_GAP`` (the caller's ``one_grade``
    check). Returns ``(evals, evecs, {"grade", "abar", "basis"})``: evals float64, evecs and abar in
    abar's dtype."""
    a = ab[:, :-1].to(torch.float64)
    if thin:
        basis = torch.linalg.qr(torch.ones(bsz, 1, dtype=torch.float64, device=ab.device), mode="complete").Q
        top = basis[:, :1].mT @ a                                   # sqrt(B) mean(a), up to the sign of basis
        rot = torch.cat([torch.cat([top, basis[:, :1].sum(0, keepdim=True)], 1),
                         torch.cat([basis[:, 1:].mT @ a, a.new_zeros(bsz - 1, 1)], 1)])
        lam, vecs, grade = graded_eigh(rot @ rot.mT / bsz, [1, bsz - 1])
        extra = {"grade": grade, "abar": rot.to(ab.dtype), "basis": basis.to(ab.dtype)}
        return lam, vecs.to(ab.dtype), extra
    m = ab.shape[1]
    perm = torch.cat([torch.tensor([m - 1]), torch.arange(m - 1)]).to(ab.device)
    abp = ab.to(torch.float64)[:, perm]
    lam, vecs_p, grade = graded_eigh(abp.mT @ abp / bsz, [1, m - 1])
    vecs = torch.empty_like(vecs_p)
    vecs[perm] = vecs_p
    return lam, vecs.to(ab.dtype), {"grade": grade, "abar": ab, "basis": None}


def _max_abs(t):
    return float(torch.linalg.vector_norm(t, ord=float("inf"))) if t.numel() else 0.0


def _gram_eig(rows, bsz, dtype, rows_side=False):
    """Eigen-pairs ``(evals float64 ascending, evecs in dtype)`` of ``rows^T rows / bsz`` (or, with
    ``rows_side``, of the row Gram ``rows rows^T / bsz``), at any scale and with no host sync.

    The matrix is divided by its trace before eigh and the scale goes back into the float64
    eigenvalues, so 1e-36 factors (gain 1e-6) work. Below float64 the rows are first divided by their
    largest entry, so float32 squares of 1e-24 activations do not underflow. A zero matrix gives zero
    eigenvalues (hence a zero direction), NaN/Inf a clear error.
    """
    return _normalised_eig(*_normalised_gram(rows, bsz, rows_side))


def _normalised_eig(gram, trace, scale):
    """_gram_eig's eigen-pairs from ``_normalised_gram``'s output."""
    try:
        evals, evecs = torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:
        raise CurvatureOverflowError(
            "eigh failed on a Kronecker factor: the weights or inputs are not finite (the run has "
            "diverged; lower optimizer.lr, set optimizer.clip, or add optimizer.damping)") from None
    return evals.to(torch.float64).clamp_min(0) * (trace.to(torch.float64) * scale), evecs


def _normalised_gram(rows, bsz, rows_side=False):
    """``(gram / trace, trace, scale)``: the factor is ``gram / trace * (trace * scale)`` (see _gram_eig)."""
    r, scale = rows, 1.0 / bsz
    if rows.dtype != torch.float64:
        top = rows.abs().amax()
        top = torch.where(top > 0, top, torch.ones_like(top))
        r, scale = rows / top, top.to(torch.float64).square() / bsz
    gram = r @ r.mT if rows_side else r.mT @ r
    trace = gram.diagonal().sum()
    trace = torch.where(trace > 0, trace, torch.ones_like(trace))
    return gram / trace, trace, scale


class _AmortisedOutputFactors:
    """``curvature_every = k > 1``: keep each layer's output-factor eigenbasis for up to k steps and
    refresh only its eigenvalues on every batch (EKFAC's eigenvalue correction, George et al. 2018).

    The input factor A_l stays exact per batch (it changes with every batch and is cheap through the
    B x B Gram). For the output factor the new batch's ``G = rows^T rows / B`` is formed (one Gram: the
    eigh is what is skipped) and written in the stale basis Q: ``mu = diag(Q^T G Q)``; the step uses
    ``G_hat = Q diag(mu) Q^T``, which has G's trace and G's exact curvature along every basis vector, so
    it follows a change of scale at once (gain 1e-6: G grows by orders of magnitude within a few steps;
    a too small stale G is what made a fixed interval diverge). Then, per stale layer:

    * ``rho = tr(D^T G D A) / tr(D^T G_hat D A)``: the curvature of this batch's G along the step D
      that G_hat produced over the curvature G_hat assigned to it, estimated with 4 Gaussian
      combinations of the batch (two thin products). The direction is multiplied by ``rho^(-1/2)``,
      so its curvature-length under the exact G is the one the model intended (for sqrtNGD: ``||g||^2``,
      as the exact step's). Without this the stale steps were systematically longer (rho 2-4 on MNIST's
      layer 1: the per-batch G1 is noisy in its small eigen-directions) and trained 5-8 % faster than
      exact in 100 steps;
    * the basis is decomposed afresh (and the layer's direction recomputed exactly) when it no longer
      fits: ``rho`` outside ``[1/RHO_MAX, RHO_MAX]``, or off-diagonal mass
      ``off = ||Q^T G Q - diag(mu)||_F / ||G||_F > OFFDIAG`` (computed as ``||G Q - Q diag(mu)||_F``,
      Q orthogonal: one n x n product), or when it is k steps old. The thresholds sit at about twice
      the batch-to-batch floor measured on MNIST (a one-step-old exact basis of layer 1: median rho
      2-2.5, off 0.27-0.37) and well below what a wrong basis shows (gain 1e-6, first steps: rho
      45-100, off 0.9).

    One host sync per step (the refresh decision).
    """

    RHO_MAX = 4.0
    OFFDIAG = 0.5

    def __init__(self, every):
        self.every = every
        self.state: list[dict | None] = []
        self.steps = 0
        self.refreshes: list[int] = []
        self.refreshed: list[bool] = []
        self.offdiag: list[float | None] = []       # last step's off-diagonal mass per layer (None: fresh)
        self.rho: list[float | None] = []           # last step's curvature ratio along the step
        self._off: list = []
        self._grams: list = []

    def stale(self, rows, bsz):
        """Per layer: ``(diag(Q^T G Q), Q)`` in the stale basis Q, or None (decompose afresh)."""
        self.steps += 1
        if not self.state:
            self.state, self.refreshes = [None] * len(rows), [0] * len(rows)
        out, self._off, self._grams = [], [], []
        for r, st in zip(rows, self.state):
            if st is None or st["since"] >= self.every:
                out.append(None)
                self._off.append(None)
                self._grams.append(None)
                continue
            gram, trace, scale = _normalised_gram(r, bsz)
            self._grams.append((gram, trace, scale))
            q = st["u"]
            gq = gram @ q
            d = (q * gq).sum(dim=0)                              # diag(Q^T G Q) / tr G
            self._off.append((gq - q * d).norm() / gram.norm().clamp_min(torch.finfo(gram.dtype).tiny))
            out.append((d.to(torch.float64).clamp_min(0) * (trace.to(torch.float64) * scale), q))
        return out

    def check(self, rows, bsz, stale, lefts, sketches):
        """Indices of the layers whose stale basis fails the refresh rule (one sync)."""
        vals = []
        for r, s, left, y, off in zip(rows, stale, lefts, sketches, self._off):
            if s is None:
                continue
            mu, u = left
            fresh = (r @ y).square().sum().to(torch.float64) / bsz
            old = ((u.mT @ y).to(torch.float64).square() * mu[:, None]).sum()
            vals += [fresh / old.clamp_min(torch.finfo(torch.float64).tiny), off.to(torch.float64)]
        vals = torch.stack(vals).tolist() if vals else []
        redo, self.refreshed, self.rho, self.offdiag = [], [], [], []
        for i, s in enumerate(stale):
            if s is None:
                self.refreshed.append(True)
                self.rho.append(None)
                self.offdiag.append(None)
                continue
            rho, off = vals.pop(0), vals.pop(0)
            self.rho.append(rho)
            self.offdiag.append(off)
            ok = (math.isfinite(rho) and 1.0 / self.RHO_MAX <= rho <= self.RHO_MAX
                  and off <= self.OFFDIAG)
            self.refreshed.append(not ok)
            if ok:
                self.state[i]["since"] += 1
            else:
                redo.append(i)
        return redo

    def fresh(self, i):
        """Layer i's output factor decomposed afresh (compute dtype) from the Gram stale() formed."""
        return _normalised_eig(*self._grams[i])

    def store(self, i, left):
        self.state[i] = {"u": left[1], "since": 1}
        self.refreshes[i] += 1

    def refresh_rate(self):
        """Fraction of (layer, step) output factors decomposed afresh so far (1.0 = exact mode's cost)."""
        return sum(self.refreshes) / (self.steps * len(self.refreshes)) if self.steps else 0.0


def _probes(n, like, k=4):
    """k fixed Gaussian probe vectors (n x k) in ``like``'s dtype and device (seeded: reproducible)."""
    gen = torch.Generator().manual_seed(n)
    return torch.randn(n, k, generator=gen, dtype=torch.float64).to(like)


class _RanksOnDemand(list):
    """``last_info["factor_ranks"]``: [(rank G_l, rank A_l)], counted only when read (a host sync)."""

    def __init__(self, spectra):
        super().__init__()
        self._spectra = spectra

    def _fill(self):
        if self._spectra is not None:
            for mu, lam, rtol in self._spectra:
                self.append((int((mu > rtol * mu.max()).sum()), int((lam > rtol * lam.max()).sum())))
            self._spectra = None

    def __getitem__(self, i):
        self._fill()
        return super().__getitem__(i)

    def __iter__(self):
        self._fill()
        return super().__iter__()

    def __len__(self):
        self._fill()
        return super().__len__()

    def __repr__(self):
        self._fill()
        return super().__repr__()


def _times_abar(coef, ab, out_dtype):
    """``coef @ abar`` (n x B times B x m, the largest product of the step) in the parameters' dtype,
    which the direction is cast to anyway; both sides are scaled by abar's largest entry first so a
    float32 product of 1e18 coefficients and 1e-18 activations (gain 1e-6) stays in range."""
    if out_dtype == ab.dtype:
        return coef @ ab
    top = ab.abs().amax()
    top = torch.where(top > 0, top, torch.ones_like(top))
    return (coef * top).to(out_dtype) @ (ab / top).to(out_dtype)


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
