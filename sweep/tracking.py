"""MLflow tracking, written only by the driver.

Why one writer: workers return metric records and the driver logs them, so trainers and workers know
nothing of MLflow, the store sees one client, and a briefly unreachable server is handled in one
place. Calls go through an ordered queue drained by one thread, every call retried with backoff for up
to `retry_s`, so an outage delays logging and loses nothing. What is queued when the writer gets to it
is sent together: a run's consecutive params, metrics and tags become one `log_batch` (within MLflow's
per-call limits) and its create and end stay calls of their own, in the run's order; runs do not wait
on each other. Run ids come from the server, so each trial holds a RunHandle filled in when its run exists.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# Our own retry loop is the one that waits out an outage; the client's built-in retries (7, with
# exponential backoff) would only hide it for minutes per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # and its extra get_run per run end

from mlflow.entities import Metric, Param, RunTag, ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)
MAX_METRICS_PER_BATCH = 1000   # MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags,
MAX_PARAMS_PER_BATCH = 100     # 1000 entities in all
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
DRAIN_MAX = 1000               # queued calls the writer takes at once (and sends merged per run)
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class RunHandle:
    """A child run that may not exist on the server yet (its creation waits in the queue)."""
    run_id: str | None = None
    deleted: bool = False
    metrics_logged: int = 0
    key: str | None = None      # trial key and attempt: what the journal records it under
    attempt: int = 1
    lost: bool = False          # a record of it was given up on: it must not end FINISHED


@dataclass
class _Op:
    name: str
    fn: Callable[[], Any] | None          # None: `batch` is sent instead, merged with its run's neighbours
    handle: RunHandle | None = None
    done: threading.Event = field(default_factory=threading.Event)
    seq: int = 0  # journal records up to this one must be on disk before it is sent
    batch: dict | None = None             # {"metrics": [...], "params": [...], "tags": [...]} for log_batch


class Tracker:
    def __init__(self, uri: str, retry_s: float = 300.0, artifacts_dir: str | None = None):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        # tags every run created here carries (provenance: sweep/provenance.py)
        self.default_tags: dict[str, str] = {}
        # where `mlflow-artifacts:/` points when the store is read directly, without its server
        self.artifacts_dir = artifacts_dir
        self.retry_s = retry_s
        self.errors: list[str] = []
        self.outage_s = 0.0
        self.journal = None     # sweep.journal.Journal: records are appended there before they are sent
        self.dead: str | None = None  # why the tracker stopped sending (outage past retry_s, full disk)
        self.acknowledged = 0   # trial ends the server has acknowledged
        self._q: queue.Queue[_Op | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="mlflow-writer", daemon=True)
        self._thread.start()

    # ---- synchronous calls (setup, resume, report), retried like the queued ones
    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        return self._retry(lambda: fn(*args, **kwargs), getattr(fn, "__name__", "call"))

    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        start, delay = time.monotonic(), 0.25
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - any failure of the tracking server is retried
                waited = time.monotonic() - start
                if waited > self.retry_s or _is_client_error(e) or _is_disk_full(e) or self.dead:
                    raise
                log.warning("tracking call %s failed (%s); retrying in %.1fs", what, _short(e), delay)
                time.sleep(delay)
                self.outage_s += delay
                delay = min(delay * 2, 5.0)

    # ---- queued calls, in order
    def _put(self, name: str, fn: Callable[[], Any] | None, handle: RunHandle | None = None,
             record: dict | None = None, batch: dict | None = None) -> _Op:
        op = _Op(name, fn, handle, batch=batch)
        if record is not None and self.journal is not None and handle is not None and handle.key:
            op.seq = self.journal.append({**record, "key": handle.key, "attempt": handle.attempt})
        self._q.put(op)
        return op

    def _drain(self) -> None:
        while True:
            ops = [self._q.get()]
            while len(ops) < DRAIN_MAX and ops[-1] is not None:   # and whatever else is queued now
                try:
                    ops.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = ops[-1] is None
            self._send([op for op in ops if op is not None])
            if stop:
                return

    def _send(self, ops: list[_Op]) -> None:
        """Send `ops` in order per run: a run's consecutive batch ops wait in its bucket and go out as one
        log_batch just before its next other call (create, end, delete) or at the end; a call of no run
        (flush, the parent's end) first sends every bucket."""
        seq = max((op.seq for op in ops), default=0)
        if seq and self.journal is not None and self.dead is None:
            try:
                self.journal.sync(seq)  # one fsync for everything appended so far
            except Exception as e:  # noqa: BLE001 - e.g. a full disk: nothing is sent unjournalled
                self._give_up(ops[0], e)
        buckets: dict[int, list[_Op]] = {}
        for op in ops:
            if op.batch is not None and op.handle is not None:
                buckets.setdefault(id(op.handle), []).append(op)
                continue
            for key in ([id(op.handle)] if op.handle is not None else list(buckets)):
                self._send_bucket(buckets.pop(key, []))
            self._run(op.name, op.fn, op.handle, [op])
        for bucket in buckets.values():
            self._send_bucket(bucket)

    def _send_bucket(self, bucket: list[_Op]) -> None:
        if not bucket:
            return
        handle = bucket[0].handle
        merged = {k: [x for op in bucket for x in op.batch.get(k, ())] for k in ("metrics", "params", "tags")}
        merged["tags"] = list({t.key: t for t in merged["tags"]}.values())   # a later value of a key wins
        chunks = list(_log_batch_chunks(**merged))

        def send():  # each chunk retried on its own: a chunk already written is not sent twice
            for chunk in chunks:
                self._retry(lambda chunk=chunk: self.client.log_batch(handle.run_id, **chunk), "log_batch")
                handle.metrics_logged += len(chunk["metrics"])
        self._run("+".join(dict.fromkeys(op.name for op in bucket)), send, handle, bucket, retried=True)

    def _run(self, name: str, fn, handle: RunHandle | None, ops: list[_Op], retried: bool = False) -> None:
        """One call (or merged batch) with the writer's rules: skipped once stopped or for a dropped attempt,
        retried, and on giving up recorded (the run is marked lost; the tracker stops if the server is gone)."""
        try:
            if self.dead is not None:
                return  # stopped: the journal holds what was not sent; the next run replays it
            # a dropped attempt's run is still created (then tagged and deleted: it stays visible among
            # the deleted runs with its attempt and node.id); its other queued records are skipped
            if handle is None or not handle.deleted or name in ("create_run", "delete"):
                fn() if retried else self._retry(fn, name)
        except Exception as e:  # noqa: BLE001
            self._give_up(ops[0], e, name)
        finally:
            for op in ops:
                op.done.set()

    def _give_up(self, op: _Op, e: Exception, name: str | None = None) -> None:
        msg = f"{name or op.name}: {_short(e)}"
        log.error("tracking gave up on %s", msg)
        self.errors.append(msg)
        if op.handle is not None:
            op.handle.lost = True
        if not _is_client_error(e):  # the server (or the disk) is gone for longer than retry_s
            self.dead = msg

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        return self._put("flush", lambda: None).done.wait(timeout)

    def pending(self) -> int:
        return self._q.qsize()

    def close(self, timeout: float | None = None) -> None:
        self.flush(timeout)
        self._q.put(None)
        self._thread.join(timeout=5)
        if self.journal is not None:
            self.journal.close()

    # ---- experiment and runs
    def experiment_id(self, name: str) -> str:
        exp = self.call(self.client.get_experiment_by_name, name)
        if exp is not None and exp.lifecycle_stage == "active":
            return exp.experiment_id
        if exp is not None:  # deleted earlier: bring it back rather than fail on the name
            self.call(self.client.restore_experiment, exp.experiment_id)
            return exp.experiment_id
        return self.call(self.client.create_experiment, name)

    def search(self, experiment_id: str, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.call(self.client.search_runs, [experiment_id], filter_string,
                             ViewType.ACTIVE_ONLY, 1000, None, token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def find_parent(self, experiment_id: str, sweep_id: str):
        runs = self.search(experiment_id, f"tags.`sweep.id` = '{sweep_id}'")
        parents = [r for r in runs if PARENT_TAG not in r.data.tags]
        return parents[0] if parents else None

    def create_parent(self, experiment_id: str, run_name: str, tags: dict) -> str:
        run = self.call(self.client.create_run, experiment_id, tags={**self.default_tags, **tags}, run_name=run_name)
        return run.info.run_id

    def children(self, experiment_id: str, parent_id: str) -> list:
        return self.search(experiment_id, f"tags.`{PARENT_TAG}` = '{parent_id}'")

    def finished_trials(self, experiment_id: str) -> dict:
        """trial.key -> a FINISHED child run of any sweep of this experiment (the earliest): a trial
        with the same resolved config need not run again when a grid grows (e.g. one more seed)."""
        out: dict = {}
        runs = self.search(experiment_id, "attributes.status = 'FINISHED'")
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            key = run.data.tags.get("trial.key")
            if key and PARENT_TAG in run.data.tags and key not in out:
                out[key] = run
        return out

    def reuse(self, run_id: str, sweep_id: str) -> None:
        """Mark a finished run of another sweep as a trial of `sweep_id` too (the report reads it)."""
        self.call(self.client.set_tag, run_id, f"sweep.reused_by.{sweep_id}", "true")

    def reused_runs(self, experiment_id: str, sweep_id: str) -> list:
        return self.search(experiment_id, f"tags.`sweep.reused_by.{sweep_id}` = 'true'")

    def log_artifact(self, run_id: str, path, artifact_path: str | None = None) -> None:
        """Upload a file to a run (directly into `artifacts_dir` when the store is read without its server)."""
        if self.artifacts_dir and not str(self.uri).startswith(("http://", "https://")):
            uri = self.call(self.client.get_run, run_id).info.artifact_uri
            if uri.startswith("mlflow-artifacts:"):
                import shutil
                from pathlib import Path
                dest = Path(self.artifacts_dir) / uri.split(":", 1)[1].lstrip("/") / (artifact_path or "")
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / Path(path).name)
                return
        self.call(self.client.log_artifact, run_id, str(path), artifact_path)

    def start_child(self, experiment_id: str, parent_id: str, run_name: str, tags: dict,
                    params: dict) -> RunHandle:
        handle = RunHandle(key=tags.get("trial.key"), attempt=int(tags.get("attempt", 1)))

        def create():
            run = self.client.create_run(experiment_id, tags={**self.default_tags, PARENT_TAG: parent_id, **tags},
                                         run_name=run_name)
            handle.run_id = run.info.run_id
        self._put("create_run", create, handle, {"op": "start", "name": run_name, "tags": tags, "params": params})
        if params:  # sent with the run's first metrics and tags when they are queued by then
            self._put("log_params", None, handle, batch={"params": [Param(k, v) for k, v in params.items()]})
        return handle

    def log_metrics(self, handle: RunHandle, metrics: Iterable[tuple[str, float, int]]) -> None:
        """(key, value, step) triples; journalled in chunks of <= 1000, sent merged with the run's
        neighbouring records (`_send`)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(s)) for k, v, s in metrics]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            chunk = items[i:i + MAX_METRICS_PER_BATCH]
            self._put("log_metrics", None, handle, {"op": "metrics", "m": [[m.key, m.value, m.step] for m in chunk]},
                      batch={"metrics": chunk})

    def set_tags(self, handle: RunHandle, tags: dict) -> None:
        self._put("set_tags", None, handle, {"op": "tags", "tags": {k: str(v) for k, v in tags.items()}},
                  batch={"tags": [RunTag(k, str(v)) for k, v in tags.items()]})

    def end(self, handle: RunHandle, status: str) -> None:
        """FINISHED only when every earlier record of the run was acknowledged (the queue is ordered);
        a run with a lost record ends FAILED, so a resume reruns it."""
        def send():
            if handle.lost and status == "FINISHED":
                self.client.set_tag(handle.run_id, "tracking.lost", "true")
                self.client.set_terminated(handle.run_id, "FAILED")
                return
            self.client.set_terminated(handle.run_id, status)
            if status == "FINISHED":
                self.acknowledged += 1
        self._put("end_run", send, handle, {"op": "end", "status": status})

    def delete(self, handle: RunHandle, tags: dict | None = None) -> None:
        """Soft-delete a run (a dead attempt) after setting `tags` on it. Its create goes out even if it was
        still queued, so the attempt is always visible among the deleted runs; its other queued records are
        skipped from now on."""
        handle.deleted = True
        tags = {k: str(v) for k, v in (tags or {}).items()}

        def send():
            if handle.run_id is None:  # its create was given up on: nothing to delete
                return
            if tags:
                self.client.log_batch(handle.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.delete_run(handle.run_id)
        self._put("delete", send, handle, {"op": "delete", "tags": tags})

    def replay(self, experiment_id: str, parent_id: str, records: list[dict]) -> RunHandle:
        """A finished attempt from the journal, sent again (its records are already on disk)."""
        journal, self.journal = self.journal, None
        try:
            handle = None
            for r in records:
                if r["op"] == "start":
                    handle = self.start_child(experiment_id, parent_id, r["name"], r["tags"], r["params"])
                elif handle is None:
                    continue
                elif r["op"] == "metrics":
                    self.log_metrics(handle, [tuple(m) for m in r["m"]])
                elif r["op"] == "tags":
                    self.set_tags(handle, r["tags"])
                elif r["op"] == "end":
                    self.end(handle, r["status"])
            return handle
        finally:
            self.journal = journal


def _log_batch_chunks(metrics: list, params: list, tags: list):
    """log_batch keyword arguments within MLflow's per-call limits, in order: params and tags first
    (a run's params come before its metrics), then metrics."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        p, params = params[:MAX_PARAMS_PER_BATCH], params[MAX_PARAMS_PER_BATCH:]
        t, tags = tags[:MAX_TAGS_PER_BATCH], tags[MAX_TAGS_PER_BATCH:]
        room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(p) - len(t))
        m, metrics = metrics[:room], metrics[room:]
        yield {"metrics": m, "params": p, "tags": t}


def _is_client_error(e: Exception) -> bool:
    """A 4xx answer means the request itself is wrong: retrying cannot help."""
    code = getattr(e, "error_code", "")
    return code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "BAD_REQUEST", "INVALID_STATE")


def _is_disk_full(e: Exception) -> bool:
    """The server's store (or our journal) is on a full filesystem: waiting will not help."""
    text = str(e).lower()
    return "no space left" in text or "disk is full" in text or "database or disk is full" in text


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:200]}" if s else type(e).__name__
