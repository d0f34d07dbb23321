"""Benchmark of the exact q-NGD update rules (issue 2). The last line printed is a JSON object.

1. Deep linear net, one exact full sqrtNGD direction: map space (trainers.curvature) vs the dense
   parameter-space reference (explicit J, H+ = J M J^T, eigh), N=16 d=4 and N=32 d=4, same process.
2. MNIST-shaped MLP [784,300,100,30,10], batch 128, one training step (forward + backward +
   precondition + SGD step) on random data: sqrtNGD-d and full sqrtNGD vs plain SGD, interleaved
   repeats, medians (and ratios of the best times, less disturbed by other jobs). Exact per-batch curvature, no amortisation. float64 curvature algebra is the
   default; the float32 opt-in (``compute_dtype=torch.float32``) is reported beside it.

Usage: python bench/bench_curvature.py [--repeats 7] [--threads N] [--skip-n32-dense]
(--threads 1 on a machine loaded by other jobs: 2 contending BLAS threads there ran ~10x slower.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainers.curvature import natural_direction  # noqa: E402
from trainers.mlp_curvature import CurvaturePreconditioner  # noqa: E402

F64 = torch.float64


def dense_full_direction(ws, delta, q):
    """Reference: parameter-space H+ = J J^T (white input) from explicit Kronecker Jacobian blocks."""
    d = len(ws)
    below = [torch.eye(ws[0].shape[1], dtype=F64)]
    for w in ws[:-1]:
        below.append(w @ below[-1])
    above = [torch.eye(ws[-1].shape[0], dtype=F64)]
    for w in reversed(ws[1:]):
        above.append(above[-1] @ w)
    above.reverse()
    jt = torch.cat([torch.kron(above[i], below[i].T.contiguous()) for i in range(d)], dim=1)   # map x P, row-major vec
    h = jt.T @ jt
    g = jt.T @ delta.reshape(-1)
    e, v = torch.linalg.eigh(h)
    keep = e > h.shape[0] * torch.finfo(F64).eps * e.max()
    f = torch.where(keep, e.clamp_min(1e-300) ** (-1 / q), torch.zeros_like(e))
    flat = v @ (f * (v.T @ g))
    return list(torch.split(flat, [w.numel() for w in ws]))


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), out


def bench_linear(n, d, repeats, dense_repeats):
    gen = torch.Generator().manual_seed(n)
    ws = [0.3 * torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]
          + 0.05 * torch.randn(n, n, generator=gen, dtype=F64) for _ in range(d)]
    wbar = ws[0]
    for w in ws[1:]:
        wbar = w @ wbar
    delta = wbar - torch.randn(n, n, generator=gen, dtype=F64)
    natural_direction(ws, delta, q=2.0)                       # warm-up
    t_map, b_map, got = timed(lambda: natural_direction(ws, delta, q=2.0), repeats)
    res = {"N": n, "d": d, "map_space_s": t_map, "map_space_best_s": b_map}
    if dense_repeats:
        t_dense, b_dense, want = timed(lambda: dense_full_direction(ws, delta, 2.0), dense_repeats)
        num = sum(float((a.reshape(-1) - b).square().sum()) for a, b in zip(got, want)) ** 0.5
        den = sum(float(b.square().sum()) for b in want) ** 0.5
        res.update(dense_param_space_s=t_dense, speedup=t_dense / t_map, speedup_best=b_dense / b_map,
                   rel_err_vs_dense=num / den)
    return res


def mnist_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 30), nn.ReLU(), nn.Linear(30, 10))


def bench_mlp(repeats):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(128, 784, generator=gen)
    y = torch.randint(0, 10, (128,), generator=gen)

    def sgd_runner():
        model = mnist_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    def pre_runner(structure, dtype):
        model = mnist_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        pre = CurvaturePreconditioner(model, q=2.0, structure=structure, compute_dtype=dtype)

        def step():
            opt.zero_grad()
            pre.forward_backward(x, y)
            pre.precondition()
            opt.step()
        return step

    runners = {"sgd": sgd_runner(),
               "sqrt_ngd_d": pre_runner("block", torch.float64),
               "sqrt_ngd_full": pre_runner("full", torch.float64),
               "sqrt_ngd_d_f32": pre_runner("block", torch.float32),
               "sqrt_ngd_full_f32": pre_runner("full", torch.float32)}
    times = {k: [] for k in runners}
    for fn in runners.values():
        fn()                                                   # warm-up
    for _ in range(repeats):                                   # interleaved: same machine state
        for k, fn in runners.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}           # least disturbed by other jobs on the machine
    out = {f"{k}_ms": 1e3 * v for k, v in med.items()}
    for k in runners:
        if k != "sgd":
            out[f"{k}_over_sgd"] = med[k] / med["sgd"]
            out[f"{k}_over_sgd_best"] = best[k] / best["sgd"]
    out["sgd_best_ms"] = 1e3 * best["sgd"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-n32-dense", action="store_true", help="skip the ~10-60 s dense N=32 reference")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lin16 = bench_linear(16, 4, 3 * args.repeats, args.repeats)
    print("linear N=16 d=4:", lin16, flush=True)
    lin32 = bench_linear(32, 4, max(3, args.repeats // 2), 0 if args.skip_n32_dense else 1)
    print("linear N=32 d=4:", lin32, flush=True)
    mlp = bench_mlp(args.repeats)
    print("mlp [784,300,100,30,10] B=128:", mlp, flush=True)
    result = {
        "linear_full_sqrt_ngd": {"N16_d4": lin16, "N32_d4": lin32},
        "mlp_step": mlp,
        "targets": {
            "linear_speedup_N16_ge_30x": lin16["speedup"] >= 30,
            "linear_N32_map_step_lt_1s": lin32["map_space_s"] < 1.0,
            "mlp_block_le_3x_sgd": mlp["sqrt_ngd_d_over_sgd"] <= 3,
            "mlp_full_le_20x_sgd": mlp["sqrt_ngd_full_over_sgd"] <= 20,
        },
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
