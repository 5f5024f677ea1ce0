"""One in-memory distillation: a student, its frozen teacher, rows and a schedule in; the
held-out metrics before and after out.

Minitron (Muralidharan et al., arXiv 2407.14679, sec. 4) distils the best candidate
architectures briefly to rank them and then distils the chosen one for the full budget.
Both are this one call: :func:`distill` prepares the student for training (activation
checkpointing, ``torch.compile`` of the decoder layers, the CPU attention backward, the
intermediate-state loss, AdamW), evaluates, runs :func:`~minicompress.distillation.loop.train`
and evaluates again. It never touches disk or ranks: the ``recover`` recipe places the
models (FSDP2 under torchrun) and passes ``restore`` (its checkpoint) and ``on_step``
(metrics, checkpoints, progress); the architecture search of ``prune`` passes neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import arch, distributed
from ..config import RecoverConfig
from ..data.mixture import source_epoch_index
from ..data.rows import TrainingData
from ..errors import MinicompressError
from . import attention, losses
from .onpolicy import OnPolicy, Prompts, on_policy_batches
from .loop import (Batches, MixtureBatch, Schedule, StepRuntime, Teacher, Teachers, batch_positions, compile_layers_,
                   default_warmup_steps, evaluate_on_ranks, make_optimizer, train)
from .teacher_cache import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class DistillState:
    """What a run's hooks read and restore.

    Attributes:
        optimizer: AdamW over the student's (and the intermediate-state loss's) parameters.
        intermediate: Minitron's intermediate-state loss module, or None.
        start_step: the first optimizer step to run (a restored checkpoint's step).
        elapsed: training seconds so far (restored runs continue the count).
        gen_elapsed: of those, seconds making the steps' micro batches (the student's own
            continuations with ``on_policy``).
        before: held-out metrics before training (restored from a checkpoint, or measured).
        after: held-out metrics of the last evaluation.
    """

    optimizer: torch.optim.Optimizer
    intermediate: losses.IntermediateStateLoss | None = None
    start_step: int = 0
    elapsed: float = 0.0
    gen_elapsed: float = 0.0
    before: dict | None = None
    after: dict = field(default_factory=dict)


def make_schedule(config: RecoverConfig, world: int, num_train: int) -> Schedule:
    """The run's :class:`~minicompress.distillation.loop.Schedule`, micro batches per step and rank included.

    Args:
        config: the recovery settings (``tokens``, ``global_batch_tokens``, ``lr`` ...).
        world: processes sharing each step.
        num_train: training rows (to warn when they are read more than once).

    Raises:
        MinicompressError: ``global_batch_tokens`` is not a multiple of one micro batch on every
            rank.
    """
    seq_len = config.data.seq_len
    tokens_per_micro = config.micro_batch_size * seq_len * world  # one micro batch on every rank
    if config.global_batch_tokens % tokens_per_micro:
        raise MinicompressError(
            f"global_batch_tokens: {config.global_batch_tokens} is not a multiple of micro_batch_size * "
            f"data.seq_len * world_size ({config.micro_batch_size} * {seq_len} * {world} = {tokens_per_micro})")
    total_steps = config.tokens // config.global_batch_tokens
    trained = total_steps * config.global_batch_tokens
    if trained != config.tokens:
        log.info("recover: training %s tokens (%d steps of %s), not the %s asked: tokens are whole optimizer "
                 "steps of global_batch_tokens", f"{trained:,}", total_steps, f"{config.global_batch_tokens:,}",
                 f"{config.tokens:,}")
    warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup_steps(total_steps)
    accum_steps = config.global_batch_tokens // tokens_per_micro
    epochs = total_steps * accum_steps * config.micro_batch_size * world / num_train
    if epochs > 1:
        log.warning("recover: %d training sequences are read %.1f times (tokens=%d)", num_train, epochs, config.tokens)
    return Schedule(lr=config.lr, min_lr=config.min_lr, warmup_steps=warmup, total_steps=total_steps,
                    tokens_per_step=config.global_batch_tokens, grad_clip=config.grad_clip, accum_steps=accum_steps)


def prepare_training_(student: torch.nn.Module, teacher: Teacher, config: RecoverConfig, *,
                      runtime: StepRuntime) -> tuple[list, Any, torch.optim.Optimizer, str | None]:
    """Ready a placed student for training, in place.

    Activation checkpointing (one process; FSDP2 applies its own), ``torch.compile`` of the
    decoder layers of both models, and with it on CPU in bf16 the student's attention
    backward as compiled bf16 GEMMs (:mod:`minicompress.distillation.attention`; measured faster
    only there), the intermediate-state loss and the optimizer.

    Args:
        student: the placed student (train mode).
        teacher: the frozen teacher, or None, or several (:class:`~minicompress.distillation.loop.Teachers`).
        config: the recovery settings (``activation_checkpointing``, ``loss``, ``lr`` ...).
        runtime: the device, autocast and whether to compile (:class:`~minicompress.distillation.loop.StepRuntime`).

    Returns:
        ``(compiled layers, intermediate loss or None, optimizer, attention name or None)``.
    """
    device, autocast = runtime.device, runtime.autocast
    if distributed.world_size() == 1 and config.activation_checkpointing:
        distributed.enable_activation_checkpointing(student)
    compiled, attention_name = [], None
    if runtime.compiled:
        live = teacher.live() if isinstance(teacher, Teachers) else [teacher] if teacher is not None else []
        compiled = compile_layers_(student) + [layer for model in live for layer in compile_layers_(model)]
        if device.type == "cpu" and autocast == "bfloat16" and attention.use_training_attention_(student):
            attention_name = attention.NAME
    intermediate = None
    if config.loss.intermediate_weight > 0:
        intermediate = losses.IntermediateStateLoss(
            student.config.hidden_size, teacher.config.hidden_size, losses.default_layer_map(
                student.config.num_hidden_layers, teacher.config.num_hidden_layers, offset=1)).to(device)
    params = [p for p in student.parameters() if p.requires_grad] + \
        (list(intermediate.parameters()) if intermediate is not None else [])
    return compiled, intermediate, make_optimizer(params, config.lr, config.weight_decay), attention_name


def micro_batches(data: TrainingData, cache: TeacherCache | None, *, micro_batch_size: int, accum_steps: int,
                  seed: int, teachers: Teachers | None = None) -> Batches:
    """This rank's micro batches of a step, a pure function of the step (see :data:`~minicompress.distillation.loop.Batches`).

    Rows come from ``data`` (one source or a mixture), or, with a teacher cache, the cache's
    own training rows (after its ``data.num_eval`` held-out rows) with their cached targets.
    With several ``teachers`` each micro batch brings a
    :class:`~minicompress.distillation.loop.MixtureBatch`: every cached teacher's targets of
    its rows (the rows of the first cache, when there is one) and the rows' teacher weights.
    """
    rank, world = distributed.rank(), distributed.world_size()
    if teachers is not None:
        cache = teachers.rows_cache

    def batches(step: int) -> list[tuple[torch.Tensor, Any]]:
        micro = [batch_positions(step, m, micro_batch_size=micro_batch_size, accum_steps=accum_steps,
                                 rank=rank, world_size=world) for m in range(accum_steps)]
        if cache is None and teachers is None:
            return [(data.rows(positions), None) for positions in micro]
        if cache is None:
            return [(data.rows(positions), MixtureBatch((None,) * len(teachers.models),
                                                        teachers.row_weights(data.row_sources(positions))))
                    for positions in micro]
        rows = [source_epoch_index(positions, data.num_train, seed) + data.eval_ids.shape[0] for positions in micro]
        if teachers is None:
            return [(cache.input_ids[r], cache.targets(r)) for r in rows]
        return [(cache.input_ids[r], MixtureBatch(tuple(None if c is None else c.targets(r) for c in teachers.caches)))
                for r in rows]

    return batches


def distill(student: torch.nn.Module, teacher: Teacher, data: TrainingData, config: RecoverConfig,
            schedule: Schedule, *, runtime: StepRuntime, cache: TeacherCache | None = None,
            restore: Callable[[DistillState], None] | None = None,
            on_step: Callable[[dict, DistillState], None] | None = None, prompts: Prompts | None = None) -> dict:
    """Distil ``student`` (placed, in train mode) from ``teacher`` (placed, frozen) in memory.

    Evaluates the held-out rows of ``data`` before training (unless ``restore`` set
    ``state.before``), every ``config.eval_every`` steps and at the end; the compiled layers
    and the attention hook are undone afterwards, also on error, so in-memory models go
    back as they came.

    Args:
        student: the student, on ``runtime.device`` (FSDP2-sharded under torchrun).
        teacher: the frozen teacher, or None (a teacher cache or CE only), or several
            (:class:`~minicompress.distillation.loop.Teachers`: their caches replace ``cache``).
        data: held-out and training rows.
        config: the recovery settings (loss, eval_every, micro_batch_size, seed ...).
        schedule: the step arithmetic, micro batches per step and rank included (:func:`make_schedule`).
        runtime: where inputs go, ``none`` or ``bfloat16`` autocast, and whether to compile the
            decoder layers and the loss kernel (:func:`~minicompress.hardware.resolve_compile`).
        cache: a teacher cache (its targets replace a live teacher).
        restore: called once the optimizer exists; loads a checkpoint into the state
            (``optimizer``, ``intermediate``) and sets ``start_step``, ``elapsed`` and ``before``.
        on_step: called with each step's record (``eval_*`` keys after an evaluation;
            ``elapsed_s``) and the state, after the step; on a fresh start first with the
            step-0 record of the evaluation before training.
        prompts: with ``config.on_policy``, prompts that replace the data rows' starts
            (:class:`~minicompress.distillation.onpolicy.Prompts`; None: the rows').

    With ``config.on_policy > 0`` a share of each step's rows is written by the student
    first (:func:`~minicompress.distillation.onpolicy.on_policy_batches`).

    Returns:
        ``{"before", "after", "elapsed", "gen_seconds", "start_step", "compiled", "attention"}``:
        the held-out metrics before training and at the last evaluation, training seconds
        (of them ``gen_seconds`` making the micro batches), the first step run, whether
        layers were compiled, and the attention kernel used (or None).
    """
    if config.on_policy and config.on_policy_prompts is not None and prompts is None:
        raise MinicompressError("on_policy_prompts: distill takes the prompts tokenised (prompts=, "
                                "onpolicy.tokenize_prompts); the recover recipe reads the file")
    compiled, intermediate, optimizer, attention_name = prepare_training_(student, teacher, config, runtime=runtime)
    state = DistillState(optimizer=optimizer, intermediate=intermediate)
    eval_ids = data.eval_ids
    n_eval = eval_ids.shape[0]

    def evaluate() -> dict:
        return evaluate_on_ranks(student, eval_ids, teacher=teacher, cache=cache, cache_rows=torch.arange(n_eval),
                                 batch_size=config.eval_batch_size, autocast=runtime.autocast,
                                 chunk_size=config.loss.chunk_size, sources=data.eval_sources)

    def step_done(record: dict) -> None:
        state.elapsed += record.pop("step_seconds")
        state.gen_elapsed += record["gen_seconds"]
        record["elapsed_s"] = state.elapsed
        done = record["step"]
        if done == schedule.total_steps or (config.eval_every and done % config.eval_every == 0):
            state.after = evaluate()
            record.update({f"eval_{k}": v for k, v in state.after.items()})
        if on_step is not None:
            on_step(record, state)

    try:
        if restore is not None:
            restore(state)
        if state.before is None:
            state.before = state.after = evaluate()
            if on_step is not None:
                on_step({"step": 0, "tokens": 0, **{f"eval_{k}": v for k, v in state.before.items()}}, state)
        batches = micro_batches(data, cache, micro_batch_size=config.micro_batch_size,
                                accum_steps=schedule.accum_steps, seed=config.seed,
                                teachers=teacher if isinstance(teacher, Teachers) else None)
        if config.on_policy > 0:  # the student writes a share of each step's rows, uncompiled
            own = {id(layer) for layer in arch.decoder_layers(student)}
            batches = on_policy_batches(batches, student, OnPolicy.from_config(config, prompts), runtime=runtime,
                                        compiled=[layer for layer in compiled if id(layer) in own])
        train(student, teacher, batches, optimizer, schedule, step_done, loss=config.loss, runtime=runtime,
              start_step=state.start_step, intermediate=intermediate)
    finally:
        for layer in compiled:  # the caller's in-memory models go back as they came
            layer._compiled_call_impl = None  # what nn.Module.compile set
        attention.restore_attention_(student)
    return {"before": state.before, "after": state.after, "elapsed": state.elapsed, "gen_seconds": state.gen_elapsed,
            "start_step": state.start_step, "compiled": bool(compiled), "attention": attention_name}
