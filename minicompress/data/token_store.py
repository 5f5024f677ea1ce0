"""Tokenise once, memory-map everywhere: a flat token file per (source, tokenizer).

:func:`minicompress.data.rows.load_sequences` reads, tokenises and packs the whole corpus in
every process (30.7M tokens: 90 s and +990 MB per process, on every torchrun rank). A
token store does that work once and writes the EOS-joined token stream of
:func:`minicompress.data.sources.tokenize_documents` to a flat binary file in the smallest unsigned
dtype that holds the vocabulary, the layout of nanoGPT's ``prepare.py`` (``train.bin`` read
through ``np.memmap``) and of Megatron-LM's indexed datasets. Every later run memory-maps
it: packing into sequences and the seeded shuffle are index arithmetic
(:class:`SequenceView`), so a run reads only the rows it trains on, and the only
per-corpus allocation is the shuffle's permutation (8 bytes per sequence).

A store is a folder::

    tokens.bin   the stream, uint16 when len(tokenizer) <= 65,536, else uint32
    store.json   format, version, dtype, counts, fingerprints of the source and the
                 tokenizer, reading options, build time, and a cheap integrity check
                 (byte size and a sha256 of the first and last MiB of tokens.bin)

:func:`get_or_build` keeps stores in a cache folder keyed by :func:`store_key`; under
torchrun the local rank 0 builds while the other ranks wait for it.

Why a flat memmap and not ``datasets`` (Arrow): an Arrow table of per-document token
lists memory-maps as well, but packing across document boundaries needs the flat stream
of the list column (a copy once the column has several chunks, and the ids are int32 or
int64 by default) or offset arithmetic through the chunks. Measured with
``benchmarks/data_path.py --arrow`` (3.07M SmolLM2 tokens, 2 shared AMD EPYC cores):
``Dataset.map`` + ``save_to_disk`` took 16-19 s and 11.7 MiB (int32) against 13-17 s and
5.8 MiB (uint16) here; the next run's ``load_from_disk`` + flat stream + first micro
batch took 0.70-0.86 s and +41 MiB of anonymous memory, against 0.14 s and +0.1 MiB for
:func:`open_token_store` + :meth:`TokenStore.sequences` + 4 rows. The flat file also
needs no dependency, and any row of any packing is one ``memmap`` slice.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from ..errors import MinicompressError
from ..outputs import atomic_folder, write_json_atomic
from ..progress import progress_bar

if TYPE_CHECKING:  # torch is imported where used: tokenising workers never load it
    import torch

FORMAT = "minicompress-token-store"
VERSION = 1
TOKENS_FILE = "tokens.bin"
META_FILE = "store.json"
#: bytes at each end of ``tokens.bin`` covered by the integrity checksum.
CHECK_BYTES = 1 << 20
#: ``.txt`` (``documents: split``) and ``.parquet`` files larger than this are read in blocks.
BLOCK_BYTES = 64 << 20
#: documents per tokenizer call (as :func:`minicompress.data.sources.tokenize_documents`).
BATCH_DOCS = 256
#: characters per tokenizer call (a batch is cut earlier when its documents are long).
BATCH_CHARS = 1 << 20
#: seconds between two looks at a store another rank is building.
POLL_SECONDS = 1.0
#: seconds a waiting rank waits for the builder (``$MINICOMPRESS_STORE_TIMEOUT`` overrides).
WAIT_SECONDS = 4 * 3600.0


# ----------------------------------------------------------------------------------------
# fingerprints and keys


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _source_files(source: str) -> tuple[Path, list[Path]] | None:
    """``(root, files)`` that :func:`minicompress.data.sources.read_documents` reads, or None for a Hub spec.

    Raises:
        MinicompressError: as ``read_documents`` (missing path, empty folder).
    """
    from . import sources

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in sources.TEXT_SUFFIXES)
        if not files:
            raise MinicompressError(f"--data: folder {path} has no {', '.join(sources.TEXT_SUFFIXES)} files")
        return path, files
    if path.is_file():
        return path.parent, [path]
    sources.check_local_source("--data", source)
    return None


def source_fingerprint(source: str) -> dict[str, Any]:
    """What identifies a source without reading it.

    Local files and folders: the sorted ``(relative path, size, mtime_ns)`` of the files
    :func:`minicompress.data.sources.read_documents` reads (no content hashing, so it costs one
    ``stat`` per file); a Hub dataset: its spec string.

    Args:
        source: ``--data`` (path or Hub ``name[:config][@split]``).

    Returns:
        A JSON-able dict (``kind`` ``files`` or ``hub``).
    """
    found = _source_files(source)
    if found is None:
        return {"kind": "hub", "spec": source}
    root, files = found
    entries = []
    for f in files:
        st = f.stat()
        entries.append([f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return {"kind": "files", "files": entries}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its serialised fast backend (or sorted
    vocabulary), EOS/BOS ids, length and class name. About 0.04 s for a 50k vocabulary.

    The backend's ``truncation`` and ``padding`` settings are left out: Hugging Face
    calls toggle them, and they do not change the ids of an unpadded, untruncated call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:
            backend = type(backend).from_str(backend.to_str())  # a copy without them
            backend.no_truncation()
            backend.no_padding()
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    h = hashlib.sha256(body.encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id,
                         len(tokenizer)]).encode())
    return h.hexdigest()


def store_key(source: str, tokenizer, *, text_field: str = "text", documents: str = "split",
              max_tokens: int | None = None) -> str:
    """The cache key of a store: a hex digest of the source and tokenizer fingerprints,
    the reading options and the store format version.

    Args:
        source: ``--data``.
        tokenizer: the Hugging Face tokenizer.
        text_field: field of json/jsonl/parquet/Hub rows holding the text.
        documents: ``split`` or ``file`` (see :class:`~minicompress.config.DataConfig`).
        max_tokens: cap on tokens (None: all).

    Returns:
        32 hex characters (128 bits of sha256).
    """
    return _digest({"format": FORMAT, "version": VERSION, "source": source_fingerprint(source),
                    "tokenizer": tokenizer_fingerprint(tokenizer), "text_field": text_field,
                    "documents": documents, "max_tokens": max_tokens})[:32]


def _token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def _head_tail_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(min(size, CHECK_BYTES)))
        f.seek(max(0, size - CHECK_BYTES))
        h.update(f.read(CHECK_BYTES))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# streaming reader


def _text_blocks(path: Path, block_bytes: int) -> Iterator[tuple[list[str], int]]:
    """Blank-line separated documents of a big ``.txt`` file, ``block_bytes`` at a time.

    Yields exactly the parts of ``sources._BLANK_LINES.split(whole_text)``: each block is
    appended to the unfinished last part of the previous one before splitting (a
    separator is ``\\n``, non-newline blanks, ``\\n``, so whether one matches is decided by
    the text up to its end, and the last part never contains one).

    Yields:
        ``(documents, bytes read)``.

    Raises:
        MinicompressError: NUL bytes in the first 64 KiB, or invalid UTF-8 (with the same
            messages and byte offset as reading the file whole).
    """
    from . import sources

    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        if b"\x00" in f.read(65536):
            raise MinicompressError(f"--data: {path} looks binary (NUL bytes); expected UTF-8 text")
        f.seek(0)
        while True:
            raw = f.read(block_bytes)
            pending = decoder.getstate()[0]
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                byte = offset - len(pending) + err.start
                raise MinicompressError(
                    f"--data: {path} is not valid UTF-8 (byte {byte}); expected UTF-8 text") from None
            offset += len(raw)
            parts = sources._BLANK_LINES.split(carry + text)
            carry = parts.pop()
            if parts or raw:
                yield parts, len(raw)
            if not raw:
                break
    yield [carry], 0


def _parquet_blocks(path: Path, text_field: str) -> Iterator[tuple[list[str], int]]:
    """The strings of a big parquet file's ``text_field`` column, one record batch at a time."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # as sources._read_file
        raise MinicompressError(f"--data: {path} is not a readable parquet file ({type(err).__name__})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise MinicompressError(f"--text-field: {path} has no column {text_field!r} (found: {columns})")
    rows = max(parquet.metadata.num_rows, 1)
    size = path.stat().st_size
    for batch in parquet.iter_batches(batch_size=4096, columns=[text_field]):
        yield [v for v in batch.column(0).to_pylist() if isinstance(v, str)], size * batch.num_rows // rows


def _hub_blocks(spec: str, text_field: str) -> Iterator[tuple[list[str], int]]:
    from . import sources

    name, subset, split = sources._parse_hub_spec(spec)
    try:
        import datasets

        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # as sources._read_hub
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MinicompressError(
            f"--data {spec!r}: not a local path, and the Hub dataset could not be loaded ({first})") from None
    if text_field not in ds.column_names:
        raise MinicompressError(f"--text-field: dataset {spec} has no column {text_field!r} (found: {ds.column_names})")
    for batch in ds.select_columns([text_field]).iter(batch_size=4096):
        yield list(batch[text_field]), 0


def _iter_documents(source: str, text_field: str = "text", documents: str = "split",
                    block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[list[str], int]]:
    """:func:`minicompress.data.sources.read_documents`, streamed: the same documents in the same
    order, one file (or one block of a big file) at a time, so memory is bounded by the
    largest small file rather than the corpus.

    Yields:
        ``(documents, source bytes they account for)``; documents are non-empty and
        stripped of surrounding newlines, as ``read_documents`` returns them.

    Raises:
        MinicompressError: the errors of ``read_documents``.
    """
    found = _source_files(source)
    if found is None:
        blocks: Iterable[tuple[list[str], int]] = _hub_blocks(source, text_field)
    else:
        blocks = itertools.chain.from_iterable(_file_blocks(f, text_field, documents, block_bytes) for f in found[1])
    any_text = False
    for docs, nbytes in blocks:
        docs = [d.strip("\n") for d in docs if d and d.strip()]
        any_text = any_text or bool(docs)
        yield docs, nbytes
    if not any_text:
        raise MinicompressError(f"--data: {source} contains no text")


def _file_blocks(path: Path, text_field: str, documents: str, block_bytes: int) -> Iterator[tuple[list[str], int]]:
    from . import sources

    size = path.stat().st_size
    suffix = path.suffix.lower()
    if size > block_bytes and suffix == ".txt" and documents == "split":
        yield from _text_blocks(path, block_bytes)
    elif size > block_bytes and suffix == ".parquet":
        yield from _parquet_blocks(path, text_field)
    else:
        yield sources._read_file(path, text_field, documents), size


def _batches(blocks: Iterable[tuple[list[str], int]], max_chars: int | None) -> Iterator[tuple[list[str], int]]:
    """Regroup documents into tokenizer batches of at most ``BATCH_DOCS`` documents and
    about ``BATCH_CHARS`` characters, each document cut to ``max_chars`` when given (the
    bound :func:`minicompress.data.sources.tokenize_documents` puts on one huge document)."""
    batch: list[str] = []
    chars = nbytes = 0
    for docs, block_bytes in blocks:
        nbytes += block_bytes
        for doc in docs:
            if max_chars is not None:
                doc = doc[:max_chars]
            batch.append(doc)
            chars += len(doc)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield batch, nbytes
                batch, chars, nbytes = [], 0, 0
    if batch or nbytes:
        yield batch, nbytes


# ----------------------------------------------------------------------------------------
# tokenising


def _encode(docs: list[str], tokenizer, eos: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, ends)``: the batch's EOS-joined ids in ``dtype`` and each document's end offset."""
    if not docs:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    ids = tokenizer(docs, add_special_tokens=False, verbose=False, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    ends = np.cumsum([len(x) + 1 for x in ids], dtype=np.int64)
    flat = itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids)
    try:
        out = np.fromiter(flat, dtype=dtype, count=int(ends[-1]))
    except (OverflowError, ValueError):
        top = max(max(x, default=0) for x in ids)
        raise MinicompressError(f"tokenizer: produced id {top}, which does not fit the store's {dtype} "
                                f"(len(tokenizer) = {len(tokenizer)})") from None
    return out, ends


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer, eos: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(tokenizer=tokenizer, eos=eos, dtype=dtype)


def _encode_in_worker(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(docs, _WORKER["tokenizer"], _WORKER["eos"], _WORKER["dtype"])


def _encoded(batches: Iterable[tuple[list[str], int]], tokenizer, eos: int, dtype: str,
             num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """``(ids, ends, bytes)`` per batch, in order; ``num_proc > 1`` encodes in a spawn pool
    with at most ``2 * num_proc`` batches in flight (``Pool.imap`` would read ahead without bound)."""
    if num_proc <= 1:
        for docs, nbytes in batches:
            yield (*_encode(docs, tokenizer, eos, dtype), nbytes)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, eos, dtype)) as pool:
        pending: deque = deque()
        for docs, nbytes in batches:
            pending.append((pool.apply_async(_encode_in_worker, (docs,)), nbytes))
            if len(pending) >= 2 * num_proc:
                job, nb = pending.popleft()
                yield (*job.get(), nb)
        while pending:
            job, nb = pending.popleft()
            yield (*job.get(), nb)


class _NoBar:
    def advance(self, amount: float = 1, **fields) -> None:
        pass

    def update(self, **fields) -> None:
        pass


# ----------------------------------------------------------------------------------------
# the store


class SequenceView:
    """A lazy ``[N, seq_len]`` int64 view of a token stream packed into sequences.

    Packing is :func:`minicompress.data.sources.pack`'s (sequence ``r`` is tokens
    ``[r * body, (r + 1) * body)`` with ``body = seq_len - 1`` after a BOS when
    ``bos_token_id`` is given, else ``seq_len``; the remainder is dropped), and row ``i``
    of a shuffled view is packed sequence ``perm[i]`` with :func:`minicompress.data.rows.load_sequences`'s
    ``perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))``.

    Indexing:

    * ``view[i]`` -> ``[seq_len]`` int64 tensor;
    * ``view[idx]`` with a 1-D integer tensor, array or list -> ``[B, seq_len]`` tensor;
    * ``view[a:b:c]`` -> another :class:`SequenceView` (nothing is read);
    * ``view.tensor()`` -> the whole view as ``[len(view), seq_len]``.

    Only the rows asked for are read from the memory map.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, bos_token_id: int | None,
                 rows: range | torch.Tensor):
        self._tokens = tokens
        self.seq_len = seq_len
        self.bos_token_id = bos_token_id
        body = seq_len - (1 if bos_token_id is not None else 0)
        n = len(tokens) // body
        self._packed = tokens[: n * body].reshape(n, body)
        self._rows = rows

    @property
    def shape(self) -> torch.Size:
        """``torch.Size([len(self), seq_len])``."""
        import torch

        return torch.Size([len(self._rows), self.seq_len])

    @property
    def dtype(self) -> torch.dtype:
        """Always ``torch.int64``."""
        import torch

        return torch.int64

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"SequenceView(shape={tuple(self.shape)}, bos_token_id={self.bos_token_id})"

    def _packed_rows(self, idx: torch.Tensor) -> np.ndarray:
        """Packed-row numbers of view rows ``idx`` (``[B]`` int64, already in range)."""
        if isinstance(self._rows, range):
            return (self._rows.start + idx * self._rows.step).numpy()
        return self._rows[idx].numpy()

    def _read(self, packed: np.ndarray | slice) -> torch.Tensor:
        import torch

        block = self._packed[packed]
        out = np.empty((block.shape[0], self.seq_len), dtype=np.int64)
        if self.bos_token_id is not None:
            out[:, 0] = self.bos_token_id
            out[:, 1:] = block
        else:
            out[:] = block
        return torch.from_numpy(out)

    def __getitem__(self, key):
        import torch

        n = len(self._rows)
        if isinstance(key, tuple):  # view[rows, cols]: read the rows, then index the tensor
            rows = self[key[0]]
            rows = rows.tensor() if isinstance(rows, SequenceView) else rows
            return rows[(slice(None),) + key[1:]] if rows.ndim == 2 else rows[key[1:]]
        if isinstance(key, slice):
            sub = range(n)[key]
            if isinstance(self._rows, range):
                return SequenceView(self._tokens, self.seq_len, self.bos_token_id, self._rows[key])
            if sub.step > 0:
                rows = self._rows[sub.start:sub.stop:sub.step]
            else:
                rows = self._rows[torch.arange(sub.start, sub.stop, sub.step, dtype=torch.long)]
            return SequenceView(self._tokens, self.seq_len, self.bos_token_id, rows)
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} sequences")
            return self._read(self._packed_rows(torch.tensor([i % n])))[0]
        idx = torch.as_tensor(key)
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex() or idx.ndim != 1:
            raise TypeError(f"SequenceView indices must be an int, a slice or a 1-D integer tensor/list; "
                            f"got {idx.dtype} with shape {tuple(idx.shape)}")
        idx = idx.to(torch.long)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"indices out of range for {n} sequences")
        idx = torch.where(idx < 0, idx + n, idx)
        return self._read(self._packed_rows(idx))

    def tensor(self) -> torch.Tensor:
        """Every row of the view, ``[len(self), seq_len]`` int64 (reads them all)."""
        import torch

        if isinstance(self._rows, range) and self._rows.step == 1:
            return self._read(slice(self._rows.start, self._rows.stop))
        return self[torch.arange(len(self), dtype=torch.long)]


class TokenStore:
    """An opened token store (see :func:`open_token_store`).

    Attributes:
        folder: the store folder.
        meta: the parsed ``store.json``.
        tokens: ``[T]`` read-only ``np.memmap`` of the EOS-joined token stream.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], tokens: np.ndarray):
        self.folder, self.meta, self.tokens = folder, meta, tokens

    @property
    def num_tokens(self) -> int:
        """Tokens in the stream (``T``)."""
        return int(self.meta["num_tokens"])

    def __repr__(self) -> str:
        return f"TokenStore({str(self.folder)!r}, num_tokens={self.num_tokens:,}, dtype={self.meta['dtype']})"

    def sequences(self, seq_len: int, bos_token_id: int | None = None, *, shuffle: bool = True,
                  seed: int = 0) -> SequenceView:
        """The stream packed into ``seq_len`` sequences, as :func:`minicompress.data.rows.load_sequences` packs it.

        Args:
            seq_len: tokens per sequence, BOS included.
            bos_token_id: prepended to every sequence (:func:`minicompress.data.sources.bos_token_id`).
            shuffle: order rows by ``torch.randperm(N)`` seeded with ``seed``.
            seed: seed of the shuffle.

        Returns:
            A lazy ``[N, seq_len]`` :class:`SequenceView`; ``view.tensor()`` equals
            ``load_sequences(DataConfig(source, seq_len=seq_len, seed=seed, shuffle=shuffle), tokenizer)``.

        Raises:
            MinicompressError: ``seq_len < 2``, or fewer tokens than one sequence.
        """
        import torch

        if seq_len < 2:
            raise MinicompressError(f"seq_len: must be at least 2, got {seq_len}")
        body = seq_len - (1 if bos_token_id is not None else 0)
        n = self.num_tokens // body
        if n == 0:
            raise MinicompressError(
                f"--data: only {self.num_tokens} tokens, fewer than one sequence of seq_len={seq_len}")
        rows: range | torch.Tensor = range(n)
        if shuffle:
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return SequenceView(self.tokens, seq_len, bos_token_id, rows)


def _damaged(folder: Path, why: str) -> MinicompressError:
    return MinicompressError(f"token store {folder} is damaged ({why}); delete it or rebuild it with --overwrite")


def open_token_store(folder: str | Path, tokenizer=None) -> TokenStore:
    """Open and check a token store (about 2 MiB read, whatever its size).

    Args:
        folder: the store folder.
        tokenizer: when given, its fingerprint must equal the store's.

    Returns:
        The :class:`TokenStore`, its tokens memory-mapped read-only.

    Raises:
        MinicompressError: one line naming the folder: no store there, another format or
            version, a size or head/tail checksum mismatch (damaged or truncated), or a
            store built with another tokenizer.
    """
    folder = Path(folder).expanduser()
    meta_path, tokens_path = folder / META_FILE, folder / TOKENS_FILE
    if not meta_path.is_file():
        raise MinicompressError(f"token store {folder} has no {META_FILE}; build it first (or delete the folder)")
    try:
        meta = json.loads(meta_path.read_text())
        num_tokens, dtype = int(meta["num_tokens"]), np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise _damaged(folder, f"{META_FILE} is unreadable") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise MinicompressError(f"token store {folder} is {meta.get('format')!r} version {meta.get('version')!r}, "
                                f"not {FORMAT!r} version {VERSION}; delete it or rebuild it with --overwrite")
    expected = num_tokens * dtype.itemsize
    size = tokens_path.stat().st_size if tokens_path.is_file() else None
    if size != expected or meta.get("bytes") != expected or num_tokens <= 0:
        raise _damaged(folder, f"{TOKENS_FILE} has {size} bytes, expected {expected}")
    if _head_tail_sha256(tokens_path, size) != meta.get("head_tail_sha256"):
        raise _damaged(folder, f"{TOKENS_FILE} head/tail checksum mismatch")
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != meta.get("tokenizer_fingerprint"):
        raise MinicompressError(f"token store {folder} was built with another tokenizer "
                                f"({type(tokenizer).__name__} differs); use its tokenizer or build a new store")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(num_tokens,))
    return TokenStore(folder, meta, tokens)


def build_token_store(folder: str | Path, source: str, tokenizer, *, text_field: str = "text",
                      documents: str = "split", max_tokens: int | None = None, num_proc: int = 1,
                      progress: bool = True, overwrite: bool = False) -> TokenStore:
    """Tokenise ``source`` once into a token store at ``folder``.

    The stream is that of ``sources.tokenize_documents(sources.read_documents(source, text_field,
    documents), tokenizer, max_tokens)``, but documents are read one file (or one 64 MiB
    block of a big ``.txt`` / ``.parquet``) at a time and ids are appended to
    ``tokens.bin`` batch by batch, so host memory does not grow with the corpus. The store
    is written into a temporary sibling folder and renamed into place at the end: a build
    that fails leaves nothing.

    ``num_proc > 1`` encodes batches in a ``spawn`` pool (order kept, at most ``2 *
    num_proc`` batches in flight). A Hugging Face fast tokenizer already spreads a batch
    over all cores (Rust threads, unless ``TOKENIZERS_PARALLELISM=false``); only turning
    its ids into Python lists and then into an array runs on one core. Measured on 2
    shared cores (AMD EPYC, SmolLM2's tokenizer, 3.07M tokens, ``benchmarks/data_path.py``,
    two runs): ``num_proc=1`` 13.4 / 17.4 s, ``num_proc=2`` 20.4 / 22.0 s: each worker first spends seconds
    importing transformers and the tokenizer's own threads already used both cores. Keep
    ``num_proc=1`` unless there are many idle cores and hundreds of millions of tokens.

    Args:
        folder: the store folder to create.
        source: ``--data`` (``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet``, a folder, or a Hub spec).
        tokenizer: a Hugging Face tokenizer with an EOS token.
        text_field: field of json/jsonl/parquet/Hub rows holding the text.
        documents: ``split`` or ``file``.
        max_tokens: stop after this many tokens (None: all).
        num_proc: tokenising processes.
        progress: show a progress bar (bytes of source read, tokens so far).
        overwrite: replace an existing ``folder``.

    Returns:
        The opened :class:`TokenStore`.

    Raises:
        MinicompressError: ``folder`` exists without ``overwrite``, a reading error of
            :func:`minicompress.data.sources.read_documents`, no EOS token, or no tokens at all.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not overwrite:
        raise MinicompressError(f"token store {folder} already exists; delete it or pass --overwrite to rebuild it")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MinicompressError("tokenizer: has no eos_token; cannot join documents")
    fingerprint = source_fingerprint(source)
    dtype = _token_dtype(tokenizer)
    total_bytes = sum(f[1] for f in fingerprint["files"]) if fingerprint["kind"] == "files" else None
    start = time.perf_counter()
    total = num_docs = 0
    batches = _batches(_iter_documents(source, text_field, documents),
                       max_tokens * 16 if max_tokens is not None else None)
    with contextlib.ExitStack() as stack:
        bar = (stack.enter_context(progress_bar("tokenising", total_bytes, unit="B"))
               if progress else _NoBar())
        tmp = stack.enter_context(atomic_folder(folder, overwrite=True))
        with open(tmp / TOKENS_FILE, "wb") as out:
            encoded = _encoded(batches, tokenizer, eos, dtype.str, num_proc)
            try:
                for ids, ends, nbytes in encoded:
                    if max_tokens is not None and total + len(ids) >= max_tokens:
                        keep = max_tokens - total  # > 0: the loop stops once total reaches max_tokens
                        starts = np.concatenate(([0], ends[:-1]))
                        ids, num_docs = ids[:keep], num_docs + int(np.searchsorted(starts, keep, "left"))
                    else:
                        num_docs += len(ends)
                    out.write(memoryview(ids))
                    total += len(ids)
                    bar.advance(nbytes, description=f"tokenising ({total:,} tok)")
                    if max_tokens is not None and total >= max_tokens:
                        break
            finally:
                encoded.close()  # stops a pool early
        if total == 0:
            raise MinicompressError("--data: tokenisation produced no tokens")
        size = total * dtype.itemsize
        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "num_tokens": total,
                "num_documents": num_docs, "bytes": size,
                "head_tail_sha256": _head_tail_sha256(tmp / TOKENS_FILE, size),
                "source": source, "source_fingerprint": _digest(fingerprint),
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "tokenizer_class": type(tokenizer).__name__,
                "eos_token_id": eos, "vocab_size": len(tokenizer), "text_field": text_field,
                "documents": documents, "max_tokens": max_tokens,
                "build_seconds": round(time.perf_counter() - start, 3), "num_proc": num_proc,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(tmp / META_FILE, meta)
    return open_token_store(folder)


# ----------------------------------------------------------------------------------------
# a cache shared by ranks


def _is_builder() -> bool:
    """Local rank 0 (or no torchrun) builds; a lock file keeps it to one builder per file system."""
    rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))
    try:
        return int(rank) == 0
    except ValueError:
        return True


def _try_lock(lock: Path) -> bool:
    """Create ``lock`` exclusively (True), or False if a live process holds it; a lock left by a
    dead process of this host is removed."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                return False  # being written, or gone: look again later
            if holder.get("host") != socket.gethostname() or _alive(int(holder.get("pid", 0))):
                return False
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
        return True
    return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def get_or_build(cache_root: str | Path, source: str, tokenizer, *, text_field: str = "text",
                 documents: str = "split", max_tokens: int | None = None, num_proc: int = 1,
                 progress: bool = True, timeout: float | None = None) -> TokenStore:
    """The token store of ``source`` under ``cache_root / store_key(...)``, built if missing.

    A valid store is opened (nothing is re-tokenised); a missing or damaged one is built.
    Under torchrun the local rank 0 (``LOCAL_RANK``, else ``RANK``) builds, holding
    ``cache_root/.<key>.lock``, while the other ranks poll for ``store.json`` (the store
    appears whole, by a rename); no ``torch.distributed`` call is made.

    Args:
        cache_root: folder of cached stores.
        source, tokenizer, text_field, documents, max_tokens: as :func:`build_token_store`.
        num_proc: tokenising processes of a build.
        progress: progress bar while building.
        timeout: seconds a waiting rank waits (default ``$MINICOMPRESS_STORE_TIMEOUT`` or 4 h).

    Returns:
        The opened :class:`TokenStore`.

    Raises:
        MinicompressError: a build error; or, on a waiting rank, the builder failed or the
            timeout passed (the message names the store and its lock file).
    """
    key = store_key(source, tokenizer, text_field=text_field, documents=documents, max_tokens=max_tokens)
    root = Path(cache_root).expanduser()
    folder, lock = root / key, root / f".{key}.lock"
    if timeout is None:
        timeout = float(os.environ.get("MINICOMPRESS_STORE_TIMEOUT", WAIT_SECONDS))
    builder = _is_builder()
    deadline = time.monotonic() + timeout
    saw_lock = False
    while True:
        locked = lock.exists()  # looked at before the store: a builder renames it into place, then unlocks
        if (folder / META_FILE).is_file():
            with contextlib.suppress(MinicompressError):
                return open_token_store(folder, tokenizer)
        if builder:
            root.mkdir(parents=True, exist_ok=True)
            if _try_lock(lock):
                try:
                    if (folder / META_FILE).is_file():  # another builder finished meanwhile
                        with contextlib.suppress(MinicompressError):
                            return open_token_store(folder, tokenizer)
                    return build_token_store(folder, source, tokenizer, text_field=text_field, documents=documents,
                                             max_tokens=max_tokens, num_proc=num_proc, progress=progress,
                                             overwrite=True)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
        if saw_lock and not locked and not builder:  # a builder takes over instead
            raise MinicompressError(f"token store {folder}: the rank building it stopped without finishing; "
                                    "see its error")
        saw_lock = saw_lock or locked
        if time.monotonic() > deadline:
            raise MinicompressError(f"token store {folder}: waited {timeout:.0f} s for another rank to build it "
                                    f"(lock {lock}); build it first, or delete a stale lock "
                                    "(MINICOMPRESS_STORE_TIMEOUT sets the wait)")
        time.sleep(POLL_SECONDS)
