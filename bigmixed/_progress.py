"""Progress display for passes over the data: a rich bar or spinner on stderr, only when it lasts."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "blocking"]


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _console():
    from rich.console import Console

    return Console(stderr=True)


class Progress:
    """A rich progress bar on stderr for one pass over the data.

    Shown only when enabled (``None``: when stderr is a terminal) and only once
    the pass has lasted ``DELAY`` seconds, so quick passes print nothing.  It
    shows rows read, rows/s and files done; with files, the bar advances by
    rows (totals from the parquet footers, read only once the bar appears).
    """

    DELAY = 1.0

    def __init__(self, enabled: bool | None, total_parts: int, description: str = "reading",
                 files: list | None = None) -> None:
        self.enabled = _stderr_is_terminal() if enabled is None else bool(enabled)
        self.total = total_parts
        self.description = description
        self.files = files or []
        self.start = time.perf_counter()
        self._bar = None
        self._rows_total: int | None = None
        self.rows = 0
        self.parts_done = 0

    def _open(self) -> None:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        if self.files and len(self.files) <= 2000:
            try:
                import pyarrow.parquet as pq

                self._rows_total = sum(pq.read_metadata(f).num_rows for f in self.files)
            except Exception:  # a progress bar must never fail a run
                self._rows_total = None
        self._bar = RichProgress(
            TextColumn(self.description), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=_console(), transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self._rows_total or self.total, info="")

    def update(self, rows: int, part_done: bool = False) -> None:
        self.rows += rows
        self.parts_done += int(part_done)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self._bar is None and elapsed > self.DELAY:
            self._open()
        if self._bar is not None:
            rate = self.rows / max(elapsed, 1e-9)
            files = f", {self.parts_done}/{self.total} files" if self.files else ""
            self._bar.update(self._task, completed=self.rows if self._rows_total else self.parts_done,
                             info=f"{self.rows:,} rows, {rate:,.0f} rows/s{files}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def blocking(enabled: bool | None, description: str, fn):
    """Run ``fn()`` (one polars query over all files); a spinner on stderr if it lasts over a second."""
    enabled = _stderr_is_terminal() if enabled is None else bool(enabled)
    if not enabled:
        return fn()
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    th = threading.Thread(target=run, daemon=True, name="bigmixed-scan")
    th.start()
    th.join(Progress.DELAY)
    if th.is_alive():
        from rich.progress import Progress as RichProgress
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        with RichProgress(SpinnerColumn(), TextColumn(description), TimeElapsedColumn(),
                      console=_console(), transient=True) as bar:
            bar.add_task(description, total=None)
            while th.is_alive():
                th.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]
