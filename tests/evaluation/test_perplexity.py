"""Tests for minicompress.evaluation.perplexity against naive Hugging Face reference loops."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_MODEL_TYPES, make_tiny_model
from minicompress.evaluation import perplexity as ev
from minicompress.evaluation.perplexity import eval_windows, evaluate_perplexity, measure_speed, parameter_summary


def random_stream(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- naive references


@torch.no_grad()
def naive_nonoverlapping_ppl(model, stream: torch.Tensor, seq_len: int, bos: int | None = None) -> float:
    """Cut the stream into full windows, plain ``model(ids).logits``, log_softmax, gather, mean, exp."""
    body = seq_len - (bos is not None)
    nlls = []
    for start in range(0, stream.numel() - body + 1, body):
        ids = stream[start:start + body]
        if bos is not None:
            ids = torch.cat([torch.tensor([bos]), ids])
        logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
        nlls.append(-logp[:-1].gather(-1, ids[1:, None]).squeeze(-1))
    return math.exp(torch.cat(nlls).mean().item())


@torch.no_grad()
def hf_guide_sliding_ppl(model, stream: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide loop (labels = -100 outside the new tokens): (ppl, scored tokens)."""
    total = stream.numel()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, total, stride):
        end = min(begin + max_length, total)
        trg_len = end - prev_end
        input_ids = stream[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = model(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())  # the model shifts labels left by one
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end = end
        if end == total:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@torch.no_grad()
def naive_kl_and_agreement(student, teacher, stream: torch.Tensor, seq_len: int) -> tuple[float, float]:
    """Mean over targets of KL(teacher || student) on full float64 softmaxes, and top-1 agreement."""
    kls, agree = [], []
    for start in range(0, stream.numel() - seq_len + 1, seq_len):
        ids = stream[start:start + seq_len][None]
        p_log = torch.log_softmax(teacher(ids).logits[0, :-1].double(), -1)
        q_log = torch.log_softmax(student(ids).logits[0, :-1].double(), -1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))
        agree.append((p_log.argmax(-1) == q_log.argmax(-1)).double())
    return torch.cat(kls).mean().item(), torch.cat(agree).mean().item()


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_nonoverlapping_perplexity_matches_naive(model_type):
    model = make_tiny_model(model_type)
    stream = random_stream(100)
    out = evaluate_perplexity(model, eval_windows(stream, 16), batch_size=4, show_progress=False)
    assert out["windows"] == 6 and out["tokens"] == 6 * 15
    assert out["perplexity"] == pytest.approx(naive_nonoverlapping_ppl(model, stream, 16), rel=1e-5)
    assert out["nll"] == pytest.approx(math.log(out["perplexity"]), rel=1e-9)
    assert out["tokens_per_s"] > 0


def test_nonoverlapping_perplexity_with_bos_matches_naive():
    model = make_tiny_model("gemma3_text")
    stream = random_stream(100, seed=1)
    windows = eval_windows(stream, 16, bos_token_id=2)
    out = evaluate_perplexity(model, windows, batch_size=2, show_progress=False)
    assert out["tokens"] == 6 * 15  # BOS is never a target; every body token is
    assert out["perplexity"] == pytest.approx(naive_nonoverlapping_ppl(model, stream, 16, bos=2), rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("stride", [5, 8, 16])
def test_strided_perplexity_matches_hf_guide(model_type, stride):
    model = make_tiny_model(model_type)
    stream = random_stream(77, seed=2)
    out = evaluate_perplexity(model, eval_windows(stream, 16, stride=stride), batch_size=3, show_progress=False)
    ppl, n_tokens = hf_guide_sliding_ppl(model, stream, 16, stride)
    assert out["tokens"] == n_tokens
    # with stride < seq_len every token after the first is scored; with stride == seq_len the first
    # token of each window has no context (as in the guide), but the ragged tail is kept
    assert n_tokens == (stream.numel() - 1 if stride < 16 else stream.numel() - math.ceil(stream.numel() / 16))
    assert out["perplexity"] == pytest.approx(ppl, rel=1e-5)


def test_batch_size_and_vocab_chunks_do_not_change_results(monkeypatch):
    model = make_tiny_model("qwen2")
    windows = eval_windows(random_stream(120, seed=3), 20, stride=7)
    reference = evaluate_perplexity(model, windows, batch_size=1, show_progress=False)
    monkeypatch.setattr(ev, "vocab_chunk_tokens", lambda vocab: 3)
    chunked = evaluate_perplexity(model, windows, batch_size=5, show_progress=False)
    assert chunked["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-6)
    assert chunked["tokens"] == reference["tokens"]


def test_vocab_chunk_bounds_the_logits_block():
    assert ev.vocab_chunk_tokens(49_152) == 512  # SmolLM2: 512 x 49,152 x 4 B = 96 MiB
    assert ev.vocab_chunk_tokens(262_144) == 128  # Gemma-3: 128 MiB
    assert ev.vocab_chunk_tokens(32) == 1024 and ev.vocab_chunk_tokens(10**8) == 64
    for vocab in (1000, 49_152, 262_144):
        c = ev.vocab_chunk_tokens(vocab)
        assert c * vocab * 4 <= ev.VOCAB_CHUNK_BYTES or c == 64


def test_kl_to_itself_is_zero():
    model = make_tiny_model("llama")
    out = evaluate_perplexity(model, eval_windows(random_stream(64), 16), teacher=model, show_progress=False)
    assert abs(out["kl_to_teacher"]) < 1e-6
    assert out["top1_agreement"] == 1.0
    assert out["teacher_perplexity"] == pytest.approx(out["perplexity"], rel=1e-9)


@pytest.mark.parametrize("student_type, teacher_type", [("llama", "llama"), ("qwen3", "gemma3_text")])
def test_kl_to_another_model_matches_naive(student_type, teacher_type):
    student = make_tiny_model(student_type, seed=0)
    teacher = make_tiny_model(teacher_type, seed=1)
    stream = random_stream(96, seed=4)
    out = evaluate_perplexity(student, eval_windows(stream, 16), teacher=teacher, batch_size=4, show_progress=False)
    kl, agree = naive_kl_and_agreement(student, teacher, stream, 16)
    assert kl > 1e-3
    assert out["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert out["top1_agreement"] == pytest.approx(agree, abs=1e-12)
    assert out["teacher_perplexity"] == pytest.approx(naive_nonoverlapping_ppl(teacher, stream, 16), rel=1e-5)


def test_bfloat16_autocast_is_close_to_float32():
    model = make_tiny_model("llama")
    windows = eval_windows(random_stream(64), 16)
    fp32 = evaluate_perplexity(model, windows, show_progress=False)
    bf16 = evaluate_perplexity(model, windows, autocast="bfloat16", show_progress=False)
    assert bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=5e-2)


# ---------------------------------------------------------------- windows


def scored_positions(windows, stride, body, has_bos):
    """Stream positions each window scores, from the protocol: window i starts at i * step."""
    step = stride or body
    out = []
    for i, (window, n_scored) in enumerate(windows):
        length = window.numel() - has_bos
        begin = i * step
        out.extend(range(begin + length - n_scored, begin + length))
    return out


def test_nonoverlapping_windows_drop_the_ragged_tail():
    stream = torch.arange(50)
    windows = eval_windows(stream, 16)
    assert len(windows) == 3
    assert all(w.numel() == 16 and n == 15 for w, n in windows)
    assert torch.equal(torch.cat([w for w, _ in windows]), stream[:48])
    assert len(eval_windows(torch.arange(48), 16)) == 3
    assert eval_windows(torch.arange(10), 16) == []


def test_nonoverlapping_windows_with_bos():
    stream = torch.arange(4, 54)
    windows = eval_windows(stream, 16, bos_token_id=2)
    assert len(windows) == 3
    assert all(w[0] == 2 and w.numel() == 16 and n == 15 for w, n in windows)
    assert torch.equal(torch.cat([w[1:] for w, _ in windows]), stream[:45])
    assert sorted(scored_positions(windows, None, 15, True)) == list(range(45))


@pytest.mark.parametrize("total", [16, 17, 50, 77])
@pytest.mark.parametrize("stride", [1, 4, 7, 15])
def test_stride_scores_every_token_exactly_once(total, stride):
    stream = torch.arange(total)
    windows = eval_windows(stream, 16, stride=stride)
    for i, (window, n_scored) in enumerate(windows):
        assert torch.equal(window, stream[i * stride:i * stride + 16])
        assert 1 <= n_scored <= window.numel() - 1
    assert sorted(scored_positions(windows, stride, 16, False)) == list(range(1, total))


def test_stride_equal_to_seq_len_keeps_the_tail():
    windows = eval_windows(torch.arange(50), 16, stride=16)
    assert [(int(w[0]), w.numel(), n) for w, n in windows] == [(0, 16, 15), (16, 16, 15), (32, 16, 15), (48, 2, 1)]


@pytest.mark.parametrize("stride", [3, 15])
def test_stride_with_bos_scores_every_token_once(stride):
    total = 40
    windows = eval_windows(torch.arange(4, 4 + total), 16, stride=stride, bos_token_id=2)
    assert all(w[0] == 2 for w, _ in windows)
    assert sorted(scored_positions(windows, stride, 15, True)) == list(range(total))


# ---------------------------------------------------------------- size and speed


def test_parameter_summary():
    model = make_tiny_model("mistral")
    summary = parameter_summary(model)
    assert summary["total"] == summary["closed_form_total"] == sum(p.numel() for p in model.parameters())
    assert 0 < summary["non_embedding"] < summary["total"]


def test_measure_speed_runs_on_a_tiny_model():
    model = make_tiny_model("gemma3_text")
    out = measure_speed(model, 256, prefill_tokens=12, decode_tokens=3, repeats=1)
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert out["peak_memory_bytes"] >= 0


def test_measure_speed_uses_the_current_cache_api(recwarn):
    """transformers 5 deprecates ``past_key_values=`` (removal in 5.40): the speed test passes ``cache=``."""
    import warnings

    model = make_tiny_model("llama")
    warnings.simplefilter("always")
    result = measure_speed(model, model.config.vocab_size, prefill_tokens=8, decode_tokens=4, repeats=1)
    assert result["decode_tokens_per_s"] > 0
    deprecations = [w for w in recwarn if "past_key_values" in str(w.message)]
    assert not deprecations, [str(w.message) for w in deprecations]
