"""``minicompress recover``: knowledge-distillation recovery of a pruned student.

Minitron (Muralidharan et al., arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796)
retrains a pruned student on a small token budget with the forward KL to its frozen
teacher. This recipe is the when-and-where of that retraining: it loads the student and
the teacher (rank 0 reads, FSDP2 shards under torchrun), reads the data, resumes from
``<output>.partial``, runs :func:`minicompress.train.train` and writes the stock Hugging
Face folder atomically. The how (losses, schedule, data order, the loop) lives in
:mod:`minicompress.train`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import arch, distributed, losses
from ..config import RecoverConfig, to_dict
from ..data import load_sequences
from ..errors import MinicompressError
from ..hardware import describe_precision, resolve_compile
from ..runtime import model_device
from ..checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint, working_folder
from ..measure import synchronize
from ..metrics import CURVES_FILE, METRICS_FILE, append_metrics, plot_curves, read_metrics
from ..models import TORCH_DTYPES, load_model, load_model_on_rank0, resolve_device
from ..outputs import atomic_folder, check_output, provenance, read_provenance, write_model_card, write_provenance
from ..progress import progress_bar
from ..teacher_cache import TeacherCache
from ..train import (batch_indices, compile_layers_, count_targets, default_warmup_steps, evaluate_on_ranks, lr_at,
                     make_optimizer, micro_batch_loss, num_held_out)

log = logging.getLogger(__name__)



def _student_folder(student: torch.nn.Module) -> Path | None:
    """The folder the student was loaded from (``config._name_or_path``), if it is one."""
    name = getattr(student.config, "_name_or_path", "") or ""
    path = Path(name).expanduser() if name else None
    return path if path is not None and path.is_dir() else None


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
    # ---- setup: output, models, data -------------------------------------------------
    world = distributed.init_from_env()  # 1 without torchrun: no process group, nothing changes
    rank, main = distributed.rank(), distributed.is_main()
    if world > 1 and config.loss.intermediate_weight > 0:
        raise MinicompressError("loss.intermediate_weight: the intermediate-state loss runs in one process only, "
                                "not under torchrun; set it to 0 or drop torchrun")
    out = check_output(config.output, config.overwrite)
    work = working_folder(out)
    checkpoint = latest_checkpoint(work) if work.exists() else None
    if checkpoint is not None and not config.resume:
        if not config.overwrite:
            raise MinicompressError(f"resume: {work} holds a checkpoint of an interrupted run; "
                                    "pass --resume to continue it or --overwrite to start over")
        checkpoint = None
    distributed.barrier()  # every rank has looked at the working folder before rank 0 changes it
    if main:
        if checkpoint is None:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    torch.manual_seed(config.seed)

    on_host, student_weights = False, None
    if student is None:
        on_host = world > 1  # torchrun: rank 0 reads the weights, shard_model hands each rank its shards
        if on_host:
            student, tokenizer, student_weights = load_model_on_rank0(config.student, for_training=True)
        else:
            student, tokenizer = load_model(config.student, for_training=True)
    elif tokenizer is None:
        raise MinicompressError("tokenizer: pass tokenizer= together with an in-memory student")
    student.train()
    device = resolve_device(config.student.device) if world > 1 and on_host else model_device(student)
    precision = describe_precision(config.autocast, device)
    autocast = precision["resolved"]
    teacher_dtype = config.teacher_dtype
    if teacher_dtype == "auto":  # an in-memory teacher keeps its dtype: the caller's model is not cast
        teacher_dtype = next((k for k, v in TORCH_DTYPES.items() if v == next(teacher.parameters()).dtype),
                             "float32") if teacher is not None else ("bfloat16" if autocast == "bfloat16" else "float32")
    precision["teacher_dtype"] = teacher_dtype
    log.info("recover: precision %s (%s)", "bf16 autocast" if autocast == "bfloat16" else "float32",
             precision["reason"])

    cache = TeacherCache(config.teacher_cache) if config.teacher_cache else None
    t_from_rank0, teacher_weights = False, None  # an in-memory teacher is whole on every rank
    if teacher is None and cache is None and config.teacher is not None:  # CE-only still evaluates KL
        t_config = dataclasses.replace(config.teacher, dtype=teacher_dtype,
                                       device=config.teacher_device or device.type)
        if world > 1:
            teacher, _, teacher_weights = load_model_on_rank0(t_config)
            t_from_rank0 = True
        else:
            teacher, _ = load_model(t_config)
    if teacher is not None:
        t_device = torch.device(config.teacher_device) if config.teacher_device else device
        t_dtype = TORCH_DTYPES[teacher_dtype]
        if world > 1:  # shard_model moves the shards to t_device
            if next(teacher.parameters()).dtype != t_dtype:
                teacher.to(dtype=t_dtype)
        elif model_device(teacher).type != t_device.type or next(teacher.parameters()).dtype != t_dtype:
            teacher.to(device=t_device, dtype=t_dtype)
        teacher.eval()
        teacher.requires_grad_(False)
        t_vocab = arch.lm_head_weight(teacher).shape[0]
        if t_vocab != arch.lm_head_weight(student).shape[0]:
            raise MinicompressError(f"teacher: vocabulary size {t_vocab} differs from the student's "
                                    f"{arch.lm_head_weight(student).shape[0]}")

    seq_len = config.data.seq_len
    if cache is not None:
        if cache.seq_len != seq_len:
            raise MinicompressError(f"data.seq_len: {seq_len} differs from the teacher cache's {cache.seq_len}")
        if cache.vocab_size != arch.lm_head_weight(student).shape[0]:
            raise MinicompressError(f"--teacher-cache: vocabulary size {cache.vocab_size} differs from the "
                                    f"student's {arch.lm_head_weight(student).shape[0]}")
        sequences = cache.input_ids
    else:
        sequences = load_sequences(config.data, tokenizer)
    n_eval = num_held_out(sequences.shape[0], config.eval_tokens, seq_len)
    eval_ids, train_ids = sequences[:n_eval], sequences[n_eval:]
    eval_rows = torch.arange(n_eval)
    n_train = train_ids.shape[0]

    tokens_per_micro = config.micro_batch_size * seq_len * world  # one micro batch on every rank
    if config.global_batch_tokens % tokens_per_micro:
        raise MinicompressError(
            f"global_batch_tokens: {config.global_batch_tokens} is not a multiple of micro_batch_size * "
            f"data.seq_len * world_size ({config.micro_batch_size} * {seq_len} * {world} = {tokens_per_micro})")
    accum_steps = config.global_batch_tokens // tokens_per_micro  # micro batches per step and rank
    total_steps = config.tokens // config.global_batch_tokens
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else default_warmup_steps(total_steps)
    epochs = total_steps * accum_steps * config.micro_batch_size * world / n_train
    if epochs > 1:
        log.warning("recover: %d training sequences are read %.1f times (tokens=%d)", n_train, epochs, config.tokens)

    if world > 1:  # FSDP2: parameters, gradients and optimizer state are sharded over the ranks
        distributed.shard_model(student, device=device, mixed_precision=autocast == "bfloat16",
                                reshard_after_forward=config.reshard_after_forward,
                                activation_checkpointing=config.activation_checkpointing, from_rank0=on_host,
                                weights=student_weights)
        del student_weights
        if teacher is not None:  # no backward would ever free gathered teacher layers: always reshard
            distributed.shard_model(teacher, device=t_device, mixed_precision=autocast == "bfloat16",
                                    from_rank0=t_from_rank0, weights=teacher_weights)
        del teacher_weights
    elif config.activation_checkpointing:
        distributed.enable_activation_checkpointing(student)
    precision["compile"], precision["compile_reason"] = resolve_compile(
        config.compile, device, tokens=config.tokens, world_size=world,
        activation_checkpointing=config.activation_checkpointing)
    compiled = []
    if precision["compile"]:
        log.info("recover: compiling the decoder layers (%s)", precision["compile_reason"])
        compiled = compile_layers_(student) + (compile_layers_(teacher) if teacher is not None else [])

    intermediate = None
    if config.loss.intermediate_weight > 0:
        s_layers, t_layers = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        intermediate = losses.IntermediateStateLoss(
            student.config.hidden_size, teacher.config.hidden_size,
            losses.default_layer_map(s_layers, t_layers, offset=1)).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    if intermediate is not None:
        params += list(intermediate.parameters())
    if not params:
        raise MinicompressError("student: has no trainable parameters (all requires_grad=False)")
    optimizer = make_optimizer(params, config.lr, config.weight_decay)

    # ---- resume or evaluate once before training -------------------------------------
    metrics_path = work / METRICS_FILE
    start_step, elapsed, resumed_from = 0, 0.0, None
    if checkpoint is not None:
        check_resumable(json.loads((checkpoint / "state.json").read_text())["config"], config)
        state = load_checkpoint(checkpoint, student=student, optimizer=optimizer, intermediate=intermediate)
        start_step, elapsed, before = state["step"], state["seconds"], state["before"]
        resumed_from = start_step
        if main:
            with metrics_path.open("r+") as f:  # drop records of steps after the checkpoint
                f.truncate(state["metrics_bytes"])
        log.info("recover: resuming from %s (step %d of %d)", checkpoint, start_step, total_steps)
    else:
        before = evaluate_on_ranks(student, eval_ids, teacher=teacher, cache=cache, cache_rows=eval_rows,
                                   batch_size=config.eval_batch_size, autocast=autocast,
                                   chunk_size=config.loss.chunk_size)
        if main:
            append_metrics(metrics_path, {"step": 0, "tokens": 0, **{f"eval_{k}": v for k, v in before.items()}})

    # ---- the training loop -----------------------------------------------------------
    with progress_bar("recover", total_steps * config.global_batch_tokens, unit="tok") as bar:
        bar.advance(start_step * config.global_batch_tokens)
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=warmup_steps,
                       total_steps=total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # the micro batches of this step and the number of targets they score
            micro = [batch_indices(n_train, step, m, micro_batch_size=config.micro_batch_size,
                                   accum_steps=accum_steps, seed=config.seed, rank=rank, world_size=world)
                     for m in range(accum_steps)]
            normalizer = sum(count_targets(train_ids[idx]) for idx in micro)
            if world > 1:  # the targets of the whole global batch, over all ranks
                normalizer = int(distributed.all_reduce_sum(torch.tensor(normalizer, dtype=torch.int64)))

            sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
            for idx in micro:
                input_ids = train_ids[idx].to(device)
                topk = cache.targets(idx + n_eval) if cache is not None else None
                loss, stats = micro_batch_loss(student, input_ids, loss=config.loss, teacher=teacher,
                                               teacher_topk=topk, intermediate=intermediate,
                                               normalizer=normalizer, autocast=autocast)
                loss.backward()
                share = stats["targets"] / normalizer
                for key in ("loss", "kl", "ce", "is"):
                    if key in stats:
                        sums[key] = sums.get(key, 0.0) + stats[key] * share
            if world > 1:  # each rank summed its share of the global batch
                reduced = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
                sums = dict(zip(sums, reduced.tolist()))

            max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")  # DTensor grads: a global norm
            grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            if not math.isfinite(grad_norm):
                raise MinicompressError(f"lr: the gradient norm is {grad_norm} at step {step + 1}; lower lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            seconds = time.perf_counter() - t0
            elapsed += seconds

            done = step + 1
            record = {"step": done, "tokens": done * config.global_batch_tokens, "lr": lr, **sums,
                      "grad_norm": grad_norm, "tokens_per_s": config.global_batch_tokens / seconds,
                      "elapsed_s": elapsed}
            if done == total_steps or (config.eval_every and done % config.eval_every == 0):
                metrics = evaluate_on_ranks(student, eval_ids, teacher=teacher, cache=cache, cache_rows=eval_rows,
                                            batch_size=config.eval_batch_size, autocast=autocast,
                                            chunk_size=config.loss.chunk_size)
                record.update({f"eval_{k}": v for k, v in metrics.items()})
            if main:
                append_metrics(metrics_path, record)
            bar.advance(config.global_batch_tokens)
            bar.update(description=f"recover loss {sums['loss']:.4f}")
            if done % config.log_every == 0 or done == total_steps:
                log.info("step %d/%d loss %.4f kl %.4f ce %.4f lr %.2e grad %.3f %.0f tok/s", done, total_steps,
                         sums["loss"], sums["kl"], sums["ce"], lr, grad_norm, record["tokens_per_s"])

            if done == total_steps or (config.save_every and done % config.save_every == 0):
                state = {
                    "step": done, "tokens": done * config.global_batch_tokens, "seconds": elapsed,
                    "data_position": done * accum_steps * config.micro_batch_size * world,
                    "scheduler": {"kind": "warmup_cosine", "lr": config.lr, "min_lr": config.min_lr,
                                  "warmup_steps": warmup_steps, "total_steps": total_steps},
                    "config": to_dict(config), "before": before,
                    "metrics_bytes": metrics_path.stat().st_size if main else None,
                }
                save_checkpoint(work, student=student, optimizer=optimizer, intermediate=intermediate, state=state,
                                keep=config.checkpoint_keep)
            if callback is not None:
                callback(record)

    for layer in compiled:  # the caller's in-memory models go back as they came
        layer._compiled_call_impl = None  # what nn.Module.compile set

    # ---- the final student, atomically (rank 0 writes) ---------------------------------
    records = distributed.broadcast_object(read_metrics(metrics_path) if main else None)
    if main:
        plot_curves(records, work / CURVES_FILE, title=f"recover {Path(out).name}")
    last = records[-1]
    after = {k[5:]: v for k, v in last.items() if k.startswith("eval_")}
    final_loss = last.get("loss")
    if cache is not None:
        teacher_source = cache.index.get("teacher")
    else:
        teacher_source = config.teacher.source if config.teacher else None
    recovery = provenance(
        "recover", config, teacher=teacher_source, teacher_cache=config.teacher_cache,
        tokens_trained=total_steps * config.global_batch_tokens, steps=total_steps, loss=to_dict(config.loss),
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
    return {
        "output": str(out),
        "steps": total_steps,
        "tokens": total_steps * config.global_batch_tokens,
        "before": before,
        "after": after,
        "final_loss": final_loss,
        "seconds": elapsed,
        "tokens_per_s": total_steps * config.global_batch_tokens / max(elapsed, 1e-9),
        "resumed_from_step": resumed_from,
        "metrics": records,
    }
