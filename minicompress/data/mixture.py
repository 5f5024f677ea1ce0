"""Recovery data as a weighted mixture of sources, drawn by a pure function of position.

Training reads one global stream of sequence positions ``p = 0, 1, 2, ...``
(:func:`minicompress.distillation.loop.batch_indices` maps a micro batch of a rank to its positions).
With several sources, position ``p`` must name a source ``s`` and a position ``j`` in that
source's own stream, deterministically, so that ``--resume`` and any sharding over ranks
and micro batches see exactly the same data. Like Megatron-LM's ``BlendedDataset``
(whose blending index assigns every global sample to a dataset so that the counts follow
the weights) the mapping is fixed in advance, but here it is a closed form rather than a
precomputed index:

* positions are grouped in blocks of ``block``; every block holds exactly
  ``largest_remainder(weights, block)[s]`` slots of source ``s`` (Hamilton's method), so
  the mixture matches the weights to within one sequence per source per block;
* the slots of block ``b`` are arranged by a permutation seeded with ``(seed, b)``;
* ``j = b * counts[s] + (slots of s earlier in block b)``, so each source's positions are
  ``0, 1, 2, ...`` in stream order, with no gaps and no repeats;
* :func:`source_epoch_index` turns ``j`` into a sequence index of the source: epoch 0 in
  order, later epochs through a seeded permutation, the rule of
  :func:`~minicompress.distillation.loop.batch_indices`, so one source of weight 1 reproduces it.

Everything here is a pure function of its arguments (no I/O, no global RNG); mapping a
micro batch costs O(block) per block it touches.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from typing import Sequence

import torch

from ..errors import MinicompressError


def check_weights(weights: Sequence[float]) -> list[float]:
    """Validate mixture weights (relative; they need not sum to 1).

    Args:
        weights: one weight per source, ``data[i].weight``.

    Returns:
        The weights as floats.

    Raises:
        MinicompressError: no source, or a weight that is not a finite number > 0
            (``data[i].weight: must be > 0, got ...``).
    """
    if len(weights) == 0:
        raise MinicompressError("data: a mixture needs at least one source")
    out = []
    for i, w in enumerate(weights):
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise MinicompressError(f"data[{i}].weight: must be > 0, got {w!r}") from None
        if isinstance(w, bool) or not math.isfinite(value) or value <= 0:
            raise MinicompressError(f"data[{i}].weight: must be > 0, got {w!r}")
        out.append(value)
    return out


def largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    """Split ``total`` slots in proportion to ``weights`` (Hamilton's largest-remainder method).

    Each source gets ``floor(total * w_s / sum(w))``; the slots left go one each to the
    largest remainders, ties to the lower source id. The arithmetic is exact (``Fraction``
    of the float weights), so the result does not depend on rounding or the platform.

    Args:
        weights: one weight > 0 per source.
        total: slots to split (>= 0).

    Returns:
        ``[S]`` counts summing to ``total``, each within 1 of its exact quota.

    Raises:
        MinicompressError: an invalid weight (see :func:`check_weights`).
    """
    exact = [Fraction(w) for w in check_weights(weights)]
    whole = sum(exact)
    quotas = [w * total / whole for w in exact]
    counts = [math.floor(q) for q in quotas]
    left = total - sum(counts)
    by_remainder = sorted(range(len(quotas)), key=lambda s: (-(quotas[s] - counts[s]), s))
    for s in by_remainder[:left]:
        counts[s] += 1
    return counts


def mixture_counts(weights: Sequence[float], block: int) -> list[int]:
    """Slots per source in every block: :func:`largest_remainder` of ``block``, each > 0.

    Raises:
        MinicompressError: an invalid weight or block, or a weight so small that its
            source would get no slot in a block (it would never be trained on).
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise MinicompressError(f"mixture block: must be an integer >= 1, got {block!r}")
    counts = largest_remainder(weights, block)
    for i, c in enumerate(counts):
        if c == 0:
            raise MinicompressError(f"data[{i}].weight: {weights[i]!r} gives source {i} no sequence in a mixture "
                                    f"block of {block}; raise the weight or the block size")
    return counts


def _block_seed(seed: int, block_index: int) -> int:
    """A 63-bit generator seed per ``(seed, block_index)``, unrelated to the epoch seeds
    ``seed * 1_000_003 + e`` of :func:`source_epoch_index`."""
    digest = hashlib.sha256(f"minicompress-mixture:{int(seed)}:{int(block_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _slots(counts: torch.Tensor, seed: int, block_index: int) -> torch.Tensor:
    block = int(counts.sum())
    base = torch.repeat_interleave(torch.arange(len(counts)), counts)
    perm = torch.randperm(block, generator=torch.Generator().manual_seed(_block_seed(seed, block_index)))
    return base[perm]


def mixture_slots(weights: Sequence[float], block: int, seed: int, block_index: int) -> torch.Tensor:
    """The source of each position of block ``block_index``.

    Args:
        weights: one weight > 0 per source.
        block: positions per block.
        seed: seed of the arrangement.
        block_index: which block (positions ``[block_index * block, (block_index + 1) * block)``).

    Returns:
        ``[block]`` int64 source ids; source ``s`` appears exactly ``mixture_counts(weights, block)[s]`` times.

    Raises:
        MinicompressError: see :func:`mixture_counts`.
    """
    return _slots(torch.tensor(mixture_counts(weights, block)), seed, block_index)


def mixture_positions(positions: torch.Tensor | Sequence[int], weights: Sequence[float], block: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map global stream positions to ``(source, position within that source's stream)``.

    A pure function: the answer for a position does not depend on which other positions
    are asked in the same call, so micro batches, ranks and resumed runs agree.

    Args:
        positions: ``[n]`` global positions (>= 0), e.g. a micro batch's.
        weights: one weight > 0 per source.
        block: positions per block.
        seed: seed of the arrangement of every block.

    Returns:
        ``(sources, within)``, both ``[n]`` int64: ``within = block_index * counts[s] +
        (earlier slots of s in that block)``.

    Raises:
        MinicompressError: see :func:`mixture_counts`; a negative position.
    """
    counts = torch.tensor(mixture_counts(weights, block))
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.as_tensor(positions, dtype=torch.long)
    flat = positions.reshape(-1)
    if flat.numel() and int(flat.min()) < 0:
        raise MinicompressError(f"mixture positions: must be >= 0, got {int(flat.min())}")
    blocks, offsets = flat // block, flat % block
    sources, within = torch.empty_like(flat), torch.empty_like(flat)
    for b in blocks.unique().tolist():
        slots = _slots(counts, seed, b)
        order = torch.argsort(slots, stable=True)
        rank = torch.empty_like(slots)
        rank[order] = torch.arange(block) - starts[slots[order]]  # earlier slots of the same source
        sel = blocks == b
        s = slots[offsets[sel]]
        sources[sel] = s
        within[sel] = b * counts[s] + rank[offsets[sel]]
    return sources.reshape(positions.shape), within.reshape(positions.shape)


def source_epoch_index(within: torch.Tensor | Sequence[int], num_sequences: int, seed: int = 0) -> torch.Tensor:
    """Sequence index of positions in one source's stream: epoch 0 in order, epoch ``e >= 1``
    through ``torch.randperm(num_sequences)`` seeded with ``(seed * 1_000_003 + e) % 2**63``,
    the rule of :func:`minicompress.distillation.loop.batch_indices` (pass a different ``seed`` per
    source to decorrelate their later epochs).

    Args:
        within: ``[n]`` positions in the source's stream (>= 0).
        num_sequences: sequences ``N`` of the source.
        seed: seed of the permutations of epochs >= 1.

    Returns:
        ``[n]`` int64 indices in ``[0, N)``.
    """
    if num_sequences < 1:
        raise MinicompressError(f"mixture source: has no sequences (num_sequences={num_sequences})")
    within = torch.as_tensor(within, dtype=torch.long)
    epochs, pos = within // num_sequences, within % num_sequences
    out = pos.clone()
    for epoch in epochs.unique().tolist():
        if epoch == 0:
            continue
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
        perm = torch.randperm(num_sequences, generator=gen)
        sel = epochs == epoch
        out[sel] = perm[pos[sel]]
    return out


def tokens_per_source(total_positions: int, weights: Sequence[float], block: int, seq_len: int, *,
                      seed: int | None = None) -> list[int]:
    """Tokens each source contributes to the first ``total_positions`` positions (for the
    recovery record).

    Whole blocks give ``counts[s]`` each (closed form); a final partial block is counted
    from its slots, which needs the ``seed``.

    Args:
        total_positions: positions trained on (sequences, all ranks together).
        weights: one weight > 0 per source.
        block: positions per block.
        seq_len: tokens per sequence.
        seed: the mixture seed; required only when ``total_positions % block != 0``.

    Returns:
        ``[S]`` token counts summing to ``total_positions * seq_len``.

    Raises:
        MinicompressError: see :func:`mixture_counts`.
        ValueError: a partial last block and no ``seed``.
    """
    counts = mixture_counts(weights, block)
    full, rest = divmod(int(total_positions), block)
    per = [full * c for c in counts]
    if rest:
        if seed is None:
            raise ValueError(f"tokens_per_source: {total_positions} positions end inside a block of {block}; "
                             "pass the mixture seed")
        partial = torch.bincount(_slots(torch.tensor(counts), seed, full)[:rest], minlength=len(counts))
        per = [n + int(k) for n, k in zip(per, partial)]
    return [n * seq_len for n in per]
