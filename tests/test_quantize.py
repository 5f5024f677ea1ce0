"""Weight-only quantization (:mod:`minicompress.quantize`) against naive reference quantizers."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_model
from minicompress.errors import MinicompressError
from minicompress.quantize import (DEFAULT_GROUP_SIZE, SCHEMES, dequantize_weight, is_quantized, quantizable_linears,
    quantize_, torchao_config)

pytest.importorskip("torchao")

IDS = torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def reference_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive symmetric int8: one scale per row (or per group of ``group_size`` columns).

    Returns:
        ``(dequantized [out, in], scale broadcast to [out, in])``.
    """
    g = w.shape[1] if group_size is None else group_size
    wg = w.reshape(w.shape[0], -1, g)
    scale = wg.abs().amax(-1, keepdim=True) / 127.5
    q = torch.clamp(torch.round(wg * (1 / scale)), -128, 127)  # torchao multiplies by 1 / scale (ties)
    return (q * scale).reshape(w.shape), scale.expand_as(wg).reshape(w.shape)


def reference_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive asymmetric int4 per group, integer zero point, range widened to hold 0.

    Returns:
        ``(dequantized [out, in], scale broadcast to [out, in])``.
    """
    wg = w.reshape(w.shape[0], -1, group_size)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.clamp(-8 - torch.round(lo / scale), -8, 7)
    q = torch.clamp(torch.round(wg * (1 / scale)) + zero, -8, 7)
    return ((q - zero) * scale).reshape(w.shape), scale.expand_as(wg).reshape(w.shape)


def _reference(scheme: str, w: torch.Tensor, group_size: int | None):
    group_size = DEFAULT_GROUP_SIZE[scheme] if group_size is None else group_size
    return reference_int8(w, group_size) if scheme == "int8-weight-only" else reference_int4(w, group_size)


@pytest.mark.parametrize("scheme,group_size", [("int8-weight-only", None), ("int8-weight-only", 16),
                                               ("int4-weight-only", None), ("int4-weight-only", 16)])
def test_weights_dequantize_to_the_naive_reference_within_half_a_step(scheme, group_size):
    model = make_tiny_model("llama")
    originals = {name: m.weight.detach().clone() for name, m in quantizable_linears(model)}
    report = quantize_(model, scheme, group_size)
    assert report["quantized_linears"] == len(originals) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert report["quantized_parameters"] == sum(w.numel() for w in originals.values())
    assert report["group_size"] == (DEFAULT_GROUP_SIZE[scheme] if group_size is None else group_size)
    modules = dict(model.named_modules())
    for name, w in originals.items():
        weight = modules[name].weight
        assert type(weight).__module__.startswith("torchao") and weight.qdata.dtype == torch.int8
        levels = weight.qdata.unique()
        assert levels.min() >= (-128 if scheme == "int8-weight-only" else -8)
        assert levels.max() <= (127 if scheme == "int8-weight-only" else 7)
        got = dequantize_weight(weight)
        expected, scale = _reference(scheme, w, group_size)
        # round to nearest: within half a quantization step of the original, and the reference's grid point
        assert ((got - w).abs() <= scale / 2 * (1 + 1e-4) + 1e-7).all(), name
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert is_quantized(model) and model.config.quantization_config.quant_method.value == "torchao"


def test_the_output_head_and_embeddings_stay_float_and_tied():
    model = make_tiny_model("llama")  # ties lm_head to embed_tokens
    head = model.lm_head.weight.detach().clone()
    quantize_(model, "int4-weight-only")
    assert type(model.lm_head.weight) is torch.nn.Parameter and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, head)
    assert model.config.quantization_config.modules_to_not_convert == ["lm_head"]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_are_the_float_models_with_reference_weights(model_type, scheme):
    """Weight-only: the quantized forward is the float forward with dequantized weights."""
    model = make_tiny_model(model_type)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in quantizable_linears(reference):
            m.weight.copy_(_reference(scheme, m.weight, None)[0])
        float_logits = model(IDS).logits
        ref_logits = reference(IDS).logits
        quantize_(model, scheme)
        logits = model(IDS).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # and close to the float model; measured on 5 seeds of llama, qwen3 and gemma3:
    # relative L2 error 0.016-0.025 for int8, 0.18-0.30 for int4 (random weights, worst case)
    rel = ((logits - float_logits).norm() / float_logits.norm()).item()
    assert rel < (0.04 if scheme == "int8-weight-only" else 0.4)


def test_finer_groups_and_more_bits_quantize_more_closely():
    errors = {}
    for scheme, group_size in [("int8-weight-only", None), ("int4-weight-only", 32), ("int4-weight-only", 8)]:
        model = make_tiny_model("llama")
        with torch.no_grad():
            float_logits = model(IDS).logits
            quantize_(model, scheme, group_size)
            errors[scheme, group_size] = ((model(IDS).logits - float_logits).norm() / float_logits.norm()).item()
    assert errors["int8-weight-only", None] < errors["int4-weight-only", 8] < errors["int4-weight-only", 32]


def test_refusals_are_one_line_and_leave_the_model_untouched():
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MinicompressError, match=r"^scheme: 'int3' is not allowed; choose one of int8-weight-only, "
                                                r"int4-weight-only$"):
        quantize_(model, "int3")
    with pytest.raises(MinicompressError, match=r"^group_size: 48 does not divide in_features=32 of "
                                                r"model\.layers\.0\.self_attn\.q_proj; .*\[32, 64\], e\.g\. 32$"):
        quantize_(model, "int4-weight-only", 48)
    assert not is_quantized(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    quantize_(model, "int8-weight-only")
    with pytest.raises(MinicompressError, match="quantized already"):
        quantize_(model, "int4-weight-only")


def test_torchao_configs_are_the_documented_ones():
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType, PerGroup, PerRow

    int8 = torchao_config("int8-weight-only")
    assert isinstance(int8, Int8WeightOnlyConfig) and isinstance(int8.granularity, PerRow)
    assert torchao_config("int8-weight-only", 64).granularity == PerGroup(64)
    int4 = torchao_config("int4-weight-only")
    assert isinstance(int4, IntxWeightOnlyConfig) and int4.weight_dtype == torch.int4
    assert int4.granularity == PerGroup(32) and int4.mapping_type == MappingType.ASYMMETRIC
