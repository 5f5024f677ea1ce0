"""``minicompress recover``: knowledge-distillation recovery of a pruned student.

Minitron (Muralidharan et al., arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796)
retrains a pruned student on a small token budget with the forward KL to its frozen
teacher. This recipe is the when-and-where of that retraining: it loads the student and
the teacher (rank 0 reads, FSDP2 shards under torchrun), reads the data, resumes from
``<output>.partial``, runs :func:`minicompress.distillation.loop.train` and writes the stock Hugging
Face folder atomically. The how (losses, schedule, data order, the loop) lives in
:mod:`minicompress.distillation.loop`.

With ``on_policy`` a share of each step's rows is written by the student itself and scored
by the teacher (on-policy distillation, GKD: Agarwal et al., arXiv 2306.13649;
:mod:`minicompress.distillation.onpolicy`); this recipe reads the optional prompts file.

With ``blockwise_tokens`` a blockwise local distillation stage (Puzzle, Bercovich et al.,
arXiv 2411.19146; :mod:`minicompress.distillation.blockwise`) runs first on that share of the
budget, with checkpoints of its own in ``<output>.partial/blockwise``; the global stage gets
the rest and reads exactly the rows a run without the stage reads.
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
from ..data.sources import bos_token_id, read_documents
from ..errors import MinicompressError
from ..hardware import describe_precision, keep_freed_memory, resolve_compile
from ..runtime import model_device
from ..checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint, working_folder
from ..distillation.metrics import CURVES_FILE, METRICS_FILE, append_metrics, plot_curves, read_metrics
from ..models import TORCH_DTYPES, load_model, load_model_on_rank0, resolve_device
from ..outputs import (atomic_folder, check_output, provenance, read_provenance, write_json_atomic, write_model_card,
                       write_provenance)
from ..progress import progress_bar
from ..distillation.distill import DistillState, distill, make_schedule
from ..distillation.loop import Schedule, StepRuntime, num_held_out
from ..distillation.teacher_cache import TeacherCache
from ..distillation.onpolicy import Prompts, generated_rows, tokenize_prompts
from ..distillation.blockwise import BlockMap, BlockwiseState, block_map, blockwise_distill, blockwise_schedule

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
    if (checkpoint or _blockwise_progress(work)) is not None and not config.resume:
        if not config.overwrite:
            raise MinicompressError(f"resume: {work} holds a checkpoint of an interrupted run; "
                                    "pass --resume to continue it or --overwrite to start over")
        checkpoint = None
    if config.resume and (checkpoint or _blockwise_progress(work)) is None and distributed.is_main():
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


def _on_policy_prompts(config: RecoverConfig, tokenizer) -> Prompts | None:
    """The prompts file of ``on_policy_prompts``, tokenised like the data rows (BOS first when
    the tokenizer adds one) and cut to ``on_policy_prompt_tokens``; None without one."""
    if not config.on_policy or config.on_policy_prompts is None:
        return None
    path = Path(config.on_policy_prompts).expanduser()
    if not path.exists():
        raise MinicompressError(f"on_policy_prompts: no such file or folder: {path}")
    try:
        texts = read_documents(str(path), text_field=config.data.text_field)
    except MinicompressError as err:  # its errors name --data
        raise MinicompressError(f"on_policy_prompts: {str(err).partition(': ')[2]}") from None
    return tokenize_prompts(texts, tokenizer, config.on_policy_prompt_tokens, bos_token_id(tokenizer))


def _on_policy_record(config: RecoverConfig, schedule: Schedule, gen_seconds: float) -> dict:
    """``recovery.on_policy``: the share, prompts, divergence, sampling and generation seconds."""
    rows = schedule.accum_steps * config.micro_batch_size
    return {"on_policy": config.on_policy, "prompt_tokens": config.on_policy_prompt_tokens,
            "prompts": config.on_policy_prompts, "divergence": config.loss.kind,
            **({"beta": config.loss.beta} if config.loss.kind == "jsd" else {}),
            "temperature": config.on_policy_temperature, "top_k": config.on_policy_top_k,
            "top_p": config.on_policy_top_p, "generated_rows_per_step": generated_rows(config.on_policy, rows),
            "rows_per_step": rows, "generation_seconds": gen_seconds}


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


# ---- the blockwise stage (Puzzle's blockwise local distillation) before the global one ----------

BLOCKWISE_DIR = "blockwise"  # its checkpoints, inside <output>.partial
BLOCKWISE_METRICS = "blockwise.jsonl"  # its step records (copied into the output)
BLOCKWISE_DONE = "blockwise.json"  # its record, written when the stage has finished


def _global_stage(config: RecoverConfig) -> RecoverConfig:
    """The settings of the global stage: ``tokens - blockwise_tokens``."""
    if not config.blockwise_tokens:
        return config
    return dataclasses.replace(config, tokens=config.tokens - config.blockwise_tokens, blockwise_tokens=0)


def _blockwise_progress(work: Path) -> Path | None:
    """What a killed run's blockwise stage left in ``work``: its record once finished, else its last
    checkpoint, else None."""
    if (work / BLOCKWISE_DONE).is_file():
        return work / BLOCKWISE_DONE
    return latest_checkpoint(work / BLOCKWISE_DIR) if (work / BLOCKWISE_DIR).is_dir() else None


def _blockwise_map(config: RecoverConfig, student, teacher) -> BlockMap | None:
    """The block map of a run with ``blockwise_tokens`` (None without): ``blockwise_layers``, else the
    plan in the student's ``minicompress.json``, else the identity."""
    if not config.blockwise_tokens:
        return None
    if distributed.world_size() > 1:
        raise MinicompressError("blockwise_tokens: the blockwise stage runs in one process only, not under torchrun; "
                                "set it to 0 or drop torchrun")
    folder = _student_folder(student)
    return block_map(student.config, teacher.config, provenance=read_provenance(folder) if folder else None,
                     layers=config.blockwise_layers)


def _blockwise_stage(config: RecoverConfig, student, teacher, data: TrainingData, work: Path, bmap: BlockMap, *,
                     runtime: StepRuntime, global_schedule: Schedule,
                     global_checkpoint: Path | None, callback: Callable[[dict], None] | None) -> dict:
    """Run (or resume, or skip once finished) the blockwise stage; returns its record.

    The stage reads the training rows after the ``global_schedule.total_steps`` steps of the global stage,
    checkpoints into ``<output>.partial/blockwise`` every ``save_every`` steps and at its end,
    then writes ``blockwise.json``: a resumed run that finds it loads the stage's last weights
    (unless the global stage has a checkpoint of its own) and goes on with the global stage.
    """
    from safetensors.torch import load_model as load_safetensors_model

    folder, done, metrics_path = work / BLOCKWISE_DIR, work / BLOCKWISE_DONE, work / BLOCKWISE_METRICS
    if done.is_file():
        if global_checkpoint is None:  # killed before the global stage's first checkpoint
            load_safetensors_model(student, str(latest_checkpoint(folder) / "student.safetensors"), strict=True,
                                   device=str(runtime.device))
        log.info("recover: the blockwise stage finished before the interruption; going on with the global stage")
        return json.loads(done.read_text())
    if global_checkpoint is not None:  # a checkpoint of a run without the stage: says which key changed
        check_resumable(json.loads((global_checkpoint / "state.json").read_text())["config"], config)
    checkpoint = latest_checkpoint(folder) if folder.is_dir() else None
    schedule = blockwise_schedule(config)
    accum_steps = global_schedule.accum_steps
    offset = global_schedule.total_steps * accum_steps * config.micro_batch_size

    def restore(state: BlockwiseState) -> None:
        if checkpoint is None:
            return
        check_resumable(json.loads((checkpoint / "state.json").read_text())["config"], config)
        saved = load_checkpoint(checkpoint, student=student, optimizer=state.optimizer, intermediate=None)
        state.start_step, state.elapsed, state.before = saved["step"], saved["seconds"], saved["before"]
        with metrics_path.open("r+") as f:  # drop records of steps after the checkpoint
            f.truncate(saved["metrics_bytes"])
        log.info("recover: resuming the blockwise stage from %s (step %d of %d)", checkpoint, state.start_step,
                 schedule.total_steps)
        bar.advance(state.start_step * schedule.tokens_per_step)

    log.info("recover: blockwise stage, %d steps of %s tokens, %d blocks over teacher spans %s", schedule.total_steps,
             f"{schedule.tokens_per_step:,}", len(bmap.layers), bmap.spans())
    with progress_bar("blockwise", schedule.total_steps * schedule.tokens_per_step, unit="tok") as bar:

        def on_step(record: dict, state: BlockwiseState) -> None:
            append_metrics(metrics_path, record)
            step = record["step"]
            bar.advance(schedule.tokens_per_step)
            bar.update(description=f"blockwise nmse {record['nmse']:.4f}")
            if step % config.log_every == 0 or step == schedule.total_steps:
                log.info("blockwise step %d/%d nmse %.4f (max block %.4f) lr %.2e grad %.3f %.0f tok/s", step,
                         schedule.total_steps, record["nmse"], max(record["nmse_blocks"]), record["lr"],
                         record["grad_norm"], record["tokens_per_s"])
            if step == schedule.total_steps or (config.save_every and step % config.save_every == 0):
                save_checkpoint(folder, student=student, optimizer=state.optimizer, intermediate=None,
                                state={"step": step, "tokens": record["tokens"], "seconds": state.elapsed,
                                       "config": to_dict(config), "before": state.before,
                                       "metrics_bytes": metrics_path.stat().st_size},
                                keep=config.checkpoint_keep)
            if callback is not None:
                callback(record)

        result = blockwise_distill(student, teacher, data, config, bmap, runtime=runtime, offset=offset,
                                   accum_steps=accum_steps, restore=restore, on_step=on_step)
    tokens = schedule.total_steps * schedule.tokens_per_step
    record = {"tokens": tokens, "steps": schedule.total_steps, "lr": schedule.lr, "map": bmap.to_dict(),
              "loss": "normalized_mse", "nmse_before": result["before"]["nmse_blocks"],
              "nmse_after": result["nmse_after"], "metrics_before": result["before"]["metrics"],
              "seconds": result["elapsed"], "tokens_per_s": tokens / max(result["elapsed"], 1e-9),
              "resumed_from_step": result["start_step"] or None}
    write_json_atomic(done, record)
    log.info("recover: blockwise stage done in %.0f s (%.0f tok/s); held-out normalized MSE per block %s -> %s",
             record["seconds"], record["tokens_per_s"], _fmt(record["nmse_before"]), _fmt(record["nmse_after"]))
    return record


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


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
            ``<output>.partial`` to resume from. The blockwise stage's records come first,
            marked ``"stage": "blockwise"``.

    Returns:
        ``{"output", "steps", "tokens", "before", "after", "final_loss", "seconds",
        "tokens_per_s", "resumed_from_step", "metrics"}``; ``before`` / ``after`` are the
        held-out metrics (``perplexity``, ``kl_to_teacher`` ...). With ``blockwise_tokens``
        also ``"blockwise"`` (the stage's record, ``recovery.blockwise`` of the output);
        ``steps`` and ``metrics`` are then the global stage's, ``tokens`` and ``seconds``
        both stages', and ``before`` is the student as it came. With ``on_policy`` also
        ``"generation_seconds"`` (of ``seconds``, the student's own continuations;
        ``recovery.on_policy`` of the output holds it with the share, prompts and divergence).

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
    if world > 1 and config.on_policy > 0:
        raise MinicompressError("on_policy: on-policy distillation runs in one process only, not under torchrun "
                                "(decoding from an FSDP2-sharded student would all-gather every layer per token); "
                                "set it to 0 or drop torchrun")
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
    prompts = _on_policy_prompts(config, tokenizer)
    bmap = _blockwise_map(config, student, teacher)  # before anything is written: a map that does not fit refuses
    schedule = make_schedule(_global_stage(config), world, data.num_train)
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
    _make_working_folder(work, checkpoint or (_blockwise_progress(work) if config.resume else None))
    # only now: a refused run (bad model, data, schedule) leaves nothing
    metrics_path = work / METRICS_FILE
    resumed_from = None
    blockwise_record = None
    if bmap is not None:  # Puzzle's blockwise local distillation first (its own checkpoints, skipped once done)
        blockwise_record = _blockwise_stage(config, student, teacher, data, work, bmap,
                                            runtime=StepRuntime(device, autocast), global_schedule=schedule,
                                            global_checkpoint=checkpoint, callback=callback)

    resume_state = json.loads((checkpoint / "state.json").read_text()) if checkpoint is not None else None

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
        log.info("recover: resuming from %s (step %d of %d)", checkpoint, state.start_step, schedule.total_steps)

    with progress_bar("recover", schedule.total_steps * schedule.tokens_per_step, unit="tok",
                      completed=(resume_state or {}).get("step", 0) * schedule.tokens_per_step) as bar:

        def on_step(record: dict, state: DistillState) -> None:
            if main:
                append_metrics(metrics_path, record)
            done = record["step"]
            if done == 0:  # the evaluation before training
                return
            bar.advance(schedule.tokens_per_step)
            times = f" gen {record['gen_seconds']:.1f}s train {record['train_seconds']:.1f}s" if config.on_policy else ""
            bar.update(description=f"recover loss {record['loss']:.4f}{times}")
            if done % config.log_every == 0 or done == schedule.total_steps:
                log.info("step %d/%d loss %.4f kl %.4f ce %.4f lr %.2e grad %.3f %.0f tok/s%s", done,
                         schedule.total_steps, record["loss"], record["kl"], record["ce"], record["lr"],
                         record["grad_norm"], record["tokens_per_s"], times)
            if done == schedule.total_steps or (config.save_every and done % config.save_every == 0):
                save_checkpoint(work, student=student, optimizer=state.optimizer, intermediate=state.intermediate,
                                state={"step": done, "tokens": record["tokens"], "seconds": state.elapsed,
                                       "gen_seconds": state.gen_elapsed, "data_position": done * schedule.accum_steps * config.micro_batch_size * world,
                                       "scheduler": {"kind": "warmup_cosine", **dataclasses.asdict(schedule)},
                                       "config": to_dict(config), "before": state.before,
                                       "metrics_bytes": metrics_path.stat().st_size if main else None},
                                keep=config.checkpoint_keep)
            if callback is not None:
                callback(record)

        result = distill(student, teacher, data, config, schedule, cache=cache, restore=restore, on_step=on_step,
                         runtime=StepRuntime(device, autocast, bool(precision["compile"])), prompts=prompts)
    if result["attention"]:
        precision["attention"] = result["attention"]
    if blockwise_record is not None:  # the blockwise stage ends where the global one began
        blockwise_record["metrics_after"] = result["before"]
        result["blockwise"] = blockwise_record
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
        schedule: the global stage's step arithmetic.
        result: what :func:`~minicompress.distillation.distill.distill` returned (``before``,
            ``elapsed``, ``gen_seconds``), with ``blockwise``: the blockwise stage's record (``recovery.blockwise``)
            when there was one; ``before`` is then the student as it came in and the seconds
            and tokens cover both stages.
        precision: the precision record.
        resumed_from: the checkpoint step the run resumed from, or None.
    """
    world, main = distributed.world_size(), distributed.is_main()
    work = working_folder(out)
    blockwise = result.get("blockwise")
    before, elapsed = result["before"], result["elapsed"]
    if blockwise is not None:
        before, elapsed = blockwise["metrics_before"], elapsed + blockwise["seconds"]
    n_eval, n_train = data.eval_ids.shape[0], data.num_train
    steps = schedule.total_steps + (blockwise or {}).get("steps", 0)
    sources = data.tokens_per_source(steps * schedule.accum_steps * config.micro_batch_size * world,
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
    tokens = schedule.total_steps * schedule.tokens_per_step + (blockwise["tokens"] if blockwise else 0)
    recovery = provenance(
        "recover", config, teacher=teacher_source, teacher_cache=config.teacher_cache,
        tokens_trained=tokens, tokens_per_source=sources, steps=schedule.total_steps, loss=to_dict(config.loss),
        held_out_sequences=n_eval, train_sequences=n_train, metrics_before=before, metrics_after=after,
        precision=precision, **({"world_size": world} if world > 1 else {}),
        final_train_loss=final_loss, seconds=elapsed, **({"blockwise": blockwise} if blockwise else {}),
        **({"on_policy": _on_policy_record(config, schedule, result["gen_seconds"])} if config.on_policy else {}),
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
            if blockwise:
                shutil.copy2(work / BLOCKWISE_METRICS, tmp / BLOCKWISE_METRICS)
            write_provenance(tmp, record_out)
            write_model_card(tmp, record_out)
        shutil.rmtree(work, ignore_errors=True)
    distributed.barrier()
    return {"output": str(out), "steps": schedule.total_steps, "tokens": tokens, "before": before, "after": after,
            "final_loss": final_loss, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
            "resumed_from_step": resumed_from, "metrics": records, **({"blockwise": blockwise} if blockwise else {}),
            **({"generation_seconds": result["gen_seconds"]} if config.on_policy else {})}
