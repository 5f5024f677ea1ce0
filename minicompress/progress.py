"""Rich progress bars with throughput and ETA for long work.

Library code reports progress through :func:`progress_bar`; it writes to stderr and is
silent when ``MINICOMPRESS_PROGRESS=0`` (tests) or when not attached to a terminal and
``MINICOMPRESS_PROGRESS`` is unset... except that the CLI turns it on explicitly.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Throughput in the task's own unit (``tok/s``, ``samples/s``)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {unit}/s" if speed >= 100 else f"{speed:.2f} {unit}/s", style="progress.data.speed")


def progress_enabled() -> bool:
    """False when ``MINICOMPRESS_PROGRESS=0``."""
    return os.environ.get("MINICOMPRESS_PROGRESS", "1") != "0"


class _Bar:
    def __init__(self, progress: Progress | None, task_id):
        self._progress, self._task = progress, task_id

    def advance(self, amount: float = 1, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=amount, **fields)

    def update(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, unit: str = "it", extra: str = "") -> Iterator[_Bar]:
    """A rich progress bar (bar, count, throughput, elapsed, ETA) on stderr.

    Args:
        description: label on the left.
        total: units of work (None: unknown).
        unit: throughput unit (``tok``, ``samples``...).
        extra: a rich format string of task fields shown at the end (e.g. ``"loss {task.fields[loss]:.3f}"``).

    Yields:
        An object with ``advance(n, **fields)`` and ``update(**fields)``.
    """
    if not progress_enabled():
        yield _Bar(None, None)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, unit=unit)
        yield _Bar(progress, task)
