"""Tests for :mod:`minicompress.distillation.attention`: the FlashAttention-2 backward against float64
autograd of naive causal attention, and the transformers hook against sdpa. The hook inside
compiled decoder layers under bf16 autocast (what recover runs) is tested end to end in
``tests/test_train.py`` (``test_compiled_bf16_recovery_...``)."""

from __future__ import annotations

import pytest
import torch

from minicompress.distillation import attention


def _naive(q, k, v, scale):
    """Causal softmax attention, written out: ``[B, H, L, D]`` (k, v with H heads)."""
    length = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


def _inputs(seed=0, shape=(2, 3, 16, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]  # q, k, v, d_out


def test_backward_matches_float64_autograd():
    """attention_backward from the naive output and exact lse: the float64 gradients to 1e-5."""
    q, k, v, d_out = _inputs()
    scale = 0.3
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    out64 = _naive(q64, k64, v64, scale)
    out64.backward(d_out.double())
    length = q.shape[-2]
    lse = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(
        torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    grads = attention.attention_backward(q, k, v, out64.detach().float(), lse.float(), d_out, scale)
    for got, want in zip(grads, (q64.grad, k64.grad, v64.grad)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_function_matches_float64_autograd(dtype, tol):
    """The autograd Function (the flash forward, this backward): output and gradients against
    float64, within float32 or bf16 rounding (relative norm error)."""
    q, k, v, d_out = _inputs(1, dtype=dtype)
    scale = 8 ** -0.5
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = attention._CausalAttention.apply(*leaves, scale)
    out.backward(d_out)
    ref = [x.double().requires_grad_(True) for x in (q, k, v)]
    out64 = _naive(*ref, scale)
    out64.backward(d_out.double())
    for got, want in [(out, out64), *zip((x.grad for x in leaves), (x.grad for x in ref))]:
        assert got.dtype == dtype
        want = want.detach()
        assert float((got.detach().double() - want).norm() / want.norm()) < tol


def _pair(make_tiny_model, model_type="llama"):
    base = make_tiny_model(model_type, seed=3)
    other = make_tiny_model(model_type, seed=3)
    assert base.config._attn_implementation == "sdpa"
    assert attention.use_training_attention_(other) is True
    assert other.config._attn_implementation == attention.NAME
    return base, other


def test_model_hook_equals_sdpa_with_grouped_query_heads(make_tiny_model):
    """A tiny Llama (4 query heads over 2 key/value heads) with the hook: logits and every
    parameter gradient equal sdpa's; restore_attention_ puts sdpa back."""
    base, other = _pair(make_tiny_model)
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for model in (base, other):
        model.train()
        model(ids).logits.float().pow(2).mean().backward()
    torch.testing.assert_close(other(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    grads = dict(base.named_parameters())
    for name, p in other.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    attention.restore_attention_(other)
    assert other.config._attn_implementation == "sdpa"


def test_model_hook_falls_back_to_sdpa(make_tiny_model):
    """Padding masks, no-grad evaluation and sliding windows (Gemma-3) take sdpa's path: the
    same logits as sdpa."""
    base, other = _pair(make_tiny_model)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, base(ids).logits)
    torch.testing.assert_close(other(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)
    base, other = _pair(make_tiny_model, "gemma3_text")
    torch.testing.assert_close(other(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_only_sdpa_models_are_switched(make_tiny_model):
    model = make_tiny_model("llama")
    model.config._attn_implementation = "eager"
    assert attention.use_training_attention_(model) is False
    assert model.config._attn_implementation == "eager"
    attention.restore_attention_(model)
    assert model.config._attn_implementation == "eager"
