"""Activation importance: aggregation, naive references, zeroed units rank last, hooks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL_TYPES, make_tiny_model
from minicompress.arch import decoder_layers, get_adapter
from minicompress.errors import MinicompressError
from minicompress.pruning.scoring import ImportanceScores, RunningAggregate, layer_loss_increase, lm_loss, score_model

AGGS = ("mean", "l2", "var")


def _naive_aggregate(batches, masks, sequence, batch):
    per_sample = []
    for values, mask in zip(batches, masks):
        for b in range(values.shape[0]):
            rows = values[b][mask[b].bool()].double()
            if sequence == "mean":
                per_sample.append(rows.mean(0))
            elif sequence == "l2":
                per_sample.append(rows.square().sum(0).sqrt())
            else:
                per_sample.append(rows.var(0, unbiased=False))
    s = torch.stack(per_sample)
    if batch == "mean":
        return s.mean(0)
    if batch == "l2":
        return s.square().sum(0).sqrt()
    return s.var(0, unbiased=False)


@pytest.mark.parametrize("sequence", AGGS)
@pytest.mark.parametrize("batch", AGGS)
def test_running_aggregate_matches_naive(sequence, batch):
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(3, 7, 5, generator=g), torch.rand(2, 7, 5, generator=g)]
    masks = [torch.ones(3, 7), torch.ones(2, 7)]
    masks[0][1, 4:] = 0
    masks[1][0, 2:] = 0
    agg = RunningAggregate(sequence, batch)
    for v, m in zip(batches, masks):
        agg.update(v, m)
    torch.testing.assert_close(agg.result().double(), _naive_aggregate(batches, masks, sequence, batch),
                               rtol=1e-5, atol=1e-6)


def _capture(model, ids):
    """Naive reference: store every activation of interest with plain hooks."""
    adapter = get_adapter(model)
    cap = {"o_in": [], "down_in": [], "norms": []}
    handles = []
    for layer in decoder_layers(model):
        attn, mlp = getattr(layer, adapter.attn), getattr(layer, adapter.mlp)
        handles.append(attn.o_proj.register_forward_pre_hook(lambda m, a: cap["o_in"].append(a[0].clone())))
        handles.append(mlp.down_proj.register_forward_pre_hook(lambda m, a: cap["down_in"].append(a[0].clone())))
        for n in adapter.input_norms:
            handles.append(getattr(layer, n).register_forward_hook(lambda m, a, o: cap["norms"].append(o.clone())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return cap


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_scores_match_naive_reference(model_type):
    model = make_tiny_model(model_type)
    cfg = model.config
    ids = torch.randint(4, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    scores = score_model(model, [ids])  # defaults: sequence mean, batch l2
    cap = _capture(model, ids)
    L, hd = cfg.num_hidden_layers, cfg.head_dim
    for i in range(L):
        per_head = cap["o_in"][i].unflatten(-1, (cfg.num_attention_heads, hd)).norm(dim=-1)  # [B, T, heads]
        want = per_head.double().mean(1).square().sum(0).sqrt()
        torch.testing.assert_close(scores.heads[i].double(), want, rtol=1e-5, atol=1e-7)
        want_n = cap["down_in"][i].abs().double().mean(1).square().sum(0).sqrt()
        torch.testing.assert_close(scores.neurons[i].double(), want_n, rtol=1e-5, atol=1e-7)
    channel_sum = sum(o.abs().double() for o in cap["norms"])
    torch.testing.assert_close(scores.channels.double(), channel_sum.mean(1).square().sum(0).sqrt(), rtol=1e-5, atol=1e-7)


def test_block_distance_matches_hidden_states():
    model = make_tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(4, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    scores = score_model(model, [ids])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[i] = input of layer i (last is post-norm)
    for a in range(4):
        for b in range(a + 1, 4):
            want = (1 - F.cosine_similarity(hs[a], hs[b], dim=-1)).mean()
            assert scores.block_distance[a, b].item() == pytest.approx(want.item(), abs=1e-5)
            assert scores.block_distance[b, a].item() == pytest.approx(want.item(), abs=1e-5)
    assert scores.block_importance.shape == (4,)
    start, dist = scores.contiguous_block(2)
    best = min(range(3), key=lambda i: scores.block_distance[i, i + 2].item())
    assert start == best and dist == pytest.approx(scores.block_distance[best, best + 2].item())


def test_layer_loss_increase_matches_dropping_the_layer():
    model = make_tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    base, increase = layer_loss_increase(model, [ids])
    with torch.no_grad():
        ref_base = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
        assert base == pytest.approx(ref_base, rel=1e-5)
        for i in range(3):
            dropped = copy.deepcopy(model)
            del dropped.model.layers[i]
            dropped.config.num_hidden_layers = 2
            for j, layer in enumerate(dropped.model.layers):
                layer.self_attn.layer_idx = j
            loss = F.cross_entropy(dropped(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
            assert increase[i].item() == pytest.approx(loss - ref_base, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_zeroed_units_rank_last(model_type):
    model = make_tiny_model(model_type)
    adapter = get_adapter(model)
    k, c = 5, 7
    with torch.no_grad():
        for layer in decoder_layers(model):
            getattr(layer, adapter.mlp).up_proj.weight[k] = 0.0  # act(gate) * 0 -> neuron k is dead
            layer.self_attn.v_proj.weight[layer.self_attn.head_dim:] = 0.0  # KV head 1 -> query heads 2, 3 dead
            for n in adapter.input_norms:  # channel c of every block input is zero
                getattr(layer, n).weight[c] = -adapter.norm_offset
    ids = torch.randint(4, 256, (2, 10), generator=torch.Generator().manual_seed(4))
    scores = score_model(model, [ids])
    for i in range(model.config.num_hidden_layers):
        assert scores.neurons[i].argmin().item() == k
        assert scores.neurons[i][k].item() == 0.0
        assert set(scores.heads[i].argsort()[:2].tolist()) == {2, 3}
    assert scores.channels.argmin().item() == c


def test_scoring_leaves_model_and_hooks_untouched():
    model = make_tiny_model("qwen3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, 256, (2, 8))
    score_model(model, [ids], loss_batches=[ids])
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_hooks_removed_after_an_exception():
    model = make_tiny_model("llama")
    bad = torch.full((1, 4), 10_000)  # out of vocabulary: the embedding raises
    with pytest.raises(IndexError):
        score_model(model, [bad])
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name


def test_padding_is_masked():
    model = make_tiny_model("llama")
    real = torch.randint(4, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([real, torch.ones(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    a = score_model(model, [real])
    b = score_model(model, [(padded, mask)])
    for key in ("heads", "neurons", "channels"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-5, atol=1e-6)


def test_scores_save_load_roundtrip(tmp_path):
    model = make_tiny_model("gemma3_text")
    ids = torch.randint(4, 256, (2, 8))
    scores = score_model(model, [ids], loss_batches=[ids], meta={"source": "tiny"})
    scores.save(tmp_path)
    again = ImportanceScores.load(tmp_path)
    for key, value in scores.tensors().items():
        assert torch.equal(value, again.tensors()[key]), key
    assert again.base_loss == pytest.approx(scores.base_loss)
    assert again.meta["source"] == "tiny" and again.digest() == scores.digest()
    with pytest.raises(MinicompressError, match="--scores"):
        ImportanceScores.load(tmp_path / "missing")


def test_lm_loss_chunking_matches_full_logits():
    model = make_tiny_model("qwen2")
    ids = torch.randint(4, 256, (2, 11))
    with torch.no_grad():
        total, count = lm_loss(model, ids, chunk_tokens=3)
        ref = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    assert count == 20 and total == pytest.approx(ref.item(), rel=1e-5)
