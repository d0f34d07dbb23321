"""Benchmark of the exact q-NGD update rules (issue 2). The last line printed is a JSON object.

1. Deep linear net, one exact full sqrtNGD direction: map space (trainers.curvature) vs the dense
   parameter-space reference (explicit J, H+ = J M J^T, eigh), N=16 d=4 and N=32 d=4, same process.
2. MNIST-shaped MLP [784,300,100,30,10], batch 128, one training step (forward + backward +
   precondition + SGD step) on random data: sqrtNGD-d and full sqrtNGD vs plain SGD, interleaved
   repeats, medians (and ratios of the best times, less disturbed by other jobs). Exact per-batch curvature, no amortisation. float64 curvature algebra is the
   default; the float32 opt-in (``compute_dtype=torch.float32``) is reported beside it.

   Modes: exact sqrtNGD-d, amortised (``curvature_every`` 10), mixed precision, both; full sqrtNGD.
3. The exact sqrtNGD-d step's breakdown (forward + root back-propagation; precondition; SGD step)
   beside its measured floor: the SGD step, layer 1's root back-propagation, and every factor's
   Gram and eigh, each timed alone on the step's own matrices (``block_breakdown``); the amortised
   mode's floor the same way (what stays exact per batch plus its eigenvalue refresh G Q).

4. precision='mixed' vs float64 at gains 1, 1e-2, 1e-6, sqrtNGD-d and full sqrtNGD (``mixed_precision``,
   ``mixed_precision_full``): direction difference, float64 fallbacks, step time ratio (interleaved).

Usage: python bench/bench_curvature.py [--repeats 7] [--threads N] [--skip-n32-dense] [--mlp-only]
       [--skip-full] [--mixed-only] [--full-repeats 3] [--device cuda]
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


def mnist_mlp(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 30), nn.ReLU(), nn.Linear(30, 10)).to(device)


def mnist_like_batch(device, bsz=128, seed=0):
    """MNIST-shaped batch: sparse [0, 1] pixels (~19 % on, as MNIST), 10 balanced classes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(bsz, 784, generator=gen) * (torch.rand(bsz, 784, generator=gen) < 0.19)
    y = torch.arange(bsz) % 10
    return x.to(device), y.to(device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# this project's modes on the MLP step: name -> CurvaturePreconditioner settings (None = plain SGD)
MODES = {
    "sgd": None,
    "sqrt_ngd_d": {"structure": "block"},
    "sqrt_ngd_d_every10": {"structure": "block", "curvature_every": 10},
    "sqrt_ngd_d_mixed": {"structure": "block", "precision": "mixed"},
    "sqrt_ngd_d_every10_mixed": {"structure": "block", "curvature_every": 10, "precision": "mixed"},
    "sqrt_ngd_full": {"structure": "full"},
    "sqrt_ngd_full_f32": {"structure": "full", "compute_dtype": torch.float32},
}


def step_runner(settings, x, y, device, seed=0):
    """One training step (forward, backward / curvature, SGD step) of a fresh MLP; returns (step, model, pre).

    ``x, y`` may be lists of batches: step i takes batch i mod len (a new batch every step, as in
    training, so an amortised mode's refresh rule sees batch-to-batch changes)."""
    model = mnist_mlp(seed, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    pre = None if settings is None else CurvaturePreconditioner(model, q=2.0, **settings)
    batches = list(zip(x, y)) if isinstance(x, list) else [(x, y)]
    count = [0]

    def step():
        x, y = batches[count[0] % len(batches)]
        count[0] += 1
        opt.zero_grad()
        if pre is None:
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            pre.forward_backward(x, y)
            pre.precondition()
        opt.step()
    return step, model, pre


def interleaved(runners, repeats, device):
    """Median and best ms of each runner, run alternately (the same machine state for all)."""
    times = {k: [] for k in runners}
    for fn in runners.values():
        fn()                                                   # warm-up
    for _ in range(repeats):
        for k, fn in runners.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return ({k: 1e3 * statistics.median(v) for k, v in times.items()},
            {k: 1e3 * min(v) for k, v in times.items()})


def bench_mlp(repeats, device, skip_full=False):
    pairs = [mnist_like_batch(device, seed=s) for s in range(8)]
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    modes = {k: v for k, v in MODES.items() if not (skip_full and k.startswith("sqrt_ngd_full"))}
    runners, pres = {}, {}
    for k, v in modes.items():
        runners[k], _, pres[k] = step_runner(v, x, y, device)
    med, best = interleaved(runners, repeats, device)
    out = {f"{k}_ms": v for k, v in med.items()}
    for k in runners:
        if k != "sgd":
            out[f"{k}_over_sgd"] = med[k] / med["sgd"]
            out[f"{k}_over_sgd_best"] = best[k] / best["sgd"]
        if pres[k] is not None and pres[k].amortised is not None:
            am = pres[k].amortised
            out[f"{k}_refresh_rate"] = am.refresh_rate()
            # per layer: which output factors the refresh rule actually skips (layer 1's is the costly one)
            out[f"{k}_refresh_rate_by_layer"] = [round(r / am.steps, 3) for r in am.refreshes]
    out["sgd_best_ms"] = best["sgd"]
    return out


def block_breakdown(repeats, device):
    """Where the exact sqrtNGD-d step goes (forward + root back-propagation + gradient; precondition;
    SGD step) beside its floor: the pieces any exact per-batch step of this rule must compute, each
    timed alone in the same loop on the step's own matrices (float64): the plain SGD step (forward,
    backward, update: the gradient), layer 1's root back-propagation (cols+1 x B x 100 times 100 x 300,
    the only way to its output factor), every factor's Gram (G_l = rows^T rows / B; A_l through the
    B x B Gram where wider than B) and its eigh. ``floor_with_apply`` adds applying layer 1's root (its
    four float64 products and the 300 x 128 x 785 one). What the step spends above that is the other
    layers' roots and the bookkeeping (casts, concatenations)."""
    x, y = mnist_like_batch(device)
    model = mnist_mlp(0, device)
    pre = CurvaturePreconditioner(model, q=2.0, structure="block")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sgd_model = mnist_mlp(0, device)
    sgd_opt = torch.optim.SGD(sgd_model.parameters(), lr=1e-3)

    def sgd_step():
        sgd_opt.zero_grad()
        nn.functional.cross_entropy(sgd_model(x), y).backward()
        sgd_opt.step()
    pre.forward_backward(x, y)
    b = pre._batch
    ncol, bsz = b["deltas"][0].shape[1], b["bsz"]
    d2 = torch.randn(ncol + 1, bsz, model[2].weight.shape[0], dtype=F64, device=device)
    w2, m1 = model[2].weight.detach().to(F64), (torch.rand(1, bsz, model[2].weight.shape[1], device=device) > 0.5).to(F64)
    # keys name the factor and layer (G1 = layer 1's output factor) and the matrix multiplied / decomposed
    grams = {f"gram_G{i}_{r.shape[0]}x{r.shape[1]}": (lambda r=r: r.mT @ r) for i, r in enumerate(b["rows"], 1)}
    grams.update({f"gram_A{i}_{ab.shape[0]}x{ab.shape[1]}": (lambda ab=ab: ab @ ab.mT if ab.shape[1] > bsz else ab.mT @ ab)
                  for i, ab in enumerate(b["abars"], 1)})
    eighs = {f"eigh_{k.split('_')[1]}_{m.shape[0]}": (lambda m=m: torch.linalg.eigh(m / m.diagonal().sum()))
             for k, m in ((k, fn()) for k, fn in grams.items())}
    # curvature_every > 1 (EKFAC refresh) replaces each G's eigh by G Q (a stale basis: any orthogonal Q)
    ekfac = {f"ekfac_GQ_G{i}_{r.shape[1]}": (lambda g=r.mT @ r, qb=torch.linalg.eigh(r.mT @ r)[1]: g @ qb)
             for i, r in enumerate(b["rows"], 1)}
    # applying layer 1's root, as _layer_direction does through the B x B Gram: U_G [(U_G^T X V) * F] V^T abar
    # (four float64 products of 300 x 300 x 128 and 300 x 128 x 128, then 300 x 128 x 785 in float32)
    ab1, x1 = b["abars"][0], b["errors"][0].mT.to(F64)
    u_g1 = torch.linalg.eigh(b["rows"][0].mT @ b["rows"][0])[1].to(F64)
    v_a1 = torch.linalg.eigh(ab1 @ ab1.mT)[1].to(F64)
    f1 = torch.rand(u_g1.shape[0], v_a1.shape[0], dtype=F64, device=device)
    apply1 = lambda: ((u_g1 @ ((u_g1.mT @ x1 @ v_a1) * f1)) @ v_a1.mT).to(model[0].weight.dtype) @ ab1.to(model[0].weight.dtype)
    pre.precondition()
    floor_parts = {"sgd_full_step": sgd_step, "root_backprop_layer1": lambda: (d2 @ w2) * m1, **grams, **eighs,
                   "apply_root_layer1": apply1, **ekfac}
    parts = {"forward_backward": [], "precondition": [], "sgd_step": [], **{k: [] for k in floor_parts}}

    def timed_into(key, fn):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        parts[key].append(1e3 * (time.perf_counter() - t))
    for i in range(repeats + 1):
        opt.zero_grad()
        timed_into("forward_backward", lambda: pre.forward_backward(x, y))
        timed_into("precondition", pre.precondition)
        timed_into("sgd_step", opt.step)
        for k, fn in floor_parts.items():
            timed_into(k, fn)
        if i == 0:
            parts = {k: [] for k in parts}                     # drop the warm-up
    med = {f"{k}_ms": statistics.median(v) for k, v in parts.items()}
    med["step_ms"] = med["forward_backward_ms"] + med["precondition_ms"] + med["sgd_step_ms"]
    exact_floor = [k for k in floor_parts if not k.startswith(("ekfac", "apply"))]
    med["floor_ms"] = sum(med[f"{k}_ms"] for k in exact_floor)
    # the same floor with layer 1's root application, the largest product any exact step then computes
    med["floor_with_apply_ms"] = med["floor_ms"] + med["apply_root_layer1_ms"]
    med["floor_with_apply_over_sgd"] = med["floor_with_apply_ms"] / med["sgd_full_step_ms"]
    # curvature_every > 1: what stays exact per batch (SGD step, root back-propagation, every Gram, the
    # input factors' eighs) plus the eigenvalue refresh G Q; without the output factors' Grams and G Q:
    # the floor of any mode that keeps the input factors exact per batch
    input_side = ["sgd_full_step", "root_backprop_layer1"] + [k for k in floor_parts if k.startswith(("gram_A", "eigh_A"))]
    med["amortised_floor_ms"] = sum(med[f"{k}_ms"] for k in input_side + [k for k in floor_parts if k.startswith(("gram_G", "ekfac"))])
    med["input_side_floor_ms"] = sum(med[f"{k}_ms"] for k in input_side)
    med["amortised_floor_over_sgd"] = med["amortised_floor_ms"] / med["sgd_full_step_ms"]
    med["amortised_floor_with_apply_over_sgd"] = ((med["amortised_floor_ms"] + med["apply_root_layer1_ms"])
                                                  / med["sgd_full_step_ms"])
    med["input_side_floor_over_sgd"] = med["input_side_floor_ms"] / med["sgd_full_step_ms"]
    med["eigh_floor_ms"] = sum(med[f"{k}_ms"] for k in eighs)
    med["floor_over_sgd"] = med["floor_ms"] / med["sgd_full_step_ms"]
    med["step_over_sgd"] = med["step_ms"] / med["sgd_full_step_ms"]
    med["floor_share_of_step"] = med["floor_ms"] / med["step_ms"]
    return med


def mixed_accuracy(repeats, device, structure="block"):
    """precision='mixed' vs float64 for sqrtNGD-d (``structure='block'``) or full sqrtNGD (``'full'``) on the
    MNIST-shaped net at gains 1, 1e-2, 1e-6 (orthogonal init x gain, the trainer's): relative direction
    difference, float64 fallbacks (block: of 8 factors; full: of 1, the Gram or the graded path's last
    grade), and the step time ratio mixed / float64 (interleaved, one fixed batch and initial state)."""
    from trainers.mnist_mlp import build_model

    x, y = mnist_like_batch(device)
    out = {}
    for gain in (1.0, 1e-2, 1e-6):
        runs = {}
        for prec in ("float64", "mixed"):
            model = build_model([784, 300, 100, 30, 10], gain, torch.Generator().manual_seed(0)).to(device)
            pre = CurvaturePreconditioner(model, q=2.0, structure=structure, precision=prec)

            def step(pre=pre, model=model):
                model.zero_grad()
                pre.forward_backward(x, y)
                pre.precondition()
            step()
            runs[prec] = (step, torch.cat([p.grad.double().reshape(-1) for p in model.parameters()]), pre)
        d64, dmix = runs["float64"][1], runs["mixed"][1]
        med, best = interleaved({k: v[0] for k, v in runs.items()}, repeats, device)
        info = runs["mixed"][2].last_info
        row = {"rel_diff": float((dmix - d64).norm() / d64.norm()),
               f"float64_fallbacks_of_{8 if structure == 'block' else 1}": info["float64_fallbacks"],
               "mixed_over_float64_time": med["mixed"] / med["float64"]}
        if structure == "full":
            row.update(grades=info["grades"], float64_ms=med["float64"], mixed_ms=med["mixed"],
                       mixed_over_float64_best=best["mixed"] / best["float64"])
        out[f"{gain:g}"] = row
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-n32-dense", action="store_true", help="skip the ~10-60 s dense N=32 reference")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: the MLP steps run there unchanged")
    ap.add_argument("--mlp-only", action="store_true", help="only the MLP step table and its breakdown")
    ap.add_argument("--skip-full", action="store_true", help="leave out the full rule (seconds per step on CPU)")
    ap.add_argument("--mixed-only", action="store_true", help="only the mixed-precision comparison (both rules)")
    ap.add_argument("--full-repeats", type=int, default=3, help="repeats of the full rule's mixed comparison "
                    "(its step takes 0.5-5 s on CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mixed_only:
        mixed = mixed_accuracy(args.repeats, args.device)
        print("precision mixed vs float64 (sqrtNGD-d):", mixed, flush=True)
        mixed_full = None if args.skip_full else mixed_accuracy(args.full_repeats, args.device, "full")
        print("precision mixed vs float64 (full sqrtNGD):", mixed_full, flush=True)
        print(json.dumps({"mixed_precision": mixed, "mixed_precision_full": mixed_full, "device": args.device,
                          "torch_threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0]}))
        return
    if args.mlp_only:
        mlp = bench_mlp(args.repeats, args.device, args.skip_full)
        print("mlp [784,300,100,30,10] B=128:", mlp, flush=True)
        brk = block_breakdown(args.repeats, args.device)
        print("exact sqrtNGD-d step breakdown (ms):", brk, flush=True)
        mixed = mixed_accuracy(args.repeats, args.device)
        print("precision mixed vs float64 (sqrtNGD-d):", mixed, flush=True)
        mixed_full = None if args.skip_full else mixed_accuracy(args.full_repeats, args.device, "full")
        print("precision mixed vs float64 (full sqrtNGD):", mixed_full, flush=True)
        print(json.dumps({"mlp_step": mlp, "block_breakdown": brk, "mixed_precision": mixed,
                          "mixed_precision_full": mixed_full, "device": args.device,
                          "targets": {"exact_block_le_8x_sgd": mlp["sqrt_ngd_d_over_sgd"] <= 8,
                                      "amortised_block_le_3x_sgd": mlp["sqrt_ngd_d_every10_over_sgd"] <= 3},
                          "torch_threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0]}))
        return
    lin16 = bench_linear(16, 4, 3 * args.repeats, args.repeats)
    print("linear N=16 d=4:", lin16, flush=True)
    lin32 = bench_linear(32, 4, max(3, args.repeats // 2), 0 if args.skip_n32_dense else 1)
    print("linear N=32 d=4:", lin32, flush=True)
    mlp = bench_mlp(args.repeats, args.device, args.skip_full)
    print("mlp [784,300,100,30,10] B=128:", mlp, flush=True)
    brk = block_breakdown(args.repeats, args.device)
    print("exact sqrtNGD-d step breakdown (ms):", brk, flush=True)
    result = {
        "linear_full_sqrt_ngd": {"N16_d4": lin16, "N32_d4": lin32},
        "mlp_step": mlp,
        "block_breakdown": brk,
        "device": args.device,
        "targets": {
            "linear_speedup_N16_ge_30x": lin16["speedup"] >= 30,
            "linear_N32_map_step_lt_1s": lin32["map_space_s"] < 1.0,
            "exact_block_le_8x_sgd": mlp["sqrt_ngd_d_over_sgd"] <= 8,
            "amortised_block_le_3x_sgd": mlp["sqrt_ngd_d_every10_over_sgd"] <= 3,
            "mlp_full_le_20x_sgd": mlp.get("sqrt_ngd_full_over_sgd", float("inf")) <= 20,
        },
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
