"""``benchmarks/serve_llamacpp.py``'s pure helpers: the llama-perplexity flags that score
``minicompress eval``'s targets, and the parsers of llama.cpp's tool output (no build needed)."""

from __future__ import annotations

import pytest
import torch

from minicompress.evaluation.perplexity import eval_windows


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    import sys
    from pathlib import Path

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        import serve_llamacpp
    finally:
        sys.path.remove(benchmarks)
    return serve_llamacpp


def llama_strided_targets(num_tokens: int, ctx_size: int, batch_size: int, ppl_stride: int, chunks: int):
    """A transcription of llama.cpp's strided perplexity (tools/perplexity/perplexity.cpp:
    ``main`` widens the context, ``perplexity_v2`` scores): ``[(chunk_start, context_len, targets)]``."""
    n_parallel = max(1, batch_size // ctx_size)  # main(): one sequence per batch of contexts
    assert n_parallel == 1, "more than one sequence changes the context size"
    n_ctx = n_parallel * ctx_size + ppl_stride // 2
    n_chunk_max = (num_tokens - n_ctx + ppl_stride - 1) // ppl_stride
    out = []
    for i in range(min(chunks, n_chunk_max)):
        start = i * ppl_stride
        targets = [start + j + 1 for j in range(n_ctx - ppl_stride - 1, n_ctx - 1)]
        out.append((start, n_ctx, targets))
    return out


def minicompress_targets(windows, starts):
    """``[(start, len, targets)]`` of eval windows: the trailing ``n_scored`` positions are targets."""
    return [(s, w.numel(), list(range(s + w.numel() - n, s + w.numel()))) for (w, n), s in zip(windows, starts)]


@pytest.mark.parametrize("seq_len", [512, 128, 7, 8])
def test_strided_flags_score_the_minicompress_stride_windows(serve, seq_len):
    flags = serve.strided_flags(seq_len)
    num_tokens = 20 * seq_len + 3
    stream = torch.arange(num_tokens)
    chunks = serve.strided_window_count(num_tokens, seq_len)
    windows = [(w, n) for w, n in eval_windows(stream, seq_len, seq_len - 1, None) if w.numel() == seq_len]
    assert len(windows) == chunks
    starts = [int(w[0]) for w, _ in windows]
    llama = llama_strided_targets(num_tokens, flags["ctx_size"], flags["batch_size"], flags["ppl_stride"], chunks)
    assert llama == minicompress_targets(windows, starts)
    # every target after the first token, once, in order
    scored = [t for _, _, targets in llama for t in targets]
    assert scored == list(range(1, scored[-1] + 1))
    # the number of windows llama.cpp can run on a longer text is not smaller
    assert len(llama_strided_targets(num_tokens + 1000, **flags, chunks=10**9)) >= chunks


def test_strided_window_count(serve):
    assert serve.strided_window_count(16384, 512) == 32
    assert serve.strided_window_count(511, 512) == 0
    assert serve.strided_window_count(512, 512) == 1
    assert serve.strided_window_count(1023, 512) == 2
    with pytest.raises(serve.ServeError, match="--seq-len"):
        serve.strided_flags(2)


def test_parse_perplexity_log_strided_and_default(serve):
    strided = ("perplexity_v2: computing over 3 chunks, n_ctx=512, batch_size=257, n_seq=1\n"
               "perplexity_v2: 0.52 seconds per pass - ETA 0.03 minutes\n"
               "[1]140.1234,[2]137.5000,[3]135.9812,\n\nllama_perf_context_print: load time = 1 ms\n")
    out = serve.parse_perplexity_log(strided)
    assert out == {"chunks": 3, "n_ctx": 512, "perplexity": 135.9812, "chunks_done": 3}
    default = ("perplexity: calculating perplexity over 2 chunks, n_ctx=512, batch_size=2048, n_seq=4\n"
               "[1]20.5,[2]21.25,\nFinal estimate: PPL = 21.2500 +/- 0.41000\n")
    out = serve.parse_perplexity_log(default)
    assert out["perplexity"] == 21.25 and out["stderr"] == 0.41
    with pytest.raises(serve.ServeError, match="no perplexity"):
        serve.parse_perplexity_log("main: error: failed to load model\n")


def test_parse_bench_json(serve):
    text = """[
  {
    "build_commit": "unknown",
    "model_filename": "model-q8_0.gguf",
    "n_threads": 2,
    "n_prompt": 512,
    "n_gen": 0,
    "avg_ts": 812.5,
    "stddev_ts": 3.25,
    "samples_ns": [ 1, 2 ],
    "samples_ts": [ 810.0, 815.0 ]
  },
  {
    "model_filename": "model-q8_0.gguf",
    "n_prompt": 0,
    "n_gen": 128,
    "avg_ts": 95.0,
    "stddev_ts": 0.5,
    "samples_ns": [ 1, 2 ],
    "samples_ts": [ 94.5, 95.5 ]
  }
]
"""
    out = serve.parse_bench_json(text)
    assert out == {"prefill": {"tokens": 512, "tokens_per_s": 812.5, "stddev": 3.25, "reps": 2},
                   "decode": {"tokens": 128, "tokens_per_s": 95.0, "stddev": 0.5, "reps": 2}}
    with pytest.raises(serve.ServeError, match="no JSON"):
        serve.parse_bench_json("error: failed to load model")


def test_parse_token_ids(serve):
    assert serve.parse_token_ids("load: 12 tokens\n[1, 2, 30]\n") == [1, 2, 30]
    assert serve.parse_token_ids("[]\n") == []
    with pytest.raises(serve.ServeError):
        serve.parse_token_ids("nothing")


def test_folder_key_follows_the_weights(serve, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a")
    key = serve.folder_key(tmp_path)
    assert serve.folder_key(tmp_path) == key and len(key) == 12
    (tmp_path / "notes.txt").write_text("not part of the model")
    assert serve.folder_key(tmp_path) == key
    (tmp_path / "model.safetensors").write_bytes(b"ab")
    assert serve.folder_key(tmp_path) != key


def test_compare_tokens(serve):
    assert serve.compare_tokens([5, 6, 7, 8], [5, 6, 7], 3) == {"same": True, "first_difference": None, "compared": 3}
    assert serve.compare_tokens([5, 9, 7], [5, 6, 7], 3) == {"same": False, "first_difference": 1, "compared": 3}
    # llama.cpp read fewer tokens than asked for
    assert serve.compare_tokens([5, 6], [5, 6, 7], 3) == {"same": False, "first_difference": 2, "compared": 2}


def test_speed_only_refuses_a_missing_record_in_one_line(serve, tmp_path, capsys):
    assert serve.main(["--speed-only", "--output", str(tmp_path / "none.json")]) == 2
    out = capsys.readouterr().out
    assert "error: --speed-only:" in out and "does not exist" in out and not (tmp_path / "none.json").exists()
