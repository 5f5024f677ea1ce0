"""On-policy distillation: a share of each step's sequences is written by the student itself.

GKD (Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", arXiv 2306.13649; TRL's ``GKDTrainer`` and its ``lmbda``) and
MiniLLM (Gu et al., arXiv 2306.08543) train the student on sequences it sampled itself,
scored token by token by the teacher with the forward KL, the reverse KL or the
generalised JSD(beta) (``loss.kind`` and ``loss.beta``). A student that only ever saw corpus
or teacher text never learns to recover from its own prefixes; on its own samples the
teacher tells it what to do where it actually goes.

Here step ``s`` of a rank replaces the first ``k = round(lambda * n)`` (half up) of its
``n = accum_steps * micro_batch_size`` data rows (:func:`generated_rows`). Each such row
keeps its first ``P`` tokens as the prompt (or takes a row of a prompts file instead,
:func:`step_prompts`), and the current student continues it to ``data.seq_len`` with the
KV-cache sampler of ``minicompress generate``
(:func:`~minicompress.distillation.sampling.sample_batch`, no sparse targets, plain
temperature-1 sampling by default) in inference mode, uncompiled
(:func:`sampling_mode`). The labels of the prompt positions are ignored: the loss is on the
generated tokens only, as in GKD. The random stream of micro batch ``m`` is seeded by
``(seed, step, rank, m)`` (:func:`generation_seed`), so a resumed run writes the same rows.
A fixed share per step instead of GKD's per-batch coin keeps every step's arithmetic a
pure function of the step; ``lambda = 0`` leaves the data rows untouched.

Generation is sequential decoding: ``L - P`` forwards of one token per generated micro batch
before the step's one training forward and backward over ``L`` tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .. import distributed
from ..data.mixture import source_epoch_index
from ..errors import MinicompressError
from . import attention
from .loop import IGNORE_INDEX, Batches, StepRuntime, shift_labels
from .sampling import SamplingConfig, sample_batch


@dataclass(frozen=True)
class Prompts:
    """Prompts that replace the data rows' starts (a prompts file, tokenised).

    Attributes:
        ids: ``[N, P]`` int64, each prompt left-aligned, 0 past its length.
        lengths: ``[N]`` int64 tokens of each prompt, in ``[1, P]``.
    """

    ids: torch.Tensor
    lengths: torch.Tensor


def tokenize_prompts(texts: Sequence[str], tokenizer: Any, prompt_tokens: int,
                     bos_token_id: int | None = None) -> Prompts:
    """Tokenise prompts (without special tokens, after ``bos_token_id`` when given), each cut to
    its first ``prompt_tokens`` tokens; prompts with no token are dropped.

    Args:
        texts: the prompts.
        tokenizer: the student's Hugging Face tokenizer.
        prompt_tokens: ``P``, the most tokens kept of a prompt (BOS included).
        bos_token_id: prepended to every prompt, as the data rows start (None: nothing).

    Returns:
        The :class:`Prompts`.

    Raises:
        MinicompressError: no prompt has a token.
    """
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    head = [] if bos_token_id is None else [bos_token_id]
    rows = [(head + list(ids))[:prompt_tokens] for ids in encoded if ids]
    if not rows:
        raise MinicompressError("on_policy_prompts: holds no prompt with a token")
    ids = torch.zeros(len(rows), prompt_tokens, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return Prompts(ids, torch.tensor([len(r) for r in rows], dtype=torch.long))


@dataclass(frozen=True)
class OnPolicy:
    """What each step generates: :class:`~minicompress.config.RecoverConfig`'s ``on_policy*`` keys.

    Attributes:
        share: ``lambda``, the share of a step's rows the student writes (``on_policy``).
        prompt_tokens: ``P``, tokens of a data row that prompt its continuation.
        sampling: the continuation's ``temperature``, ``top_k`` and ``top_p`` (no greedy
            tokens, no sparse targets).
        seed: the run's seed (of every generation and of the prompts file's later epochs).
        prompts: a prompts file's rows instead of the data rows' starts (None: the rows').
    """

    share: float
    prompt_tokens: int
    sampling: SamplingConfig = SamplingConfig(greedy_tokens=0, top_k=0, samples=0)
    seed: int = 0
    prompts: Prompts | None = None

    @classmethod
    def from_config(cls, config: Any, prompts: Prompts | None = None) -> "OnPolicy":
        """The on-policy settings of a :class:`~minicompress.config.RecoverConfig`."""
        sampling = SamplingConfig(greedy_tokens=0, top_k=config.on_policy_top_k, top_p=config.on_policy_top_p,
                                  temperature=config.on_policy_temperature, samples=0)
        return cls(config.on_policy, config.on_policy_prompt_tokens, sampling, config.seed, prompts)


def generated_rows(share: float, rows: int) -> int:
    """Rows of ``rows`` the student writes: ``round(share * rows)``, halves rounded up."""
    return min(rows, int(math.floor(share * rows + 0.5)))


def generation_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A 63-bit generator seed per ``(seed, step, rank, micro batch)``."""
    digest = hashlib.sha256(f"minicompress-on-policy:{int(seed)}:{int(step)}:{int(rank)}:{int(micro)}".encode())
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)


def step_prompts(policy: OnPolicy, step: int, rows: Sequence[torch.Tensor], *, rank: int = 0,
                 world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """The prompts of a step's generated rows, per micro batch: a pure function of the step.

    The first :func:`generated_rows` of the step's rows (micro batch 0 first) are generated.
    A row's prompt is its own first ``P`` tokens, or with ``policy.prompts`` the prompt at
    position ``(step * world_size + rank) * k + j`` (``j``: the row's index among the step's
    ``k`` generated rows) of the prompts file: in file order, then a seeded permutation per
    later pass (:func:`~minicompress.data.mixture.source_epoch_index`).

    Args:
        policy: the on-policy settings.
        step: the 0-based optimizer step.
        rows: the step's micro batches of data rows, ``[B_m, L]`` each.
        rank: this process's rank.
        world_size: number of ranks.

    Returns:
        Per micro batch, ``(prompts [t, P], lengths [t])`` of its first ``t`` rows, or None
        when none of its rows is generated.
    """
    k = generated_rows(policy.share, sum(r.shape[0] for r in rows))
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    first = 0  # the step's rows before this micro batch
    for r in rows:
        take = min(max(k - first, 0), r.shape[0])
        if take == 0:
            out.append(None)
        elif policy.prompts is None:
            out.append((r[:take, :policy.prompt_tokens].clone(),
                        torch.full((take,), policy.prompt_tokens, dtype=torch.long)))
        else:
            index = (step * world_size + rank) * k + first + torch.arange(take)
            chosen = source_epoch_index(index, policy.prompts.ids.shape[0], policy.seed)
            out.append((policy.prompts.ids[chosen], policy.prompts.lengths[chosen]))
        first += r.shape[0]
    return out


def continue_prompts(student: torch.nn.Module, prompts: torch.Tensor, lengths: torch.Tensor, seq_len: int, *,
                     generator: torch.Generator, sampling: SamplingConfig, autocast: str = "none") -> torch.Tensor:
    """The student's continuations of ``prompts`` to ``seq_len`` tokens (see :func:`sample_batch`).

    Rows of one prompt length decode together, lengths in increasing order, all from
    ``generator``.

    Args:
        student: the student (put in eval mode; see :func:`sampling_mode`).
        prompts: ``[B, P]`` int64, each row's prompt left-aligned.
        lengths: ``[B]`` prompt tokens of each row (``<= P < seq_len``).
        seq_len: ``L``, tokens per returned row.
        generator: the random stream, on the student's device.
        sampling: temperature, top-k and top-p of the continuation.
        autocast: ``none`` or ``bfloat16``.

    Returns:
        ``[B, L]`` int64 on the CPU, a normal (not inference) tensor: row ``b`` starts with
        its ``lengths[b]`` prompt tokens.
    """
    out = torch.empty(prompts.shape[0], seq_len, dtype=torch.long)
    for length in sorted(set(lengths.tolist())):
        sel = (lengths == length).nonzero().squeeze(1)
        rows = sample_batch(student, prompts[sel, :length], seq_len, generator=generator, sampling=sampling,
                            autocast=autocast)["input_ids"]
        out[sel] = rows.cpu()
    return out


def prompt_labels(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Next-token labels ``[B, L]`` of rows whose first ``lengths[b]`` tokens are a prompt: only the
    generated tokens are targets (positions ``< lengths[b] - 1`` are ``IGNORE_INDEX``)."""
    labels = shift_labels(input_ids)
    positions = torch.arange(input_ids.shape[1])
    labels[positions.unsqueeze(0) < (lengths - 1).unsqueeze(1)] = IGNORE_INDEX
    return labels


@contextlib.contextmanager
def sampling_mode(student: torch.nn.Module, compiled: Sequence[torch.nn.Module] = ()) -> Iterator[None]:
    """Run the student as ``generate`` runs a teacher, then put it back as it was.

    Inside, the ``compiled`` decoder layers run their plain forward (a compiled layer would
    recompile for every decode shape and KV cache), the CPU training attention
    (:mod:`~minicompress.distillation.attention`) gives way to ``sdpa`` so that
    :func:`sample_batch` can use its decode attention, and :func:`sample_batch` puts the
    student in eval mode; its train mode, compiled forwards and attention come back after.
    """
    was_training = student.training
    saved = [(layer, layer._compiled_call_impl) for layer in compiled]
    switched = getattr(student.config, "_attn_implementation", None) == attention.NAME
    try:
        for layer, _ in saved:
            layer._compiled_call_impl = None
        if switched:
            attention.restore_attention_(student)
        yield
    finally:
        for layer, impl in saved:
            layer._compiled_call_impl = impl
        if switched:
            attention.use_training_attention_(student)
        student.train(was_training)


def on_policy_batches(batches: Batches, student: torch.nn.Module, policy: OnPolicy, *, runtime: StepRuntime,
                      compiled: Sequence[torch.nn.Module] = ()) -> Batches:
    """``batches`` with the first :func:`generated_rows` of each step's rows written by the student.

    Every micro batch comes back as ``(input_ids, targets, labels)``; the generated rows'
    prompt positions are ignored in ``labels`` (:func:`prompt_labels`), the data rows keep
    every position. With ``policy.share == 0`` the rows are the data's.

    Args:
        batches: the step's data micro batches (:func:`~minicompress.distillation.distill.micro_batches`).
        student: the student being trained (it writes the rows at its current weights).
        policy: share, prompt length, sampling, seed and prompts.
        runtime: the device and autocast of the student.
        compiled: the student's compiled decoder layers (they decode uncompiled).

    Returns:
        The :data:`~minicompress.distillation.loop.Batches` of the run.
    """
    rank, world = distributed.rank(), distributed.world_size()

    def with_generations(step: int) -> list[tuple[torch.Tensor, Any, torch.Tensor]]:
        micro = batches(step)
        plan = step_prompts(policy, step, [m[0] for m in micro], rank=rank, world_size=world)
        out = []
        with sampling_mode(student, compiled):
            for m, ((ids, targets, *_), planned) in enumerate(zip(micro, plan)):
                if planned is None:
                    out.append((ids, targets, shift_labels(ids)))
                    continue
                prompts, lengths = planned
                generator = torch.Generator(device=runtime.device).manual_seed(
                    generation_seed(policy.seed, step, rank, m))
                rows = continue_prompts(student, prompts, lengths, ids.shape[1], generator=generator,
                                        sampling=policy.sampling, autocast=runtime.autocast)
                ids = ids.clone()
                ids[:rows.shape[0]] = rows
                full = torch.full((ids.shape[0],), 1, dtype=torch.long)  # data rows: every position a target
                full[:rows.shape[0]] = lengths
                out.append((ids, targets, prompt_labels(ids, full)))
        return out

    return with_generations
