"""Tests for minicompress.data: readers, tokenisation, packing, shuffling, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from minicompress.config import DataConfig
from minicompress.data.rows import as_tensor, iterate_batches, load_sequences, sample_calibration
from minicompress.data.sources import bos_token_id, load_token_stream, pack, read_documents, tokenize_documents
from minicompress.errors import MinicompressError


def _rows(config, tokenizer):
    """``load_sequences`` as a tensor (the default token store returns a lazy view)."""
    return as_tensor(load_sequences(config, tokenizer))


@pytest.mark.parametrize("bos", [False, True])
def test_token_store_and_in_memory_paths_give_the_same_rows(corpus_files, tiny_tokenizer, tiny_bos_tokenizer, bos):
    tok = tiny_bos_tokenizer if bos else tiny_tokenizer
    for seed in (0, 3):
        cfg = DataConfig(source=str(corpus_files["folder"]), seq_len=12, seed=seed)
        stored = load_sequences(cfg, tok)
        assert not isinstance(stored, torch.Tensor)  # the default: a memory-mapped view
        memory = load_sequences(dataclasses.replace(cfg, token_store=False), tok)
        assert torch.equal(as_tensor(stored), memory)
        assert torch.equal(stored[torch.tensor([5, 1])], memory[torch.tensor([5, 1])])



def naive_stream(docs, tokenizer):
    ids = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


# ---------------------------------------------------------------- readers


def test_txt_is_split_on_blank_lines(corpus_files):
    assert read_documents(str(corpus_files["txt"])) == corpus_files["docs"]
    assert len(corpus_files["docs"]) == 6


def test_txt_blank_lines_with_spaces_and_crlf(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nline two\n  \t\nsecond\n\n\n\nthird\n")
    assert read_documents(str(path)) == ["first doc\nline two", "second", "third"]


def test_txt_file_mode_keeps_one_document(corpus_files):
    docs = read_documents(str(corpus_files["txt"]), documents="file")
    assert docs == ["\n\n".join(corpus_files["docs"])]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "folder"])
def test_structured_sources(corpus_files, kind):
    assert read_documents(str(corpus_files[kind])) == corpus_files["docs"]


def test_custom_text_field_and_string_lists(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"content": "alpha beta"}\n\n{"content": "gamma"}\n')
    assert read_documents(str(jsonl), text_field="content") == ["alpha beta", "gamma"]
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["one", "two", ""]))
    assert read_documents(str(strings)) == ["one", "two"]
    nested = tmp_path / "n.json"
    nested.write_text(json.dumps({"text": ["x y", "z"]}))
    assert read_documents(str(nested)) == ["x y", "z"]


# ---------------------------------------------------------------- tokenising and packing


def test_documents_are_joined_with_eos(corpus_files, tiny_tokenizer):
    docs = corpus_files["docs"]
    stream = tokenize_documents(docs, tiny_tokenizer)
    assert torch.equal(stream, naive_stream(docs, tiny_tokenizer))
    assert (stream == tiny_tokenizer.eos_token_id).sum() == len(docs)
    assert stream.dtype == torch.long


def test_max_tokens_caps_the_stream(corpus_files, tiny_tokenizer):
    full = tokenize_documents(corpus_files["docs"], tiny_tokenizer)
    capped = tokenize_documents(corpus_files["docs"], tiny_tokenizer, max_tokens=50, batch_docs=1)
    assert capped.numel() == 50 and torch.equal(capped, full[:50])
    cfg = DataConfig(source=str(corpus_files["txt"]), max_tokens=37)
    assert load_token_stream(cfg, tiny_tokenizer).numel() == 37


def test_pack_without_bos(tiny_tokenizer):
    stream = torch.arange(4, 4 + 50)
    seqs = pack(stream, 16)
    assert seqs.shape == (3, 16)
    assert torch.equal(seqs.flatten(), stream[:48])


def test_pack_with_bos():
    stream = torch.arange(4, 4 + 50)
    seqs = pack(stream, 16, bos_token_id=2)
    assert seqs.shape == (3, 16)
    assert torch.all(seqs[:, 0] == 2)
    assert torch.equal(seqs[:, 1:].flatten(), stream[:45])


def test_pack_too_short_names_the_flag():
    with pytest.raises(MinicompressError, match="^--data: only 5 tokens"):
        pack(torch.arange(5), 16)


def test_bos_detection(tiny_tokenizer, tiny_bos_tokenizer):
    assert bos_token_id(tiny_tokenizer) is None
    assert bos_token_id(tiny_bos_tokenizer) == tiny_bos_tokenizer.bos_token_id == 2


def test_load_sequences_prepends_bos_for_bos_tokenizers(corpus_files, tiny_bos_tokenizer):
    cfg = DataConfig(source=str(corpus_files["txt"]), seq_len=16, shuffle=False)
    seqs = _rows(cfg, tiny_bos_tokenizer)
    assert torch.all(seqs[:, 0] == 2)
    stream = naive_stream(corpus_files["docs"], tiny_bos_tokenizer)
    assert torch.equal(seqs[:, 1:].flatten(), stream[: seqs.shape[0] * 15])


def test_shuffle_is_deterministic(text_corpus, tiny_tokenizer):
    base = dict(source=str(text_corpus), seq_len=8)
    ordered = _rows(DataConfig(**base, shuffle=False), tiny_tokenizer)
    a = _rows(DataConfig(**base, seed=0), tiny_tokenizer)
    b = _rows(DataConfig(**base, seed=0), tiny_tokenizer)
    c = _rows(DataConfig(**base, seed=1), tiny_tokenizer)
    assert ordered.shape[0] >= 20
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, ordered)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(a) == key(ordered) == key(c)


def test_sample_calibration(text_corpus, tiny_tokenizer):
    seqs = _rows(DataConfig(source=str(text_corpus), seq_len=8, shuffle=False), tiny_tokenizer)
    sample = sample_calibration(seqs, 5, seed=3)
    assert sample.shape == (5, 8)
    assert torch.equal(sample, sample_calibration(seqs, 5, seed=3))
    assert not torch.equal(sample, sample_calibration(seqs, 5, seed=4))
    rows = [tuple(r) for r in seqs.tolist()]
    positions = [rows.index(tuple(r)) for r in sample.tolist()]
    assert positions == sorted(positions)  # drawn rows keep their order
    assert torch.equal(sample_calibration(seqs, 10_000), seqs)


def test_iterate_batches():
    seqs = torch.arange(70).view(7, 10)
    batches = list(iterate_batches(seqs, 3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat(batches), seqs)


# ---------------------------------------------------------------- errors


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(MinicompressError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert _error(read_documents, str(tmp_path / "missing.txt")).startswith("--data: no such file or folder")


def test_empty_and_blank_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    assert "contains no text" in _error(read_documents, str(tmp_path / "empty.txt"))
    assert "contains no text" in _error(read_documents, str(tmp_path / "blank.txt"))


def test_binary_file(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02" * 10)
    assert _error(read_documents, str(tmp_path / "bin.txt")).startswith("--data:")
    assert "binary" in _error(read_documents, str(tmp_path / "bin.txt"))


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    message = _error(read_documents, str(tmp_path / "latin.txt"))
    assert message.startswith("--data:") and "not valid UTF-8" in message


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_missing_text_field_names_the_flag(corpus_files, kind):
    message = _error(read_documents, str(corpus_files[kind]), text_field="body")
    assert message.startswith("--text-field:") and "'body'" in message


def test_bad_json_and_suffix(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    assert "line 2 is not valid JSON" in _error(read_documents, str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.json").write_text("{")
    assert "is not valid JSON" in _error(read_documents, str(tmp_path / "bad.json"))
    (tmp_path / "obj.json").write_text('{"a": 1}')
    assert "list of records" in _error(read_documents, str(tmp_path / "obj.json"))
    (tmp_path / "x.csv").write_text("a,b\n")
    assert "unsupported suffix '.csv'" in _error(read_documents, str(tmp_path / "x.csv"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    assert "not a readable parquet" in _error(read_documents, str(tmp_path / "junk.parquet"))


def test_folder_without_text_files(tmp_path):
    (tmp_path / "only.csv").write_text("a,b\n")
    assert _error(read_documents, str(tmp_path)).startswith("--data: folder")


def test_tokenizer_without_eos(tiny_tokenizer):
    tiny_tokenizer.eos_token = None
    assert _error(tokenize_documents, ["a b"], tiny_tokenizer).startswith("tokenizer: has no eos_token")


def test_hub_dataset_offline_gives_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    except ImportError:
        pass
    monkeypatch.chdir(tmp_path)
    message = _error(read_documents, "minicompress-no-such-dataset-xyz")
    assert message.startswith("--data 'minicompress-no-such-dataset-xyz':")


def test_a_mixture_draws_by_weight_holds_out_every_source_and_counts_its_tokens(tmp_path, tiny_tokenizer):
    from conftest import corpus_text
    from minicompress.config import SourceConfig
    from minicompress.data.rows import load_training_data
    from minicompress.distillation.loop import batch_positions

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(corpus_text(40, seed=1))
    b.write_text(corpus_text(40, seed=2))
    cfg = DataConfig(seq_len=8, mixture=(SourceConfig(str(a), 0.75), SourceConfig(str(b), 0.25)))
    data = load_training_data(cfg, tiny_tokenizer, eval_tokens=16, seed=0)
    rows_a = _rows(DataConfig(source=str(a), seq_len=8), tiny_tokenizer)
    rows_b = _rows(DataConfig(source=str(b), seq_len=8), tiny_tokenizer)
    assert torch.equal(data.eval_ids, torch.cat([rows_a[:2], rows_b[:2]]))  # each source's first 2 rows
    train_a, train_b = {tuple(r) for r in rows_a[2:].tolist()}, {tuple(r) for r in rows_b[2:].tolist()}
    drawn = torch.cat([data.rows(batch_positions(step, 0, micro_batch_size=4, accum_steps=1))
                       for step in range(50)])  # 200 positions = 2 blocks of 100
    from_a = sum(tuple(r) in train_a for r in drawn.tolist())
    from_b = sum(tuple(r) in train_b for r in drawn.tolist())
    assert (from_a, from_b) == (150, 50)
    assert data.tokens_per_source(200, 8) == {str(a): 150 * 8, str(b): 50 * 8}
    # a pure function of the position: the same rows however the positions are asked for
    assert torch.equal(drawn[37:41], data.rows(torch.arange(37, 41)))
    # which source each row came from (per-source teachers), held-out rows included
    sources = data.row_sources(torch.arange(200))
    assert [tuple(r) in (train_a if s == 0 else train_b) for r, s in zip(drawn.tolist(), sources.tolist())] == \
        [True] * 200
    assert torch.equal(data.row_sources(torch.arange(37, 41)), sources[37:41])
    assert data.eval_sources.tolist() == [0, 0, 1, 1]


def test_a_mixture_weight_must_be_positive_and_a_source_must_exist(tmp_path, tiny_tokenizer):
    from minicompress.config import build_config, RecoverConfig
    from minicompress.data.rows import load_training_data
    from minicompress.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.mixture\[1\].weight: must be a number > 0"):
        build_config(RecoverConfig, overrides=["teacher.source=x", f"data.mixture={tmp_path}=1,{tmp_path}=0"])
    cfg = build_config(RecoverConfig, overrides=["teacher.source=x", f"data.mixture={tmp_path / 'nope.txt'}=1"])
    with pytest.raises(MinicompressError, match="no such file"):
        load_training_data(cfg.data, tiny_tokenizer, eval_tokens=0)


def _two_sources(tmp_path):
    from conftest import corpus_text

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(corpus_text(40, seed=1))
    b.write_text(corpus_text(40, seed=2))
    return a, b


def test_calibration_from_a_mixture_draws_each_source_by_weight(tmp_path, tiny_tokenizer):
    from minicompress.config import SourceConfig
    from minicompress.data.rows import load_calibration

    a, b = _two_sources(tmp_path)
    one = DataConfig(source=str(a), seq_len=8, seed=3)  # one source: exactly the draw scoring always made
    assert torch.equal(load_calibration(one, tiny_tokenizer, 10),
                       as_tensor(sample_calibration(load_sequences(one, tiny_tokenizer), 10, 3)))
    cfg = DataConfig(seq_len=8, seed=3, mixture=(SourceConfig(str(a), 0.7), SourceConfig(str(b), 0.3)))
    rows = load_calibration(cfg, tiny_tokenizer, 10)
    rows_a = {tuple(r) for r in _rows(DataConfig(source=str(a), seq_len=8), tiny_tokenizer).tolist()}
    rows_b = {tuple(r) for r in _rows(DataConfig(source=str(b), seq_len=8), tiny_tokenizer).tolist()}
    got = [tuple(r) for r in rows.tolist()]
    assert len(set(got)) == 10 and sum(r in rows_a for r in got) == 7 and sum(r in rows_b for r in got) == 3
    assert any(r in rows_b for r in got[:5])  # shuffled together: the first rows are not all from a
    assert torch.equal(rows, load_calibration(cfg, tiny_tokenizer, 10))  # deterministic
    assert cfg.describe() == f"{a}=0.7,{b}=0.3" and one.describe() == str(a)


def test_a_teacher_cache_of_a_mixture_holds_the_mixtures_stream(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model
    from minicompress.config import ModelConfig, SourceConfig, TeacherCacheConfig
    from minicompress.data.rows import load_training_data
    from minicompress.recipes.teacher_cache import write_teacher_cache
    from minicompress.distillation.teacher_cache import TeacherCache

    a, b = _two_sources(tmp_path)
    cfg = DataConfig(seq_len=8, seed=0, mixture=(SourceConfig(str(a), 3), SourceConfig(str(b), 1)))
    out = tmp_path / "cache"
    write_teacher_cache(TeacherCacheConfig(teacher=ModelConfig(source="in-memory"), data=cfg, tokens=40 * 8,
                                           output=str(out), kind="sampled", samples=4),
                        teacher=make_tiny_model("llama"), tokenizer=tiny_tokenizer)
    cache = TeacherCache(out)
    stream = load_training_data(cfg, tiny_tokenizer, 0, seed=0).rows(torch.arange(40))
    assert torch.equal(cache.input_ids.long(), stream)
    index = json.loads((out / "teacher_cache.json").read_text())
    assert index["sources"] == {str(a): 30 * 8, str(b): 10 * 8}
