"""This project's sweep vs Ray Tune on the same trials (issue 11). The last line printed is JSON.

The trials: the ``smoke`` experiment's grid (sgd and sqrtNGD-d on the tiny teacher-student task at
gains 0.1 and 0.01) with ``--seeds`` seeds, i.e. 4 x seeds trials, on ``--workers`` CPU workers:

1. ``python -m sweep +experiment=smoke sweep.seeds=[...]`` (embedded MLflow server, local Ray, report);
2. Ray Tune, the same trial configs through ``trainers.run_trial`` (every eval record reported), with
   the stock ``MLflowLoggerCallback`` to an ``mlflow server`` started here (the same server setup as
   the sweep's), no actor reuse;
3. Ray Tune with ``reuse_actors=True`` and no tracking (Tune's fastest configuration).

Reported: end-to-end wall seconds and trials per second of each (2 and 3 from ``Tuner.fit`` to its
return, Ray start-up excluded; 1 includes its own Ray and MLflow start-up and the report), measured in
one run, one after another. Needs nothing beyond the project's dependencies (Ray Tune is part of Ray).

Usage: python bench/bench_tune.py [--seeds 5] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import REPO  # noqa: E402  (bench/common.py; puts the repo and tests/ on sys.path)
from services import run_sweep, start_mlflow  # noqa: E402


def smoke_trials(seeds: int) -> list[dict]:
    """The smoke grid as plain trial configs (Contract 1), read from conf/experiment/smoke.yaml."""
    exp = yaml.safe_load((REPO / "conf/experiment/smoke.yaml").read_text())
    trainer = {"name": "linear_teacher", **exp["trainer"]}
    out = []
    for opt in exp["sweep"]["axes"]["optimizer"]:
        for gain in exp["sweep"]["axes"]["trainer"]["gain"]:
            for seed in range(seeds):
                out.append({"seed": seed, "device": "cpu",
                            "optimizer": {"name": opt, **exp["sweep"]["variants"][opt]["optimizer"]},
                            "trainer": {**trainer, "gain": gain}})
    return out


# Ray's node registration has a fixed 30 s limit ("timed out during startup"), hit on this shared machine
# at load ~25+: the bench retries a start that failed that way (and reports how often), nothing else.
RAY_START_FAILED = "timed out during startup"
ATTEMPTS = 3


def run_project_sweep(seeds: int, workers: int, tmp: Path) -> tuple[float, int]:
    """Wall seconds of the whole sweep command (the timed attempt) and the attempts it took."""
    args = ["+experiment=smoke", f"sweep.seeds=[{','.join(map(str, range(seeds)))}]",
            f"cluster.num_cpus={workers}", f"resources.workers={workers}"]
    for attempt in range(1, ATTEMPTS + 1):
        results = tmp / f"sweep{attempt}"
        results.mkdir()
        proc, wall = run_sweep(args, results, timeout=None)
        if proc.returncode == 0:
            return wall, attempt
        if RAY_START_FAILED not in proc.stdout + proc.stderr or attempt == ATTEMPTS:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"sweep failed ({proc.returncode})")
        print(f"sweep attempt {attempt}: Ray start-up timed out (load {os.getloadavg()[0]:.1f}); retrying",
              file=sys.stderr)


def start_ray_retrying(workers: int, tmp: Path) -> tuple[str, int]:
    from sweep.services import start_ray
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return start_ray(None, workers, 0, False, str(tmp / "ray.log")), attempt
        except Exception as e:  # noqa: BLE001 - only Ray's start-up timeout is retried
            if RAY_START_FAILED not in str(e) or attempt == ATTEMPTS:
                raise
            print(f"Tune's Ray start attempt {attempt} timed out; retrying", file=sys.stderr)


def trainable(config):
    import torch
    from ray import tune

    from trainers import run_trial
    torch.set_num_threads(1)
    for rec in run_trial(config["trial"]):
        if rec["kind"] == "eval":
            tune.report({k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float))})


def run_tune(trials: list[dict], workers: int, tmp: Path, mlflow_uri: str | None, reuse: bool) -> float:
    from ray import tune

    callbacks = []
    if mlflow_uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_uri, experiment_name="tune_smoke"))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(reuse_actors=reuse, max_concurrent_trials=workers),
        run_config=tune.RunConfig(storage_path=str(tmp / "tune"), callbacks=callbacks, verbose=0))
    t0 = time.monotonic()
    results = tuner.fit()
    wall = time.monotonic() - t0
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"Tune trials failed: {errors[0]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="seeds per grid point (4 grid points)")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    load_start = os.getloadavg()[0]
    trials = smoke_trials(a.seeds)
    tmp = Path(tempfile.mkdtemp(prefix="h-bench-tune-"))
    out = {"benchmark": "sweep_vs_tune", "trials": len(trials), "workers": a.workers}
    try:
        out["sweep_wall_s"], out["sweep_attempts"] = run_project_sweep(a.seeds, a.workers, tmp)
        os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
                          PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        sys.path.insert(0, str(REPO))
        ray_tmp, out["tune_ray_attempts"] = start_ray_retrying(a.workers, tmp)
        server = start_mlflow(tmp / "mlflow")
        try:
            out["tune_mlflow_wall_s"] = run_tune(trials, a.workers, tmp, server.uri, reuse=False)
            out["tune_reuse_actors_wall_s"] = run_tune(trials, a.workers, tmp, None, reuse=True)
        finally:
            server.stop()
            import ray
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k in ("sweep", "tune_mlflow", "tune_reuse_actors"):
        out[f"{k}_trials_per_s"] = round(len(trials) / out[f"{k}_wall_s"], 3)
        out[f"{k}_wall_s"] = round(out[f"{k}_wall_s"], 1)
    out["load_avg_1min"] = os.getloadavg()[0]
    out["load_avg_start_1min"] = load_start
    print(f"{'runner':<22} {'wall s':>8} {'trials/s':>9}   ({len(trials)} trials, {a.workers} workers)")
    for k in ("sweep", "tune_mlflow", "tune_reuse_actors"):
        print(f"{k:<22} {out[k + '_wall_s']:>8.1f} {out[k + '_trials_per_s']:>9.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
