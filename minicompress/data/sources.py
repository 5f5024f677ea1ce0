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

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig
from ..errors import MinicompressError

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
