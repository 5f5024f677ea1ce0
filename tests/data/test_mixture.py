"""Tests for minicompress.data.mixture: exact per-block counts, a pure position mapping, identities."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from minicompress.errors import MinicompressError
from minicompress.data.mixture import (check_weights, largest_remainder, mixture_counts, mixture_positions,
    mixture_slots, source_epoch_index, tokens_per_source)

WEIGHTS = [0.5, 0.3, 0.2]
BLOCK = 16


def naive_largest_remainder(weights, total):
    quotas = [Fraction(w) * total / sum(Fraction(x) for x in weights) for w in weights]
    counts = [int(q) for q in quotas]
    while sum(counts) < total:  # one at a time to the largest shortfall, lowest id first
        best = max(range(len(weights)), key=lambda s: (quotas[s] - counts[s], -s))
        counts[best] += 1
    return counts


def naive_positions(total, weights, block, seed):
    """Walk the stream position by position with a counter per source."""
    seen = [0] * len(weights)
    sources, within = [], []
    for b in range(math.ceil(total / block)):
        for s in mixture_slots(weights, block, seed, b).tolist():
            sources.append(s)
            within.append(seen[s])
            seen[s] += 1
    return torch.tensor(sources[:total]), torch.tensor(within[:total])


def test_largest_remainder():
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]
    assert largest_remainder([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # quotas 3.5, 2.1, 1.4
    assert largest_remainder([1, 1], 3) == [2, 1]  # tie: lower id
    assert largest_remainder([2, 1, 1], 0) == [0, 0, 0]
    assert largest_remainder([0.1, 0.2, 0.7], 10) == [1, 2, 7]  # no float rounding surprise
    rng = random.Random(0)
    for _ in range(200):
        weights = [rng.uniform(0.01, 5) for _ in range(rng.randint(1, 6))]
        total = rng.randint(0, 300)
        counts = largest_remainder(weights, total)
        assert counts == naive_largest_remainder(weights, total)
        assert sum(counts) == total
        assert all(abs(c - w * total / sum(weights)) < 1 for c, w in zip(counts, weights))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "x", None])
def test_check_weights(bad):
    assert check_weights([1, 2.5]) == [1.0, 2.5]
    with pytest.raises(MinicompressError) as err:
        check_weights([1.0, bad])
    assert str(err.value).startswith("data[1].weight: must be > 0, got ")
    with pytest.raises(MinicompressError, match="at least one source"):
        check_weights([])


def test_a_source_without_slots_is_an_error():
    with pytest.raises(MinicompressError, match=r"data\[1\]\.weight: .*no sequence"):
        mixture_counts([1.0, 0.01], 16)
    with pytest.raises(MinicompressError, match="block"):
        mixture_counts([1.0], 0)


def test_exact_counts_per_block_and_determinism():
    counts = largest_remainder(WEIGHTS, BLOCK)
    assert counts == [8, 5, 3]
    arrangements = set()
    for b in range(20):
        slots = mixture_slots(WEIGHTS, BLOCK, 7, b)
        assert slots.shape == (BLOCK,) and slots.dtype == torch.int64
        assert torch.bincount(slots, minlength=3).tolist() == counts
        assert torch.equal(slots, mixture_slots(WEIGHTS, BLOCK, 7, b))
        arrangements.add(tuple(slots.tolist()))
    assert len(arrangements) > 15  # blocks are arranged differently
    assert not torch.equal(mixture_slots(WEIGHTS, BLOCK, 7, 0), mixture_slots(WEIGHTS, BLOCK, 8, 0))


def test_positions_match_a_naive_walk_and_within_has_no_gaps():
    total = 7 * BLOCK + 5
    sources, within = mixture_positions(torch.arange(total), WEIGHTS, BLOCK, seed=3)
    ref_sources, ref_within = naive_positions(total, WEIGHTS, BLOCK, 3)
    assert torch.equal(sources, ref_sources) and torch.equal(within, ref_within)
    for s in range(3):
        mine = within[sources == s]
        assert torch.equal(mine, torch.arange(mine.numel()))  # 0, 1, 2, ... in stream order


def test_positions_do_not_depend_on_how_they_are_split():
    micro, accum, world, steps = 3, 2, 2, 5
    total = micro * accum * world * steps
    all_sources, all_within = mixture_positions(torch.arange(total), WEIGHTS, BLOCK, seed=11)
    # per micro batch, ranks interleaved as in batch_indices, in a scrambled order of calls
    calls = [(step, m, rank) for step in range(steps) for m in range(accum) for rank in range(world)]
    random.Random(0).shuffle(calls)
    for step, m, rank in calls:
        first = ((step * accum + m) * world + rank) * micro
        positions = torch.arange(first, first + micro)
        sources, within = mixture_positions(positions, WEIGHTS, BLOCK, seed=11)
        assert torch.equal(sources, all_sources[positions]) and torch.equal(within, all_within[positions])
    # one rank's whole share at once, and an arbitrary scattered set with repeats
    rank1 = torch.cat([torch.arange(i * micro, (i + 1) * micro) for i in range(1, total // micro, world)])
    assert torch.equal(mixture_positions(rank1, WEIGHTS, BLOCK, 11)[1], all_within[rank1])
    scattered = torch.tensor([[total - 1, 0], [17, 17]])
    sources, within = mixture_positions(scattered, WEIGHTS, BLOCK, 11)
    assert sources.shape == (2, 2) and torch.equal(within, all_within[scattered])


def test_tokens_per_source_equals_a_brute_force_count():
    seq_len = 32
    for total in (0, BLOCK, 3 * BLOCK, 3 * BLOCK + 1, 5 * BLOCK - 1, 101):
        sources, _ = mixture_positions(torch.arange(total), WEIGHTS, BLOCK, seed=5)
        brute = (torch.bincount(sources, minlength=3) * seq_len).tolist()
        assert tokens_per_source(total, WEIGHTS, BLOCK, seq_len, seed=5) == brute
        assert sum(brute) == total * seq_len
    assert tokens_per_source(4 * BLOCK, WEIGHTS, BLOCK, seq_len) == [4 * c * seq_len for c in (8, 5, 3)]
    with pytest.raises(ValueError, match="seed"):
        tokens_per_source(4 * BLOCK + 1, WEIGHTS, BLOCK, seq_len)


def test_source_epoch_index_epochs_are_permutations():
    n = 7
    idx = source_epoch_index(torch.arange(4 * n), n, seed=2)
    assert torch.equal(idx[:n], torch.arange(n))
    for e in range(1, 4):
        assert sorted(idx[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(idx[n:2 * n], idx[2 * n:3 * n])


def _batch_indices():
    try:
        from minicompress.distillation.loop import batch_indices
    except ImportError:  # before the training code moved out of distill.py
        from minicompress.distill import batch_indices
    return batch_indices


@pytest.mark.parametrize("block", [1, 5, 64])
def test_one_source_reproduces_batch_indices(block):
    batch_indices = _batch_indices()
    n, micro, accum, world, seed = 10, 4, 3, 2, 9
    for step in range(4):
        for m in range(accum):
            for rank in range(world):
                ref = batch_indices(n, step, m, micro_batch_size=micro, accum_steps=accum, seed=seed, rank=rank,
                                    world_size=world)
                first = ((step * accum + m) * world + rank) * micro
                sources, within = mixture_positions(torch.arange(first, first + micro), [1.0], block, seed=123)
                assert torch.equal(sources, torch.zeros(micro, dtype=torch.long))
                assert torch.equal(source_epoch_index(within, n, seed), ref)
