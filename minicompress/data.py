"""Data sources: one function that every subcommand uses for ``--data``.

Text comes from a ``.txt`` file (documents separated by blank lines), ``.jsonl`` /
``.json`` (a ``text`` field, or ``--text-field``), ``.parquet``, a folder of these, or a
Hub dataset ``name[:config][@split]``. Documents are tokenised without special tokens,
joined with EOS, and packed into fixed-length sequences (each starting with BOS for
tokenizers that add one, such as Gemma's), then shuffled deterministically with a seed.
Minitron (arXiv 2407.14679) calibrates importance on 1024 such samples; the same packing
feeds distillation. Empty, binary or undecodable input raises a one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import DataConfig
from .errors import MinicompressError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise MinicompressError(f"--data: {path} looks binary (NUL bytes); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MinicompressError(f"--data: {path} is not valid UTF-8 (byte {err.start}); expected UTF-8 text") from None


def _field(record: Any, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise MinicompressError(f"--text-field: {where} has no field {text_field!r} (found: {keys})")
    value = record[text_field]
    if not isinstance(value, str):
        raise MinicompressError(f"--text-field: {where} field {text_field!r} is {type(value).__name__}, not text")
    return value


def _read_file(path: Path, text_field: str, documents: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = _read_text_file(path)
        return [text] if documents == "file" else _BLANK_LINES.split(text)
    if suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(_read_text_file(path).splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise MinicompressError(f"--data: {path} line {lineno} is not valid JSON") from None
                out.append(_field(record, text_field, f"{path} line {lineno}"))
        return out
    if suffix == ".json":
        try:
            data = json.loads(_read_text_file(path))
        except json.JSONDecodeError as err:
            raise MinicompressError(f"--data: {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get(text_field), list):
            data = data[text_field]
        if not isinstance(data, list):
            raise MinicompressError(f"--data: {path} must hold a list of records or strings")
        return [_field(r, text_field, f"{path} item {i}") for i, r in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid (a ValueError) for non-parquet bytes
            raise MinicompressError(f"--data: {path} is not a readable parquet file ({type(err).__name__})") from None
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise MinicompressError(f"--text-field: {path} has no column {text_field!r} (found: {columns})")
        table = parquet.read(columns=[text_field])
        return [v for v in table.column(text_field).to_pylist() if isinstance(v, str)]
    raise MinicompressError(f"--data: {path} has unsupported suffix {suffix!r}; allowed: {', '.join(TEXT_SUFFIXES)}")


def check_local_source(key: str, source: str, error: type[Exception] = MinicompressError) -> None:
    """Refuse a source that names a local file or folder which does not exist (a Hub id passes).

    Args:
        key: the flag or config key named in the error (``--data``, ``data.mixture[1].source``).
        source: the source as given.
        error: the exception class raised.
    """
    path = Path(source).expanduser()
    looks_local = path.suffix.lower() in TEXT_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not path.exists():
        raise error(f"{key}: no such file or folder: {path}")


def _parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    name, _, split = spec.partition("@")
    name, _, subset = name.partition(":")
    return name, subset or None, split or "train"


def read_documents(source: str, text_field: str = "text", documents: str = "split") -> list[str]:
    """Read raw documents from a file, folder or Hub dataset.

    Args:
        source: path or Hub dataset ``name[:config][@split]``.
        text_field: field of json/jsonl/parquet/Hub rows holding the text.
        documents: ``split`` (blank-line separated documents in ``.txt``) or ``file``.

    Returns:
        Non-empty documents, in source order.

    Raises:
        MinicompressError: missing path, unsupported or binary file, undecodable text,
            missing field, an unreachable Hub dataset, or no text at all.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise MinicompressError(f"--data: folder {path} has no {', '.join(TEXT_SUFFIXES)} files")
        docs = [d for f in files for d in _read_file(f, text_field, documents)]
    elif path.is_file():
        docs = _read_file(path, text_field, documents)
    else:
        check_local_source("--data", source)
        docs = _read_hub(source, text_field)
    docs = [d.strip("\n") for d in docs if d and d.strip()]
    if not docs:
        raise MinicompressError(f"--data: {source} contains no text")
    return docs


def _read_hub(spec: str, text_field: str) -> list[str]:
    name, subset, split = _parse_hub_spec(spec)
    try:
        import datasets

        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # datasets raises many types for offline / missing
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MinicompressError(
            f"--data {spec!r}: not a local path, and the Hub dataset could not be loaded ({first})"
        ) from None
    if text_field not in ds.column_names:
        raise MinicompressError(f"--text-field: dataset {spec} has no column {text_field!r} (found: {ds.column_names})")
    return list(ds[text_field])


def bos_token_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one by default (Gemma), else None (SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def tokenize_documents(documents: list[str], tokenizer, max_tokens: int | None = None,
                       batch_docs: int = 256) -> torch.Tensor:
    """Tokenise documents without special tokens and join them with EOS.

    Args:
        documents: raw texts.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        max_tokens: stop once this many tokens are produced (None: all).
        batch_docs: documents per tokenizer call.

    Returns:
        ``[T]`` int64 token stream, each document followed by EOS, at most ``max_tokens``.

    Raises:
        MinicompressError: the tokenizer has no EOS token, or nothing was tokenised.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MinicompressError("tokenizer: has no eos_token; cannot join documents")
    chunks: list[torch.Tensor] = []
    total = 0
    for start in range(0, len(documents), batch_docs):
        batch = documents[start:start + batch_docs]
        if max_tokens is not None:  # bound the work on one huge document
            batch = [d[: max_tokens * 16] for d in batch]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            chunks.append(torch.tensor(ids + [eos], dtype=torch.long))
            total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    if total == 0:
        raise MinicompressError("--data: tokenisation produced no tokens")
    stream = torch.cat(chunks)
    return stream[:max_tokens] if max_tokens is not None else stream


def pack(stream: torch.Tensor, seq_len: int, bos_token_id: int | None = None) -> torch.Tensor:
    """Cut a token stream into fixed-length sequences (the remainder is dropped).

    Args:
        stream: ``[T]`` token ids.
        seq_len: tokens per sequence (including BOS when given).
        bos_token_id: prepended to every sequence when not None.

    Returns:
        ``[N, seq_len]`` int64.

    Raises:
        MinicompressError: fewer tokens than one sequence.
    """
    body = seq_len - (1 if bos_token_id is not None else 0)
    n = stream.numel() // body
    if n == 0:
        raise MinicompressError(f"--data: only {stream.numel()} tokens, fewer than one sequence of seq_len={seq_len}")
    seqs = stream[: n * body].view(n, body)
    if bos_token_id is not None:
        seqs = torch.cat([torch.full((n, 1), bos_token_id, dtype=seqs.dtype), seqs], dim=1)
    return seqs


def load_token_stream(config: DataConfig, tokenizer) -> torch.Tensor:
    """Read ``config.source`` and return its EOS-joined ``[T]`` token stream."""
    if config.source is None:
        raise MinicompressError("--data: a data source is required")
    docs = read_documents(config.source, config.text_field, config.documents)
    return tokenize_documents(docs, tokenizer, config.max_tokens)


def token_cache_dir() -> Path:
    """Where token stores live: ``$MINICOMPRESS_TOKEN_CACHE``, else ``<$MINICOMPRESS_CACHE>/tokens``."""
    if os.environ.get("MINICOMPRESS_TOKEN_CACHE"):
        return Path(os.environ["MINICOMPRESS_TOKEN_CACHE"]).expanduser()
    return Path(os.environ.get("MINICOMPRESS_CACHE", Path.home() / ".cache" / "minicompress")).expanduser() / "tokens"


def load_sequences(config: DataConfig, tokenizer, source: str | None = None):
    """Read, tokenise, pack and (optionally) shuffle a data source.

    With ``config.token_store`` (the default) the source is tokenised once into a token
    store (:func:`minicompress.token_store.get_or_build`; a second run re-tokenises
    nothing) and the result is a lazy :class:`~minicompress.token_store.SequenceView` over
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
        from .token_store import get_or_build

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
    """``rows`` as a ``[N, L]`` tensor (a :class:`~minicompress.token_store.SequenceView` is read)."""
    return rows if isinstance(rows, torch.Tensor) else rows.tensor()


#: Sequences per block of a mixture: each block holds every source's exact share.
MIXTURE_BLOCK = 100


class TrainingData:
    """Held-out and training rows of one source or of a weighted mixture of sources.

    Every source holds out its first ``n_eval`` rows (the same rows whatever the mixture,
    so a source's held-out text never changes with the weights); training reads the rest.
    One source: micro batch rows are ``train[batch_indices(...)]``, exactly as before.
    Several: the micro batch's stream positions map to a source and a position in that
    source by :func:`minicompress.mixture.mixture_positions` (a pure function of the
    position, so ``resume`` and sharding stay exact), then to a row by
    :func:`~minicompress.mixture.source_epoch_index`.

    Attributes:
        sources: the source names, in order.
        weights: their normalised weights (``[1.0]`` for one source).
        eval_ids: ``[E, L]`` held-out rows of every source, concatenated.
        num_train: training rows of all sources together.
    """

    def __init__(self, rows: list, weights: list[float] | None, n_eval: int, *, names: list[str], seed: int = 0):
        from .mixture import check_weights

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
        self.num_train = sum(len(t) for t in self._train)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` training rows at global stream positions ``positions`` ``[B]``."""
        from .mixture import mixture_positions, source_epoch_index

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
        from .mixture import tokens_per_source

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
    from .mixture import largest_remainder

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
