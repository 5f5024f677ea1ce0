"""Outputs that are never half-written, and the provenance record next to each.

Every folder output is built in a temporary sibling folder and renamed into place only
when complete; an existing output is replaced only with ``overwrite=True``. Each output
gets ``minicompress.json`` (what produced it: command, resolved config, versions, time)
and the resolved config as ``minicompress.yaml``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from .config import to_dict
from .errors import MinicompressError

PROVENANCE = "minicompress.json"
RESOLVED_CONFIG = "minicompress.yaml"


def check_output(path: str | Path | None, overwrite: bool, flag: str = "--output") -> Path:
    """Validate an output path before any work starts.

    Raises:
        MinicompressError: no path given, or it exists and ``overwrite`` is False.
    """
    if path is None:
        raise MinicompressError(f"{flag}: an output path is required")
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise MinicompressError(f"{flag}: {out} already exists; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block succeeds.

    Args:
        path: final folder.
        overwrite: replace an existing ``path``.

    Yields:
        The temporary folder to write into (a sibling of ``path``).
    """
    out = check_output(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def versions() -> dict[str, str]:
    """Versions of the packages that shape results."""
    import torch
    import transformers

    from . import __version__

    return {
        "minicompress": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def provenance(command: str, config: Any, **extra: Any) -> dict[str, Any]:
    """A provenance record: command, resolved config, versions, time, argv, extras."""
    return {
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "versions": versions(),
        "config": to_dict(config),
        **extra,
    }


def write_provenance(folder: str | Path, record: dict[str, Any]) -> None:
    """Write ``minicompress.json`` and the resolved config ``minicompress.yaml`` into ``folder``."""
    folder = Path(folder)
    write_json_atomic(folder / PROVENANCE, record)
    (folder / RESOLVED_CONFIG).write_text(yaml.safe_dump(record.get("config", {}), sort_keys=False))


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The ``minicompress.json`` of a folder, or None if there is none."""
    path = Path(folder) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None
