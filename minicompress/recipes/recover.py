"""``minicompress recover``: knowledge-distillation recovery of a pruned student.

Minitron (Muralidharan et al., arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796)
retrains a pruned student on a small token budget with the forward KL to its frozen
teacher. This recipe is the when-and-where of that retraining: it loads the student and
the teacher (rank 0 reads, FSDP2 shards under torchrun), reads the data, resumes from
``<output>.partial``, runs :func:`minicompress.distillation.loop.train` and writes the stock Hugging
Face folder atomically. The how (losses, schedule, data order, the loop) lives in
:mod:`minicompress.distillation.loop`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .. import arch, distributed
from ..config import RecoverConfig, to_dict
from ..data.rows import TrainingData, load_training_data
from ..errors import MinicompressError
from ..hardware import describe_precision, keep_freed_memory, resolve_compile
from ..runtime import model_device
from ..checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint, working_folder
from ..distillation.metrics import CURVES_FILE, METRICS_FILE, append_metrics, plot_curves, read_metrics
from ..models import TORCH_DTYPES, load_model, load_model_on_rank0, resolve_device
from ..outputs import atomic_folder, check_output, provenance, read_provenance, write_model_card, write_provenance
from ..progress import progress_bar
from ..distillation.distill import DistillState, distill, make_schedule
from ..distillation.loop import Schedule, StepRuntime, num_held_out
from ..distillation.teacher_cache import TeacherCache

log = logging.getLogger(__name__)



def _student_folder(student: torch.nn.Module) -> Path | None:
    """The folder the student was loaded from (``config._name_or_path``), if it is one."""
    name = getattr(student.config, "_name_or_path", "") or ""
    path = Path(name).expanduser() if name else None
    return path if path is not None and path.is_dir() else None


def _open_working_folder(config: RecoverConfig) -> tuple[Path, Path, Path | None]:
    """Check the output and ``<output>.partial``; returns ``(out, work, checkpoint)``.

    A checkpoint there is resumed only with ``resume``; without it the run is refused
    (``overwrite`` starts over). ``resume`` with nothing to resume says so and starts fresh.
    Nothing is written: :func:`_make_working_folder` does that once the setup has succeeded.
    """
    out = check_output(config.output, config.overwrite)
    work = working_folder(out)
    checkpoint = latest_checkpoint(work) if work.exists() else None
    if checkpoint is not None and not config.resume:
        if not config.overwrite:
            raise MinicompressError(f"resume: {work} holds a checkpoint of an interrupted run; "
                                    "pass --resume to continue it or --overwrite to start over")
        checkpoint = None
    if config.resume and checkpoint is None and distributed.is_main():
        log.warning("recover: --resume, but %s holds no checkpoint to resume; starting from step 0", work)
    return out, work, checkpoint


def _make_working_folder(work: Path, checkpoint: Path | None) -> None:
    """Empty ``work`` for a fresh run (keep it to resume ``checkpoint``), on rank 0."""
    distributed.barrier()  # every rank has looked at the working folder before rank 0 changes it
    if distributed.is_main():
        if checkpoint is None:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    distributed.barrier()


def _place_teacher(config: RecoverConfig, teacher, student, device: torch.device, teacher_dtype: str,
                   cache: TeacherCache | None):
    """Load the teacher when the run needs a live one (rank 0 reads under torchrun), cast it to
    ``teacher_dtype`` on its device and freeze it; returns ``(teacher, t_device, weights)``."""
    world, weights = distributed.world_size(), None
    if teacher is None and cache is None and config.teacher is not None:  # CE-only still evaluates KL
        t_config = dataclasses.replace(config.teacher, dtype=teacher_dtype, device=config.teacher_device or device.type)
        teacher, _, weights = load_model_on_rank0(t_config) if world > 1 else (*load_model(t_config), None)
    t_device = torch.device(config.teacher_device) if config.teacher_device else device
    if teacher is None:
        return None, t_device, None
    t_dtype = TORCH_DTYPES[teacher_dtype]
    if world > 1:  # shard_model moves the shards to t_device
        if next(teacher.parameters()).dtype != t_dtype:
            teacher.to(dtype=t_dtype)
    elif model_device(teacher).type != t_device.type or next(teacher.parameters()).dtype != t_dtype:
        teacher.to(device=t_device, dtype=t_dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    vocab, s_vocab = arch.lm_head_weight(teacher).shape[0], arch.lm_head_weight(student).shape[0]
    if vocab != s_vocab:
        raise MinicompressError(f"teacher: vocabulary size {vocab} differs from the student's {s_vocab}")
    return teacher, t_device, weights


def _training_data(config: RecoverConfig, cache: TeacherCache | None, student, tokenizer) -> TrainingData:
    """Held-out and training rows: the cache's own rows, or the data (one source or a mixture)."""
    if cache is None:
        return load_training_data(config.data, tokenizer, config.eval_tokens, seed=config.seed)
    if cache.seq_len != config.data.seq_len:
        raise MinicompressError(f"data.seq_len: {config.data.seq_len} differs from the teacher cache's {cache.seq_len}")
    if cache.vocab_size != arch.lm_head_weight(student).shape[0]:
        raise MinicompressError(f"--teacher-cache: vocabulary size {cache.vocab_size} differs from the "
                                f"student's {arch.lm_head_weight(student).shape[0]}")
    n_eval = num_held_out(cache.input_ids.shape[0], config.eval_tokens, config.data.seq_len)
    return TrainingData([cache.input_ids], None, n_eval, names=[str(config.teacher_cache)], seed=config.seed)


def _shard_for_training(config: RecoverConfig, student, teacher, *, device, t_device, autocast: str,
                        from_rank0: tuple[bool, bool], weights: tuple) -> None:
    """Under torchrun, shard the student and the teacher over the ranks (FSDP2): parameters,
    gradients and optimizer state are sharded; one process places nothing."""
    if distributed.world_size() == 1:
        return
    distributed.shard_model(student, device=device, mixed_precision=autocast == "bfloat16",
                            reshard_after_forward=config.reshard_after_forward,
                            activation_checkpointing=config.activation_checkpointing, from_rank0=from_rank0[0],
                            weights=weights[0])
    if teacher is not None:  # no backward would ever free gathered teacher layers: always reshard
        distributed.shard_model(teacher, device=t_device, mixed_precision=autocast == "bfloat16",
                                from_rank0=from_rank0[1], weights=weights[1])


def recover(config: RecoverConfig, *, student: torch.nn.Module | None = None,
            teacher: torch.nn.Module | None = None, tokenizer: Any = None,
            callback: Callable[[dict], None] | None = None) -> dict:
    """Distil a (pruned) student from its frozen teacher and save it as a HF folder.

    Args:
        config: the recovery settings (``output`` required).
        student: an in-memory student (else loaded from ``config.student``); trained in place.
        teacher: an in-memory teacher (else loaded from ``config.teacher`` when the loss
            needs it); frozen, never modified (cast to ``teacher_dtype`` /
            ``teacher_device`` only when it differs).
        tokenizer: the student's tokenizer (required with an in-memory student).
        callback: called with each step's metrics record after the step (and its
            checkpoint); an exception from it stops the run, leaving the working folder
            ``<output>.partial`` to resume from.

    Returns:
        ``{"output", "steps", "tokens", "before", "after", "final_loss", "seconds",
        "tokens_per_s", "resumed_from_step", "metrics"}``; ``before`` / ``after`` are the
        held-out metrics (``perplexity``, ``kl_to_teacher`` ...).

    Raises:
        MinicompressError: an existing output without ``overwrite``, a stale working
            folder without ``resume``/``overwrite``, a resume with changed settings,
            mismatched vocabularies, too little data, or a non-finite gradient.
    """
    # ---- where: output and working folder, ranks, models, data -------------------------
    world = distributed.init_from_env()  # 1 without torchrun: no process group, nothing changes
    main = distributed.is_main()
    if world > 1 and config.loss.intermediate_weight > 0:
        raise MinicompressError("loss.intermediate_weight: the intermediate-state loss runs in one process only, "
                                "not under torchrun; set it to 0 or drop torchrun")
    out, work, checkpoint = _open_working_folder(config)
    torch.manual_seed(config.seed)
    on_host, student_weights = student is None and world > 1, None  # torchrun: rank 0 reads, shard_model hands out
    if student is None:
        student, tokenizer, student_weights = load_model_on_rank0(config.student, for_training=True) if on_host \
            else (*load_model(config.student, for_training=True), None)
    elif tokenizer is None:
        raise MinicompressError("tokenizer: pass tokenizer= together with an in-memory student")
    student.train()
    device = resolve_device(config.student.device) if on_host else model_device(student)
    precision = describe_precision(config.autocast, device)
    autocast = precision["resolved"]
    teacher_dtype = config.teacher_dtype
    if teacher_dtype == "auto":  # an in-memory teacher keeps its dtype: the caller's model is not cast
        teacher_dtype = next((k for k, v in TORCH_DTYPES.items() if v == next(teacher.parameters()).dtype),
                             "float32") if teacher is not None else ("bfloat16" if autocast == "bfloat16" else "float32")
    precision["teacher_dtype"] = teacher_dtype
    if device.type == "cpu":  # a step's big buffers reuse their pages instead of faulting them in again
        precision["allocator"] = keep_freed_memory()
    log.info("recover: precision %s (%s)", "bf16 autocast" if autocast == "bfloat16" else "float32", precision["reason"])
    cache = TeacherCache(config.teacher_cache) if config.teacher_cache else None
    t_from_rank0 = teacher is None and world > 1
    teacher, t_device, teacher_weights = _place_teacher(config, teacher, student, device, teacher_dtype, cache)
    data = _training_data(config, cache, student, tokenizer)
    schedule = make_schedule(config, world, data.num_train)
    _shard_for_training(config, student, teacher, device=device, t_device=t_device, autocast=autocast,
                        from_rank0=(on_host, t_from_rank0), weights=(student_weights, teacher_weights))
    del student_weights, teacher_weights
    if not any(p.requires_grad for p in student.parameters()):
        raise MinicompressError("student: has no trainable parameters (all requires_grad=False)")
    precision["compile"], precision["compile_reason"] = resolve_compile(
        config.compile, device, tokens=config.tokens, world_size=world,
        activation_checkpointing=config.activation_checkpointing)
    if precision["compile"]:
        log.info("recover: compiling the decoder layers (%s)", precision["compile_reason"])

    # ---- resume, or evaluate once before training; checkpoints and metrics per step ------
    _make_working_folder(work, checkpoint)  # only now: a refused run (bad model, data, schedule) leaves nothing
    metrics_path = work / METRICS_FILE
    resumed_from = None

    def restore(state: DistillState) -> None:
        nonlocal resumed_from
        if checkpoint is None:
            return
        check_resumable(json.loads((checkpoint / "state.json").read_text())["config"], config)
        saved = load_checkpoint(checkpoint, student=student, optimizer=state.optimizer, intermediate=state.intermediate)
        state.start_step, state.elapsed, state.before = saved["step"], saved["seconds"], saved["before"]
        resumed_from = state.start_step
        if main:
            with metrics_path.open("r+") as f:  # drop records of steps after the checkpoint
                f.truncate(saved["metrics_bytes"])
        log.info("recover: resuming from %s (step %d of %d)", checkpoint, state.start_step, schedule.total_steps)
        bar.advance(state.start_step * schedule.tokens_per_step)

    with progress_bar("recover", schedule.total_steps * schedule.tokens_per_step, unit="tok") as bar:

        def on_step(record: dict, state: DistillState) -> None:
            if main:
                append_metrics(metrics_path, record)
            done = record["step"]
            if done == 0:  # the evaluation before training
                return
            bar.advance(schedule.tokens_per_step)
            bar.update(description=f"recover loss {record['loss']:.4f}")
            if done % config.log_every == 0 or done == schedule.total_steps:
                log.info("step %d/%d loss %.4f kl %.4f ce %.4f lr %.2e grad %.3f %.0f tok/s", done,
                         schedule.total_steps, record["loss"], record["kl"], record["ce"], record["lr"],
                         record["grad_norm"], record["tokens_per_s"])
            if done == schedule.total_steps or (config.save_every and done % config.save_every == 0):
                save_checkpoint(work, student=student, optimizer=state.optimizer, intermediate=state.intermediate,
                                state={"step": done, "tokens": record["tokens"], "seconds": state.elapsed,
                                       "data_position": done * schedule.accum_steps * config.micro_batch_size * world,
                                       "scheduler": {"kind": "warmup_cosine", **dataclasses.asdict(schedule)},
                                       "config": to_dict(config), "before": state.before,
                                       "metrics_bytes": metrics_path.stat().st_size if main else None},
                                keep=config.checkpoint_keep)
            if callback is not None:
                callback(record)

        result = distill(student, teacher, data, config, schedule, cache=cache, restore=restore, on_step=on_step,
                         runtime=StepRuntime(device, autocast, bool(precision["compile"])))
    if result["attention"]:
        precision["attention"] = result["attention"]
    return _write_student(config, out, student, tokenizer, cache=cache, data=data, schedule=schedule, result=result,
                          precision=precision, resumed_from=resumed_from)


def _write_student(config: RecoverConfig, out: Path, student, tokenizer, *, cache: TeacherCache | None,
                   data: TrainingData, schedule: Schedule, result: dict, precision: dict,
                   resumed_from: int | None) -> dict:
    """Write the recovered student atomically (rank 0) with its recovery record; returns the report.

    Args:
        config: the recovery settings.
        out: the output folder (its working folder ``<out>.partial`` holds the metrics).
        student: the trained student.
        tokenizer: saved next to it.
        cache: the teacher cache trained from, or None.
        data: the held-out and training rows (their counts and sources go into the record).
        schedule: the run's step arithmetic.
        result: what :func:`~minicompress.distillation.distill.distill` returned (``before``,
            ``elapsed``).
        precision: the precision record.
        resumed_from: the checkpoint step the run resumed from, or None.
    """
    world, main = distributed.world_size(), distributed.is_main()
    work = working_folder(out)
    before, elapsed = result["before"], result["elapsed"]
    n_eval, n_train = data.eval_ids.shape[0], data.num_train
    sources = data.tokens_per_source(schedule.total_steps * schedule.accum_steps * config.micro_batch_size * world,
                                     config.data.seq_len)
    metrics_path = work / METRICS_FILE
    records = distributed.broadcast_object(read_metrics(metrics_path) if main else None)
    if main:
        plot_curves(records, work / CURVES_FILE, title=f"recover {Path(out).name}")
    last = records[-1]
    after = {k[5:]: v for k, v in last.items() if k.startswith("eval_")}
    final_loss = last.get("loss")
    teacher_source = cache.index.get("teacher") if cache is not None else \
        (config.teacher.source if config.teacher else None)
    tokens = schedule.total_steps * schedule.tokens_per_step
    recovery = provenance(
        "recover", config, teacher=teacher_source, teacher_cache=config.teacher_cache,
        tokens_trained=tokens, tokens_per_source=sources, steps=schedule.total_steps, loss=to_dict(config.loss),
        held_out_sequences=n_eval, train_sequences=n_train, metrics_before=before, metrics_after=after,
        precision=precision, **({"world_size": world} if world > 1 else {}),
        final_train_loss=final_loss, seconds=elapsed,
    )
    folder = _student_folder(student)
    previous = read_provenance(folder) if folder is not None else None
    record_out = dict(previous) if previous else provenance("recover", config)
    if previous and "recovery" in previous:
        record_out["recovery_history"] = previous.get("recovery_history", []) + [previous["recovery"]]
    record_out["recovery"] = recovery
    full_state = distributed.full_state_dict(student) if world > 1 else None  # collective; rank 0 holds it
    if main:
        with atomic_folder(out, config.overwrite) as tmp:
            distributed.save_pretrained(student, tmp, full_state)
            if getattr(student, "generation_config", None) is not None:
                student.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.copy2(metrics_path, tmp / METRICS_FILE)
            shutil.copy2(work / CURVES_FILE, tmp / CURVES_FILE)
            write_provenance(tmp, record_out)
            write_model_card(tmp, record_out)
        shutil.rmtree(work, ignore_errors=True)
    distributed.barrier()
    return {"output": str(out), "steps": schedule.total_steps, "tokens": tokens, "before": before, "after": after,
            "final_loss": final_loss, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
            "resumed_from_step": resumed_from, "metrics": records}
