"""Exact q-NGD update rules for deep linear networks, and the one place update clipping lives.

Conventions (paper section 2): ``w_i`` has shape ``N_i x N_(i-1)``, ``wbar = w_d ... w_1``,
``w_<i = w_(i-1) ... w_1`` and ``w_>i = w_d ... w_(i+1)`` (identities when empty). The loss is
``1/2 Tr(Delta Sigma_x Delta^T)`` with ``Delta = wbar - wbar*``, so the gradient is
``g_i = w_>i^T Delta Sigma_x w_<i^T`` and the Gauss-Newton matrix is ``H+ = J M J^T``, where
``J_i = d wbar / d w_i`` and ``M = (X -> X Sigma_x)`` is the map-space metric of the loss.

``full``: with ``K = J M^(1/2)`` we have ``H+ = K K^T`` and ``g = K v``, ``v = Delta Sigma_x^(1/2)``.
Since ``f(K K^T) K = K f(K^T K)`` (same nonzero spectrum, so the same Moore-Penrose cut-off), the
direction is ``D_i = w_>i^T U Sigma_x^(1/2) w_<i^T`` with ``U = f(K^T K) v`` computed in map space,
where ``K^T K = sum_i (w_>i w_>i^T) (x) (Sigma^(1/2) w_<i^T w_<i Sigma^(1/2))`` acts on row-major
``vec(X)`` and is only ``(N_d N_0)^2``. The parameter-space matrix is never formed.

``block``: ``H_ii`` is the operator ``X -> B_i X A_i`` with ``B_i = w_>i^T w_>i`` and
``A_i = w_<i Sigma_x w_<i^T``; ``f(H_ii)`` is applied through the eigen-decompositions of the two
factors, and the step carries the depth scaling ``1/d^(1/q)`` (paper eq 19, 21).
"""

from __future__ import annotations

import math

import torch

from trainers.matrix_functions import (
    COMPUTE_DTYPE,
    DAMPING_FORMS,
    default_rtol,
    depth_scale,
    eigh_psd,
    finish_directions,
    kron_power_apply,
    psd_power_apply,
    validate_rule,
)

STRUCTURES = ("full", "block")


def _check_shapes(weights, delta, sigma_x):
    if not weights:
        raise ValueError("weights must be a non-empty list of 2-D tensors w_i of shape N_i x N_(i-1)")
    for i, w in enumerate(weights, 1):
        if not torch.is_tensor(w) or w.dim() != 2:
            raise ValueError(f"weights[{i - 1}] (w_{i}) must be a 2-D tensor, got {getattr(w, 'shape', w)!r}")
        if i > 1 and w.shape[1] != weights[i - 2].shape[0]:
            raise ValueError(f"w_{i} has shape {tuple(w.shape)} but w_{i - 1} outputs {weights[i - 2].shape[0]} "
                             f"units: w_i must be N_i x N_(i-1)")
    n_out, n_in = weights[-1].shape[0], weights[0].shape[1]
    if tuple(delta.shape) != (n_out, n_in):
        raise ValueError(f"delta must be wbar - wbar* of shape {(n_out, n_in)} (N_d x N_0), got {tuple(delta.shape)}")
    if sigma_x is not None and tuple(sigma_x.shape) != (n_in, n_in):
        raise ValueError(f"sigma_x must be the N_0 x N_0 input correlation {(n_in, n_in)}, got {tuple(sigma_x.shape)}")


def _prefix_suffix(ws):
    """w_<i and w_>i for i = 1..d (0-based lists), as identities when empty."""
    d = len(ws)
    eye_in = torch.eye(ws[0].shape[1], dtype=ws[0].dtype, device=ws[0].device)
    eye_out = torch.eye(ws[-1].shape[0], dtype=ws[0].dtype, device=ws[0].device)
    below = [eye_in]
    for w in ws[:-1]:
        below.append(w @ below[-1])
    above = [eye_out]
    for w in reversed(ws[1:]):
        above.append(above[-1] @ w)
    above.reverse()
    return below, above  # below[i] = w_<(i+1), above[i] = w_>(i+1)


def _sqrt_psd(sigma):
    evals, evecs = eigh_psd(sigma)
    return (evecs * evals.sqrt()) @ evecs.mT


def block_factors(weights, sigma_x=None):
    """Kronecker factors ``(A_i, B_i)`` of each block: ``H_ii X = B_i X A_i`` (float64).

    ``A_i = w_<i Sigma_x w_<i^T`` (N_(i-1) square), ``B_i = w_>i^T w_>i`` (N_i square); in row-major
    vec the block is ``kron(B_i, A_i)``. Exposed for tests and diagnostics.
    """
    ws = [w.to(COMPUTE_DTYPE) for w in weights]
    below, above = _prefix_suffix(ws)
    sig = None if sigma_x is None else sigma_x.to(COMPUTE_DTYPE)
    out = []
    for lo, hi in zip(below, above):
        a = lo @ lo.mT if sig is None else lo @ sig @ lo.mT
        out.append((a, hi.mT @ hi))
    return out


def natural_direction(weights, delta, *, q, structure="full", damping=0.0, sigma_x=None, rtol=None,
                      damping_form="lm"):
    """Per-layer q-NGD directions ``D_i``; the step is ``w_i <- w_i - lr * D_i``.

    ``q`` >= 1 (1 = NGD, 2 = sqrtNGD) or ``inf`` (the plain gradient ``w_>i^T Delta Sigma_x w_<i^T``);
    ``structure`` "full" (exact ``(H+ + damping)^(-1/q) g``, Moore-Penrose with no damping) or "block"
    (``(H_ii + damping)^(-1/q) g_i / d^(1/q)``: NGD-d, sqrtNGD-d). ``delta = wbar - wbar*``,
    ``sigma_x`` = E[x x^T] (identity when None), ``rtol`` = pseudo-inverse cut-off relative to the
    largest eigenvalue (default n * eps(float64), n the operator size). ``damping_form`` "lm" uses
    ``(H + damping)^(-1/q)``, "interpolate" ``((1 + damping) / (H + damping))^(1/q)`` (paper S.I.2; the
    full rule tends to SGD as damping -> inf, the block rule to SGD / d^(1/q)). Works in float64 internally
    and returns tensors of the weights' dtype and device.

    Raises ``CurvatureOverflowError`` instead of returning NaN/Inf (q=1 at tiny weights without
    damping), and warns ``ExplodingUpdateWarning`` when the direction dwarfs the residual.
    """
    q = validate_rule(q, damping, rtol)
    if damping_form not in DAMPING_FORMS:
        raise ValueError(f"optimizer.damping_form must be one of {DAMPING_FORMS}, got {damping_form!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"optimizer.structure must be one of {STRUCTURES}, got {structure!r}")
    _check_shapes(weights, delta, sigma_x)
    damping = float(damping)
    out_dtype = weights[0].dtype
    ws = [w.to(COMPUTE_DTYPE) for w in weights]
    dl = delta.to(COMPUTE_DTYPE)
    sig = None if sigma_x is None else sigma_x.to(COMPUTE_DTYPE)
    below, above = _prefix_suffix(ws)
    d = len(ws)

    if math.isinf(q) or structure == "block":
        resid = dl if sig is None else dl @ sig          # Delta Sigma_x
        grads = [hi.mT @ resid @ lo.mT for lo, hi in zip(below, above)]
        if math.isinf(q):
            return [g.to(out_dtype) for g in grads]
        scale = depth_scale(q, d)
        dirs = []
        for g, lo, hi in zip(grads, below, above):
            a = lo @ lo.mT if sig is None else lo @ sig @ lo.mT
            dirs.append(scale * kron_power_apply(eigh_psd(hi.mT @ hi), eigh_psd(a), g, q, damping, rtol,
                                                 damping_form))
    else:
        half = None if sig is None else _sqrt_psd(sig)
        n_out, n_in = dl.shape
        gram = dl.new_zeros(n_out * n_in, n_out * n_in)
        for lo, hi in zip(below, above):
            right = lo.mT @ lo if half is None else half @ lo.mT @ lo @ half
            gram += torch.kron(hi @ hi.mT, right)
        v = dl if half is None else dl @ half
        rtol = default_rtol(n_out * n_in) if rtol is None else rtol
        u = psd_power_apply(gram, v.reshape(-1), q, damping, rtol, form=damping_form).reshape(n_out, n_in)
        if half is not None:
            u = u @ half
        dirs = [hi.mT @ u @ lo.mT for lo, hi in zip(below, above)]
    residual = float(dl.norm() if sig is None else (dl @ _sqrt_psd(sig)).norm())
    return finish_directions(dirs, out_dtype=out_dtype, residual_norm=residual, q=q, damping=damping,
                             what=f"{structure} natural direction")


def clip_update(directions, lr, max_norm):
    """Cap the whole update: rescale so ``lr * ||D||`` (global Frobenius) is at most ``max_norm``.

    Scales the tensors in place (so ``.grad`` tensors can be passed directly; ``None`` entries are
    skipped) and returns ``(directions, clipped)``. ``max_norm=None`` is a no-op. A non-finite norm
    is left alone (the caller's divergence check sees it).
    """
    if max_norm is None:
        return directions, False
    if not (float(max_norm) > 0 and math.isfinite(float(max_norm))):
        raise ValueError(f"optimizer.clip must be null or a positive number, got {max_norm!r}")
    if not float(lr) > 0:
        raise ValueError(f"optimizer.lr must be > 0, got {lr!r}")
    tensors = [t for t in directions if t is not None]
    if not tensors:
        return directions, False
    total = float(lr) * float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors])))
    if not math.isfinite(total) or total <= float(max_norm):
        return directions, False
    factor = float(max_norm) / total
    with torch.no_grad():
        for t in tensors:
            t.mul_(factor)
    return directions, True
