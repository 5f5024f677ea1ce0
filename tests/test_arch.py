"""Tests for minicompress.arch: adapters, closed-form parameter counts, logits."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_MODEL_TYPES, make_tiny_model, tiny_config
from minicompress.arch import (ADAPTERS, compute_logits, count_parameters, decoder_layers, describe, embed_tokens,
    final_norm, get_adapter, head_dim, num_kv_heads)
from minicompress.errors import MinicompressError


def unique_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_count_parameters_matches_counted(model_type):
    model = make_tiny_model(model_type)
    counts = count_parameters(model.config)
    assert counts["total"] == unique_parameter_count(model)
    assert counts["total"] == sum(counts[k] for k in ("embedding", "lm_head", "attention", "mlp", "norms"))
    assert counts["non_embedding"] == counts["total"] - counts["embedding"] - counts["lm_head"]
    assert (counts["lm_head"] == 0) == bool(model.config.tie_word_embeddings)


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    ("qwen3", dict(attention_bias=True)),
    ("gemma3_text", dict(num_hidden_layers=4, head_dim=8)),
    ("mistral", dict(num_key_value_heads=4)),
])
def test_count_parameters_with_biases_and_variants(model_type, overrides):
    model = make_tiny_model(model_type, **overrides)
    assert count_parameters(model.config)["total"] == unique_parameter_count(model)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_adapter_names_exist_in_the_model(model_type):
    model = make_tiny_model(model_type)
    adapter = get_adapter(model)
    assert adapter is get_adapter(model.config) is get_adapter(model_type)
    layer = decoder_layers(model)[0]
    attn = getattr(layer, adapter.attn)
    assert hasattr(attn, "q_proj") and hasattr(attn, "o_proj")
    assert hasattr(getattr(layer, adapter.mlp), "down_proj")
    for name in adapter.all_layer_norms:
        assert getattr(layer, name).weight.shape == (model.config.hidden_size,)
    assert hasattr(attn, "q_norm") == adapter.qk_norm
    assert (attn.q_proj.bias is not None) == adapter.qkv_bias
    assert embed_tokens(model).weight.shape[0] == model.config.vocab_size
    assert final_norm(model).weight.shape == (model.config.hidden_size,)


def test_unsupported_model_type_lists_supported():
    with pytest.raises(MinicompressError) as info:
        get_adapter("gpt2")
    message = str(info.value)
    assert "'gpt2' is not supported" in message and "\n" not in message
    for name in ADAPTERS:
        assert name in message


def test_head_dim_and_kv_defaults():
    config = tiny_config("llama", head_dim=None, num_key_value_heads=None)
    assert head_dim(config) == config.hidden_size // config.num_attention_heads
    assert num_kv_heads(config) == config.num_attention_heads


def test_describe_gemma_layer_types():
    summary = describe(tiny_config("gemma3_text"))
    assert summary["model_type"] == "gemma3_text"
    assert summary["layer_types"] == {"full_attention": 1, "sliding_attention": 2}
    assert summary["sliding_window"] == 8
    assert summary["parameters"]["total"] == count_parameters(tiny_config("gemma3_text"))["total"]


@pytest.mark.parametrize("model_type, overrides", [("llama", {}), ("gemma3_text", {"final_logit_softcapping": 3.0})])
def test_compute_logits_matches_forward(model_type, overrides):
    model = make_tiny_model(model_type, **overrides)
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(compute_logits(model, hidden), model(ids).logits, rtol=1e-5, atol=1e-5)
