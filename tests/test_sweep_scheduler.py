"""WorkerPool on a real local Ray: a worker that can never be placed shrinks the pool instead of
blocking the sweep (the situation after a node is lost for good and no other node has room)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from services import fresh_ray_temp_dir
from sweep import scheduler


def _trial(seed: int) -> SimpleNamespace:
    config = {"seed": seed, "device": "cpu", "optimizer": {"name": "sgd", "lr": 0.05},
              "trainer": {"name": "linear_teacher", "width": 4, "depth": 2, "rank": 1,
                          "teacher_singular_values": [1.0], "train_samples": 4, "test_samples": 40,
                          "steps": 5, "eval_every": 5}}
    return SimpleNamespace(variant="sgd", config=config)


@pytest.fixture
def one_cpu_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=fresh_ray_temp_dir(),
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_unplaceable_worker_is_dropped_and_every_trial_still_runs(one_cpu_ray, monkeypatch):
    monkeypatch.setattr(scheduler, "WORKER_START_TIMEOUT_S", 3.0)
    pool = scheduler.WorkerPool(n_workers=2, cpu=1, gpu=0, max_retries=0)  # room for one worker only
    finished, statuses = [], []
    callbacks = scheduler.Callbacks(
        start=lambda job: None,
        records=lambda job, records: statuses.extend(r["status"] for r in records if r["kind"] == "summary"),
        finish=lambda job, item: finished.append((job.trial.config["seed"], item["error"])),
        retry=lambda job, reason: pytest.fail(f"unexpected retry: {reason}"),
        give_up=lambda job, reason: pytest.fail(f"unexpected give-up: {reason}"))
    try:
        pool.run([_trial(s) for s in range(3)], callbacks)
    finally:
        pool.shutdown()
    assert sorted(finished) == [(0, None), (1, None), (2, None)]
    assert statuses == ["finished"] * 3
    assert len(pool.workers) == 1


def test_no_placeable_worker_at_all_fails_with_the_fix(one_cpu_ray, monkeypatch):
    monkeypatch.setattr(scheduler, "WORKER_START_TIMEOUT_S", 2.0)
    pool = scheduler.WorkerPool(n_workers=1, cpu=2, gpu=0, max_retries=0)  # needs 2 CPUs, the cluster has 1
    callbacks = scheduler.Callbacks(start=lambda job: None, records=lambda job, r: None,
                                    finish=lambda job, item: None, retry=lambda job, r: None,
                                    give_up=lambda job, r: None)
    try:
        with pytest.raises(RuntimeError, match="resources.cpu"):
            pool.run([_trial(0)], callbacks)
    finally:
        pool.shutdown()
