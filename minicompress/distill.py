"""Recovery of a pruned causal LM by knowledge distillation from its frozen teacher.

Minitron (Muralidharan et al., arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796)
retrains a pruned student on a small token budget with the forward KL divergence between
the teacher's and the student's next-token distributions (optionally plus cross-entropy on
the labels and the intermediate-state cosine loss). This module is that retraining as one
explicit loop that reads top to bottom, in the spirit of nanoGPT's ``train.py``:

* data: :func:`minicompress.data.load_sequences` packs and shuffles the text (seeded by
  ``data.seed``); the first ``ceil(eval_tokens / seq_len)`` sequences are held out for
  evaluation and never trained on; training reads the rest in that order during the first
  epoch and in a seeded permutation during later epochs (:func:`batch_indices`, a pure
  function of the step, so resuming and sharding over ranks need no data state).
* step: AdamW (weight decay only on matrices), linear warmup then cosine decay
  (:func:`lr_at`), gradient accumulation of micro batches to ``global_batch_tokens``,
  gradient clipping, optional bf16 autocast.
* loss (:func:`micro_batch_loss`): the student's and the teacher's final post-norm hidden
  states go into :func:`minicompress.losses.chunked_distill_loss`, which never builds
  the ``[N, V]`` logits; each micro batch is weighted by its share of the step's target
  tokens, so accumulation equals one big batch.
* evaluation on the held-out sequences (perplexity, KL to the teacher) before training,
  every ``eval_every`` steps and at the end; ``metrics.jsonl`` and ``curves.png``.
* checkpoints in the working folder ``<output>.partial`` (``resume=True`` continues
  bit-exactly); the final student is written atomically to ``output`` as a stock Hugging
  Face folder whose ``minicompress.json`` gains a ``recovery`` record.

:func:`minicompress.teacher_cache.write_teacher_cache` stores the teacher's top-k logits of the same sequences offline
(safetensors shards holding ``input_ids`` too), and ``recover(teacher_cache=...)`` trains
from them with the top-k forward KL without loading the teacher.

Under torchrun (:mod:`minicompress.distributed`) the same loop runs on every rank with
FSDP2-sharded student and teacher: rank ``r`` reads the micro batches
``batch_indices(..., rank=r, world_size=W)`` (``global_batch_tokens / (micro_batch_size *
seq_len * W)`` per step), each rank's loss is divided by the target count of the whole
global batch (an all-reduce) and FSDP sums the gradients over ranks, so a step equals the
single-process step on the same global batch. Metrics are reduced over ranks; rank 0
alone writes ``metrics.jsonl``, logs and the final folder; checkpoints are
``torch.distributed.checkpoint`` folders that resume on any number of ranks, including
one process (https://pytorch.org/docs/stable/distributed.checkpoint.html). One process
(no ``WORLD_SIZE``) runs exactly as without torchrun.
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

from . import arch, distributed, losses
from .config import LossConfig, RecoverConfig, to_dict
from .data import load_sequences
from .errors import MinicompressError
from .hardware import describe_precision, resolve_autocast, resolve_compile
from .evaluate import autocast_context, evaluate_perplexity, final_hidden, model_device
from .checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint, working_folder
from .measure import synchronize
from .metrics import CURVES_FILE, METRICS_FILE, append_metrics, plot_curves, read_metrics
from .models import TORCH_DTYPES, load_model, load_model_on_rank0, resolve_device
from .outputs import atomic_folder, check_output, provenance, read_provenance, write_model_card, write_provenance
from .progress import progress_bar
from .teacher_cache import TeacherCache

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


# ----------------------------------------------------------------------------------------
# Schedule and data order (pure functions of the step)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``; afterwards
    ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)``, so the first step after
    warmup runs at ``lr`` and the last one just above ``min_lr``.

    Args:
        step: 0-based optimizer step.
        lr: peak learning rate.
        min_lr: learning rate the cosine decays to.
        warmup_steps: steps of linear warmup.
        total_steps: optimizer steps of the whole run.

    Returns:
        The learning rate.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def default_warmup_steps(total_steps: int) -> int:
    """Warmup when ``warmup_steps`` is not set: a tenth of the run, between 1 and 10 steps
    (10 steps of a 16-step, 131k-token recovery would spend most of it warming up)."""
    return min(10, max(1, total_steps // 10))


def batch_indices(num_sequences: int, step: int, micro_step: int, *, micro_batch_size: int,
                  accum_steps: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Training-sequence indices of one micro batch, a pure function of its position.

    The stream of sequences is epoch 0 in order (``load_sequences`` already shuffled them
    with ``data.seed``, and this keeps a teacher cache of the first tokens aligned with
    the sequences trained on), then a fresh seeded permutation per later epoch. Micro
    batch ``(step, micro_step)`` of ``rank`` takes the ``micro_batch_size`` consecutive
    stream positions starting at ``((step * accum_steps + micro_step) * world_size + rank)
    * micro_batch_size``.

    Args:
        num_sequences: training sequences ``N``.
        step: 0-based optimizer step.
        micro_step: 0-based micro batch within the step (``< accum_steps``).
        micro_batch_size: sequences per micro batch.
        accum_steps: micro batches per optimizer step per rank.
        seed: seed of the permutations of epochs >= 1.
        rank: this process's rank.
        world_size: number of ranks.

    Returns:
        ``[micro_batch_size]`` int64 indices in ``[0, N)``.
    """
    micro = (step * accum_steps + micro_step) * world_size + rank
    positions = torch.arange(micro * micro_batch_size, (micro + 1) * micro_batch_size)
    epochs, within = positions // num_sequences, positions % num_sequences
    out = within.clone()
    for epoch in epochs.unique().tolist():
        if epoch == 0:
            continue
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
        perm = torch.randperm(num_sequences, generator=gen)
        sel = epochs == epoch
        out[sel] = perm[within[sel]]
    return out


def shift_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels ``[B, L]``: ``input_ids`` shifted left, the last position ignored."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def count_targets(input_ids: torch.Tensor) -> int:
    """Number of scored next-token targets in a ``[B, L]`` batch (``B * (L - 1)``)."""
    return int((shift_labels(input_ids) != IGNORE_INDEX).sum())


def num_held_out(num_sequences: int, eval_tokens: int, seq_len: int) -> int:
    """Held-out sequences at the front: ``ceil(eval_tokens / seq_len)``.

    Raises:
        MinicompressError: nothing would be left to train on.
    """
    n_eval = math.ceil(eval_tokens / seq_len) if eval_tokens else 0
    if n_eval >= num_sequences:
        raise MinicompressError(
            f"eval_tokens: holding out {n_eval} of {num_sequences} sequences leaves none to train on; "
            "lower eval_tokens or add data"
        )
    return n_eval


# ----------------------------------------------------------------------------------------
# The loss of one micro batch


def micro_batch_loss(student: torch.nn.Module, input_ids: torch.Tensor, *, loss: LossConfig,
                     teacher: torch.nn.Module | None = None,
                     teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                     intermediate: losses.IntermediateStateLoss | None = None,
                     normalizer: int | None = None, autocast: str = "none") -> tuple[torch.Tensor, dict]:
    """Distillation loss of one micro batch, scaled for accumulation.

    The student's final post-norm hidden states ``student.model(input_ids)`` and the
    teacher's (under ``no_grad``) feed :func:`losses.chunked_distill_loss`, which returns
    the mean over this batch's ``n`` targets. Multiplying by ``n / normalizer`` (the
    targets of the whole optimizer step, over all micro batches and ranks) makes the
    summed gradients of the micro batches equal to those of one big batch. The optional
    Minitron intermediate-state term is added as ``w * (L_logits / L_is) * L_is`` with the
    ratio detached and computed per micro batch.

    Args:
        student: the student ``*ForCausalLM`` (train mode).
        input_ids: ``[B, L]`` int64 on the student's device.
        loss: loss weights and kind.
        teacher: the frozen teacher (None for CE-only or with ``teacher_topk``).
        teacher_topk: cached sparse teacher targets ``(values [B, L, k], indices [B, L, k])``
            (top-k logits), or ``(values, indices, kind)`` from
            :meth:`~minicompress.teacher_cache.TeacherCache.targets` with ``kind``
            ``topk_kl`` or ``sampled_kl`` (values: the sampled tokens' teacher log-probs).
        intermediate: the intermediate-state loss module (needs ``teacher``).
        normalizer: scored targets of the whole step (None: this batch's own).
        autocast: ``none`` or ``bfloat16``.

    Under torchrun the whole computation runs as a forward of the student's FSDP root
    (:func:`distributed.run_in_root`), so ``lm_head_weight(student)`` is the gathered
    weight and its gradient is reduce-scattered like any other; the teacher's forward runs
    in its own root and its gathered ``lm_head`` stays valid until the loss is computed.

    Returns:
        ``(scaled_loss, stats)``; ``stats`` holds the unscaled float ``loss``, ``kl``,
        ``ce`` (and ``is``) of this micro batch and its ``targets`` count.

    Raises:
        MinicompressError: a KL or intermediate-state weight without a teacher.
    """
    return distributed.run_in_root(student, lambda: _micro_batch_loss(
        student, input_ids, loss=loss, teacher=teacher, teacher_topk=teacher_topk, intermediate=intermediate,
        normalizer=normalizer, autocast=autocast))


def _micro_batch_loss(student: torch.nn.Module, input_ids: torch.Tensor, *, loss: LossConfig,
                      teacher: torch.nn.Module | None, teacher_topk: tuple[torch.Tensor, torch.Tensor] | None,
                      intermediate: losses.IntermediateStateLoss | None, normalizer: int | None,
                      autocast: str) -> tuple[torch.Tensor, dict]:
    """The body of :func:`micro_batch_loss` (inside the student's FSDP root forward)."""
    if loss.kl_weight > 0 and teacher is None and teacher_topk is None:
        raise MinicompressError("teacher: loss.kl_weight > 0 needs a teacher or cached top-k logits")
    if intermediate is not None and teacher is None:
        raise MinicompressError("teacher: loss.intermediate_weight > 0 needs a live teacher")
    device = input_ids.device
    labels = shift_labels(input_ids)
    targets = int((labels != IGNORE_INDEX).sum())
    want_states = intermediate is not None
    use_teacher = teacher is not None and teacher_topk is None and (loss.kl_weight > 0 or want_states)
    with autocast_context(device, autocast):
        out = student.model(input_ids=input_ids, use_cache=False, output_hidden_states=want_states)
    t_hidden = t_weight = t_out = None
    if use_teacher:
        t_device = model_device(teacher)
        with torch.no_grad(), autocast_context(t_device, autocast):
            t_out = distributed.run_in_root(teacher, lambda: teacher.model(
                input_ids=input_ids.to(t_device), use_cache=False, output_hidden_states=want_states))
        t_hidden = t_out.last_hidden_state.to(device)
        t_weight = distributed.full_tensor(arch.lm_head_weight(teacher)).detach().to(device)
    kind, sparse = loss.kind, None
    if teacher_topk is not None:
        kind = teacher_topk[2] if len(teacher_topk) == 3 else "topk_kl"
        sparse = (teacher_topk[0].to(device), teacher_topk[1].to(device))
    logit_loss, parts = losses.chunked_distill_loss(
        out.last_hidden_state, arch.lm_head_weight(student), t_hidden, t_weight,
        labels=labels,
        teacher_topk=sparse if kind == "topk_kl" else None,
        teacher_samples=sparse if kind == "sampled_kl" else None,
        kl_weight=loss.kl_weight,
        ce_weight=loss.ce_weight, kind=kind, temperature=loss.temperature, beta=loss.beta,
        chunk_size=loss.chunk_size, student_softcap=arch.logit_softcap(student),
        teacher_softcap=arch.logit_softcap(teacher) if use_teacher else None,
        matmul_dtype=torch.bfloat16 if resolve_autocast(autocast, device) == "bfloat16" else torch.float32,
        return_components=True,
    )
    stats = {"kl": float(parts["kl"]), "ce": float(parts["ce"])}
    total = logit_loss
    if want_states:
        t_states = [h.to(device) for h in t_out.hidden_states]
        l_is = intermediate(out.hidden_states, t_states)
        total = logit_loss + loss.intermediate_weight * (losses.dynamic_weight(logit_loss.detach(), l_is)
                                                         - logit_loss.detach())
        stats["is"] = float(l_is.detach())
    stats["loss"] = float(total.detach())
    stats["targets"] = targets
    scale = targets / normalizer if normalizer else 1.0
    return total * scale, stats


# ----------------------------------------------------------------------------------------
# Evaluation on the held-out sequences


def evaluate_held_out(student: torch.nn.Module, eval_ids: torch.Tensor | None, *,
                      teacher: torch.nn.Module | None = None, cache: TeacherCache | None = None,
                      cache_rows: torch.Tensor | None = None, batch_size: int = 4, autocast: str = "none",
                      chunk_size: int = 0) -> dict:
    """Perplexity (and KL to the teacher) of the student on held-out sequences.

    Args:
        student: the student (its train/eval mode is restored afterwards).
        eval_ids: ``[E, L]`` held-out sequences (None or empty: no evaluation).
        teacher: the teacher for ``kl_to_teacher`` and ``top1_agreement``.
        cache: a teacher cache for ``topk_kl_to_teacher`` when there is no teacher.
        cache_rows: ``[E]`` cache rows of ``eval_ids``.
        batch_size: sequences per forward.
        autocast: ``none`` or ``bfloat16``.
        chunk_size: tokens per vocabulary chunk of the cached KL.

    Returns:
        ``{"perplexity", "nll", ...}`` from :func:`evaluate.evaluate_perplexity` (without
        its timing keys) plus ``topk_kl_to_teacher`` with a cache; ``{}`` without data.
    """
    if eval_ids is None or eval_ids.shape[0] == 0:
        return {}
    was_training = student.training
    student.eval()
    try:
        windows = [(seq, seq.numel() - 1) for seq in eval_ids]
        result = evaluate_perplexity(student, windows, teacher=teacher, batch_size=batch_size, autocast=autocast)
        metrics = {k: v for k, v in result.items() if k not in ("tokens_per_s", "windows")}
        if cache is not None and teacher is None:
            device = model_device(student)
            kl_sum, count = 0.0, 0
            with torch.no_grad():
                for rows in cache_rows.split(batch_size):
                    ids = cache.input_ids[rows].to(device)
                    with autocast_context(device, autocast):
                        hidden = final_hidden(student, ids)
                    values, indices, kind = cache.targets(rows)
                    _, parts = losses.chunked_distill_loss(
                        hidden, arch.lm_head_weight(student), labels=shift_labels(ids),
                        teacher_topk=(values.to(device), indices.to(device)) if kind == "topk_kl" else None,
                        teacher_samples=(values.to(device), indices.to(device)) if kind == "sampled_kl" else None,
                        kl_weight=1.0, ce_weight=0.0, kind=kind, chunk_size=chunk_size, student_softcap=arch.logit_softcap(student),
                        return_components=True)
                    n = count_targets(ids)
                    kl_sum += float(parts["kl"]) * n
                    count += n
            metrics[f"{cache.kind}_kl_to_teacher"] = kl_sum / count  # topk_ or sampled_kl_to_teacher
    finally:
        student.train(was_training)
    return metrics


def evaluate_on_ranks(student: torch.nn.Module, eval_ids: torch.Tensor | None, *,
                      teacher: torch.nn.Module | None = None, cache: TeacherCache | None = None,
                      cache_rows: torch.Tensor | None = None, batch_size: int = 4, autocast: str = "none",
                      chunk_size: int = 0) -> dict:
    """:func:`evaluate_held_out` shared by the ranks (the same call for one process).

    Rank ``r`` of ``W`` scores held-out rows ``r, r + W, ...`` in batches of
    ``batch_size``, inside the FSDP roots of the student and the teacher. Every rank runs
    the same number of forwards (each all-gathers the layers); a rank that is out of rows
    scores row 0 again with weight 0. Per-token means (``nll``, ``kl_to_teacher`` ...)
    are summed as ``mean * tokens`` over batches and ranks and divided by the total
    token count, so the result equals one process's up to float rounding.

    Args:
        student, eval_ids, teacher, cache, cache_rows, batch_size, autocast, chunk_size:
            as for :func:`evaluate_held_out` (``eval_ids`` ``[E, L]``, the same on every rank).

    Returns:
        The metrics of :func:`evaluate_held_out` over all ``E`` rows.
    """
    kwargs = dict(teacher=teacher, cache=cache, batch_size=batch_size, autocast=autocast, chunk_size=chunk_size)
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1 or eval_ids is None or eval_ids.shape[0] == 0:
        return evaluate_held_out(student, eval_ids, cache_rows=cache_rows, **kwargs)
    mine = torch.arange(rank, eval_ids.shape[0], world)
    steps = math.ceil(math.ceil(eval_ids.shape[0] / world) / batch_size)
    sums: dict[str, float] = {}
    tokens, metrics = 0.0, {}
    for i in range(steps):
        rows = mine[i * batch_size:(i + 1) * batch_size]
        weight = 1.0 if rows.numel() else 0.0
        rows = rows if rows.numel() else torch.zeros(1, dtype=torch.long)
        metrics = distributed.run_in_root(student, lambda: distributed.run_in_root(teacher, lambda: evaluate_held_out(
            student, eval_ids[rows], cache_rows=None if cache_rows is None else cache_rows[rows], **kwargs),
            reshard=True), reshard=True)
        n = metrics["tokens"] * weight
        for key, value in metrics.items():
            if key not in ("tokens", "perplexity", "teacher_perplexity"):
                sums[key] = sums.get(key, 0.0) + value * n
        tokens += n
    keys = sorted(sums)
    total = distributed.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [tokens], dtype=torch.float64))
    count = float(total[-1])
    means = {k: float(v) / count for k, v in zip(keys, total[:-1])}
    out = {}
    for key in metrics:  # the single-process key order
        if key == "tokens":
            out[key] = int(round(count))
        elif key.endswith("perplexity"):
            out[key] = math.exp(means[key.replace("perplexity", "nll")])
        else:
            out[key] = means[key]
    return out


# ----------------------------------------------------------------------------------------
# Recovery


def _make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    for flag in ("fused", "foreach"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, **{flag: True})
        except (RuntimeError, TypeError, ValueError):
            continue
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def compile_layers_(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``torch.compile`` every decoder layer of ``model`` in place (``nn.Module.compile``).

    Layers of one shape share a graph, so compiling costs one graph per distinct layer
    shape and grad mode, not per layer; parameter names and ``state_dict`` are unchanged.
    Inductor fuses each layer's elementwise work (RMSNorm, RoPE, SiLU gate, the casts of
    autocast) into a few kernels: on CPU this work took half of a bf16 step (profiled in
    ``benchmarks/RESULTS.md``).

    Returns:
        The compiled layers (set ``layer._compiled_call_impl = None`` to undo).
    """
    layers = list(arch.decoder_layers(model))
    for layer in layers:
        layer.compile()
    return layers


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
    optimizer = _make_optimizer(params, config.lr, config.weight_decay)

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
