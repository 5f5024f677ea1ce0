"""Tests for minicompress.data.token_store: identity with rows.load_sequences, caching, integrity."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_tiny_tokenizer

from minicompress.data import rows, sources
from minicompress.data import token_store as ts
from minicompress.config import DataConfig
from minicompress.errors import MinicompressError


@pytest.fixture(params=[False, True], ids=["no-bos", "bos"])
def tok(request, tiny_tokenizer, tiny_bos_tokenizer):
    return tiny_bos_tokenizer if request.param else tiny_tokenizer


def build(tmp_path, source, tokenizer, name="store", **kwargs):
    return ts.build_token_store(tmp_path / name, str(source), tokenizer, progress=False, **kwargs)


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg
    return msg


# ---------------------------------------------------------------- identity with load_sequences


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet", "folder"])
def test_sequences_equal_load_sequences(tmp_path, corpus_files, tok, kind):
    store = build(tmp_path, corpus_files[kind], tok)
    bos = sources.bos_token_id(tok)
    stream = sources.tokenize_documents(sources.read_documents(str(corpus_files[kind])), tok)
    assert np.array_equal(np.asarray(store.tokens, dtype=np.int64), stream.numpy())
    assert store.meta["num_documents"] == len(corpus_files["docs"])
    for seq_len, seed in ((16, 0), (23, 7)):
        ref = rows.load_sequences(DataConfig(source=str(corpus_files[kind]), seq_len=seq_len, seed=seed, token_store=False), tok)
        view = store.sequences(seq_len, bos, shuffle=True, seed=seed)
        assert view.shape == ref.shape and len(view) == ref.shape[0]
        assert torch.equal(view.tensor(), ref)
        assert torch.equal(view[:].tensor(), ref)
        assert view[0].dtype == torch.int64
    ordered = rows.load_sequences(DataConfig(source=str(corpus_files[kind]), seq_len=16, shuffle=False, token_store=False), tok)
    assert torch.equal(store.sequences(16, bos, shuffle=False).tensor(), ordered)


def test_max_tokens_and_meta(tmp_path, corpus_files, tiny_tokenizer):
    src = str(corpus_files["txt"])
    store = build(tmp_path, src, tiny_tokenizer, max_tokens=150)
    ref = sources.load_token_stream(DataConfig(source=src, max_tokens=150), tiny_tokenizer)
    assert store.num_tokens == 150 and np.array_equal(np.asarray(store.tokens, dtype=np.int64), ref.numpy())
    # documents that contributed at least one token
    eos_before = int((ref[:-1] == tiny_tokenizer.eos_token_id).sum())
    assert store.meta["num_documents"] == eos_before + 1
    seqs = rows.load_sequences(DataConfig(source=src, seq_len=16, max_tokens=150, seed=3, token_store=False), tiny_tokenizer)
    assert torch.equal(store.sequences(16, seed=3).tensor(), seqs)
    meta = store.meta
    assert meta["format"] == "minicompress-token-store" and meta["version"] == ts.VERSION
    assert meta["dtype"] == "uint16" and store.tokens.dtype == np.uint16
    assert meta["bytes"] == 300 == (tmp_path / "store" / "tokens.bin").stat().st_size
    assert meta["max_tokens"] == 150 and meta["text_field"] == "text" and meta["documents"] == "split"
    assert not store.tokens.flags.writeable


def test_documents_file_mode(tmp_path, corpus_files, tiny_tokenizer):
    src = str(corpus_files["folder"])
    store = build(tmp_path, src, tiny_tokenizer, documents="file")
    ref = rows.load_sequences(DataConfig(source=src, seq_len=16, documents="file", seed=1, token_store=False), tiny_tokenizer)
    assert store.meta["num_documents"] == 2
    assert torch.equal(store.sequences(16, seed=1).tensor(), ref)


def test_big_files_are_read_in_blocks(tmp_path, corpus_files, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(ts, "BLOCK_BYTES", 97)  # every .txt / .parquet is "big"
    monkeypatch.setattr(ts, "BATCH_DOCS", 2)
    for kind in ("txt", "parquet", "folder"):
        store = build(tmp_path, corpus_files[kind], tiny_tokenizer, name=kind)
        ref = sources.tokenize_documents(sources.read_documents(str(corpus_files[kind])), tiny_tokenizer)
        assert np.array_equal(np.asarray(store.tokens, dtype=np.int64), ref.numpy()), kind


TRICKY = ("first doc\r\nline two\n  \t\nsecond é€😀 doc\n\n\n\nthird\n \n \n\nfourth\n\n"
          "fifth\t\n\r\n\n\nsixth ends here\n")


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 13, 64, 1000])
def test_block_reader_splits_like_read_documents(tmp_path, block):
    path = tmp_path / "t.txt"
    path.write_bytes(TRICKY.encode())
    streamed = [d for docs, _ in ts._iter_documents(str(path), block_bytes=block) for d in docs]
    assert streamed == sources.read_documents(str(path))
    assert sum(n for _, n in ts._iter_documents(str(path), block_bytes=block)) == path.stat().st_size


@pytest.mark.parametrize("raw", [b"good text\n\n\xff\xfe more", "abc\n\né".encode()[:-1], b"ok\x00binary"])
def test_block_reader_errors_like_read_documents(tmp_path, raw):
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    with pytest.raises(MinicompressError) as whole:
        sources.read_documents(str(path))
    with pytest.raises(MinicompressError) as streamed:
        list(ts._iter_documents(str(path), block_bytes=3))
    assert str(streamed.value) == str(whole.value)


# ---------------------------------------------------------------- the view


def naive_view(stream: torch.Tensor, seq_len: int, bos: int | None, seed: int) -> torch.Tensor:
    body = seq_len - (bos is not None)
    rows = [stream[i * body:(i + 1) * body].tolist() for i in range(stream.numel() // body)]
    rows = [([bos] if bos is not None else []) + r for r in rows]
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.tensor([rows[p] for p in perm])


def test_view_indexing(tmp_path, corpus_files, tiny_bos_tokenizer):
    store = build(tmp_path, corpus_files["txt"], tiny_bos_tokenizer)
    view = store.sequences(12, 2, seed=4)
    ref = naive_view(torch.from_numpy(np.asarray(store.tokens, dtype=np.int64)), 12, 2, 4)
    n = len(ref)
    assert view.shape == torch.Size([n, 12]) and view.dtype == torch.int64
    assert torch.equal(view[3], ref[3]) and torch.equal(view[-1], ref[-1]) and torch.equal(view[np.int64(2)], ref[2])
    assert torch.equal(view[torch.tensor(5)], ref[5])
    idx = torch.tensor([7, 0, 7, n - 1, -2])
    assert torch.equal(view[idx], ref[idx]) and torch.equal(view[idx.tolist()], ref[idx])
    assert view[torch.tensor([], dtype=torch.long)].shape == (0, 12)
    head, tail = view[:5], view[5:]
    assert isinstance(head, ts.SequenceView) and len(head) + len(tail) == n
    assert torch.equal(tail[torch.tensor([0, 2])], ref[5:][torch.tensor([0, 2])])
    assert torch.equal(view[3:-2:3][1:][::2].tensor(), ref[3:-2:3][1:][::2])
    assert torch.equal(view[::-1][2:9:2].tensor(), ref.flip(0)[2:9:2])
    assert torch.equal(torch.stack(list(view[:4])), ref[:4])
    ordered = store.sequences(12, 2, shuffle=False)
    packed = ref[torch.argsort(torch.randperm(n, generator=torch.Generator().manual_seed(4)))]
    assert torch.equal(ordered[10:2:-3].tensor(), packed[torch.arange(10, 2, -3)])
    assert torch.equal(ordered[5:].tensor(), packed[5:]) and torch.equal(ordered[7], packed[7])
    with pytest.raises(IndexError):
        view[n]
    with pytest.raises(IndexError):
        view[torch.tensor([0, -n - 1])]
    with pytest.raises(TypeError):
        view[torch.ones(n, dtype=torch.bool)]
    with pytest.raises(MinicompressError, match="fewer than one sequence"):
        store.sequences(store.num_tokens + 2, 2)


# ---------------------------------------------------------------- keys, cache and integrity


def test_store_key_changes_with_source_tokenizer_and_options(tmp_path, tiny_tokenizer, tiny_bos_tokenizer):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta\n\ngamma")
    (folder / "skip.bin").write_bytes(b"\x00")
    key = ts.store_key(str(folder), tiny_tokenizer)
    assert len(key) == 32 and key == ts.store_key(str(folder), make_tiny_tokenizer())  # another object, same ids
    (folder / "skip.bin").write_bytes(b"\x00\x01")  # not a text file: not part of the source
    assert ts.store_key(str(folder), tiny_tokenizer) == key
    assert ts.store_key(str(folder), tiny_bos_tokenizer) != key
    assert ts.store_key(str(folder), tiny_tokenizer, max_tokens=10) != key
    assert ts.store_key(str(folder), tiny_tokenizer, text_field="body") != key
    assert ts.store_key(str(folder), tiny_tokenizer, documents="file") != key
    (folder / "a.txt").write_text("alpha beta\n\ngamma delta")
    assert ts.store_key(str(folder), tiny_tokenizer) != key
    st = (folder / "a.txt").stat()
    os.utime(folder / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same size, newer
    changed = ts.store_key(str(folder), tiny_tokenizer)
    (folder / "b.jsonl").write_text('{"text": "x"}\n')
    assert ts.store_key(str(folder), tiny_tokenizer) != changed
    assert ts.source_fingerprint("user/dataset@train") == {"kind": "hub", "spec": "user/dataset@train"}


def test_tokenizer_fingerprint_ignores_truncation_and_padding(tiny_tokenizer):
    before = ts.tokenizer_fingerprint(tiny_tokenizer)
    tiny_tokenizer.backend_tokenizer.enable_truncation(8)
    tiny_tokenizer.backend_tokenizer.enable_padding(length=8)
    assert ts.tokenizer_fingerprint(tiny_tokenizer) == before
    assert tiny_tokenizer.backend_tokenizer.truncation is not None  # the tokenizer itself is untouched
    tiny_tokenizer.add_tokens(["zzzz"])
    assert ts.tokenizer_fingerprint(tiny_tokenizer) != before


def test_get_or_build_reuses_the_store(tmp_path, corpus_files, tiny_tokenizer, monkeypatch):
    cache = tmp_path / "cache"
    first = ts.get_or_build(cache, str(corpus_files["jsonl"]), tiny_tokenizer, progress=False)
    expected = np.array(first.tokens)
    key = ts.store_key(str(corpus_files["jsonl"]), tiny_tokenizer)
    assert first.folder == cache / key and sorted(p.name for p in cache.iterdir()) == [key]

    def no_tokenising(*args, **kwargs):
        raise AssertionError("re-tokenised")

    monkeypatch.setattr(ts, "_encode", no_tokenising)
    second = ts.get_or_build(cache, str(corpus_files["jsonl"]), tiny_tokenizer, progress=False)
    assert np.array_equal(second.tokens, expected) and second.meta == first.meta
    del first, second  # their maps would see the damage below
    monkeypatch.undo()
    # a damaged store is rebuilt
    tokens = cache / key / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    third = ts.get_or_build(cache, str(corpus_files["jsonl"]), tiny_tokenizer, progress=False)
    assert np.array_equal(third.tokens, expected)
    assert sorted(p.name for p in cache.iterdir()) == [key]


def test_damaged_stores_give_one_line_errors(tmp_path, corpus_files, tiny_tokenizer, tiny_bos_tokenizer):
    store = build(tmp_path, corpus_files["txt"], tiny_tokenizer)
    folder = store.folder
    tokens = folder / "tokens.bin"
    raw = tokens.read_bytes()
    ts.open_token_store(folder, tiny_tokenizer)
    with pytest.raises(MinicompressError) as err:
        ts.open_token_store(folder, tiny_bos_tokenizer)
    one_line_error(err, str(folder), "built with another tokenizer")

    tokens.write_bytes(raw[:-2])
    with pytest.raises(MinicompressError) as err:
        ts.open_token_store(folder)
    one_line_error(err, str(folder), "damaged", "--overwrite")

    tokens.write_bytes(raw[:5] + bytes([raw[5] ^ 1]) + raw[6:])
    with pytest.raises(MinicompressError) as err:
        ts.open_token_store(folder)
    one_line_error(err, str(folder), "checksum", "--overwrite")

    tokens.write_bytes(raw)
    meta = json.loads((folder / "store.json").read_text())
    (folder / "store.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(MinicompressError) as err:
        ts.open_token_store(folder)
    one_line_error(err, str(folder), "version")
    (folder / "store.json").write_text("{not json")
    with pytest.raises(MinicompressError) as err:
        ts.open_token_store(folder)
    one_line_error(err, str(folder), "damaged")
    with pytest.raises(MinicompressError) as err:
        ts.open_token_store(tmp_path / "nowhere")
    one_line_error(err, "nowhere", "store.json")
    with pytest.raises(MinicompressError) as err:
        build(tmp_path, corpus_files["txt"], tiny_tokenizer)
    one_line_error(err, "already exists", "--overwrite")


def test_failed_build_leaves_nothing(tmp_path, corpus_files, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(ts, "BATCH_DOCS", 1)
    calls = {"n": 0}
    encode = ts._encode

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return encode(*args)

    monkeypatch.setattr(ts, "_encode", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        ts.build_token_store(out / "store", str(corpus_files["txt"]), tiny_tokenizer, progress=False)
    assert list(out.iterdir()) == []
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(MinicompressError, match="contains no text"):
        ts.build_token_store(out / "store", str(empty), tiny_tokenizer, progress=False)
    assert list(out.iterdir()) == []


def test_num_proc_pool_keeps_order(tmp_path, corpus_files, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(ts, "BATCH_DOCS", 1)  # 6 batches over 2 workers
    store = build(tmp_path, corpus_files["folder"], tiny_tokenizer, num_proc=2, max_tokens=400)
    ref = sources.load_token_stream(DataConfig(source=str(corpus_files["folder"]), max_tokens=400), tiny_tokenizer)
    assert np.array_equal(np.asarray(store.tokens, dtype=np.int64), ref.numpy())


# ---------------------------------------------------------------- ranks waiting for the builder


def test_waiting_rank(tmp_path, corpus_files, tiny_tokenizer, monkeypatch):
    src = str(corpus_files["txt"])
    cache = tmp_path / "cache"
    key = ts.store_key(src, tiny_tokenizer)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(ts, "POLL_SECONDS", 0.02)
    with pytest.raises(MinicompressError) as err:
        ts.get_or_build(cache, src, tiny_tokenizer, timeout=0.1)
    one_line_error(err, "waited", "lock")
    assert not cache.exists()  # a waiting rank writes nothing

    def rank0():
        time.sleep(0.1)
        ts.build_token_store(cache / key, src, tiny_tokenizer, progress=False)

    thread = threading.Thread(target=rank0)
    thread.start()
    store = ts.get_or_build(cache, src, tiny_tokenizer, timeout=30)
    thread.join()
    assert store.folder == cache / key and store.num_tokens > 0


def test_waiting_rank_sees_the_builder_fail(tmp_path, corpus_files, tiny_tokenizer, monkeypatch):
    src = str(corpus_files["txt"])
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / f".{ts.store_key(src, tiny_tokenizer)}.lock"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(ts, "POLL_SECONDS", 0.02)
    threading.Timer(0.1, lock.unlink).start()
    with pytest.raises(MinicompressError) as err:
        ts.get_or_build(cache, src, tiny_tokenizer, timeout=30)
    one_line_error(err, "stopped without finishing")


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, corpus_files, tiny_tokenizer, monkeypatch):
    import socket
    import subprocess
    import sys

    src = str(corpus_files["txt"])
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = cache / f".{ts.store_key(src, tiny_tokenizer)}.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    store = ts.get_or_build(cache, src, tiny_tokenizer, progress=False, timeout=5)
    assert store.num_tokens > 0 and not lock.exists()
