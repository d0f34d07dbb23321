"""One sweep, start to finish: services up, resume, run the trials, report, services down."""
from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from . import grid
from . import provenance
from .services import MlflowServer, free_port, start_ray
from .ui import record_timings, run_url, runs_url, ui_command

log = logging.getLogger("sweep")


class Sweep:
    """Driver-side state of one sweep: the tracker, the parent run and one child run per attempt."""

    def __init__(self, cfg: DictConfig, trials: list[grid.Trial], tracker, console: Console):
        from .cli import sweep_id
        self.cfg, self.trials, self.tracker, self.console = cfg, trials, tracker, console
        self.experiment = cfg.tracking.experiment or cfg.name
        self.sweep_id = sweep_id(self.experiment, trials)
        self.failed: list[str] = []
        self.progress = None
        self.streamed: list = []  # (run handle, metrics) as logged: the report draws from these

    # ---- resume
    def open(self) -> list[grid.Trial]:
        """Parent run (reused for the same experiment and grid), and the trials still to run."""
        tr = self.tracker
        self.exp_id = tr.experiment_id(self.experiment)
        parent = tr.find_parent(self.exp_id, self.sweep_id)
        if parent is None:
            self.parent_id = tr.create_parent(self.exp_id, f"{self.experiment}-{self.sweep_id[:6]}", {
                "sweep.id": self.sweep_id, "sweep.trials": str(len(self.trials)),
                "sweep.experiment": self.experiment})
            self._log_plan()
            children = []
        else:
            self.parent_id = parent.info.run_id
            tr.call(tr.client.update_run, self.parent_id, "RUNNING")
            children = tr.children(self.exp_id, self.parent_id)
        keys = {t.key for t in self.trials}
        finished = {}
        for run in children:
            key = run.data.tags.get("trial.key")
            if run.info.status == "FINISHED" and key in keys and key not in finished:
                finished[key] = run.info.run_id
        for run in children:  # leftovers of an interrupted run: exactly one visible run per key
            if finished.get(run.data.tags.get("trial.key")) != run.info.run_id:
                tr.call(tr.client.delete_run, run.info.run_id)
        # finished trials of other grids of this experiment (same trial key = same resolved config)
        self.past = tr.finished_trials(self.exp_id)
        for key in sorted(keys - set(finished)):
            run = self.past.get(key)
            if run is not None:
                if run.data.tags.get(f"sweep.reused_by.{self.sweep_id}") != "true":
                    tr.reuse(run.info.run_id, self.sweep_id)
                finished[key] = run.info.run_id
        self.resumed = finished
        return [t for t in self.trials if t.key not in finished]

    def _log_plan(self) -> None:
        tr = self.tracker
        resolved = OmegaConf.to_yaml(self.cfg, resolve=True)
        tr.call(tr.client.log_text, self.parent_id, resolved, "sweep_config.yaml")
        rows = [{"trial.key": t.key, "variant": t.variant, "gain": t.gain, "seed": t.seed, "point": t.point}
                for t in self.trials]
        tr.call(tr.client.log_dict, self.parent_id, rows, "grid.json")

    # ---- scheduler callbacks
    def start(self, job):
        t = job.trial
        tags = {"trial.key": t.key, "optimizer": t.optimizer, "variant": t.variant, "gain": f"{t.gain:g}",
                "seed": str(t.seed), "status": "running", "attempt": str(job.attempt), "sweep.id": self.sweep_id,
                "node.id": job.info.get("node_id", ""), "worker.gpu_ids": ",".join(job.info.get("gpu_ids", [])),
                "worker.torch_device": job.info.get("torch_device", "")}
        name = run_name(t)
        self.progress.started(job.trial, name)
        return self.tracker.start_child(self.exp_id, self.parent_id, name, tags, grid.flatten_params(t.config))

    def records(self, job, records: list) -> None:
        metrics = []
        for r in records:
            if r.get("kind") == "eval":
                metrics += [(k, v, r["step"]) for k, v in r["metrics"].items() if _number(v)]
            elif r.get("kind") == "summary":
                job.summary = r
                metrics += [(k, v, r.get("step") or 0) for k, v in r["metrics"].items() if _number(v)]
        self.tracker.log_metrics(job.state, metrics)
        self.streamed.append((job.state, metrics))

    def finish(self, job, item: dict) -> None:
        summary = getattr(job, "summary", None)
        if item.get("compute_s") is not None:
            self.tracker.log_metrics(job.state, [("trial_seconds", item["compute_s"], 0)])
        if item.get("error") or summary is None:
            error = item.get("error") or "the trainer ended without a summary record"
            self.tracker.set_tags(job.state, {"status": "failed", "error": error[-4000:]})
            self.tracker.end(job.state, "FAILED")
            self.failed.append(f"{job.trial.variant} gain={job.trial.gain:g} seed={job.trial.seed}: "
                               f"{error.strip().splitlines()[-1]}")
            self.progress.ended(job.trial, "failed", None, item.get("compute_s"))
        else:
            status = summary.get("status", "finished")
            tags = {"status": status}
            if summary.get("diverged_step") is not None:
                tags["diverged_step"] = str(summary["diverged_step"])
            if summary.get("reason"):
                tags["reason"] = str(summary["reason"])[:4000]
            self.tracker.set_tags(job.state, tags)
            self.tracker.end(job.state, "FINISHED")
            self.progress.ended(job.trial, status, summary.get("metrics", {}), item.get("compute_s"))

    def retry(self, job, reason: str) -> None:
        """The worker died: drop this attempt's run (the retry gets a fresh one, attempt + 1)."""
        self.tracker.delete(job.state)
        log.warning("trial %s attempt %d lost (%s); retrying", job.trial.key, job.attempt, reason)
        self.progress.ended(job.trial, "retried", None, None)

    def give_up(self, job, reason: str) -> None:
        self.tracker.set_tags(job.state, {"status": "failed", "error": f"worker died: {reason}"})
        self.tracker.end(job.state, "FAILED")
        self.failed.append(f"{job.trial.variant} gain={job.trial.gain:g} seed={job.trial.seed}: worker died "
                           f"{job.attempt} times ({reason})")
        self.progress.ended(job.trial, "failed", None, None)

    def dedupe(self) -> None:
        """After the sweep: keep exactly one visible run per key (a retried create can leave a spare)."""
        tr = self.tracker
        best: dict = {}
        children = tr.children(self.exp_id, self.parent_id)
        rank = {"FINISHED": 0, "FAILED": 1, "KILLED": 2, "RUNNING": 3, "SCHEDULED": 3}
        for run in sorted(children, key=lambda r: (rank.get(r.info.status, 4), -r.info.start_time)):
            key = run.data.tags.get("trial.key")
            if key in best:
                tr.call(tr.client.delete_run, run.info.run_id)
            else:
                best[key] = run


def run_name(t: grid.Trial) -> str:
    """Short and distinct in MLflow's runs table: variant, gain, seed."""
    from .report import fmt_gain
    return f"{t.variant} g{fmt_gain(t.gain)} s{t.seed}"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _workers(cfg: DictConfig, n_trials: int) -> int:
    import ray
    res = cfg.resources
    if res.workers:
        return min(res.workers, max(n_trials, 1))
    total = ray.cluster_resources()
    n = math.floor(total.get("CPU", 0) / res.cpu + 1e-9)
    if res.gpu > 0:
        n = min(n, math.floor(total.get("GPU", 0) / res.gpu + 1e-9))
    return min(n, max(n_trials, 1))


def run_sweep(cfg: DictConfig, trials: list[grid.Trial], console: Console, started: float) -> int:
    results = Path(cfg.results_dir).resolve()
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.verbose:
        logging.getLogger("sweep").addHandler(logging.StreamHandler())

    def _terminate(signum, frame):  # `kill` / `docker stop`: clean up like Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _terminate)
    server = None
    temp_dir = None
    pool = None
    tracker = None
    code = 1
    backend = f"sqlite:///{results / 'mlflow' / 'mlflow.db'}"
    artifacts = str(results / "mlflow" / "artifacts")
    try:
        if cfg.tracking.uri is None:  # start it first: it boots while Ray does
            (results / "mlflow").mkdir(parents=True, exist_ok=True)
            server = MlflowServer(backend, artifacts, log_path=logs / "mlflow-server.log").start()
        # the heavy imports (ray, mlflow: seconds) only now, while the server boots
        import ray

        from .progress import SweepProgress
        from .scheduler import Callbacks, WorkerPool
        from .tracking import Tracker
        log.info("imports done after %.1fs", time.monotonic() - started)
        console.print(f"[bold]{cfg.name}[/]: {len(trials)} trials; starting Ray"
                      + (" and MLflow" if server else "") + f" (log: {log_file})")
        temp_dir = start_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus, cfg.verbose,
                             str(log_file))
        log.info("ray ready after %.1fs", time.monotonic() - started)
        n_workers = _workers(cfg, len(trials))
        if n_workers < 1:
            total = ray.cluster_resources()
            console.print(f"[red]error:[/] resources.cpu={cfg.resources.cpu} resources.gpu={cfg.resources.gpu} "
                          f"do not fit the cluster ({total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU). "
                          "Fix: lower resources.cpu / resources.gpu or add nodes.")
            return 2
        uri = server.wait_ready().uri if server else cfg.tracking.uri
        log.info("tracking ready after %.1fs", time.monotonic() - started)
        tracker = Tracker(uri, cfg.tracking.retry_s)
        tracker.default_tags = provenance.tags()
        sweep = Sweep(cfg, trials, tracker, console)
        todo = sweep.open()
        console.print(f"tracking: {uri} experiment '{sweep.experiment}' parent run {sweep.parent_id} "
                      f"(sweep.id {sweep.sweep_id}); {len(sweep.resumed)} trials already finished, "
                      f"{len(todo)} to run on {n_workers} workers", highlight=False)
        console.print(f"watch it live: {runs_url(uri, sweep.exp_id)}", soft_wrap=True, highlight=False)
        pool = WorkerPool(n_workers, cfg.resources.cpu, cfg.resources.gpu, cfg.sweep.max_retries)
        with SweepProgress(todo, len(sweep.resumed), n_workers, console, sweep.past) as progress:
            sweep.progress = progress
            t_run = time.monotonic()
            pool.run(todo, Callbacks(start=sweep.start, records=sweep.records, finish=sweep.finish,
                                     retry=sweep.retry, give_up=sweep.give_up))
            run_s = time.monotonic() - t_run
        log.info("trials done after %.1fs (trial phase %.1fs)", time.monotonic() - started, run_s)
        tracker.flush()
        sweep.dedupe()
        if cfg.report.enabled:
            from .report import report
            report(sweep, console, results / "reports" / sweep.sweep_id)
        tracker.flush()
        log.info("report done after %.1fs", time.monotonic() - started)
        failed = bool(sweep.failed) or bool(tracker.errors)
        record_timings(tracker, sweep.parent_id, run_s if todo else 0.0, time.monotonic() - started)
        tracker.call(tracker.client.set_terminated, sweep.parent_id, "FAILED" if failed else "FINISHED")
        for line in sweep.failed:
            console.print(f"[red]failed:[/] {line}")
        for line in tracker.errors:
            console.print(f"[red]tracking lost:[/] {line}")
        console.print(f"done in {time.monotonic() - started:.0f}s (trials {run_s:.0f}s). Results: "
                      f"{uri if server is None else results} · experiment '{sweep.experiment}', "
                      f"parent run {sweep.parent_id}")
        if server is not None:  # the embedded server is gone with this command: `sweep ui` serves the store
            port = free_port()
            host = f"http://127.0.0.1:{port}"
            console.print(f"Open the runs table: {ui_command(results, sweep.experiment, port)}\n"
                          f"  then the trials: {runs_url(host, sweep.exp_id)}\n"
                          f"  the summary:     {run_url(host, sweep.exp_id, sweep.parent_id)}",
                          soft_wrap=True, highlight=False)
        else:
            console.print(f"Open the runs table: {runs_url(uri, sweep.exp_id)}\n"
                          f"  the summary: {run_url(uri, sweep.exp_id, sweep.parent_id)}", soft_wrap=True,
                          highlight=False)
        code = 1 if failed else 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished trials are kept; run the same command again to resume")
        code = 130
    finally:
        if pool is not None:
            pool.shutdown()
        if tracker is not None:
            tracker.close(timeout=30)
        if server is not None:
            server.terminate()  # it stops while Ray does
        try:
            import ray as _ray
            if _ray.is_initialized():
                _ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        if server is not None:
            server.stop()
    return code
