"""One live line: done / running / failed / diverged counts, a bar and the ETA (rich).

Without a terminal (a log file, CI, `docker compose run` without -t) rich's live line shows nothing
until the end, so there a plain line is printed each time a trial ends instead."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class SweepProgress:
    def __init__(self, total: int, skipped: int, console: Console):
        self.total, self.skipped = total, skipped
        self.done = self.failed = self.diverged = self.running = self.retried = 0
        self.progress = Progress(
            TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
            refresh_per_second=4)
        self.task = self.progress.add_task(self._text(), total=total)
        self.console, self.started, self._last_line = console, time.monotonic(), None

    def _text(self) -> str:
        parts = [f"running {self.running}", f"failed {self.failed}", f"diverged {self.diverged}"]
        if self.retried:
            parts.append(f"retried {self.retried}")
        if self.skipped:
            parts.append(f"resumed {self.skipped}")
        return " · ".join(parts)

    def update(self) -> None:
        ended = self.done + self.failed
        self.progress.update(self.task, completed=ended, description=self._text())
        if not self.console.is_terminal and ended and ended != self._last_line:
            self._last_line = ended
            elapsed = time.monotonic() - self.started
            eta = elapsed / ended * (self.total - ended)
            self.console.print(f"sweep {ended}/{self.total} · {self._text()} · {elapsed:.0f} s elapsed, "
                               f"ETA {eta:.0f} s", highlight=False)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.update()
        self.progress.stop()
