"""The working folder of a training command: resume, checkpoints, metrics, progress, the output.

Two commands train a model with :func:`minicompress.distillation.distill.distill` (Minitron,
Muralidharan et al., arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796): ``recover``
distils a pruned student from its frozen teacher, ``correct`` fine-tunes the unpruned
teacher on the distillation text first (teacher correction). Both train the same way here:
the run's checkpoints and ``metrics.jsonl`` live in ``<output>.partial`` while it trains, a
killed run resumes from its last checkpoint only when asked (``resume``), the progress bar
counts tokens, and the trained model is written as a stock Hugging Face folder, atomically,
with its provenance and model card. The components below (the loop, the losses) never touch
disk; this module is the part of the two recipes that does, written once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed
from .checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint, working_folder
from .config import RecoverConfig, to_dict
from .data.rows import TrainingData
from .distillation.distill import DistillState, distill
from .distillation.loop import Schedule, StepRuntime
from .distillation.onpolicy import Prompts
from .distillation.metrics import CURVES_FILE, METRICS_FILE, append_metrics, plot_curves, read_metrics
from .distillation.teacher_cache import TeacherCache
from .errors import MinicompressError
from .outputs import atomic_folder, check_output, write_model_card, write_provenance
from .progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkingFolder:
    """Where a training command writes while it trains.

    Attributes:
        command: the command's name (log lines, the progress bar, the curves' title).
        output: the final folder.
        work: its working folder ``<output>.partial`` (checkpoints, ``metrics.jsonl``).
        checkpoint: the checkpoint to resume, or None (a fresh start).
    """

    command: str
    output: Path
    work: Path
    checkpoint: Path | None


def open_working_folder(command: str, config: Any,
                        interrupted: Callable[[Path], Path | None] = latest_checkpoint) -> WorkingFolder:
    """Check the output and ``<output>.partial`` of ``config`` (``output``, ``overwrite``, ``resume``).

    What an interrupted run left there (``interrupted(work)``: its last checkpoint by default)
    is resumed only with ``resume``; without it the run is refused (``overwrite`` starts
    over). ``resume`` with nothing to resume says so and starts fresh. Nothing is written:
    :func:`make_working_folder` does that once the setup has succeeded.

    Raises:
        MinicompressError: no output, an existing output without ``overwrite``, or a
            working folder holding a checkpoint without ``resume`` or ``overwrite``.
    """
    out = check_output(config.output, config.overwrite)
    work = working_folder(out)
    checkpoint = latest_checkpoint(work) if work.exists() else None
    left = interrupted(work) if work.exists() else None
    if left is not None and not config.resume:
        if not config.overwrite:
            raise MinicompressError(f"resume: {work} holds a checkpoint of an interrupted run; "
                                    "pass --resume to continue it or --overwrite to start over")
        checkpoint = None
    if config.resume and left is None and distributed.is_main():
        log.warning("%s: --resume, but %s holds no checkpoint to resume; starting from step 0", command, work)
    return WorkingFolder(command, out, work, checkpoint)


def make_working_folder(work: Path, keep: bool) -> None:
    """Empty ``work`` for a fresh run (``keep`` it to resume), on rank 0."""
    distributed.barrier()  # every rank has looked at the working folder before rank 0 changes it
    if distributed.is_main():
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    distributed.barrier()


def distill_with_checkpoints(student: torch.nn.Module, teacher: torch.nn.Module | None, data: TrainingData,
                             config: RecoverConfig, schedule: Schedule, *, folder: WorkingFolder,
                             runtime: StepRuntime, cache: TeacherCache | None = None,
                             callback: Callable[[dict], None] | None = None, prompts: Prompts | None = None) -> dict:
    """:func:`~minicompress.distillation.distill.distill` with checkpoints, metrics and a progress bar.

    Resumes ``folder.checkpoint`` when there is one (refusing changed settings:
    :func:`~minicompress.checkpoint.check_resumable`), appends every step's record to
    ``<work>/metrics.jsonl`` (rank 0), checkpoints every ``config.save_every`` steps and at
    the end, and logs every ``config.log_every`` steps.

    Args:
        student: the placed model to train (train mode).
        teacher: the frozen teacher, or None (a teacher cache, or cross-entropy only).
        data: held-out and training rows.
        config: the training settings (``correct`` passes
            :meth:`~minicompress.config.CorrectConfig.recover_config`).
        schedule: the step arithmetic (:func:`~minicompress.distillation.distill.make_schedule`).
        folder: the working folder and the checkpoint to resume.
        runtime: device, autocast and compilation.
        cache: a teacher cache (its targets replace a live teacher).
        callback: called with each step's record after the step (and its checkpoint); an
            exception from it stops the run, leaving the working folder to resume from.
        prompts: the prompts file's rows of an on-policy run (``config.on_policy > 0``), or None:
            prompts from the data rows.

    Returns:
        What ``distill`` returns, plus ``resumed_from_step`` (None on a fresh start).
    """
    main, world = distributed.is_main(), distributed.world_size()
    work, checkpoint = folder.work, folder.checkpoint
    metrics_path = work / METRICS_FILE
    resume_state = json.loads((checkpoint / "state.json").read_text()) if checkpoint is not None else None
    resumed_from = None
    on_policy = getattr(config, "on_policy", 0) > 0

    def restore(state: DistillState) -> None:
        nonlocal resumed_from
        if resume_state is None:
            return
        check_resumable(resume_state["config"], config)
        saved = load_checkpoint(checkpoint, student=student, optimizer=state.optimizer, intermediate=state.intermediate)
        state.start_step, state.elapsed, state.before = saved["step"], saved["seconds"], saved["before"]
        state.gen_elapsed = saved.get("gen_seconds", 0.0)
        resumed_from = state.start_step
        if main:
            with metrics_path.open("r+") as f:  # drop records of steps after the checkpoint
                f.truncate(saved["metrics_bytes"])
        log.info("%s: resuming from %s (step %d of %d)", folder.command, checkpoint, state.start_step,
                 schedule.total_steps)

    with progress_bar(folder.command, schedule.total_steps * schedule.tokens_per_step, unit="tok",
                      completed=(resume_state or {}).get("step", 0) * schedule.tokens_per_step) as bar:

        def on_step(record: dict, state: DistillState) -> None:
            if main:
                append_metrics(metrics_path, record)
            done = record["step"]
            if done == 0:  # the evaluation before training
                return
            bar.advance(schedule.tokens_per_step)
            times = f" gen {record['gen_seconds']:.1f}s train {record['train_seconds']:.1f}s" if on_policy else ""
            bar.update(description=f"{folder.command} loss {record['loss']:.4f}{times}")
            if done % config.log_every == 0 or done == schedule.total_steps:
                log.info("step %d/%d loss %.4f kl %.4f ce %.4f lr %.2e grad %.3f %.0f tok/s%s", done,
                         schedule.total_steps, record["loss"], record["kl"], record["ce"], record["lr"],
                         record["grad_norm"], record["tokens_per_s"], times)
            if done == schedule.total_steps or (config.save_every and done % config.save_every == 0):
                save_checkpoint(work, student=student, optimizer=state.optimizer, intermediate=state.intermediate,
                                state={"step": done, "tokens": record["tokens"], "seconds": state.elapsed,
                                       "gen_seconds": state.gen_elapsed,
                                       "data_position": done * schedule.accum_steps * config.micro_batch_size * world,
                                       "scheduler": {"kind": "warmup_cosine", **dataclasses.asdict(schedule)},
                                       "config": to_dict(config), "before": state.before,
                                       "metrics_bytes": metrics_path.stat().st_size if main else None},
                                keep=config.checkpoint_keep)
            if callback is not None:
                callback(record)

        result = distill(student, teacher, data, config, schedule, cache=cache, restore=restore, on_step=on_step,
                         runtime=runtime, prompts=prompts)
    return {**result, "resumed_from_step": resumed_from}


def finish_metrics(folder: WorkingFolder) -> list[dict]:
    """The run's ``metrics.jsonl`` records (on every rank); rank 0 draws ``curves.png`` from them."""
    metrics_path = folder.work / METRICS_FILE
    records = distributed.broadcast_object(read_metrics(metrics_path) if distributed.is_main() else None)
    if distributed.is_main():
        plot_curves(records, folder.work / CURVES_FILE, title=f"{folder.command} {folder.output.name}")
    return records


def write_model_folder(folder: WorkingFolder, model: torch.nn.Module, tokenizer: Any, record: dict, *,
                       overwrite: bool, full_state: dict | None = None, files: tuple[str, ...] = ()) -> None:
    """Write the trained model into ``folder.output`` atomically (rank 0), then drop the working folder.

    A stock Hugging Face folder: the weights (``save_pretrained``; ``full_state`` is the
    gathered state of a sharded model), its generation config and tokenizer, ``files``
    copied from the working folder (``metrics.jsonl``, ``curves.png`` ...; none when
    nothing was trained), ``minicompress.json`` (``record``) and the model card.
    """
    if distributed.is_main():
        with atomic_folder(folder.output, overwrite) as tmp:
            distributed.save_pretrained(model, tmp, full_state)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for name in files:
                shutil.copy2(folder.work / name, tmp / name)
            write_provenance(tmp, record)
            write_model_card(tmp, record)
        shutil.rmtree(folder.work, ignore_errors=True)
    distributed.barrier()


#: what a trained folder carries from its working folder
TRAINING_FILES = (METRICS_FILE, CURVES_FILE)
