"""Training and calibration rows: packed, shuffled sequences of a source or a mixture.

A source is read once into a token store (:mod:`minicompress.data.token_store`) and
served as ``[N, seq_len]`` rows; training holds out the first rows of every source and
draws micro batches as pure functions of the step (:class:`TrainingData`); Minitron
(arXiv 2407.14679) calibrates importance on 1024 such samples (:func:`load_calibration`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterator

import torch

from ..config import DataConfig, ScoreConfig
from ..errors import MinicompressError
from .mixture import check_weights, largest_remainder, mixture_positions, source_epoch_index, tokens_per_source
from .sources import bos_token_id, load_token_stream, pack
from .token_store import get_or_build

log = logging.getLogger(__name__)


def token_cache_dir() -> Path:
    """Where token stores live: ``$MINICOMPRESS_TOKEN_CACHE``, else ``<$MINICOMPRESS_CACHE>/tokens``."""
    if os.environ.get("MINICOMPRESS_TOKEN_CACHE"):
        return Path(os.environ["MINICOMPRESS_TOKEN_CACHE"]).expanduser()
    return Path(os.environ.get("MINICOMPRESS_CACHE", Path.home() / ".cache" / "minicompress")).expanduser() / "tokens"


def load_sequences(config: DataConfig, tokenizer, source: str | None = None):
    """Read, tokenise, pack and (optionally) shuffle a data source.

    With ``config.token_store`` (the default) the source is tokenised once into a token
    store (:func:`minicompress.data.token_store.get_or_build`; a second run re-tokenises
    nothing) and the result is a lazy :class:`~minicompress.data.token_store.SequenceView` over
    its memory map: the same rows, in the same order, as the in-memory path.

    Args:
        config: the data settings.
        tokenizer: the model's tokenizer.
        source: read this source instead of ``config.source`` (one source of a mixture).

    Returns:
        ``[N, config.seq_len]`` int64 rows (a tensor, or a view that indexes like one);
        shuffled with ``config.seed`` when ``config.shuffle``.
    """
    source = source if source is not None else config.source
    if source is None:
        raise MinicompressError("--data: a data source is required")
    if config.token_store:
        store = get_or_build(token_cache_dir(), source, tokenizer, text_field=config.text_field,
                             documents=config.documents, max_tokens=config.max_tokens)
        body = config.seq_len - (1 if bos_token_id(tokenizer) is not None else 0)
        if store.num_tokens < body:
            raise MinicompressError(f"--data: only {store.num_tokens} tokens, fewer than one sequence of "
                                    f"seq_len={config.seq_len}")
        return store.sequences(config.seq_len, bos_token_id(tokenizer), shuffle=config.shuffle, seed=config.seed)
    config = dataclasses.replace(config, source=source)
    seqs = pack(load_token_stream(config, tokenizer), config.seq_len, bos_token_id(tokenizer))
    if config.shuffle:
        order = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(config.seed))
        seqs = seqs[order]
    return seqs


def as_tensor(rows) -> torch.Tensor:
    """``rows`` as a ``[N, L]`` tensor (a :class:`~minicompress.data.token_store.SequenceView` is read)."""
    return rows if isinstance(rows, torch.Tensor) else rows.tensor()


#: Sequences per block of a mixture: each block holds every source's exact share.
MIXTURE_BLOCK = 100


class TrainingData:
    """Held-out and training rows of one source or of a weighted mixture of sources.

    Every source holds out its first ``n_eval`` rows (the same rows whatever the mixture,
    so a source's held-out text never changes with the weights); training reads the rest.
    One source: micro batch rows are ``train[batch_indices(...)]``, exactly as before.
    Several: the micro batch's stream positions map to a source and a position in that
    source by :func:`minicompress.data.mixture.mixture_positions` (a pure function of the
    position, so ``resume`` and sharding stay exact), then to a row by
    :func:`~minicompress.data.mixture.source_epoch_index`.

    Attributes:
        sources: the source names, in order.
        weights: their normalised weights (``[1.0]`` for one source).
        eval_ids: ``[E, L]`` held-out rows of every source, concatenated.
        eval_sources: ``[E]`` int64 source of each held-out row.
        num_train: training rows of all sources together.
    """

    def __init__(self, rows: list, weights: list[float] | None, n_eval: int, *, names: list[str], seed: int = 0):
        self.sources = names
        raw = check_weights(weights) if weights is not None else [1.0]
        self.weights = [w / sum(raw) for w in raw]
        self._train = [r[n_eval:] for r in rows]
        self.seed = seed
        for name, train in zip(names, self._train):
            if len(train) == 0:
                raise MinicompressError(f"eval_tokens: holding out {n_eval} sequences of {name} leaves none to "
                                        "train on; lower eval_tokens or add data")
        self.eval_ids = torch.cat([as_tensor(r[:n_eval]) for r in rows]) if n_eval else \
            torch.empty(0, rows[0].shape[1], dtype=torch.long)
        self.eval_sources = torch.arange(len(rows)).repeat_interleave(n_eval)
        self.num_train = sum(len(t) for t in self._train)

    def row_sources(self, positions: torch.Tensor) -> torch.Tensor:
        """``[B]`` int64 source of the training rows at global stream positions ``positions``
        ``[B]`` (the rows :meth:`rows` returns): a pure function of the positions."""
        if len(self._train) == 1:
            return torch.zeros(positions.numel(), dtype=torch.long)
        return mixture_positions(positions, self.weights, MIXTURE_BLOCK, self.seed)[0].reshape(-1)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` training rows at global stream positions ``positions`` ``[B]``."""
        if len(self._train) == 1:
            return as_tensor(self._train[0][source_epoch_index(positions, len(self._train[0]), self.seed)])
        sources, within = mixture_positions(positions, self.weights, MIXTURE_BLOCK, self.seed)
        out = torch.empty(positions.numel(), self._train[0].shape[1], dtype=torch.long)
        for s, train in enumerate(self._train):
            sel = sources == s
            if sel.any():
                out[sel] = as_tensor(train[source_epoch_index(within[sel], len(train), self.seed)])
        return out

    def tokens_per_source(self, positions: int, seq_len: int) -> dict[str, int]:
        """Training tokens each source supplies over the first ``positions`` stream positions."""
        if len(self._train) == 1:
            return {self.sources[0]: positions * seq_len}
        counts = tokens_per_source(positions, self.weights, MIXTURE_BLOCK, seq_len, seed=self.seed)
        return dict(zip(self.sources, counts))


def load_training_data(config: DataConfig, tokenizer, eval_tokens: int, *, seed: int = 0) -> TrainingData:
    """The held-out and training rows of ``config`` (one source or ``config.mixture``).

    ``seed`` orders epochs after the first and the mixture's blocks (the run's seed).

    Raises:
        MinicompressError: no source, a bad weight, or too little data to hold out ``eval_tokens``.
    """
    import math

    specs = [(m.source, m.weight) for m in config.mixture] or [(config.source, None)]
    if specs[0][0] is None:
        raise MinicompressError("--data: a data source is required")
    rows = [load_sequences(config, tokenizer, source=src) for src, _ in specs]
    n_eval = math.ceil(eval_tokens / config.seq_len) if eval_tokens else 0
    weights = [w for _, w in specs] if config.mixture else None
    return TrainingData(rows, weights, n_eval, names=[src for src, _ in specs], seed=seed)


def sample_calibration(sequences: torch.Tensor, num_samples: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` sequences drawn without replacement (all of them if fewer exist).

    Args:
        sequences: ``[N, L]`` packed sequences.
        num_samples: how many to draw.
        seed: seed of the draw.

    Returns:
        ``[min(N, num_samples), L]``.
    """
    n = sequences.shape[0]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, num_samples)]
    return sequences[idx.sort().values]


def load_calibration(config: DataConfig, tokenizer, num_samples: int) -> torch.Tensor:
    """Calibration rows from ``config``'s source or mixture (scoring, the pruning search).

    One source: :func:`sample_calibration` of :func:`load_sequences` with ``config.seed``.
    A mixture: each source gives its share of ``num_samples`` by weight (largest
    remainder, so the counts are exact and sum to ``num_samples``), drawn the same way from
    its own rows, and the rows of all sources are shuffled together with ``config.seed``
    (so any first rows, e.g. the layer-loss samples, hold every source).

    Args:
        config: the data settings (``source`` or ``mixture``).
        tokenizer: the model's tokenizer.
        num_samples: rows wanted.

    Returns:
        ``[N, config.seq_len]`` int64 rows, ``N <= num_samples`` (fewer only where a source
        holds fewer rows than its share).

    Raises:
        MinicompressError: no source, or a source that cannot be read.
    """
    specs = config.sources()
    if not specs:
        raise MinicompressError("--data: a data source is required")
    if not config.mixture:
        return as_tensor(sample_calibration(load_sequences(config, tokenizer), num_samples, config.seed))
    counts = largest_remainder([w for _, w in specs], num_samples)  # validates the weights
    parts = [as_tensor(sample_calibration(load_sequences(config, tokenizer, source=src), count, config.seed))
             for (src, _), count in zip(specs, counts) if count]
    rows = torch.cat(parts)
    return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(config.seed))]


def iterate_batches(sequences: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield ``[<=batch_size, L]`` slices of ``sequences`` in order."""
    for start in range(0, sequences.shape[0], batch_size):
        yield sequences[start:start + batch_size]


def calibration_batches(config: ScoreConfig, tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Calibration batches for scoring and the (smaller) batches for the layer-loss score.

    Reads the rows of ``config.data`` (one source, or a mixture by weight) that
    :func:`load_calibration` picks; used by ``score``, ``prune`` and the search.

    Returns:
        ``(batches, loss_batches)``: lists of ``[B, L]`` tensors.
    """
    data = config.data
    if data.max_tokens is None:  # read only what the samples need (with slack for shuffling)
        data = dataclasses.replace(data, max_tokens=max(config.num_samples * data.seq_len * 4, 1 << 20))
    sequences = load_calibration(data, tokenizer, config.num_samples)  # one source, or a mixture by weight
    if sequences.shape[0] < config.num_samples:
        log.warning("calibration: only %d sequences of %d tokens available (asked for %d)",
                    sequences.shape[0], data.seq_len, config.num_samples)
    batches = list(iterate_batches(sequences, config.batch_size))
    loss_batches = list(iterate_batches(sequences[: config.loss_samples], config.batch_size)) \
        if config.layer_scores and config.loss_samples else []
    return batches, loss_batches
