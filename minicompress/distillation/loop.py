"""Recovery of a pruned causal LM by knowledge distillation from its frozen teacher.

Minitron (Muralidharan et al., arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796)
retrains a pruned student on a small token budget with the forward KL divergence between
the teacher's and the student's next-token distributions (optionally plus cross-entropy on
the labels and the intermediate-state cosine loss). This module is that retraining as one
explicit loop that reads top to bottom, in the spirit of nanoGPT's ``train.py``:

* data: :func:`minicompress.data.rows.load_sequences` packs and shuffles the text (seeded by
  ``data.seed``); the first ``ceil(eval_tokens / seq_len)`` sequences are held out for
  evaluation and never trained on; training reads the rest in that order during the first
  epoch and in a seeded permutation during later epochs (:func:`batch_indices`, a pure
  function of the step, so resuming and sharding over ranks need no data state).
* step: AdamW (weight decay only on matrices), linear warmup then cosine decay
  (:func:`lr_at`), gradient accumulation of micro batches to ``global_batch_tokens``,
  gradient clipping, optional bf16 autocast.
* loss (:func:`micro_batch_loss`): the student's and the teacher's final post-norm hidden
  states go into :func:`minicompress.distillation.losses.chunked_distill_loss`, which never builds
  the ``[N, V]`` logits; each micro batch is weighted by its share of the step's target
  tokens, so accumulation equals one big batch.
* evaluation on the held-out sequences (perplexity, KL to the teacher) before training,
  every ``eval_every`` steps and at the end; ``metrics.jsonl`` and ``curves.png``.
* checkpoints in the working folder ``<output>.partial`` (``resume=True`` continues
  bit-exactly); the final student is written atomically to ``output`` as a stock Hugging
  Face folder whose ``minicompress.json`` gains a ``recovery`` record.

:func:`minicompress.recipes.teacher_cache.write_teacher_cache` stores the teacher's top-k logits of the same sequences offline
(safetensors shards holding ``input_ids`` too), and ``recover(teacher_cache=...)`` trains
from them with the top-k forward KL without loading the teacher.

Several teachers (:class:`Teachers`, one process) make the target the weighted mixture of
their distributions (multi-teacher distillation, You et al., KDD 2017):
:func:`mixture_targets` runs each live teacher on the rows that weigh it and hands
:meth:`~minicompress.distillation.losses.TeacherTargets.mixture` to the same fused loss; rows
of a data source with a teacher of its own weigh that teacher alone.

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

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from .. import arch, distributed
from . import losses
from ..config import LossConfig
from ..errors import MinicompressError
from ..hardware import resolve_autocast
from ..runtime import autocast_context, final_hidden, model_device
from ..evaluation.perplexity import evaluate_perplexity
from ..measure import synchronize
from ..data.mixture import source_epoch_index
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


def batch_positions(step: int, micro_step: int, *, micro_batch_size: int, accum_steps: int, rank: int = 0,
                    world_size: int = 1) -> torch.Tensor:
    """Stream positions ``[micro_batch_size]`` of one micro batch (see :func:`batch_indices`):
    ``((step * accum_steps + micro_step) * world_size + rank) * micro_batch_size`` onwards."""
    micro = (step * accum_steps + micro_step) * world_size + rank
    return torch.arange(micro * micro_batch_size, (micro + 1) * micro_batch_size)


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
    positions = batch_positions(step, micro_step, micro_batch_size=micro_batch_size, accum_steps=accum_steps,
                                rank=rank, world_size=world_size)
    return source_epoch_index(positions, num_sequences, seed)


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
# Several teachers


@dataclass(frozen=True, eq=False)
class Teachers:
    """The teachers of a multi-teacher distillation: the target is the mixture of their
    distributions (:meth:`~minicompress.distillation.losses.TeacherTargets.mixture`).

    Attributes:
        models: per teacher, the frozen live model, or None where its cache serves it. The
            first is the original teacher, the one ``kl_to_teacher`` measures against.
        caches: per teacher, its top-k :class:`TeacherCache`, or None for a live teacher.
        weights: per teacher, its weight in the mixture (normalised to sum 1).
        by_source: per data source, the index of the teacher its rows are distilled from
            alone, or None (the weighted mixture); empty: every row takes the mixture.
    """

    models: tuple
    caches: tuple
    weights: tuple[float, ...]
    by_source: tuple = ()

    @property
    def rows_cache(self) -> TeacherCache | None:
        """The first teacher cache (training and held-out rows are its rows), or None."""
        return next((c for c in self.caches if c is not None), None)

    def live(self) -> list[torch.nn.Module]:
        """The live teacher models."""
        return [m for m in self.models if m is not None]

    def row_weights(self, sources: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, T]`` teacher weights of rows from data sources ``sources`` ``[B]``: one-hot for a
        source with a teacher of its own, ``weights`` for the others; None when every row takes
        ``weights`` (no source has a teacher, or ``sources`` is None)."""
        if sources is None or all(t is None for t in self.by_source):
            return None
        table = torch.tensor(self.weights, dtype=torch.float32).repeat(len(self.by_source), 1)
        for s, t in enumerate(self.by_source):
            if t is not None:
                table[s] = 0.0
                table[s, t] = 1.0
        return table[sources]


@dataclass(frozen=True, eq=False)
class MixtureBatch:
    """The teachers' side of one batch of a :class:`Teachers` run.

    Attributes:
        cached: per teacher, its cached ``(values [B, L, k], indices [B, L, k], kind)``, or None
            for a live teacher.
        row_weights: ``[B, T]`` each row's teacher weights (:meth:`Teachers.row_weights`), or
            None: every row takes ``Teachers.weights``.
    """

    cached: tuple
    row_weights: torch.Tensor | None = None


def mixture_targets(teachers: Teachers, input_ids: torch.Tensor, batch: MixtureBatch, *, device: torch.device,
                    autocast: str = "none") -> losses.TeacherTargets:
    """The mixture target of one ``[B, L]`` batch for :func:`losses.chunked_distill_loss`.

    Each live teacher runs (under ``no_grad``) only on the rows that give it a weight (the
    others get zero hidden states and weight 0); a teacher no row weighs is left out.

    Args:
        teachers: the teachers.
        input_ids: ``[B, L]`` int64 rows.
        batch: the batch's cached targets and row weights.
        device: where the student's loss runs.
        autocast: ``none`` or ``bfloat16``.

    Returns:
        :meth:`losses.TeacherTargets.mixture` of the teachers used, with weights ``[T]`` or
        per token ``[B * L, T]``.
    """
    b, length = input_ids.shape
    weights = batch.row_weights if batch.row_weights is not None else \
        torch.tensor(teachers.weights, dtype=torch.float32).expand(b, -1)
    members, used = [], []
    for i, (model, cached) in enumerate(zip(teachers.models, batch.cached)):
        need = weights[:, i] > 0
        if not bool(need.any()):
            continue
        used.append(i)
        if model is None:
            values, indices, kind = cached
            members.append(losses.TeacherTargets.from_cache(values.to(device), indices.to(device), kind))
            continue
        rows = need.nonzero().squeeze(1)
        t_device = model_device(model)
        with torch.no_grad(), autocast_context(t_device, autocast):
            hidden = model.model(input_ids=input_ids[rows].to(t_device), use_cache=False).last_hidden_state.to(device)
        if rows.numel() < b:
            hidden = hidden.new_zeros(b, length, hidden.shape[-1]).index_copy_(0, rows.to(device), hidden)
        members.append(losses.TeacherTargets(hidden, arch.lm_head_weight(model).detach().to(device),
                                             softcap=arch.logit_softcap(model)))
    if batch.row_weights is None:
        return losses.TeacherTargets.mixture(members, torch.tensor([teachers.weights[i] for i in used]))
    per_token = weights[:, used].to(device).unsqueeze(1).expand(b, length, len(used))
    return losses.TeacherTargets.mixture(members, per_token)


# ----------------------------------------------------------------------------------------
# The loss of one micro batch


#: The teacher argument of the loop: one frozen model, several (:class:`Teachers`), or None.
Teacher = Union[torch.nn.Module, Teachers, None]


def micro_batch_loss(student: torch.nn.Module, input_ids: torch.Tensor, *, loss: LossConfig,
                     teacher: Teacher = None,
                     teacher_topk: tuple | MixtureBatch | None = None,
                     intermediate: losses.IntermediateStateLoss | None = None,
                     normalizer: int | None = None, autocast: str = "none",
                     compiled: bool = False, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Distillation loss of one micro batch, scaled for accumulation.

    The student's final post-norm hidden states ``student.model(input_ids)`` and the
    teacher's (under ``no_grad``) feed :func:`losses.chunked_distill_loss`, which returns
    the mean over this batch's ``n`` targets. Multiplying by ``n / normalizer`` (the
    targets of the whole optimizer step, over all micro batches and ranks) makes the
    summed gradients of the micro batches equal to those of one big batch (without an
    intermediate-state term the loss divides by ``normalizer`` itself, so its backward
    rescales nothing). The optional
    Minitron intermediate-state term is added as ``w * (L_logits / L_is) * L_is`` with the
    ratio detached and computed per micro batch.

    Args:
        student: the student ``*ForCausalLM`` (train mode).
        input_ids: ``[B, L]`` int64 on the student's device.
        loss: loss weights and kind.
        teacher: the frozen teacher (None for CE-only or with ``teacher_topk``), or several
            (:class:`Teachers`: the target is their mixture, :func:`mixture_targets`).
        teacher_topk: cached sparse teacher targets ``(values [B, L, k], indices [B, L, k])``
            (top-k logits), or ``(values, indices, kind)`` from
            :meth:`~minicompress.distillation.teacher_cache.TeacherCache.targets` with ``kind``
            ``topk_kl`` or ``sampled_kl`` (values: the sampled tokens' teacher log-probs); with
            :class:`Teachers`, the batch's :class:`MixtureBatch` (None: every teacher live,
            global weights).
        intermediate: the intermediate-state loss module (needs ``teacher``).
        normalizer: scored targets of the whole step (None: this batch's own).
        autocast: ``none`` or ``bfloat16``.
        compiled: the loss's compiled chunk kernel (``LossNumerics(compiled=True)`` of
            :func:`losses.chunked_distill_loss`; what ``recover`` passes when it compiles
            the decoder layers).
        labels: ``[B, L]`` next-token labels, ``IGNORE_INDEX`` where nothing is scored (None:
            :func:`shift_labels` of ``input_ids``, every position). On-policy rows ignore
            their prompt (:mod:`minicompress.distillation.onpolicy`).

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
        normalizer=normalizer, autocast=autocast, compiled=compiled, labels=labels))


def _micro_batch_loss(student: torch.nn.Module, input_ids: torch.Tensor, *, loss: LossConfig,
                      teacher: Teacher, teacher_topk: tuple | MixtureBatch | None,
                      intermediate: losses.IntermediateStateLoss | None, normalizer: int | None,
                      autocast: str, compiled: bool, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """The body of :func:`micro_batch_loss` (inside the student's FSDP root forward)."""
    mixture = teacher if isinstance(teacher, Teachers) else None
    if mixture is not None:
        if intermediate is not None:
            raise MinicompressError("loss.intermediate_weight: the intermediate-state loss follows one teacher")
        teacher, batch = None, teacher_topk if teacher_topk is not None else MixtureBatch((None,) * len(mixture.models))
        teacher_topk = None
    if loss.kl_weight > 0 and teacher is None and teacher_topk is None and mixture is None:
        raise MinicompressError("teacher: loss.kl_weight > 0 needs a teacher or cached top-k logits")
    if intermediate is not None and teacher is None:
        raise MinicompressError("teacher: loss.intermediate_weight > 0 needs a live teacher")
    device = input_ids.device
    labels = shift_labels(input_ids) if labels is None else labels.to(device)
    targets = int((labels != IGNORE_INDEX).sum())
    want_states = intermediate is not None
    use_teacher = teacher is not None and teacher_topk is None and (loss.kl_weight > 0 or want_states)
    with autocast_context(device, autocast):
        out = student.model(input_ids=input_ids, use_cache=False, output_hidden_states=want_states)
    t_out = t_targets = None
    if use_teacher:
        t_device = model_device(teacher)
        with torch.no_grad(), autocast_context(t_device, autocast):
            t_out = distributed.run_in_root(teacher, lambda: teacher.model(
                input_ids=input_ids.to(t_device), use_cache=False, output_hidden_states=want_states))
        t_targets = losses.TeacherTargets(
            t_out.last_hidden_state.to(device),
            distributed.full_tensor(arch.lm_head_weight(teacher)).detach().to(device),
            softcap=arch.logit_softcap(teacher))
    # the step's normalizer inside the loss: no [V, H] rescale in its backward (the IS term needs the mean)
    inside = normalizer if (normalizer and not want_states) else None
    kind = loss.kind
    if mixture is not None:  # a dense target whatever the members: topk_kl means forward_kl
        kind = "forward_kl" if kind in losses.SPARSE_KINDS else kind
        if loss.kl_weight > 0:
            t_targets = mixture_targets(mixture, input_ids, batch, device=device, autocast=autocast)
    elif teacher_topk is not None:
        kind = teacher_topk[2] if len(teacher_topk) == 3 else "topk_kl"
        t_targets = losses.TeacherTargets.from_cache(teacher_topk[0].to(device), teacher_topk[1].to(device), kind)
    logit_loss, parts = losses.chunked_distill_loss(
        out.last_hidden_state, arch.lm_head_weight(student), t_targets, labels=labels,
        loss=losses.LogitLoss.from_config(loss, kind=kind),
        numerics=losses.LossNumerics(
            chunk_size=loss.chunk_size, compiled=compiled,
            matmul_dtype=torch.bfloat16 if resolve_autocast(autocast, device) == "bfloat16" else torch.float32),
        student_softcap=arch.logit_softcap(student), normalizer=inside, return_components=True,
    )
    share = inside / targets if (inside and targets) else 1.0  # a share of the step's mean -> this batch's mean
    stats = {"kl": float(parts["kl"]) * share, "ce": float(parts["ce"]) * share}
    total = logit_loss
    if want_states:
        t_states = [h.to(device) for h in t_out.hidden_states]
        l_is = intermediate(out.hidden_states, t_states)
        total = logit_loss + loss.intermediate_weight * (losses.dynamic_weight(logit_loss.detach(), l_is)
                                                         - logit_loss.detach())
        stats["is"] = float(l_is.detach())
    stats["loss"] = float(total.detach()) * share  # share is 1 with an IS term
    stats["targets"] = targets
    scale = targets / normalizer if (normalizer and not inside) else 1.0
    return total * scale, stats


# ----------------------------------------------------------------------------------------
# Evaluation on the held-out sequences


def evaluate_held_out(student: torch.nn.Module, eval_ids: torch.Tensor | None, *,
                      teacher: Teacher = None, cache: TeacherCache | None = None,
                      cache_rows: torch.Tensor | None = None, batch_size: int = 4, autocast: str = "none",
                      chunk_size: int = 0, sources: torch.Tensor | None = None) -> dict:
    """Perplexity (and KL to the teacher) of the student on held-out sequences.

    Args:
        student: the student (its train/eval mode is restored afterwards).
        eval_ids: ``[E, L]`` held-out sequences (None or empty: no evaluation).
        teacher: the teacher for ``kl_to_teacher`` and ``top1_agreement``; with several
            (:class:`Teachers`) the first one (or its cache), plus ``kl_to_teachers``.
        cache: a teacher cache for ``topk_kl_to_teacher`` when there is no teacher.
        cache_rows: ``[E]`` cache rows of ``eval_ids``.
        batch_size: sequences per forward.
        autocast: ``none`` or ``bfloat16``.
        chunk_size: tokens per vocabulary chunk of the cached KL.
        sources: ``[E]`` data source of each row (per-source teachers of :class:`Teachers`).

    Returns:
        ``{"perplexity", "nll", ...}`` from :func:`evaluate.evaluate_perplexity` (without
        its timing keys) plus ``topk_kl_to_teacher`` with a cache and ``kl_to_teachers``
        (forward KL at temperature 1 to the teachers' mixture) with :class:`Teachers`;
        ``{}`` without data.
    """
    if eval_ids is None or eval_ids.shape[0] == 0:
        return {}
    mixture = teacher if isinstance(teacher, Teachers) else None
    if mixture is not None:  # kl_to_teacher keeps measuring the first teacher
        teacher, cache = mixture.models[0], mixture.caches[0]
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
                        hidden, arch.lm_head_weight(student),
                        losses.TeacherTargets.from_cache(values.to(device), indices.to(device), kind),
                        labels=shift_labels(ids), loss=losses.LogitLoss(kind=kind),
                        numerics=losses.LossNumerics(chunk_size=chunk_size),
                        student_softcap=arch.logit_softcap(student), return_components=True)
                    n = count_targets(ids)
                    kl_sum += float(parts["kl"]) * n
                    count += n
            metrics[f"{cache.kind}_kl_to_teacher"] = kl_sum / count  # topk_ or sampled_kl_to_teacher
        if mixture is not None:
            metrics["kl_to_teachers"] = _kl_to_mixture(student, eval_ids, mixture, cache_rows=cache_rows,
                                                       sources=sources, batch_size=batch_size, autocast=autocast,
                                                       chunk_size=chunk_size)
    finally:
        student.train(was_training)
    return metrics


def _kl_to_mixture(student: torch.nn.Module, eval_ids: torch.Tensor, teachers: Teachers, *,
                   cache_rows: torch.Tensor | None, sources: torch.Tensor | None, batch_size: int, autocast: str,
                   chunk_size: int) -> float:
    """Forward KL (temperature 1) of the student from the teachers' mixture, per held-out target."""
    device = model_device(student)
    kl_sum, count = 0.0, 0
    rows_all = torch.arange(eval_ids.shape[0])
    with torch.no_grad():
        for rows in rows_all.split(batch_size):
            ids = eval_ids[rows].to(device)
            with autocast_context(device, autocast):
                hidden = final_hidden(student, ids)
            cached = tuple(None if c is None else c.targets(cache_rows[rows]) for c in teachers.caches)
            batch = MixtureBatch(cached, teachers.row_weights(None if sources is None else sources[rows]))
            _, parts = losses.chunked_distill_loss(
                hidden, arch.lm_head_weight(student),
                mixture_targets(teachers, ids, batch, device=device, autocast=autocast),
                labels=shift_labels(ids), numerics=losses.LossNumerics(chunk_size=chunk_size),
                student_softcap=arch.logit_softcap(student), return_components=True)
            n = count_targets(ids)
            kl_sum += float(parts["kl"]) * n
            count += n
    return kl_sum / count


def evaluate_on_ranks(student: torch.nn.Module, eval_ids: torch.Tensor | None, *,
                      teacher: Teacher = None, cache: TeacherCache | None = None,
                      cache_rows: torch.Tensor | None = None, batch_size: int = 4, autocast: str = "none",
                      chunk_size: int = 0, sources: torch.Tensor | None = None) -> dict:
    """:func:`evaluate_held_out` shared by the ranks (the same call for one process).

    Rank ``r`` of ``W`` scores held-out rows ``r, r + W, ...`` in batches of
    ``batch_size``, inside the FSDP roots of the student and the teacher. Every rank runs
    the same number of forwards (each all-gathers the layers); a rank that is out of rows
    scores row 0 again with weight 0. Per-token means (``nll``, ``kl_to_teacher`` ...)
    are summed as ``mean * tokens`` over batches and ranks and divided by the total
    token count, so the result equals one process's up to float rounding.

    Args:
        student, eval_ids, teacher, cache, cache_rows, batch_size, autocast, chunk_size, sources:
            as for :func:`evaluate_held_out` (``eval_ids`` ``[E, L]``, the same on every rank;
            several :class:`Teachers` run in one process only).

    Returns:
        The metrics of :func:`evaluate_held_out` over all ``E`` rows.
    """
    kwargs = dict(teacher=teacher, cache=cache, batch_size=batch_size, autocast=autocast, chunk_size=chunk_size)
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1 or eval_ids is None or eval_ids.shape[0] == 0:
        return evaluate_held_out(student, eval_ids, cache_rows=cache_rows, sources=sources, **kwargs)
    if isinstance(teacher, Teachers):
        raise MinicompressError("teachers: several teachers run in one process only, not under torchrun")
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


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
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




# ----------------------------------------------------------------------------------------
# The training loop


@dataclass(frozen=True)
class Schedule:
    """The step arithmetic of a run: pure numbers, decided once by the recipe.

    Attributes:
        lr: peak learning rate.
        min_lr: learning rate the cosine decays to.
        warmup_steps: steps of linear warmup.
        total_steps: optimizer steps of the whole run.
        tokens_per_step: tokens of one optimizer step over all ranks (``global_batch_tokens``).
        grad_clip: global gradient-norm clip (0: none).
        accum_steps: micro batches per optimizer step and rank (gradient accumulation).
    """

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    tokens_per_step: int
    grad_clip: float = 1.0
    accum_steps: int = 1

    def lr_at(self, step: int) -> float:
        """:func:`lr_at` of this schedule."""
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps)


@dataclass(frozen=True)
class StepRuntime:
    """Where and how the steps run (not what they compute), shared by :func:`train` and
    :func:`~minicompress.distillation.distill.distill`.

    Attributes:
        device: where the student's inputs go.
        autocast: ``none`` or ``bfloat16`` (resolved: not ``auto``).
        compiled: ``torch.compile`` the decoder layers of both models
            (:func:`~minicompress.distillation.distill.distill`) and run the fused loss's
            compiled chunk kernel (see :func:`micro_batch_loss`); what
            :func:`~minicompress.hardware.resolve_compile` decided.
    """

    device: torch.device
    autocast: str = "none"
    compiled: bool = False


#: ``batches(step)`` -> this rank's micro batches of optimizer step ``step``: ``[(input_ids [B, L],
#: cached teacher targets, a MixtureBatch of several teachers, or None)]``, a pure function of
#: the step (resume needs no loader state);
#: a micro batch may carry ``labels [B, L]`` third (``IGNORE_INDEX`` where nothing is scored: the
#: prompts of on-policy rows, :func:`~minicompress.distillation.onpolicy.on_policy_batches`).
Batches = Callable[[int], list[tuple[torch.Tensor, Any] | tuple[torch.Tensor, Any, torch.Tensor]]]


def micro_labels(micro: tuple) -> torch.Tensor:
    """The ``[B, L]`` next-token labels of a micro batch of :data:`Batches` (its own, or every position)."""
    return micro[2] if len(micro) > 2 else shift_labels(micro[0])


def train(student: torch.nn.Module, teacher: Teacher, batches: Batches,
          optimizer: torch.optim.Optimizer, schedule: Schedule, on_step: Callable[[dict], None] | None = None, *,
          loss: LossConfig, runtime: StepRuntime, start_step: int = 0,
          intermediate: losses.IntermediateStateLoss | None = None) -> None:
    """Distil ``student`` from ``teacher`` for ``schedule.total_steps - start_step`` optimizer steps.

    Each step: set the learning rate, take the step's micro batches, weight each by its
    share of the step's targets (summed over ranks), accumulate gradients, clip the global
    norm, take an AdamW step. Nothing here loads, saves or evaluates: ``on_step`` gets
    each step's record (``step``, ``tokens``, ``lr``, ``loss``, ``kl``, ``ce``, ``grad_norm``,
    ``tokens_per_s``, ``gen_seconds``, ``train_seconds``, ``step_seconds``) and does that.
    ``gen_seconds`` is the time ``batches(step)`` took (the student's own continuations
    under on-policy distillation; reading rows otherwise), ``train_seconds`` the rest.

    Args:
        student: the student in train mode (FSDP2-sharded under torchrun).
        teacher: the frozen teacher, or None (cached targets or CE only), or several
            (:class:`Teachers`; each micro batch then brings its :class:`MixtureBatch`).
        batches: this rank's micro batches of a step (see :data:`Batches`).
        optimizer: the optimizer over the student's (and ``intermediate``'s) parameters.
        schedule: learning rate and step arithmetic.
        on_step: called after every optimizer step with its record.
        loss: loss weights and kind.
        runtime: device, autocast and the loss's compiled chunk kernel (:class:`StepRuntime`).
        start_step: the first step to run (a resumed run's checkpoint step).
        intermediate: Minitron's intermediate-state loss module (one process only).

    Raises:
        MinicompressError: a non-finite gradient norm.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = runtime.device
    for step in range(start_step, schedule.total_steps):
        t0 = time.perf_counter()
        lr = schedule.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        micro = batches(step)  # this step's micro batches and the targets they score, over all ranks
        gen_seconds = time.perf_counter() - t0
        labels = [micro_labels(m) for m in micro]
        normalizer = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels)
        if distributed.world_size() > 1:
            normalizer = int(distributed.all_reduce_sum(torch.tensor(normalizer, dtype=torch.int64)))

        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
        for (input_ids, targets, *_), labels_m in zip(micro, labels):
            value, stats = micro_batch_loss(student, input_ids.to(device), loss=loss, teacher=teacher,
                                            teacher_topk=targets, intermediate=intermediate, normalizer=normalizer,
                                            autocast=runtime.autocast, compiled=runtime.compiled,
                                            labels=labels_m)
            value.backward()
            share = stats["targets"] / normalizer
            for key in ("loss", "kl", "ce", "is"):
                if key in stats:
                    sums[key] = sums.get(key, 0.0) + stats[key] * share
        if distributed.world_size() > 1:  # each rank summed its share of the global batch
            reduced = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
            sums = dict(zip(sums, reduced.tolist()))

        max_norm = schedule.grad_clip if schedule.grad_clip > 0 else float("inf")  # DTensor grads: a global norm
        grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        if not math.isfinite(grad_norm):
            raise MinicompressError(f"lr: the gradient norm is {grad_norm} at step {step + 1}; lower lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds = time.perf_counter() - t0
        if on_step is not None:
            on_step({"step": step + 1, "tokens": (step + 1) * schedule.tokens_per_step, "lr": lr, **sums,
                     "grad_norm": grad_norm, "tokens_per_s": schedule.tokens_per_step / seconds,
                     "gen_seconds": gen_seconds, "train_seconds": seconds - gen_seconds, "step_seconds": seconds})
