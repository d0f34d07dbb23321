"""Honest progress: which trials run now, how each finished one scored, and an ETA from what each
variant has cost so far (the same per-variant costs the scheduler orders by), or from earlier runs of
the experiment before any trial of this one ended.

On a terminal: a live two-line display (rich) with one printed line per finished trial above it.
Without one (a log file, CI, `docker compose run` without -t): the same per-trial line, plain. The
per-trial lines also go to the sweep's log file.
"""
from __future__ import annotations

import logging
import time

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

log = logging.getLogger("sweep")


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def past_costs(past: dict) -> dict[str, list[float]]:
    """variant -> trial_seconds of earlier finished runs of this experiment (trial.key -> run)."""
    out: dict[str, list[float]] = {}
    for run in (past or {}).values():
        s = run.data.metrics.get("trial_seconds")
        v = run.data.tags.get("variant")
        if v and s is not None:
            out.setdefault(v, []).append(float(s))
    return out


class SweepProgress:
    def __init__(self, todo: list, skipped: int, workers: int, console, past: dict | None = None):
        self.queue = {t.key: t for t in todo}
        self.total, self.skipped, self.workers = len(todo) + skipped, skipped, max(workers, 1)
        self.done, self.failed, self.diverged, self.retried = skipped, 0, 0, 0
        self.running: dict[str, tuple[str, str, float]] = {}  # trial key -> (run name, variant, started)
        self.cost: dict[str, list[float]] = {}    # variant -> this sweep's trial seconds
        self.prior = past_costs(past or {})       # variant -> earlier runs' trial seconds
        self.console, self.t_start = console, time.monotonic()
        self.durable = None  # () -> count, set by the runner
        self.live = Live(console=console, refresh_per_second=4, transient=True, get_renderable=self._render) \
            if console.is_terminal else None

    # ---- events (the runner's scheduler callbacks)
    def started(self, trial, name: str) -> None:
        self.queue.pop(trial.key, None)
        self.running[trial.key] = (name, trial.variant, time.monotonic())

    def ended(self, trial, status: str, metrics: dict | None, compute_s: float | None) -> None:
        name, variant, t0 = self.running.pop(trial.key, (trial.key, trial.variant, time.monotonic()))
        if status == "retried":  # it runs again
            self.retried += 1
            self.queue[trial.key] = trial
            line = f"{name}: worker lost, retrying"
        else:
            if compute_s is not None:
                self.cost.setdefault(variant, []).append(compute_s)
            if status == "failed":
                self.failed += 1
            else:
                self.done += 1
                self.diverged += status == "diverged"
            line = f"{name}: {status}" + _headline(metrics) + (f" ({compute_s:.1f} s)" if compute_s else "")
        ended = self.done + self.failed
        text = f"sweep {ended}/{self.total} · {line} · {self._counts()} · {self._times()}"
        log.info(text)
        self.console.print(text, highlight=False, soft_wrap=True)

    # ---- estimates
    def _estimate(self, variant: str) -> float | None:
        for source in (self.cost, self.prior):
            if source.get(variant):
                return sum(source[variant]) / len(source[variant])
        every = [s for source in (self.cost, self.prior) for v in source.values() for s in v]
        return sum(every) / len(every) if every else None

    def eta(self) -> float | None:
        """Seconds left: the queued trials' estimated costs plus what the running ones still need,
        shared by the workers. None until any cost is known."""
        now, left = time.monotonic(), 0.0
        for t in self.queue.values():
            e = self._estimate(t.variant)
            if e is None:
                return None
            left += e
        for _name, variant, t0 in self.running.values():
            e = self._estimate(variant)
            if e is None:
                return None
            left += max(e - (now - t0), 0.0)
        return left / min(self.workers, max(len(self.queue) + len(self.running), 1))

    def _counts(self) -> str:
        parts = [f"running {len(self.running)}", f"failed {self.failed}", f"diverged {self.diverged}"]
        if self.retried:
            parts.append(f"retried {self.retried}")
        if self.skipped:
            parts.append(f"resumed {self.skipped}")
        if self.durable is not None:  # finished trials whose records are on disk (journal): a kill loses none
            parts.append(f"durable {self.durable()}")
        return " · ".join(parts)

    def _times(self) -> str:
        eta = self.eta()
        return f"{_duration(time.monotonic() - self.t_start)} elapsed, ETA " + (
            _duration(eta) if eta is not None else "after the first trial")

    def _render(self):
        ended = self.done + self.failed
        head = Table.grid(padding=(0, 1))
        head.add_row(Text("sweep", style="bold"), ProgressBar(total=self.total, completed=ended, width=20),
                     Text(f"{ended}/{self.total} · {self._times()}"))
        now = time.monotonic()
        running = ", ".join(f"{n} ({now - t0:.0f} s)" for n, _v, t0 in self.running.values()) or "-"
        return Group(head, Text(f"running: {running}", overflow="ellipsis", no_wrap=True),
                     Text(self._counts(), style="dim"))

    def __enter__(self):
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()
        ended = self.done + self.failed
        self.console.print(f"sweep {ended}/{self.total} · {self._counts()} · "
                           f"{_duration(time.monotonic() - self.t_start)} elapsed", highlight=False)


def _headline(metrics: dict | None) -> str:
    from .report import METRICS
    if not metrics:
        return ""
    for key, (label, _what) in METRICS.items():
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f", {label} {v:#.4g}"
    return ""


def estimate(cfg, trials: list):
    """For `dry_run`: ({variant: (trials, to run, seconds per trial or None)}, workers, store) from the
    finished trials of this experiment already in the store, or None when there are none. A trial whose
    key already finished costs nothing (it is reused); others cost their variant's mean trial_seconds
    (scaled by the step count when it differs)."""
    import os
    from pathlib import Path

    uri = cfg.tracking.uri
    if uri is None:
        db = Path(cfg.results_dir).resolve() / "mlflow" / "mlflow.db"
        if not db.exists():
            return None
        uri = f"sqlite:///{db}"
    from .tracking import Tracker
    tracker = Tracker(uri, retry_s=5)
    try:
        exp = tracker.client.get_experiment_by_name(cfg.tracking.experiment or cfg.name)
        if exp is None:
            return None
        past = tracker.finished_trials(exp.experiment_id)
    finally:
        tracker.close(timeout=5)
    per_step: dict[str, list[float]] = {}
    for run in past.values():
        s, steps = run.data.metrics.get("trial_seconds"), run.data.params.get("trainer.steps")
        if s is not None and steps and steps.isdigit() and int(steps) > 0:
            per_step.setdefault(run.data.tags.get("variant"), []).append(s / int(steps))
    if not per_step:
        return None
    out: dict = {}
    for t in trials:
        n, todo, s = out.get(t.variant, (0, 0, None))
        rate = per_step.get(t.variant)
        cost = sum(rate) / len(rate) * int(t.config["trainer"].get("steps") or 0) if rate else None
        out[t.variant] = (n + 1, todo + (t.key not in past), cost if cost is not None else s)
    workers = cfg.resources.workers or max(int((cfg.cluster.num_cpus or os.cpu_count() or 1) / cfg.resources.cpu), 1)
    return out, workers, uri
