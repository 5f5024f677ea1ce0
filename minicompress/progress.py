"""Progress with throughput and ETA for long work: a rich bar on a terminal, log lines elsewhere.

Library code reports progress through :func:`progress_bar`. It is silent when
``MINICOMPRESS_PROGRESS=0`` (tests, ``-q``). Otherwise, with stderr on a terminal (or in
Jupyter) it draws a rich bar; off a terminal (``nohup``, CI, a scheduler, ``2> file``)
a live bar would only print when it ends, so it logs a plain line instead (logger
``minicompress.progress``, level INFO) every ``MINICOMPRESS_PROGRESS_INTERVAL`` seconds
(default 30) and once at the end::

    score 64/128 samples (50.0%) 2.13 samples/s elapsed 00:30 ETA 00:30 loss 3.1

The CLI's logging setup (:func:`minicompress.cli.setup_logging`) sends those lines to
stderr; a library caller sees them once it configures ``logging`` for INFO.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator

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


log = logging.getLogger(__name__)

#: seconds between two log lines off a terminal (``MINICOMPRESS_PROGRESS_INTERVAL`` overrides it)
DEFAULT_LOG_INTERVAL = 30.0
#: the clock of the log lines (tests replace it)
clock = time.monotonic


def log_interval() -> float:
    """Seconds between progress log lines: ``MINICOMPRESS_PROGRESS_INTERVAL`` (>= 0), else 30."""
    text = os.environ.get("MINICOMPRESS_PROGRESS_INTERVAL", "").strip()
    try:
        value = float(text) if text else DEFAULT_LOG_INTERVAL
    except ValueError:
        value = DEFAULT_LOG_INTERVAL
    return value if math.isfinite(value) and value >= 0 else DEFAULT_LOG_INTERVAL


def on_terminal() -> bool:
    """Whether stderr is a terminal a live bar can redraw (or a Jupyter notebook)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a replaced or closed stream
        pass
    return Console(stderr=True).is_jupyter


def _clock_time(seconds: float) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour on)."""
    seconds = int(max(seconds, 0.0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _amount(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _field(value: Any) -> str:
    if isinstance(value, float) and not float(value).is_integer():
        return f"{value:.4g}"
    return _amount(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


class _LogBar:
    """Progress as plain log lines: every ``interval`` seconds (on an update, or from a
    heartbeat thread while a long step runs) and once at the end.

    The rate is measured over completed work only: from the moment the work of the
    previous line was done to the moment of the latest advance. A line between two
    advances (a heartbeat while a long optimizer step runs) repeats the last rate
    instead of counting the unfinished step's time with none of its work. Work
    ``completed`` before the bar started (a resumed run) is not part of any rate.
    """

    def __init__(self, description: str, total: float | None, unit: str, interval: float, completed: float = 0.0):
        self.description, self.total, self.unit, self.interval = description, total, unit, interval
        self.done = self._start_done = float(completed)
        self.fields: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._start = self._last = self._advanced_at = clock()
        self._ref = (self.done, self._start)  # (done, when it was done) as of the previous line's rate
        self._rate: float | None = None
        self._stop = threading.Event()
        self._thread = None
        if interval > 0:
            self._thread = threading.Thread(target=self._heartbeat, name="minicompress-progress", daemon=True)
            self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval):
            self._maybe_emit()

    def _recent_rate(self) -> tuple[float | None, tuple[float, float]]:
        """The rate over the work completed since the previous line's (as rich's bar shows a
        recent speed), and the reference point of the next line."""
        ref_done, ref_at = self._ref
        if self.done > ref_done and self._advanced_at > ref_at:
            return (self.done - ref_done) / (self._advanced_at - ref_at), (self.done, self._advanced_at)
        return self._rate, self._ref  # nothing completed since: the last rate still holds

    def line(self, final: bool = False) -> str:
        """The log line as of now (``final``: the rate over the whole run, no ETA)."""
        now = clock()
        elapsed = now - self._start
        if final:
            rate = (self.done - self._start_done) / elapsed if elapsed > 0 else None
        else:
            rate = self._recent_rate()[0]
        parts = [self.description]
        if self.total:
            percent = 100 * self.done / self.total
            parts.append(f"{_amount(self.done)}/{_amount(self.total)} {self.unit} ({percent:.1f}%)")
        else:
            parts.append(f"{_amount(self.done)} {self.unit}")
        if rate is None:
            parts.append(f"? {self.unit}/s")
        else:
            parts.append(f"{rate:,.0f} {self.unit}/s" if rate >= 100 else f"{rate:.2f} {self.unit}/s")
        parts.append(f"elapsed {_clock_time(elapsed)}")
        if self.total:
            remaining = max(self.total - self.done, 0.0)
            parts.append("ETA " + (_clock_time(remaining / rate) if rate else
                                   ("00:00" if remaining == 0 else "?")))
        parts += [f"{key} {_field(value)}" for key, value in self.fields.items()]
        return " ".join(parts)

    def _emit(self, final: bool = False) -> None:
        text = self.line(final)
        self._rate, self._ref = self._recent_rate()
        self._last = clock()
        log.info("%s", text)

    def _maybe_emit(self) -> None:
        with self._lock:
            if clock() - self._last >= self.interval:
                self._emit()

    def advance(self, amount: float = 1, **fields) -> None:
        with self._lock:
            self.done += amount
            if amount:
                self._advanced_at = clock()
            self._set(fields)
        self._maybe_emit()

    def update(self, **fields) -> None:
        with self._lock:
            self._set(fields)
        self._maybe_emit()

    def _set(self, fields: dict[str, Any]) -> None:
        if "total" in fields:
            self.total = fields.pop("total")
        if "completed" in fields:
            done = fields.pop("completed")
            if done != self.done:
                self.done, self._advanced_at = done, clock()
        if "description" in fields:
            self.description = fields.pop("description")
        fields.pop("advance", None)
        fields.pop("refresh", None)
        fields.pop("visible", None)
        self.fields.update(fields)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._emit(final=True)


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
def progress_bar(description: str, total: float | None, unit: str = "it", extra: str = "",
                 completed: float = 0) -> Iterator[_Bar]:
    """A rich progress bar (bar, count, throughput, elapsed, ETA) on stderr; off a terminal,
    log lines (see the module docstring).

    Args:
        description: label on the left.
        total: units of work (None: unknown).
        unit: throughput unit (``tok``, ``samples``...).
        extra: a rich format string of task fields shown at the end (e.g. ``"loss {task.fields[loss]:.3f}"``).
        completed: units already done before this run (a resumed run): shown, never part of the rate.

    Yields:
        An object with ``advance(n, **fields)`` and ``update(**fields)``; off a terminal,
        fields other than ``total``, ``completed`` and ``description`` end the log line
        as ``name value``.
    """
    if not progress_enabled():
        yield _Bar(None, None)
        return
    if not on_terminal():
        bar = _LogBar(description, total, unit, log_interval(), completed)
        try:
            yield bar
        finally:
            bar.close()
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, unit=unit)
        yield _Bar(progress, task)


def _progress_over(iterable: Iterable, description: str, total: float | None, unit: str) -> Iterator:
    """Yield ``iterable``'s items, advancing a :func:`progress_bar` after each one."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress_bar(description, total, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.advance(1)


@contextlib.contextmanager
def library_tqdm_as_progress(module: Any, description: str, unit: str = "it") -> Iterator[None]:
    """Route a library module's ``tqdm(iterable, ...)`` loops through :func:`progress_bar`
    while the context runs.

    A library's own tqdm bar redraws itself with ``\\r``: off a terminal every redraw lands
    in the log file as a line of its own. Inside this context ``module.tqdm(iterable)``
    is minicompress's progress instead (a rich bar on a terminal, plain log lines at
    intervals elsewhere, nothing with ``MINICOMPRESS_PROGRESS=0``); a bar the library
    drives by hand (``tqdm(total=...)`` and ``update``) is only shown on a terminal.

    Args:
        module: the module whose global ``tqdm`` the library calls (left alone without one).
        description: the label of the progress (the library's ``desc`` is dropped).
        unit: the unit of one item (``tensors``).
    """
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return

    def tqdm(iterable=None, *args, total=None, **kwargs):
        if iterable is None:
            kwargs["disable"] = not (progress_enabled() and on_terminal())
            return original(None, *args, total=total, **kwargs)
        return _progress_over(iterable, description, total, unit)

    module.tqdm = tqdm
    try:
        yield
    finally:
        module.tqdm = original
