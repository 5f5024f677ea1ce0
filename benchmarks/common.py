"""What the benchmark scripts share: paths, the machine's facts, JSON results and rich tables.

Every script in ``benchmarks/`` is run as ``python benchmarks/<name>.py`` (its folder is
then first on ``sys.path``), so they import this module as ``common``. Only the standard
library is imported here at module level: children that measure their own memory
baseline (``scale.py``, ``scale_loading.py``) stay as light as they were; torch,
transformers, rich and minicompress are imported by the functions that need them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

#: the repository root
ROOT = Path(__file__).resolve().parent.parent
#: the shared data next to the checkout (``corpus``, ``wikitext2``)
DATA = ROOT.parent / "shared" / "data"
#: where results are written (``benchmarks/out``)
OUT = ROOT / "benchmarks" / "out"
MiB = 1 << 20
GiB = 1 << 30
#: the CPU flags recorded with results: bf16 matmul support and the vector width
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` value in KiB (``VmHWM``: peak resident memory, ``VmRSS``...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for ``torchrun --master-port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``, else ``lscpu``, else :func:`platform.processor`)."""
    for text, key in ((_cpuinfo(), "model name"), (_lscpu(), "Model name")):
        for line in text.splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU feature flags (``/proc/cpuinfo``'s first ``flags`` line, else ``lscpu``)."""
    for text, key in ((_cpuinfo(), "flags"), (_lscpu(), "Flags")):
        for line in text.splitlines():
            if line.startswith(key):
                return set(line.split(":", 1)[1].split())
    return set()


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (other processes sharing the CPU skew timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_facts() -> dict[str, Any]:
    """The CPU a result was measured on: model name, logical CPUs, the bf16 flags, whether
    :func:`minicompress.hardware.cpu_has_native_bf16` (what ``autocast: auto`` follows)
    finds native bf16, and the load average."""
    from minicompress.hardware import cpu_has_native_bf16

    flags = cpu_flags()
    return {"model": cpu_model(), "cpus": os.cpu_count(), **{flag: flag in flags for flag in BF16_FLAGS},
            "native_bf16": cpu_has_native_bf16(), "load_average": load_average()}


def versions() -> dict[str, str]:
    """minicompress, torch, transformers and Python versions (:func:`minicompress.outputs.versions`)."""
    from minicompress.outputs import versions as package_versions

    return package_versions()


def run_record(**extra: Any) -> dict[str, Any]:
    """The header every result starts with: date, command line, versions and CPU facts."""
    return {"date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "versions": versions(),
            "cpu": cpu_facts(), **extra}


def write_json(path: str | Path, record: Any) -> Path:
    """Write a result as indented JSON atomically (tensors and numpy values become lists)."""
    from minicompress.outputs import write_json_atomic

    return write_json_atomic(Path(path), record)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int | Iterable[str] = 1):
    """A rich table: ``columns`` headers, ``rows`` of cells (``str()`` of each).

    Args:
        title: the table's title.
        columns: column headers.
        rows: one sequence of cells per row.
        left: left-justified columns: the first ``left`` ones, or these headers; the
            others are right-justified (numbers).
    """
    from rich.table import Table

    out = Table(title=title)
    lefts = set(columns[:left]) if isinstance(left, int) else set(left)
    for column in columns:
        out.add_column(column, justify="left" if column in lefts else "right")
    for row in rows:
        out.add_row(*("" if cell is None else str(cell) for cell in row))
    return out


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
                left: int | Iterable[str] = 1, console=None) -> None:
    """Print :func:`table` to ``console`` (default: stdout, at least 160 columns wide)."""
    (console or make_console()).print(table(title, columns, rows, left=left))


def make_console(width: int = 160):
    """A rich console on stdout at least ``width`` columns wide (tables stay readable in logs)."""
    from rich.console import Console

    return Console(width=max(width, Console().width))
