"""WorkerPool on a real local Ray: a worker that can never be placed shrinks the pool instead of
blocking the sweep (the situation after a node is lost for good and no other node has room).

Each scenario runs in its own Python process: Ray fixes its auth mode once per process, and
tests/test_cluster.py runs its cluster with token auth in the pytest process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent


def _trial(seed: int) -> SimpleNamespace:
    config = {"seed": seed, "device": "cpu", "optimizer": {"name": "sgd", "lr": 0.05},
              "trainer": {"name": "linear_teacher", "width": 4, "depth": 2, "rank": 1,
                          "teacher_singular_values": [1.0], "train_samples": 4,
                          "steps": 5, "eval_every": 5}}
    return SimpleNamespace(variant="sgd", config=config)


def _scenario(n_workers: int, cpu: float, n_trials: int, timeout_s: float) -> dict:
    """Runs in the child process: a 1-CPU local Ray, a pool of `n_workers` asking `cpu` each."""
    import ray

    from services import fresh_ray_temp_dir
    from sweep import scheduler
    import time
    scheduler.WORKER_START_TIMEOUT_S = timeout_s
    ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=fresh_ray_temp_dir(),
             log_to_driver=False)
    finished, statuses, retries, warnings, ended_at = [], [], [], [], []
    t0 = time.monotonic()
    callbacks = scheduler.Callbacks(
        start=lambda job: None,
        records=lambda job, records: statuses.extend(r["status"] for r in records if r["kind"] == "summary"),
        finish=lambda job, item: (finished.append([job.trial.config["seed"], item["error"]]),
                                  ended_at.append(time.monotonic() - t0)),
        warn=lambda message: warnings.append([time.monotonic() - t0, message]),
        retry=lambda job, reason: retries.append(reason), give_up=lambda job, reason: retries.append(reason))
    pool = scheduler.WorkerPool(n_workers=n_workers, cpu=cpu, gpu=0, max_retries=0)
    try:
        pool.run([_trial(s) for s in range(n_trials)], callbacks)
        error = None
    except RuntimeError as e:
        error = str(e)
    finally:
        pool.shutdown()
        ray.shutdown()
    return {"finished": sorted(finished), "statuses": statuses, "retries": retries, "error": error,
            "workers_left": len(pool.workers), "warnings": warnings, "ended_at": ended_at}


def _run(*args) -> dict:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_TMPDIR"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_trials_run_on_the_placed_worker_while_another_waits_to_be_placed():
    # two workers of 1 CPU on a 1-CPU cluster: one can never be placed. The trials run on the placed one
    # while the other is still waited for (in parallel, not before): all end before its 60 s are up.
    out = _run(2, 1, 3, 60)
    assert out["error"] is None
    assert out["finished"] == [[0, None], [1, None], [2, None]]
    assert out["statuses"] == ["finished"] * 3
    assert out["retries"] == []
    assert max(out["ended_at"]) < 60 and out["warnings"] == [], out


def test_no_placeable_worker_at_all_fails_with_the_fix():
    out = _run(1, 2, 1, 3)  # the only worker needs 2 CPUs, the cluster has 1: dropped after 3 s, said so
    assert out["finished"] == []
    assert len(out["warnings"]) == 1 and "could not be placed within 3 s" in out["warnings"][0][1], out
    assert out["warnings"][0][0] >= 3
    assert "no Ray worker could be placed" in out["error"] and "resources.cpu" in out["error"]


if __name__ == "__main__":
    print(json.dumps(_scenario(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))))
