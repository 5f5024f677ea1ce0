"""Checkpoints of a recovery run in its working folder ``<output>.partial``.

Each checkpoint is written to a temporary folder and renamed; ``latest.json`` is replaced
atomically last, so a run killed at any moment resumes from the last complete one.
Weights are safetensors; optimizer and RNG states are read back with ``weights_only=True``.

Under torchrun (:mod:`minicompress.distributed`) a checkpoint is a
``torch.distributed.checkpoint`` (DCP) folder instead: every rank writes its shards of the
model and optimizer state (``get_state_dict``, keyed by parameter names) and DCP's
``.metadata`` records the global tensors, so it loads on any number of ranks, also in a
single process without a process group (``dcp.load(..., no_dist=True)``), resharding
as it reads (https://pytorch.org/docs/stable/distributed.checkpoint.html).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from . import distributed
from .config import RecoverConfig, declared_defaults, to_dict
from .errors import MinicompressError
from .runtime import model_device
from .outputs import write_json_atomic

LATEST_FILE = "latest.json"
DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint
# Keys that may change between an interrupted run and its resumption.
RESUME_FREE_KEYS = ("resume", "overwrite", "eval_every", "save_every", "checkpoint_keep", "log_every",
                    "eval_batch_size", "activation_checkpointing", "reshard_after_forward", "compile")
#: The on-policy keys of a run without them (checkpoints written before they existed resume as such).
ON_POLICY_DEFAULTS = {f: v for f, v in declared_defaults(RecoverConfig).items() if f.startswith("on_policy")}



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

    Under torchrun the folder is a DCP checkpoint (:func:`save_distributed_checkpoint`).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file, save_model

    if distributed.is_distributed():
        if intermediate is not None:
            raise MinicompressError("loss.intermediate_weight: not supported under torchrun")
        return save_distributed_checkpoint(work, student=student, optimizer=optimizer, state=state, keep=keep)
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
    _finish(work, tmp, final, state, keep)
    return final


def load_checkpoint(folder: Path, *, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    intermediate: torch.nn.Module | None) -> dict:
    """Restore what :func:`save_checkpoint` wrote (safetensors / ``weights_only`` only).

    A DCP folder (written under torchrun) loads on any number of ranks, or in one process.

    Returns:
        The checkpoint's ``state.json``.

    Raises:
        MinicompressError: a single-process checkpoint resumed under torchrun.
    """
    from safetensors.torch import load_file, load_model as load_safetensors_model

    if (folder / DCP_METADATA).is_file():
        return load_distributed_checkpoint(folder, student=student, optimizer=optimizer)
    if distributed.is_distributed():
        raise MinicompressError(f"resume: {folder} was written by a single process; resume it in one process "
                                "(torchrun resumes checkpoints written under torchrun, on any number of ranks)")
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
    # how the data is read (memory map or in memory) does not change a row; a checkpoint
    # written before mixtures existed had no mixture: the same as an empty one
    now["data"] = {k: v for k, v in now["data"].items() if k != "token_store"}
    before["data"] = {"mixture": [], **{k: v for k, v in before.get("data", {}).items() if k != "token_store"}}
    before["data"]["mixture"] = [{"teacher": None, **m} for m in before["data"]["mixture"]]  # before source teachers
    before = {"blockwise_tokens": 0, "blockwise_lr": None, "blockwise_layers": [], **before}  # before the stage existed
    before = {"teachers": [], "teacher_weights": [], **ON_POLICY_DEFAULTS, **before}  # before several teachers / on-policy
    for key in now:
        if now[key] != before.get(key):
            raise MinicompressError(
                f"resume: {key} differs from the interrupted run ({before.get(key)!r} -> {now[key]!r}); "
                "restore it or start over with --overwrite"
            )


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def _finish(work: Path, tmp: Path, final: Path, state: dict, keep: int) -> None:
    """Rename a complete checkpoint into place, point ``latest.json`` at it, prune old ones."""
    write_json_atomic(tmp / "state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json_atomic(work / LATEST_FILE, {"checkpoint": final.name, "step": state["step"]})
    old = sorted(p for p in work.glob("checkpoint-*") if p.is_dir() and p.name != final.name)
    for folder in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(folder, ignore_errors=True)


def save_distributed_checkpoint(work: Path, *, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                state: dict, keep: int = 1) -> Path:
    """Write a DCP checkpoint of a sharded run into ``work/checkpoint-<step>`` (every rank calls it).

    Rank 0 prepares a temporary folder; every rank writes its shards of
    ``{"model": ..., "optimizer": ...}`` from
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` (parameter-name keys,
    ``DTensor`` values) and its RNG state; rank 0 then adds ``state.json`` (with
    ``world_size``), renames the folder and replaces ``latest.json``, as
    :func:`save_checkpoint` does. The working folder must be on a file system every rank
    sees (one node, or a shared one).

    Returns:
        The checkpoint folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"checkpoint-{state['step']:08d}"
    final, tmp = work / name, work / f".{name}.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    model_state, optim_state = get_state_dict(student, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / _rng_file(distributed.rank()))
    distributed.barrier()
    if distributed.is_main():
        _finish(work, tmp, final, {**state, "world_size": distributed.world_size()}, keep)
    distributed.barrier()
    return final


def load_distributed_checkpoint(folder: Path, *, student: torch.nn.Module,
                                optimizer: torch.optim.Optimizer) -> dict:
    """Restore a DCP checkpoint into a sharded or a plain model (any number of ranks).

    The target state dicts come from ``get_state_dict(student, optimizer)`` (sharded
    ``DTensor`` under torchrun, whole tensors in one process); ``dcp.load`` fills them
    from whatever shards were written (without a process group in one process) and
    ``set_state_dict`` puts them back. A rank restores its own RNG state when the writer
    had that rank.

    Returns:
        The checkpoint's ``state.json``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(student, optimizer)
    states = {"model": model_state, "optimizer": optim_state}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(states, checkpoint_id=str(folder), no_dist=not distributed.is_distributed())
    set_state_dict(student, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
    rng_path = folder / _rng_file(distributed.rank())
    if rng_path.is_file():
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((folder / "state.json").read_text())
