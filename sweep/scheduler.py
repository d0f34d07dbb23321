"""Runs trials on Ray core: a pool of long-lived worker actors, each running many trials.

Why not Ray Tune: a Tune trial is an actor of its own and pays actor start + `import torch` (6-9 s
measured on 2 cores) per trial, far more than a teacher-student trial's compute. Here a worker
imports torch once and runs trials back to back; each trial streams its metric records back (a Ray
generator, batched about once a second) and the driver alone talks to MLflow. A worker that dies
(RayActorError, node loss) is replaced and its trial rerun as attempt + 1, up to `max_retries` times.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayError

log = logging.getLogger(__name__)

# How long a (replacement) worker may wait for room on the cluster before the pool shrinks without it.
WORKER_START_TIMEOUT_S = float(os.environ.get("SWEEP_WORKER_START_TIMEOUT_S", "120"))


@ray.remote
class TrialWorker:
    """Imports torch and the trainers once; runs any number of trials, one at a time."""

    def __init__(self):
        if not ray.get_gpu_ids():  # no GPU reserved for this worker: do not touch one (device auto = cpu)
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import torch  # noqa: F401  (the expensive import, paid once per worker)

        import trainers  # noqa: F401
        self._run_trial = trainers.run_trial

    def info(self) -> dict:
        """Where this worker runs: node, the GPUs Ray assigned it, and what torch sees there."""
        import torch
        ctx = ray.get_runtime_context()
        cuda = torch.cuda.is_available()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "torch_device": f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"}

    def run(self, config: dict, flush_s: float = 1.0):
        """Yields {"records": [...]} batches; the last one has done=True, its compute seconds, and
        `error` (a traceback) if the trainer raised: that fails this trial, not the worker."""
        start = last = time.monotonic()
        batch: list = []
        try:
            for record in self._run_trial(config):
                batch.append(record)
                now = time.monotonic()
                if now - last >= flush_s:
                    yield {"records": batch, "done": False}
                    batch, last = [], now
            yield {"records": batch, "done": True, "compute_s": time.monotonic() - start, "error": None}
        except Exception:  # noqa: BLE001 - reported as this trial's failure
            yield {"records": batch, "done": True, "compute_s": time.monotonic() - start,
                   "error": traceback.format_exc(limit=20)}


@dataclass
class Job:
    """One trial being run: `trial` is the caller's object, `attempt` counts from 1."""
    trial: object
    attempt: int = 1
    worker: object = None
    info: dict = field(default_factory=dict)
    stream: object = None
    state: object = None  # the caller's per-attempt state (its MLflow run handle)


@dataclass
class Callbacks:
    start: Callable[[Job], object]               # a job starts on a worker; returns per-attempt state
    records: Callable[[Job, list], None]         # a batch of metric records arrived
    finish: Callable[[Job, dict], None]          # the last batch: {"compute_s", "error"}
    retry: Callable[[Job, str], None]            # the worker died; this attempt is abandoned
    give_up: Callable[[Job, str], None]          # the worker died and no retries are left
    tick: Callable[[int], None] = lambda running: None  # called about twice a second
    warn: Callable[[str], None] = lambda message: None  # something the user should see (a dropped worker)


class WorkerPool:
    def __init__(self, n_workers: int, cpu: float, gpu: float, max_retries: int):
        self.options = dict(num_cpus=cpu, num_gpus=gpu, max_concurrency=1)
        self.max_retries = max_retries
        self.workers = [self._new_worker() for _ in range(n_workers)]
        self.replaced = 0

    def _new_worker(self):
        return TrialWorker.options(**self.options).remote()

    @staticmethod
    def _pick(queue: list, cost: dict, started: set) -> "Job":
        """Next job: retries first; then one of each variant not started yet (grid order), so every
        variant's cost is learned early; then the variant with the longest observed trials, so long ones
        do not end up alone at the tail of the sweep (longest-processing-time-first)."""
        def rank(i_job):
            i, job = i_job
            seen = cost.get(job.trial.variant)
            return (job.attempt == 1, job.trial.variant in started, seen is None,
                    -(sum(seen) / len(seen)) if seen else 0.0, i)
        i, job = min(enumerate(queue), key=rank)
        started.add(job.trial.variant)
        return queue.pop(i)

    def run(self, trials: list, cb: Callbacks) -> None:
        queue = [Job(t) for t in trials]
        cost: dict = {}  # variant -> seconds of its finished trials
        started: set = set()
        idle: list = []
        infos: dict = {}
        running: dict = {}  # stream -> Job
        self.running = running  # what is in flight (the runner marks these KILLED on an interrupt)
        # every worker is asked where it runs at once; trials start on those placed, while the others
        # get WORKER_START_TIMEOUT_S to be placed (in parallel) before the pool shrinks without them
        placing = {w.info.remote(): (w, time.monotonic() + WORKER_START_TIMEOUT_S) for w in self.workers}
        while queue or running:
            self._place(placing, idle, infos, cb, wait_s=0.5 if queue and not running and not idle else 0.0)
            if not self.workers and queue:
                raise RuntimeError(
                    f"no Ray worker could be placed within {WORKER_START_TIMEOUT_S:.0f} s "
                    f"(each needs {self.options['num_cpus']} CPU, {self.options['num_gpus']} GPU). "
                    "Fix: add nodes to the cluster or lower resources.cpu / resources.gpu")
            while idle and queue:
                job, worker = self._pick(queue, cost, started), idle.pop()
                job.worker = worker
                job.info = infos.get(id(worker), {})
                job.state = cb.start(job)
                job.stream = worker.run.remote(job.trial.config)
                running[job.stream] = job
            if not running:
                cb.tick(0)
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for stream in ready:
                job = running[stream]
                try:
                    item = ray.get(next(stream))
                except StopIteration:
                    item = {"records": [], "done": True, "compute_s": None, "error": "worker stream ended early"}
                except RayActorError as e:
                    del running[stream]
                    self.replaced += 1
                    replacement = self._new_worker()
                    self.workers = [replacement if w is job.worker else w for w in self.workers]
                    placing[replacement.info.remote()] = (replacement, time.monotonic() + WORKER_START_TIMEOUT_S)
                    reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                    if job.attempt <= self.max_retries:
                        cb.retry(job, reason)
                        queue.append(Job(job.trial, attempt=job.attempt + 1))
                    else:
                        cb.give_up(job, reason)
                    continue
                except RayError as e:  # the task itself broke (e.g. records that cannot be pickled)
                    item = {"records": [], "done": True, "compute_s": None, "error": f"{type(e).__name__}: {e}"}
                if item["records"]:
                    cb.records(job, item["records"])
                if item["done"]:
                    if item.get("compute_s") is not None:
                        cost.setdefault(job.trial.variant, []).append(item["compute_s"])
                    del running[stream]
                    cb.finish(job, item)
                    idle.append(job.worker)
            cb.tick(len(running))

    def _place(self, placing: dict, idle: list, infos: dict, cb: Callbacks, wait_s: float) -> None:
        """Move placed workers to `idle` (with their node and GPU ids, tags on their trials); drop the ones
        still unplaced at their deadline (e.g. more workers than fit, or a node lost for good), saying so."""
        if not placing:
            return
        ready, _ = ray.wait(list(placing), num_returns=len(placing), timeout=wait_s)
        for ref in ready:
            worker, _deadline = placing.pop(ref)
            try:
                infos[id(worker)] = ray.get(ref)
            except RayError as e:  # died while starting: its first trial sees RayActorError and retries
                log.warning("worker info unavailable: %s", e)
                infos[id(worker)] = {}
            idle.append(worker)
        now = time.monotonic()
        for ref, (worker, deadline) in list(placing.items()):
            if now >= deadline:
                del placing[ref]
                self._drop(worker)
                message = (f"a Ray worker ({self.options['num_cpus']:g} CPU, {self.options['num_gpus']:g} GPU) "
                           f"could not be placed within {WORKER_START_TIMEOUT_S:.0f} s and was dropped; "
                           f"{len(self.workers)} workers remain")
                log.warning(message)
                cb.warn(message)

    def _drop(self, worker) -> None:
        self.workers = [w for w in self.workers if w is not worker]
        try:
            ray.kill(worker)
        except Exception:  # noqa: BLE001
            pass

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001
                pass
