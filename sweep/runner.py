"""One sweep, start to finish: services up, resume, run the trials, report, services down."""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import signal
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from . import grid
from . import provenance
from .services import MlflowServer, OneComplaintFileHandler, ResultsLock, free_port, prepare_ray_env, ray_pids, start_ray
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
        self.journaled: dict = {}  # trial key -> records of a finished attempt in the local journal
        self.replayed = 0

    # ---- resume
    def open(self) -> list[grid.Trial]:
        """Parent run (reused for the same experiment and grid), and the trials still to run."""
        tr = self.tracker
        self.exp_id = tr.experiment_id(self.experiment)
        parent = tr.find_parent(self.exp_id, self.sweep_id)
        if parent is None:
            self.parent_id = tr.create_parent(self.exp_id, f"{self.experiment}-{self.sweep_id[:6]}", {
                "sweep.id": self.sweep_id, "sweep.trials": str(len(self.trials)),
                "sweep.experiment": self.experiment,
                "sweep.claims": json.dumps(OmegaConf.to_container(self.cfg.claims, resolve=True))})
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
        # finished in the journal of an earlier, interrupted run but not (or not wholly) in MLflow: replay
        for key in [t.key for t in self.trials if t.key not in finished and t.key in self.journaled]:
            tr.replay(self.exp_id, self.parent_id, self.journaled[key])
            finished[key] = None
            self.replayed += 1
        self.resumed = finished
        return [t for t in self.trials if t.key not in finished]

    def tick(self, running: int) -> None:
        """Twice a second from the scheduler: stop loudly when tracking has stopped for good."""
        if self.tracker.dead:
            raise TrackingStopped(self.tracker.dead)
        journal = self.tracker.journal
        if journal is not None and journal.written > journal.synced:
            journal.sync()  # a batch: whatever arrived since the last tick

    def kill_running(self, pool) -> None:
        """Interrupted: the runs in flight end KILLED in MLflow (their records so far are kept)."""
        for job in list(getattr(pool, "running", {}).values()):
            if job.state is not None:
                self.tracker.set_tags(job.state, {"status": "killed"})
                self.tracker.end(job.state, "KILLED")

    def _log_plan(self) -> None:
        tr = self.tracker
        resolved = OmegaConf.to_yaml(self.cfg, resolve=True)
        tr.call(tr.client.log_text, self.parent_id, resolved, "sweep_config.yaml")
        rows = [{"trial.key": t.key, "variant": t.variant, "gain": t.gain, "seed": t.seed, "point": t.point,
                 "parts": list(t.parts)}
                for t in self.trials]
        tr.call(tr.client.log_dict, self.parent_id, rows, "grid.json")

    # ---- scheduler callbacks
    def start(self, job):
        t = job.trial
        tags = {"trial.key": t.key, "optimizer": t.optimizer, "variant": t.variant, "gain": f"{t.gain:g}",
                "seed": str(t.seed), "status": "running", "attempt": str(job.attempt), "sweep.id": self.sweep_id,
                "node.id": job.info.get("node_id", ""), "worker.gpu_ids": ",".join(job.info.get("gpu_ids", [])),
                "worker.torch_device": job.info.get("torch_device", ""), "parts": ",".join(t.parts)}
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
        """The worker died: this attempt's run ends deleted, tagged why (the retry gets a fresh one,
        attempt + 1). It keeps its `attempt` and `node.id` tags, also when it was not created yet."""
        self.tracker.delete(job.state, {"status": "retried", "error": f"worker died: {reason}"[-4000:]})
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


class TrackingStopped(RuntimeError):
    """Tracking gave up (an outage past tracking.retry_s, a full disk): the sweep stops, resumable."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (exit 130) or SIGTERM (exit 143)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


_received: list[int] = []  # the signal that interrupted the sweep (Ray may re-raise a plain KeyboardInterrupt)


def _on_signal(signum, frame):
    _received.append(signum)
    raise Interrupted(signum)


def _install_signal_handlers() -> None:
    """Ctrl-C and `kill`/`docker stop` both end the sweep cleanly. Installed again after `ray.init`,
    which replaces the driver's SIGTERM handler with its own (exit 134 and a crash dump)."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _workers(cfg: DictConfig, n_trials: int, console: Console | None = None) -> int:
    """Workers to start. On the embedded local Ray, only those that fit now (nothing will join it). On a
    remote cluster all of resources.workers: nodes may join (a scaled-up service), and workers that stay
    unplaced are dropped after the scheduler's bounded wait."""
    import ray
    res = cfg.resources
    total = ray.cluster_resources()
    n = math.floor(total.get("CPU", 0) / res.cpu + 1e-9)
    if res.gpu > 0:
        n = min(n, math.floor(total.get("GPU", 0) / res.gpu + 1e-9))
    if res.workers:
        if cfg.cluster.address is not None:
            return min(res.workers, max(n_trials, 1))
        if res.workers > n and n >= 1 and console is not None:
            console.print(f"[yellow]warning:[/] resources.workers={res.workers} but the cluster fits {n} "
                          f"({total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU at resources.cpu={res.cpu:g}, "
                          f"resources.gpu={res.gpu:g}); starting {n}", highlight=False)
        n = min(res.workers, n)
    return min(n, max(n_trials, 1))


def run_sweep(cfg: DictConfig, trials: list[grid.Trial], console: Console, started: float) -> int:
    prepare_ray_env(local=cfg.cluster.address is None)  # before ray is imported: it reads these then
    _received.clear()
    from .journal import DiskFull, Journal, finished_attempts, read

    results = Path(cfg.results_dir).resolve()
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lock = ResultsLock(results)
    try:
        cleaned = lock.acquire()
    except RuntimeError as e:
        print(f"error: results_dir {e}", file=sys.stderr)
        return 2
    log_file = logs / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = OneComplaintFileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.verbose:
        logging.getLogger("sweep").addHandler(logging.StreamHandler())

    if cleaned:
        log.info("cleaned up after a killed sweep: %s", ", ".join(cleaned))
    _install_signal_handlers()
    server = None
    sweep = None
    temp_dir = None
    pool = None
    tracker = None
    code = 1
    backend = f"sqlite:///{results / 'mlflow' / 'mlflow.db'}"
    artifacts = str(results / "mlflow" / "artifacts")
    def start_server():
        (results / "mlflow").mkdir(parents=True, exist_ok=True)
        srv = MlflowServer(backend, artifacts, log_path=logs / "mlflow-server.log").start()
        lock.update(pids=lock.state.get("pids", []) + [srv.proc.pid])
        return srv

    try:
        # a local Ray's size was checked before anything started: start MLflow first, it boots while Ray
        # does; a remote cluster's resources are checked before MLflow starts
        if cfg.tracking.uri is None and cfg.cluster.address is None:
            server = start_server()
        # the heavy imports (ray, mlflow: seconds) only now, while the server boots
        import ray

        from .progress import SweepProgress
        from .scheduler import Callbacks, WorkerPool
        from .tracking import Tracker
        log.info("imports done after %.1fs", time.monotonic() - started)
        console.print(f"[bold]{cfg.name}[/]: {len(trials)} trials; starting Ray"
                      + (" and MLflow" if cfg.tracking.uri is None else "") + f" (log: {log_file})")
        try:
            temp_dir = start_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus, cfg.verbose,
                                 str(log_file))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - one line, the details are in the log file
            log.exception("ray did not start")
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f"cluster.address {cfg.cluster.address!r}" if cfg.cluster.address else "the local Ray"
            console.print(f"[red]error:[/] {where} did not start: {first[:300]}. Fix: see {log_file}; "
                          "run the same command again to resume", highlight=False, soft_wrap=True)
            return 1
        _install_signal_handlers()  # ray.init replaced the SIGTERM handler
        lock.update(temp_dir=temp_dir, pids=lock.state.get("pids", []) + ray_pids())
        log.info("ray ready after %.1fs", time.monotonic() - started)
        n_workers = _workers(cfg, len(trials), console)
        if n_workers < 1:
            total = ray.cluster_resources()
            console.print(f"[red]error:[/] resources.cpu={cfg.resources.cpu} resources.gpu={cfg.resources.gpu} "
                          f"do not fit the cluster ({total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU). "
                          "Fix: lower resources.cpu / resources.gpu or add nodes.")
            return 2
        if cfg.tracking.uri is None and server is None:
            server = start_server()
        uri = server.wait_ready().uri if server else cfg.tracking.uri
        log.info("tracking ready after %.1fs", time.monotonic() - started)
        tracker = Tracker(uri, cfg.tracking.retry_s)
        tracker.default_tags = provenance.tags()
        sweep = Sweep(cfg, trials, tracker, console)
        journal_path = results / "journal" / f"{sweep.sweep_id}.jsonl"
        sweep.journaled = finished_attempts(read(journal_path))
        todo = sweep.open()
        tracker.journal = Journal(journal_path)
        replayed = f" ({sweep.replayed} replayed from the journal)" if sweep.replayed else ""
        console.print(f"tracking: {uri} experiment '{sweep.experiment}' parent run {sweep.parent_id} "
                      f"(sweep.id {sweep.sweep_id}); {len(sweep.resumed)} trials already finished{replayed}, "
                      f"{len(todo)} to run on {n_workers} workers", highlight=False)
        console.print(f"watch it live: {runs_url(uri, sweep.exp_id)}", soft_wrap=True, highlight=False)
        pool = WorkerPool(n_workers, cfg.resources.cpu, cfg.resources.gpu, cfg.sweep.max_retries)
        with SweepProgress(todo, len(sweep.resumed), n_workers, console, sweep.past) as progress:
            sweep.progress = progress
            progress.durable = lambda: len(sweep.resumed) + tracker.journal.durable_ends
            t_run = time.monotonic()
            pool.run(todo, Callbacks(start=sweep.start, records=sweep.records, finish=sweep.finish,
                                     retry=sweep.retry, give_up=sweep.give_up, tick=sweep.tick,
                                     warn=lambda m: console.print(f"[yellow]warning:[/] {m}", highlight=False)))
            tracker.journal.sync()
            run_s = time.monotonic() - t_run
        log.info("trials done after %.1fs (trial phase %.1fs)", time.monotonic() - started, run_s)
        pending = tracker.pending()
        if pending:
            console.print(f"waiting for MLflow to acknowledge {pending} queued records (all are in the journal)",
                          highlight=False)
        tracker.flush(timeout=cfg.tracking.retry_s + 60)
        if tracker.dead:
            raise TrackingStopped(tracker.dead)
        log.info("tracking flushed after %.1fs", time.monotonic() - started)  # the trials' queued writes
        sweep.dedupe()
        if cfg.report.enabled:
            from .report import report
            report(sweep, console, results / "reports" / sweep.sweep_id)
        tracker.flush(timeout=cfg.tracking.retry_s + 60)
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
        if not tracker.errors and not tracker.dead:
            tracker.journal.remove()  # MLflow acknowledged every record
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signum = _received[0] if _received else signal.SIGINT
        code = 128 + signum
        e = signal.Signals(signum).name
        durable = ""
        if tracker is not None and sweep is not None and pool is not None:
            tracker.retry_s = min(tracker.retry_s, 5.0)  # bounded: the journal keeps what MLflow misses
            sweep.kill_running(pool)
            if getattr(sweep, "parent_id", None):
                tracker._put("end_parent", lambda: tracker.client.set_terminated(sweep.parent_id, "KILLED"))
            tracker.flush(timeout=15)
            if tracker.journal is not None:
                durable = f"; {len(sweep.resumed) + tracker.journal.durable_ends} trials durable"
        console.print(f"[yellow]interrupted ({e})[/]: finished trials are kept{durable}; run the same command "
                      "again to resume", highlight=False)
    except (TrackingStopped, DiskFull) as e:
        code = 3
        full = isinstance(e, DiskFull) or "no space left" in str(e).lower() or "disk is full" in str(e).lower()
        where = f"results_dir {results} is full: free space there" if full else \
            f"tracking stopped: {e} (unreachable for more than tracking.retry_s={cfg.tracking.retry_s:g} s); fix tracking"
        done = f"{len(sweep.resumed) + tracker.journal.durable_ends} finished trials are safe in the journal " \
            f"{tracker.journal.path}" if sweep is not None and tracker is not None and tracker.journal else \
            "finished trials are kept"
        console.print(f"[red]error:[/] {where}. {done}; run the same command again to resume: they are replayed, "
                      "not recomputed", highlight=False, soft_wrap=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if pool is not None:
            pool.shutdown()
        if tracker is not None:
            tracker.close(timeout=10 if tracker.dead else 30)
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
        lock.release()
        logging.getLogger().removeHandler(handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code
