"""The driver's local, durable journal of every tracking record, written before the record is sent.

Why: MLflow writes lag the trials (a queue drained by one thread; an outage can hold it for minutes),
so a driver killed at "300/300" used to lose most finished trials. Every record (run start, metric
batch, tags, end) is appended here first and fsynced in batches by the tracker's writer thread before
it sends anything; a trial whose end record is synced is durable. On the next run of the same sweep,
trials the journal holds as finished but MLflow does not are replayed from it instead of recomputed.

Format: one JSON object per line, `results_dir/journal/<sweep.id>.jsonl`; a torn last line (a kill
mid-write) is ignored. The file is removed once MLflow has acknowledged every record of a sweep.
"""
from __future__ import annotations

import errno
import json
import math
import os
import threading
from pathlib import Path


class DiskFull(OSError):
    """The results filesystem is full: the sweep stops, resumable, saying so."""


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self.written = 0   # records appended (sequence number of the last one)
        self.synced = 0    # records known to be on disk
        self._ends: list[int] = []  # sequence numbers of finished-trial end records
        self.durable_ends = 0

    def append(self, record: dict) -> int:
        line = json.dumps(record, separators=(",", ":"), default=_json_default) + "\n"
        with self._lock:
            try:
                self._f.write(line)
            except OSError as e:
                raise _classify(e, self.path) from None
            self.written += 1
            if record.get("op") == "end" and record.get("status") == "FINISHED":
                self._ends.append(self.written)
            return self.written

    def sync(self, upto: int | None = None) -> None:
        """Flush and fsync everything appended so far (one fsync covers a whole batch)."""
        with self._lock:
            target = self.written
            if upto is not None and upto <= self.synced:
                return
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            except OSError as e:
                raise _classify(e, self.path) from None
            self.synced = target
            self.durable_ends = sum(1 for s in self._ends if s <= target)

    def close(self) -> None:
        with self._lock:
            try:
                self._f.close()
            except OSError:
                pass

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def read(path: str | Path) -> list[dict]:
    """The records of a journal file; a torn last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                out.append(json.loads(line, parse_constant=_parse_constant))
            except json.JSONDecodeError:
                break  # the torn tail of a kill mid-write
    return out


def finished_attempts(records: list[dict]) -> dict[str, list[dict]]:
    """trial key -> the records of its attempt that ended FINISHED (the last such attempt)."""
    by_attempt: dict[tuple, list[dict]] = {}
    done: dict[str, tuple] = {}
    for r in records:
        k = (r.get("key"), r.get("attempt"))
        by_attempt.setdefault(k, []).append(r)
        if r.get("op") == "end" and r.get("status") == "FINISHED":
            done[r["key"]] = k
        elif r.get("op") == "delete" and done.get(r.get("key")) == k:
            del done[r["key"]]
    return {key: by_attempt[k] for key, k in done.items()}


def _json_default(x):
    raise TypeError(f"not JSON serialisable: {x!r}")


def _parse_constant(name: str) -> float:
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


def _classify(e: OSError, path: Path) -> OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(e.errno, f"the results filesystem is full ({os.strerror(e.errno)}) writing {path}")
    return e
