"""Peers on the same MLP step, in one process, interleaved (issue 11). The last line printed is JSON.

The step: MNIST-shaped MLP [784,300,100,30,10], batch 128, cross-entropy: forward, backward/curvature,
one SGD step. Runners (each on its own copy of the same initial model; ours cycle through 8 batches so the amortised refresh rule sees new data, the peers take one):

- sgd: torch SGD (the unit);
- this project: exact sqrtNGD-d (float64), amortised (curvature_every 10), mixed precision, both;
- ASDL K-FAC, exact Fisher (``fisher_exact``), preconditioner and curvature updated every step and
  every 10 steps (ASDL's damping 1e-7 default would differ per package; 1e-3 here for all damped peers);
- BackPACK KFLR (exact GGN Kronecker factors, the 784 x 784 input factor dense) + the inverse square
  root of each factor by float64 eigh (what sqrtNGD-d does), every step;
- pytorch-optimizer Shampoo with preconditioning every step, and ScalableShampoo at its defaults
  (statistics every step, roots every 1000 steps after 25).

Peers are optional: ``pip install -e ".[peers]" -c bench/peers-constraints.txt`` (the constraint keeps
the installed torch). A missing peer is reported as absent, not an error.

Usage: python bench/bench_peers.py [--repeats 9] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_curvature import MODES, interleaved, mnist_like_batch, mnist_mlp, step_runner  # noqa: E402

OURS = ("sgd", "sqrt_ngd_d", "sqrt_ngd_d_every10", "sqrt_ngd_d_mixed", "sqrt_ngd_d_every10_mixed")


def asdl_kfac(x, y, device, interval):
    from asdl import KfacGradientMaker, PreconditioningConfig

    model = mnist_mlp(0, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cfg = PreconditioningConfig(data_size=x.shape[0], damping=1e-3, preconditioner_upd_interval=interval,
                                curvature_upd_interval=interval)
    gm = KfacGradientMaker(model, cfg, fisher_type="fisher_exact")

    def step():
        opt.zero_grad()
        out = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, out, y)
        gm.forward_and_backward()
        opt.step()
    return step


def _inv_root(mat):
    """mat^(-1/2) on its range (float64 eigh, cut-off n * eps * max), as sqrtNGD-d does."""
    e, v = torch.linalg.eigh(mat.double())
    keep = e > mat.shape[0] * torch.finfo(torch.float64).eps * e.max()
    f = torch.where(keep, e.clamp_min(1e-300).rsqrt(), torch.zeros_like(e))
    return (v * f) @ v.T


def backpack_kflr_root(x, y, device):
    from backpack import backpack, extend
    from backpack.extensions import KFLR

    model = extend(mnist_mlp(0, device))
    lossf = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    scale = len(linears) ** -0.5

    def step():
        opt.zero_grad()
        with backpack(KFLR()):
            lossf(model(x), y).backward()
        with torch.no_grad():
            for m in linears:
                g_out, a_in = m.weight.kflr
                rg, ra = _inv_root(g_out), _inv_root(a_in)
                m.weight.grad.copy_(scale * (rg @ m.weight.grad.double() @ ra))
                m.bias.grad.copy_(scale * (_inv_root(m.bias.kflr[0]) @ m.bias.grad.double()))
        opt.step()
    return step


def shampoo(x, y, device, scalable):
    from pytorch_optimizer import ScalableShampoo, Shampoo

    model = mnist_mlp(0, device)
    opt = (ScalableShampoo(model.parameters(), lr=1e-3) if scalable
           else Shampoo(model.parameters(), lr=1e-3, preconditioning_compute_steps=1))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


PEERS = {
    "asdl_kfac_exact": lambda x, y, d: asdl_kfac(x, y, d, 1),
    "asdl_kfac_interval10": lambda x, y, d: asdl_kfac(x, y, d, 10),
    "backpack_kflr_root": backpack_kflr_root,
    "shampoo_every_step": lambda x, y, d: shampoo(x, y, d, False),
    "scalable_shampoo_defaults": lambda x, y, d: shampoo(x, y, d, True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = mnist_like_batch(args.device)
    pairs = [mnist_like_batch(args.device, seed=s) for s in range(8)]
    runners, absent = {}, {}
    for k in OURS:
        runners[k] = step_runner(MODES[k], [p[0] for p in pairs], [p[1] for p in pairs], args.device)[0]
    for k, make in PEERS.items():
        try:
            runners[k] = make(x, y, args.device)
        except ImportError as e:
            absent[k] = f"not installed ({e.name}): pip install -e '.[peers]' -c bench/peers-constraints.txt"
    med, best = interleaved(runners, args.repeats, args.device)
    table = {k: {"ms": round(med[k], 2), "over_sgd": round(med[k] / med["sgd"], 2),
                 "over_sgd_best": round(best[k] / best["sgd"], 2)} for k in runners}
    print(f"{'step (median of ' + str(args.repeats) + ')':<30} {'ms':>9} {'x SGD':>7}")
    for k, row in table.items():
        print(f"{k:<30} {row['ms']:>9.1f} {row['over_sgd']:>7.1f}")
    print(json.dumps({"mlp_step_peers": table, "absent": absent, "device": args.device,
                      "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                      "load_avg_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
