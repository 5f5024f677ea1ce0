"""Tests for minicompress.distillation.sampling against naive no-cache reference loops.

The references recompute everything from scratch with one full forward of the whole
sequence (``model(...).logits``, so Gemma's soft-capping comes from transformers, not
from :func:`minicompress.arch.compute_logits`), and the distribution checks compare
empirical frequencies with the exact distributions under bounds derived below.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BOS_ID, TINY_VOCAB, make_tiny_model
from minicompress.distillation import sampling

MODEL_TYPES = ("llama", "gemma3_text")
# a softcap makes Gemma's capped logits differ measurably from the raw ones
OVERRIDES = {"llama": {}, "gemma3_text": {"final_logit_softcapping": 2.0}}


@pytest.fixture(scope="module", params=MODEL_TYPES)
def model(request):
    return make_tiny_model(request.param, **OVERRIDES[request.param])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L, V]`` float32 logits of one no-cache forward (transformers' own head)."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _naive_greedy(model, prompts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Greedy continuation: a full forward of the whole prefix for every new token."""
    ids = prompts.clone()
    while ids.shape[1] < seq_len:
        nxt = _full_logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


# --------------------------------------------------------------------------
# 1-2: the cached decode loop against full forwards
# --------------------------------------------------------------------------
def test_greedy_matches_naive_loop_and_hf_generate(model):
    prompts = sampling.start_tokens(TINY_VOCAB, 3, seed=1, exclude=range(4))
    prompts = torch.cat([prompts, torch.tensor([[7], [9], [11]])], dim=1)  # P = 2
    seq_len = 20  # longer than Gemma's sliding window (8)
    out = sampling.sample_batch(model, prompts, seq_len, sampling=sampling.SamplingConfig(greedy_tokens=seq_len),
                                generator=_gen(0))
    assert out["input_ids"].shape == (3, seq_len) and out["input_ids"].dtype == torch.int64
    torch.testing.assert_close(out["input_ids"], _naive_greedy(model, prompts, seq_len), rtol=0, atol=0)
    hf = model.generate(prompts, do_sample=False, max_new_tokens=seq_len - 2, min_new_tokens=seq_len - 2,
                        attention_mask=torch.ones_like(prompts), pad_token_id=1)
    torch.testing.assert_close(out["input_ids"], hf, rtol=0, atol=0)


@pytest.mark.parametrize("bos", [None, BOS_ID])
def test_logprobs_match_one_full_forward(model, bos):
    prompts = torch.tensor([[5, 6, 7], [40, 41, 42]])
    seq_len = 18
    out = sampling.sample_batch(model, prompts, seq_len, sampling=sampling.SamplingConfig(samples=12),
                                generator=_gen(3), bos_token_id=bos)
    ids, idx, lp = out["input_ids"], out["sample_indices"], out["sample_logprobs"]
    assert ids.shape == (2, seq_len)
    assert idx.shape == lp.shape == (2, seq_len, 12)
    assert idx.dtype == torch.int32 and lp.dtype == torch.float32
    head = 1 if bos is not None else 0
    if bos is not None:
        assert (ids[:, 0] == bos).all()
    torch.testing.assert_close(ids[:, head:head + 3], prompts, rtol=0, atol=0)
    assert int(idx.min()) >= 0 and int(idx.max()) < TINY_VOCAB
    ref = torch.log_softmax(_full_logits(model, ids), dim=-1).gather(-1, idx.long())  # every position, last included
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)


def test_cache_layouts_and_attention_agree():
    model = make_tiny_model("gemma3_text")  # sliding + full layers
    prompts = torch.tensor([[3, 4], [5, 6]])
    settings = [{"cache": c} for c in sampling.CACHE_KINDS] + [{"attention": "sdpa"}]
    outs = [sampling.sample_batch(model, prompts, 14, generator=_gen(0), decode=sampling.DecodeOptions(**kw))
            for kw in settings]
    for other in outs[1:]:
        torch.testing.assert_close(other["input_ids"], outs[0]["input_ids"], rtol=0, atol=0)
        torch.testing.assert_close(other["sample_indices"], outs[0]["sample_indices"], rtol=0, atol=0)
        torch.testing.assert_close(other["sample_logprobs"], outs[0]["sample_logprobs"], rtol=0, atol=1e-5)


def test_cache_growth_in_small_blocks_matches_full_forward(model, monkeypatch):
    monkeypatch.setattr(sampling, "CACHE_BLOCK", 3)  # grows (and pads) many times within 17 positions
    prompts = torch.tensor([[5, 6], [40, 41]])
    out = sampling.sample_batch(model, prompts, 17, generator=_gen(4))
    ref = torch.log_softmax(_full_logits(model, out["input_ids"]), dim=-1).gather(-1, out["sample_indices"].long())
    torch.testing.assert_close(out["sample_logprobs"], ref, rtol=0, atol=1e-5)
    greedy = sampling.sample_batch(model, prompts, 17, sampling=sampling.SamplingConfig(greedy_tokens=17),
                                   generator=_gen(0))
    torch.testing.assert_close(greedy["input_ids"], _naive_greedy(model, prompts, 17), rtol=0, atol=0)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_decode_attention_matches_sdpa(mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    g = _gen(0)
    batch, kv_heads, length, dim = 2, 2, 7, 8
    query = torch.randn(batch, 1, kv_heads * 3, dim, generator=g).transpose(1, 2)  # [B, H, 1, D] as in the models
    store = torch.randn(2, batch, kv_heads, 12, dim, generator=g)  # a preallocated cache, partly filled
    key, value = store[0][:, :, :length], store[1][:, :, :length]
    attn_mask = None
    if mask is not None:
        keep = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        keep[0, ..., :3] = False  # a sliding window
        attn_mask = keep if mask == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out, _ = sampling.decode_attention(module, query, key, value, attn_mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, query, key.contiguous(), value.contiguous(), attn_mask, scaling=0.3)
    assert out.shape == (batch, 1, kv_heads * 3, dim)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_decode_attention_is_used_and_restored(monkeypatch):
    model = make_tiny_model("llama")
    calls = {"n": 0}
    bmm = torch.bmm

    def counting_bmm(*args, **kwargs):
        calls["n"] += 1
        return bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", counting_bmm)
    sampling.sample_batch(model, torch.tensor([[5]]), 6, generator=_gen(0))
    assert calls["n"] == 2 * 2 * 6  # two products, two layers, six single-token forwards (prefill included)
    assert model.config._attn_implementation == "sdpa"

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "bmm", boom)
    with pytest.raises(RuntimeError, match="boom"):
        sampling.sample_batch(model, torch.tensor([[5]]), 6, generator=_gen(0))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="cache"):
        sampling.make_cache(model, 8, "paged")


def test_prompt_as_long_as_seq_len_only_scores():
    model = make_tiny_model("llama")
    prompts = torch.tensor([[5, 6, 7, 8]])
    out = sampling.sample_batch(model, prompts, 4, generator=_gen(0))
    torch.testing.assert_close(out["input_ids"], prompts, rtol=0, atol=0)
    ref = torch.log_softmax(_full_logits(model, prompts), -1).gather(-1, out["sample_indices"].long())
    torch.testing.assert_close(out["sample_logprobs"], ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        sampling.sample_batch(model, prompts, 3, generator=_gen(0))


def test_bf16_autocast_runs():
    model = make_tiny_model("llama")
    out = sampling.sample_batch(model, torch.tensor([[5], [6]]), 8, generator=_gen(0), autocast="bfloat16")
    assert out["sample_logprobs"].dtype == torch.float32 and (out["sample_logprobs"] <= 0).all()
    ref = torch.log_softmax(_full_logits(model, out["input_ids"]), -1).gather(-1, out["sample_indices"].long())
    torch.testing.assert_close(out["sample_logprobs"], ref, rtol=0, atol=0.1)  # bf16 matmuls


# --------------------------------------------------------------------------
# 3: top-k 1 is greedy; seeds
# --------------------------------------------------------------------------
def test_top_k_one_is_greedy_and_seeds_are_deterministic():
    model = make_tiny_model("llama")
    prompts = sampling.start_tokens(TINY_VOCAB, 4, seed=0, exclude=range(4))
    greedy = sampling.sample_batch(model, prompts, 16, sampling=sampling.SamplingConfig(greedy_tokens=16),
                                   generator=_gen(0))
    top1 = sampling.sample_batch(model, prompts, 16, generator=_gen(5),
                                 sampling=sampling.SamplingConfig(greedy_tokens=0, top_k=1, temperature=2.0))
    torch.testing.assert_close(top1["input_ids"], greedy["input_ids"], rtol=0, atol=0)
    a = sampling.sample_batch(model, prompts, 16, generator=_gen(11))
    b = sampling.sample_batch(model, prompts, 16, generator=_gen(11))
    c = sampling.sample_batch(model, prompts, 16, generator=_gen(12))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert not torch.equal(a["sample_indices"], c["sample_indices"])
    # the greedy head (prompt + 3 tokens) does not depend on the seed
    torch.testing.assert_close(a["input_ids"][:, :4], c["input_ids"][:, :4], rtol=0, atol=0)


# --------------------------------------------------------------------------
# 4: the sampled distributions
# --------------------------------------------------------------------------
def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("top_k, top_p, temperature", [(5, 1.0, 0.7), (8, 0.8, 1.3)])
def test_continuation_follows_filtered_tempered_distribution(top_k, top_p, temperature):
    model = make_tiny_model("llama", initializer_range=0.5)  # a peaked, non-uniform distribution
    rows = 6000
    prompts = torch.full((rows, 1), 17)
    out = sampling.sample_batch(model, prompts, 3, generator=_gen(0), sampling=sampling.SamplingConfig(
        greedy_tokens=1, top_k=top_k, top_p=top_p, temperature=temperature))
    ids = out["input_ids"]
    assert (ids[:, 1] == ids[0, 1]).all()  # the greedy token is the same for every row
    logits = _full_logits(model, ids[:1, :2])[0, -1]  # position 1 predicts token 2
    vals, top = logits.topk(top_k)
    probs = torch.softmax(vals / temperature, -1)
    keep = (probs.cumsum(-1) - probs) < top_p  # nucleus: tokens whose preceding mass is below top_p
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    probs = probs / probs.sum()
    drawn = ids[:, 2]
    allowed = top[keep]
    assert torch.isin(drawn, allowed).all(), "a token outside the top-k / top-p set was drawn"
    counts = torch.stack([(drawn == t).sum() for t in allowed]).double()
    assert allowed.numel() > 2
    df = allowed.numel() - 1
    stat = _chi_square(counts, probs[keep].double())  # every expected count is > 5 here
    assert float((probs[keep] * rows).min()) > 5
    # under the null the statistic is chi2(df): its p-value is Q(df / 2, stat / 2)
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    assert p_value > 1e-4, (stat, df, p_value)


def test_sparse_draws_follow_the_full_softmax():
    model = make_tiny_model("llama", initializer_range=0.5)
    rows, samples = 4000, 12
    prompts = torch.full((rows, 1), 17)
    out = sampling.sample_batch(model, prompts, 2, sampling=sampling.SamplingConfig(greedy_tokens=1, samples=samples),
                                generator=_gen(1))
    p = torch.softmax(_full_logits(model, out["input_ids"][:1])[0, 0].double(), -1)  # position 0: all rows equal
    draws = out["sample_indices"][:, 0].reshape(-1).long()
    n = draws.numel()
    freq = torch.bincount(draws, minlength=TINY_VOCAB).double() / n
    tv = 0.5 * float((freq - p).abs().sum())
    # E|f_i - p_i| <= sqrt(p_i (1 - p_i) / n) (Jensen), so E[TV] <= 0.5 sum_i sqrt(p_i (1 - p_i) / n);
    # one draw moves TV by at most 1/n, so McDiarmid gives P(TV > E[TV] + eps) <= exp(-2 n eps^2)
    eps = math.sqrt(math.log(1e4) / (2 * n))  # failure probability 1e-4
    bound = 0.5 * float((p * (1 - p) / n).sqrt().sum()) + eps
    assert tv < bound, (tv, bound)
    # a wrong distribution (e.g. the temperature-2 softmax) sits well outside the bound
    p2 = torch.softmax(_full_logits(model, out["input_ids"][:1])[0, 0].double() / 2, -1)
    assert 0.5 * float((p2 - p).abs().sum()) > 2 * bound
    # the stored log-probs are those of the full softmax
    torch.testing.assert_close(out["sample_logprobs"][:, 0].double(), p.log()[out["sample_indices"][:, 0].long()],
                               rtol=0, atol=1e-5)


def test_sparse_draw_methods_agree_in_distribution():
    logits = torch.randn(4, 300, generator=_gen(0)) * 3
    p = torch.softmax(logits.double(), -1)
    for method in ("cdf", "multinomial"):
        idx, lp = sampling._sparse_draws(logits.repeat(500, 1), 12, _gen(2), method)
        torch.testing.assert_close(lp.double(), p.repeat(500, 1).log().gather(-1, idx), rtol=0, atol=1e-5)
        zero = logits.clone()
        zero[:, ::2] = -math.inf  # impossible tokens are never drawn
        idx, _ = sampling._sparse_draws(zero, 64, _gen(3), method)
        assert (idx % 2 == 1).all()


# --------------------------------------------------------------------------
# 5: start ids and prompts
# --------------------------------------------------------------------------
def test_start_tokens_exclude_special_ids_and_are_deterministic(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    special = set(sampling.special_token_ids(tiny_tokenizer))
    assert {0, 1, 2, 3} <= special
    ids = sampling.start_tokens(tiny_tokenizer, vocab + 10, seed=4)
    assert ids.shape == (vocab + 10, 1) and ids.dtype == torch.int64
    flat = ids.squeeze(1).tolist()
    assert not special & set(flat)
    allowed = vocab - len(special)
    assert sorted(flat[:allowed]) == sorted(set(range(vocab)) - special)  # a permutation, then cycled
    assert flat[allowed:] == flat[:vocab + 10 - allowed]
    torch.testing.assert_close(sampling.start_tokens(tiny_tokenizer, 50, seed=4), ids[:50], rtol=0, atol=0)
    assert not torch.equal(sampling.start_tokens(tiny_tokenizer, 50, seed=5), ids[:50])
    by_size = sampling.start_tokens(100, 7, seed=0, exclude=[0, 1])
    assert by_size.min() >= 2 and by_size.max() < 100
    with pytest.raises(ValueError):
        sampling.start_tokens(3, 1, seed=0, exclude=[0, 1, 2])


def test_prompt_starts():
    seqs = torch.arange(5 * 9).view(5, 9)
    out = sampling.prompt_starts(seqs, 3, 12, seed=0)
    assert out.shape == (12, 3) and out.dtype == torch.int64
    rows = (out[:, 0] // 9).tolist()
    assert sorted(rows[:5]) == list(range(5)) and rows[5:10] == rows[:5]
    torch.testing.assert_close(out, seqs[torch.tensor(rows), :3], rtol=0, atol=0)
    torch.testing.assert_close(sampling.prompt_starts(seqs, 3, 12, seed=0), out, rtol=0, atol=0)
    with pytest.raises(ValueError):
        sampling.prompt_starts(seqs, 10, 2, seed=0)


def test_on_tokens_counts_every_position_once_as_it_is_produced(model):
    prompts = torch.tensor([[5, 6], [40, 41]])
    calls: list[int] = []
    out = sampling.sample_batch(model, prompts, 9, generator=_gen(1), bos_token_id=1, on_tokens=calls.append)
    assert calls == [2 * 3] + [2] * 6  # the prefill (BOS + 2 prompt tokens), then one call per decode step
    assert sum(calls) == out["input_ids"].numel()


def test_sampling_and_decode_settings_are_checked_when_built():
    for bad in (dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(samples=-1),
                dict(greedy_tokens=-1)):
        with pytest.raises(ValueError):
            sampling.SamplingConfig(**bad)
    for bad in (dict(cache="paged"), dict(attention="flash"), dict(draw="gumbel")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sampling.DecodeOptions(**bad)
