"""``minicompress recover``: knowledge-distillation recovery of a pruned student.

Minitron (Muralidharan et al., arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796)
retrains a pruned student on a small token budget with the forward KL to its frozen
teacher. This recipe is the when-and-where of that retraining: it loads the student and
the teacher (rank 0 reads, FSDP2 shards under torchrun), reads the data, resumes from
``<output>.partial``, runs :func:`minicompress.distillation.loop.train` and writes the stock Hugging
Face folder atomically (the working folder, checkpoints, metrics and output are
:mod:`minicompress.training`'s, shared with ``correct``). The how (losses, schedule, data
order, the loop) lives in :mod:`minicompress.distillation.loop`.

With ``teachers`` (``--teacher A --teacher B``) the target is the weighted mixture of several
teachers' distributions (:class:`~minicompress.distillation.loop.Teachers`); every further
teacher must have the student's tokenizer (checked before its weights are read) and
vocabulary, and a teacher cache per teacher works as ``teacher_cache`` does.

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
from pathlib import Path
from typing import Any, Callable

import torch

from .. import arch, distributed
from ..config import ModelConfig, RecoverConfig, to_dict
from ..data.rows import TrainingData, load_training_data
from ..data.sources import bos_token_id, read_documents
from ..errors import MinicompressError
from ..hardware import describe_precision, keep_freed_memory, resolve_compile
from ..runtime import model_device
from ..checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint
from ..distillation.metrics import append_metrics
from ..models import TORCH_DTYPES, load_for_flag, load_model, load_model_on_rank0, load_tokenizer, resolve_device
from ..outputs import provenance, read_provenance, write_json_atomic
from ..progress import progress_bar
from ..distillation.distill import make_schedule
from ..distillation.loop import Schedule, StepRuntime, Teachers, num_held_out
from ..distillation.teacher_cache import TeacherCache
from ..distillation.onpolicy import Prompts, generated_rows, tokenize_prompts
from ..distillation.blockwise import BlockMap, BlockwiseState, block_map, blockwise_distill, blockwise_schedule
from ..training import (TRAINING_FILES, WorkingFolder, distill_with_checkpoints, finish_metrics, make_working_folder,
                        open_working_folder, write_model_folder)

log = logging.getLogger(__name__)



def _student_folder(student: torch.nn.Module) -> Path | None:
    """The folder the student was loaded from (``config._name_or_path``), if it is one."""
    name = getattr(student.config, "_name_or_path", "") or ""
    path = Path(name).expanduser() if name else None
    return path if path is not None and path.is_dir() else None


def _place_teacher(config: RecoverConfig, teacher, student, device: torch.device, teacher_dtype: str,
                   cache: TeacherCache | None, tokenizer):
    """Load the teacher when the run needs a live one (rank 0 reads under torchrun), cast it to
    ``teacher_dtype`` on its device and freeze it; returns ``(teacher, t_device, weights)``.
    With further ``teachers`` its tokenizer must be the student's ``tokenizer`` (checked first)."""
    world, weights = distributed.world_size(), None
    if teacher is None and cache is None and config.teacher is not None:  # CE-only still evaluates KL
        t_config = dataclasses.replace(config.teacher, dtype=teacher_dtype, device=config.teacher_device or device.type)
        if config.teachers:
            _check_tokenizer(f"--teacher {t_config.source}", t_config, tokenizer)
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


def _check_tokenizer(flag: str, model: ModelConfig, tokenizer) -> None:
    """Refuse a teacher whose tokenizer (its vocabulary: token -> id) is not the student's ``tokenizer``;
    reads the teacher's tokenizer files only, before its weights."""
    theirs, ours = load_tokenizer(model).get_vocab(), tokenizer.get_vocab()
    if theirs != ours:
        sizes = f"{len(theirs)} vs {len(ours)} tokens" if len(theirs) != len(ours) else \
            f"both {len(ours)} tokens, not the same ids"
        raise MinicompressError(f"{flag}: its tokenizer differs from the student's ({sizes})")


def _open_cache(folder: str, key: str) -> TeacherCache:
    """A further teacher's cache, its errors naming ``key`` (``teachers[1].cache``)."""
    try:
        return TeacherCache(folder)
    except MinicompressError as err:
        raise MinicompressError(str(err).replace("--teacher-cache", key, 1)) from None


def _place_teachers(config: RecoverConfig, first, cache: TeacherCache | None, student, tokenizer, *,
                    device: torch.device, teacher_dtype: str) -> Teachers | None:
    """The teachers of a multi-teacher run (None with one teacher): the first as placed, then each of
    ``config.teachers`` loaded (tokenizer checked before the weights), cast and frozen like the first,
    or its cache opened.

    Raises:
        MinicompressError: a teacher with another tokenizer or vocabulary size, a sampled cache (its
            draws cannot be mixed), or caches whose rows differ.
    """
    if not config.teachers:
        return None
    vocab = arch.lm_head_weight(student).shape[0]
    models, caches, keys = [first if cache is None else None], [cache], ["--teacher-cache"]
    for i, spec in enumerate(config.teachers):
        if spec.cache is not None:
            models.append(None)
            caches.append(_open_cache(spec.cache, f"teachers[{i}].cache"))
            keys.append(f"teachers[{i}].cache")
            if caches[-1].vocab_size != vocab:
                raise MinicompressError(f"teachers[{i}].cache: vocabulary size {caches[-1].vocab_size} differs from "
                                        f"the student's {vocab}")
            continue
        flag = f"--teacher {spec.source}"
        t_config = ModelConfig(source=spec.source, dtype=teacher_dtype, device=config.teacher_device or device.type,
                               trust_remote_code=spec.trust_remote_code)
        _check_tokenizer(flag, t_config, tokenizer)
        model, _ = load_for_flag(t_config, "--teacher")
        model.eval()
        model.requires_grad_(False)
        if arch.lm_head_weight(model).shape[0] != vocab:
            raise MinicompressError(f"{flag}: its vocabulary size {arch.lm_head_weight(model).shape[0]} differs from "
                                    f"the student's {vocab}")
        models.append(model)
        caches.append(None)
    rows = next((c for c in caches if c is not None), None)
    for key, c in zip(keys, caches):
        if c is None:
            continue
        if c.kind != "topk":
            raise MinicompressError(f"{key}: {c.folder} holds sampled tokens, an estimate of one teacher's KL that "
                                    "cannot be mixed with other teachers; write it with teacher-cache --kind topk")
        if c is not rows and not torch.equal(c.input_ids, rows.input_ids):
            raise MinicompressError(f"{key}: its rows differ from those of {rows.folder}; write every teacher's cache "
                                    "from the same data, seq_len and tokens")
    return Teachers(tuple(models), tuple(caches), config.mixture_weights(), config.source_teachers())


def _teachers_record(config: RecoverConfig, teachers: Teachers) -> dict:
    """The ``recovery`` record of a multi-teacher run: each teacher, its cache and weight, and the
    data sources distilled from one teacher alone."""
    record = {"teachers": [{"teacher": c.index.get("teacher", name) if c is not None else name,
                            "cache": str(c.folder) if c is not None else None, "weight": w}
                           for name, c, w in zip(config.teacher_names(), teachers.caches, teachers.weights)]}
    by_source = {part.source: t for part, t in zip(config.data.mixture, teachers.by_source) if t is not None}
    if by_source:
        record["source_teachers"] = by_source
    return record


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
    first = config.teacher_cache is not None and cache.folder == Path(config.teacher_cache).expanduser()
    return TrainingData([cache.input_ids], None, n_eval, names=[str(config.teacher_cache if first else cache.folder)],
                        seed=config.seed)


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
    if world > 1 and config.loss.intermediate_weight > 0:
        raise MinicompressError("loss.intermediate_weight: the intermediate-state loss runs in one process only, "
                                "not under torchrun; set it to 0 or drop torchrun")
    if world > 1 and config.on_policy > 0:
        raise MinicompressError("on_policy: on-policy distillation runs in one process only, not under torchrun "
                                "(decoding from an FSDP2-sharded student would all-gather every layer per token); "
                                "set it to 0 or drop torchrun")
    if world > 1 and config.teachers:
        raise MinicompressError("teachers: several teachers run in one process only, not under torchrun; give one "
                                "teacher or drop torchrun")
    folder = open_working_folder("recover", config,
                                 interrupted=lambda work: latest_checkpoint(work) or _blockwise_progress(work))
    work, checkpoint = folder.work, folder.checkpoint
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
    teacher, t_device, teacher_weights = _place_teacher(config, teacher, student, device, teacher_dtype, cache,
                                                        tokenizer)
    teachers = _place_teachers(config, teacher, cache, student, tokenizer, device=device, teacher_dtype=teacher_dtype)
    data = _training_data(config, teachers.rows_cache if teachers is not None else cache, student, tokenizer)
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
    make_working_folder(work, keep=(checkpoint or (_blockwise_progress(work) if config.resume else None)) is not None)
    # only now: a refused run (bad model, data, schedule) leaves nothing
    blockwise_record = None
    if bmap is not None:  # Puzzle's blockwise local distillation first (its own checkpoints, skipped once done)
        blockwise_record = _blockwise_stage(config, student, teacher, data, work, bmap,
                                            runtime=StepRuntime(device, autocast), global_schedule=schedule,
                                            global_checkpoint=checkpoint, callback=callback)
    result = distill_with_checkpoints(student, teachers if teachers is not None else teacher, data, config, schedule,
                                      folder=folder, cache=cache if teachers is None else None,
                                      callback=callback, prompts=prompts,
                                      runtime=StepRuntime(device, autocast, bool(precision["compile"])))
    if result["attention"]:
        precision["attention"] = result["attention"]
    if blockwise_record is not None:  # the blockwise stage ends where the global one began
        blockwise_record["metrics_after"] = result["before"]
        result["blockwise"] = blockwise_record
    if teachers is not None:
        result["teachers"] = _teachers_record(config, teachers)
    return _write_student(config, folder, student, tokenizer, cache=cache, data=data, schedule=schedule,
                          result=result, precision=precision)


def _write_student(config: RecoverConfig, folder: WorkingFolder, student, tokenizer, *, cache: TeacherCache | None,
                   data: TrainingData, schedule: Schedule, result: dict, precision: dict) -> dict:
    """Write the recovered student atomically (rank 0) with its recovery record; returns the report.

    Args:
        config: the recovery settings.
        folder: the output folder and its working folder ``<output>.partial`` (the metrics).
        student: the trained student.
        tokenizer: saved next to it.
        cache: the teacher cache trained from, or None.
        data: the held-out and training rows (their counts and sources go into the record).
        schedule: the global stage's step arithmetic.
        result: what :func:`~minicompress.training.distill_with_checkpoints` returned (``before``,
            ``elapsed``, ``gen_seconds``, ``resumed_from_step``), with ``blockwise``: the blockwise stage's record
            (``recovery.blockwise``) when there was one; ``before`` is then the student as it came in and the seconds
            and tokens cover both stages; ``teachers``: the teachers' record of a multi-teacher run
            (``recovery.teachers``, ``recovery.source_teachers``).
        precision: the precision record.
    """
    world = distributed.world_size()
    out = folder.output
    blockwise = result.get("blockwise")
    before, elapsed = result["before"], result["elapsed"]
    if blockwise is not None:
        before, elapsed = blockwise["metrics_before"], elapsed + blockwise["seconds"]
    n_eval, n_train = data.eval_ids.shape[0], data.num_train
    steps = schedule.total_steps + (blockwise or {}).get("steps", 0)
    sources = data.tokens_per_source(steps * schedule.accum_steps * config.micro_batch_size * world,
                                     config.data.seq_len)
    records = finish_metrics(folder)
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
        **result.get("teachers", {}),
        **({"on_policy": _on_policy_record(config, schedule, result["gen_seconds"])} if config.on_policy else {}),
    )
    source = _student_folder(student)
    previous = read_provenance(source) if source is not None else None
    record_out = dict(previous) if previous else provenance("recover", config)
    if previous and "recovery" in previous:
        record_out["recovery_history"] = previous.get("recovery_history", []) + [previous["recovery"]]
    record_out["recovery"] = recovery
    full_state = distributed.full_state_dict(student) if world > 1 else None  # collective; rank 0 holds it
    write_model_folder(folder, student, tokenizer, record_out, overwrite=config.overwrite, full_state=full_state,
                       files=TRAINING_FILES + ((BLOCKWISE_METRICS,) if blockwise else ()))
    return {"output": str(out), "steps": schedule.total_steps, "tokens": tokens, "before": before, "after": after,
            "final_loss": final_loss, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
            "resumed_from_step": result["resumed_from_step"], "metrics": records,
            **({"blockwise": blockwise} if blockwise else {}),
            **({"generation_seconds": result["gen_seconds"]} if config.on_policy else {})}
