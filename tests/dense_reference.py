"""Independent dense references shared by the curvature tests: plain eigh on matrices the tests build
themselves, nothing from the code under test."""
from __future__ import annotations

import math

import torch


def dense_power(h, v, q, eps):
    """(h + eps)^(-1/q) v with Moore-Penrose semantics at eps = 0 (eigh, cut-off n * eps64)."""
    if math.isinf(q):
        return v
    e, vecs = torch.linalg.eigh(h)
    if eps > 0:
        f = (e.clamp_min(0) + eps) ** (-1 / q)
    else:
        keep = e > h.shape[0] * torch.finfo(torch.float64).eps * e.max()
        f = torch.where(keep, e.clamp_min(1e-300) ** (-1 / q), torch.zeros_like(e))
    return vecs @ (f * (vecs.T @ v))
