"""Benchmark of the graded full rule (issue 10). The last line printed is a JSON object.

One training step (forward + backward + precondition + SGD step) of full sqrtNGD on the MNIST-shaped MLP
[784,300,100,30,10], batch 128 (output-space Gram 1152^2), random data, in one process, interleaved:

- gain 1: the rule as shipped (it checks the terms' scales, finds one grade and takes the single-matrix
  path) vs the single-matrix rule before issue 10 (the same code with the scale check skipped); and the
  scale check alone (the only added work, robust to load where the two step times are not).
- gain 1e-6: the graded rule (four grades) vs the single-matrix rule (wrong there: it keeps only the last
  bias's directions; timed for the cost comparison only).
- the unit and the floor, in the same loop: a plain torch SGD step of the same model and batch, and a
  bare float64 eigh of the step's own 1152^2 output-space Gram (the one decomposition the rule needs).

Usage: python bench/bench_full_graded.py [--repeats 7] [--threads 1]
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
import trainers.mlp_curvature as mlp_curvature  # noqa: E402
from trainers.mlp_curvature import CurvaturePreconditioner  # noqa: E402


def model_at(gain, seed=0):
    torch.manual_seed(seed)
    mods = []
    widths = [784, 300, 100, 30, 10]
    for i in range(4):
        lin = nn.Linear(widths[i], widths[i + 1])
        nn.init.orthogonal_(lin.weight, gain=gain)
        nn.init.zeros_(lin.bias)
        mods += [lin, nn.ReLU()] if i < 3 else [lin]
    return nn.Sequential(*mods)


def step_fn(gain, single_matrix):
    model = model_at(gain)
    pre = CurvaturePreconditioner(model, q=2.0, structure="full")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    state = model.state_dict()

    def step():
        model.load_state_dict(state)                   # every repeat times the same (initial) step
        scales = mlp_curvature._term_scales
        if single_matrix:
            mlp_curvature._term_scales = lambda *a: [1.0]
        try:
            model.zero_grad()
            pre.forward_backward(x, y)
            pre.precondition()
        finally:
            mlp_curvature._term_scales = scales
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        return pre.last_info["grades"]
    return step


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen)


def sgd_step():
    """The unit: torch SGD on the same model and batch (forward, backward, update)."""
    model = model_at(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return None
    return step


def gram_eigh():
    """The floor: float64 eigh of the gain-1 step's own (trace-normalised) 1152 x 1152 output-space Gram."""
    pre = CurvaturePreconditioner(model_at(1.0), q=2.0, structure="full")
    pre.forward_backward(*_data())
    b = pre._batch
    n = b["bsz"] * b["u"].shape[1]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for ab, dl in zip(b["abars"], b["deltas"]):
        flat = dl.to(torch.float64).reshape(n, -1)
        a = ab.to(torch.float64)
        gram += (flat @ flat.mT) * torch.repeat_interleave(torch.repeat_interleave(a @ a.mT, dl.shape[1], 0),
                                                           dl.shape[1], 1)
    gram /= gram.diagonal().sum()
    return lambda: (torch.linalg.eigh(gram), None)[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"gain1_shipped": (1.0, False), "gain1_single_matrix": (1.0, True),
             "gain1e-6_graded": (1e-6, False), "gain1e-6_single_matrix": (1e-6, True)}
    fns = {k: step_fn(*v) for k, v in cases.items()}
    fns["sgd"], fns["eigh_1152"] = sgd_step(), gram_eigh()
    times = {k: [] for k in fns}
    grades = {k: fn() for k, fn in fns.items()}             # warm-up
    names = list(fns)
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:   # interleaved, order rotated each round
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    pre = CurvaturePreconditioner(model_at(1.0), q=2.0, structure="full")
    gen = torch.Generator().manual_seed(1)
    pre.forward_backward(torch.rand(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen))
    b = pre._batch
    check = []
    for _ in range(args.repeats):                         # the only work gain 1 adds: the scale check
        t = time.perf_counter()
        mlp_curvature.one_grade(mlp_curvature._term_scales(b["abars"], b["deltas"], b["bsz"]))
        check.append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    for k in fns:
        print(f"{k:24s} median {med[k] * 1e3:8.1f} ms  best {best[k] * 1e3:8.1f} ms  grades {grades[k]}")
    result = {
        "repeats": args.repeats, "threads": args.threads, "load_average_1min": os.getloadavg()[0],
        "median_s": med, "best_s": best, "grades": grades, "scale_check_median_s": statistics.median(check),
        "scale_check_over_gain1_step_median": statistics.median(check) / med["gain1_single_matrix"],
        "gain1_shipped_over_single_matrix_median": med["gain1_shipped"] / med["gain1_single_matrix"],
        "gain1_shipped_over_single_matrix_best": best["gain1_shipped"] / best["gain1_single_matrix"],
        "gain1e-6_graded_over_gain1_shipped_median": med["gain1e-6_graded"] / med["gain1_shipped"],
        "gain1e-6_graded_over_single_matrix_median": med["gain1e-6_graded"] / med["gain1e-6_single_matrix"],
        "gain1_shipped_over_sgd_median": med["gain1_shipped"] / med["sgd"],
        "gain1e-6_graded_over_sgd_median": med["gain1e-6_graded"] / med["sgd"],
        "eigh_1152_over_sgd_median": med["eigh_1152"] / med["sgd"],
        "eigh_1152_share_of_gain1_step": med["eigh_1152"] / med["gain1_shipped"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
