"""Does the amortised block rule (``optimizer.curvature_every: k``) reproduce the exact rule's S.I.3 result?

sqrtNGD-d (undamped, lr 0.1; ``--rule ngd_d``: NGD-d with its S.I.3 damping and lr per gain) on MNIST
at gains 1, 1e-2, 1e-4, 1e-6 with the ``mnist_gain`` experiment's
budget (100 steps of batch 128 on 5,000 training images, 2,000 test images), seeds 0-2: the exact rule
(k = 1) and the amortised one side by side (and, with --mixed, precision mixed). Reported per gain:
final test loss of each, their ratio, divergences, the refresh rate (share of output factors
decomposed afresh), wall time per trial. Target: final test loss within 5 % of exact, no divergence.
The last line printed is a JSON object.

``--by-layer``: instead, the refresh rate of each layer's output factor (the trainer reports the mean
only), from the same steps run in-process (sqrtNGD-d, lr 0.1, batch 128 on the first 5,000 training
images, the trainer's init): which factors the refresh rule actually skips.

Usage: python bench/bench_amortised.py [--every 10] [--seeds 0 1 2] [--steps 100] [--mixed] [--by-layer]
       [--rule ngd_d]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainers import run_trial  # noqa: E402

GAINS = (1.0, 1e-2, 1e-4, 1e-6)


# NGD-d's S.I.3 settings (conf/experiment/mnist_gain.yaml): damping and lr zipped with the gain
NGD_D = {1.0: {"lr": 0.03, "damping": 1e-3}, 1e-2: {"lr": 0.03, "damping": 1e-3},
         1e-4: {"lr": 3e-5, "damping": 1e-6}, 1e-6: {"lr": 3e-6, "damping": 1e-7}}


def trial(seed, gain, steps, device, rule="sqrt_ngd_d", **opt):
    base = {"name": "sqrt_ngd_d", "lr": 0.1} if rule == "sqrt_ngd_d" else {"name": rule, **NGD_D[gain]}
    cfg = {"seed": seed, "device": device,
           "optimizer": {**base, **opt},
           "trainer": {"name": "mnist_mlp", "gain": gain, "steps": steps, "eval_every": steps,
                       "train_subset": 5000, "test_subset": 2000}}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = list(run_trial(cfg))
    wall = time.perf_counter() - t
    last_eval = [r for r in recs if r["kind"] == "eval"][-1]["metrics"]
    return {"status": recs[-1]["status"], "test_loss": last_eval["test_loss"], "wall_s": wall,
            "refresh_rate": last_eval.get("curvature_refresh_rate", 1.0)}


def refresh_by_layer(seed, gain, steps, every, device):
    """Per layer: the share of steps whose output factor was decomposed afresh (see --by-layer)."""
    from trainers.data import load_dataset
    from trainers.mlp_curvature import CurvaturePreconditioner
    from trainers.mnist_mlp import _tensors, build_model

    data = load_dataset("mnist")
    x, y = _tensors(data.train_images, data.train_labels, 5000, device)
    gen = torch.Generator().manual_seed(seed)
    model = build_model([784, 300, 100, 30, 10], gain, gen).to(device)
    pre = CurvaturePreconditioner(model, q=2.0, structure="block", curvature_every=every)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    order, batches = torch.randperm(len(y), generator=gen), len(y) // 128
    for step in range(steps):
        idx = order[(step % batches) * 128:(step % batches + 1) * 128]
        opt.zero_grad()
        pre.forward_backward(x[idx], y[idx])
        pre.precondition()
        opt.step()
    return [round(r / pre.amortised.steps, 3) for r in pre.amortised.refreshes]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--gains", type=float, nargs="+", default=list(GAINS))
    ap.add_argument("--mixed", action="store_true", help="also precision: mixed (exact every step)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--by-layer", action="store_true", help="only the per-layer refresh rates (see above)")
    ap.add_argument("--rule", default="sqrt_ngd_d", choices=["sqrt_ngd_d", "ngd_d"],
                    help="ngd_d: with its S.I.3 damping and lr per gain (mnist_gain.yaml)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.by_layer:
        rates = {f"{g:g}": {s: refresh_by_layer(s, g, args.steps, args.every, args.device) for s in args.seeds}
                 for g in args.gains}
        for g, per in rates.items():
            print(f"gain {g}: refresh rate by layer (seed: layers 1..4)", per, flush=True)
        print(json.dumps({"refresh_rate_by_layer": rates, "every": args.every, "steps": args.steps,
                          "load_avg_1min": os.getloadavg()[0]}))
        return
    modes = {"exact": {}, f"every_{args.every}": {"curvature_every": args.every}}
    if args.mixed:
        modes["mixed"] = {"precision": "mixed"}
        modes[f"every_{args.every}_mixed"] = {"curvature_every": args.every, "precision": "mixed"}
    rows = {}
    for gain in args.gains:
        per = {m: [] for m in modes}
        for seed in args.seeds:
            for m, opt in modes.items():            # alternate modes: the same machine state
                per[m].append(trial(seed, gain, args.steps, args.device, args.rule, **opt))
        row = {}
        for m, runs in per.items():
            row[m] = {"test_loss": [round(r["test_loss"], 4) for r in runs],
                      "diverged": sum(r["status"] != "finished" for r in runs),
                      "refresh_rate": [round(r["refresh_rate"], 3) for r in runs],
                      "wall_s": round(sum(r["wall_s"] for r in runs) / len(runs), 2)}
            if m != "exact":
                ratios = [a["test_loss"] / b["test_loss"] for a, b in zip(runs, per["exact"])]
                row[m]["loss_over_exact"] = [round(x, 4) for x in ratios]
                row[m]["within_5pct"] = all(abs(x - 1) <= 0.05 for x in ratios) and row[m]["diverged"] == 0
        rows[f"{gain:g}"] = row
        print(f"gain {gain:g}:", json.dumps(row), flush=True)
    ok = all(v["within_5pct"] for row in rows.values() for k, v in row.items() if k != "exact")
    print(json.dumps({f"{args.rule}_mnist_gain": rows, "every": args.every, "seeds": args.seeds,
                      "steps": args.steps, "all_within_5pct_no_divergence": ok,
                      "load_avg_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
