"""One live line: done / running / failed / diverged counts, a bar and the ETA (rich)."""
from __future__ import annotations

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

    def _text(self) -> str:
        parts = [f"running {self.running}", f"failed {self.failed}", f"diverged {self.diverged}"]
        if self.retried:
            parts.append(f"retried {self.retried}")
        if self.skipped:
            parts.append(f"resumed {self.skipped}")
        return " · ".join(parts)

    def update(self) -> None:
        self.progress.update(self.task, completed=self.done + self.failed, description=self._text())

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.update()
        self.progress.stop()
