"""Checkpoints of a recovery run in its working folder ``<output>.partial``.

Each checkpoint is written to a temporary folder and renamed; ``latest.json`` is replaced
atomically last, so a run killed at any moment resumes from the last complete one.
Weights are safetensors; optimizer and RNG states are read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .config import RecoverConfig, to_dict
from .errors import MinicompressError
from .evaluate import model_device
from .outputs import write_json_atomic

LATEST_FILE = "latest.json"
# Keys that may change between an interrupted run and its resumption.
RESUME_FREE_KEYS = ("resume", "overwrite", "eval_every", "save_every", "checkpoint_keep", "log_every",
                    "eval_batch_size")



def working_folder(output: str | Path) -> Path:
    """The folder next to ``output`` that holds checkpoints and metrics while training."""
    out = Path(output).expanduser()
    return out.with_name(out.name + ".partial")


def latest_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint named by ``work/latest.json``, or None."""
    latest = work / LATEST_FILE
    if not latest.is_file():
        return None
    folder = work / json.loads(latest.read_text())["checkpoint"]
    return folder if (folder / "state.json").is_file() else None


def save_checkpoint(work: Path, *, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    intermediate: torch.nn.Module | None, state: dict, keep: int = 1) -> Path:
    """Write a checkpoint into ``work/checkpoint-<step>`` via a temp folder and a rename.

    Holds the student weights (safetensors), the intermediate-loss projection
    (safetensors), the optimizer state and RNG states (``torch.save`` of tensors and
    plain containers, read back with ``weights_only=True``) and ``state.json`` (step,
    tokens, data position, scheduler, config, metrics offset). ``latest.json`` is
    replaced atomically last, then all but the newest ``keep`` checkpoints are removed.

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file, save_model

    name = f"checkpoint-{state['step']:08d}"
    final = work / name
    tmp = work / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(student, str(tmp / "student.safetensors"))
    if intermediate is not None:
        save_file({k: v.contiguous() for k, v in intermediate.state_dict().items()} or {"_empty": torch.zeros(0)},
                  str(tmp / "intermediate.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    write_json_atomic(tmp / "state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json_atomic(work / LATEST_FILE, {"checkpoint": name, "step": state["step"]})
    old = sorted(p for p in work.glob("checkpoint-*") if p.is_dir() and p.name != name)
    for folder in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(folder, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, *, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    intermediate: torch.nn.Module | None) -> dict:
    """Restore what :func:`save_checkpoint` wrote (safetensors / ``weights_only`` only).

    Returns:
        The checkpoint's ``state.json``.
    """
    from safetensors.torch import load_file, load_model as load_safetensors_model

    device = model_device(student)
    load_safetensors_model(student, str(folder / "student.safetensors"), strict=True, device=str(device))
    if intermediate is not None:
        weights = load_file(str(folder / "intermediate.safetensors"), device=str(device))
        weights.pop("_empty", None)
        intermediate.load_state_dict(weights)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=device))
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((folder / "state.json").read_text())


def check_resumable(saved: dict, config: RecoverConfig) -> None:
    """Refuse to resume when a setting other than :data:`RESUME_FREE_KEYS` changed.

    Raises:
        MinicompressError: names the first changed key.
    """
    now = {k: v for k, v in to_dict(config).items() if k not in RESUME_FREE_KEYS}
    before = {k: v for k, v in saved.items() if k not in RESUME_FREE_KEYS}
    for key in now:
        if now[key] != before.get(key):
            raise MinicompressError(
                f"resume: {key} differs from the interrupted run ({before.get(key)!r} -> {now[key]!r}); "
                "restore it or start over with --overwrite"
            )
