"""Pruning plans and rewrites: identities, reload, closed-form size, GQA, errors, search."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_MODEL_TYPES, make_tiny_model
from minicompress.arch import count_parameters, decoder_layers
from minicompress.errors import MinicompressError
from minicompress.pruning.plan import PrunePlan, apply_plan_, make_plan, plan_parameters, pruned_copy, slice_parameter
from minicompress.pruning.search import (SearchSpace, candidate_targets, row_target, search_architecture,
    search_candidates, validate_target, zero_shot_ranking)
from minicompress.pruning.scoring import score_model

SHRINK = {"hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1,
          "num_hidden_layers": 2}


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(4, 256, shape, generator=torch.Generator().manual_seed(seed))


def _scored(model_type, **overrides):
    model = make_tiny_model(model_type, **overrides)
    return model, score_model(model, [_ids(1), _ids(2)], loss_batches=[_ids(3)])


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_keep_everything_changes_nothing(model_type):
    model, scores = _scored(model_type)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        out = pruned_copy(model, make_plan(scores, model.config, {}))(ids).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_pruned_model_saves_reloads_and_matches_closed_form(model_type, tmp_path):
    model, scores = _scored(model_type, num_hidden_layers=3)
    plan = make_plan(scores, model.config, SHRINK)
    apply_plan_(model, plan)
    ids = _ids()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hidden_size"] == 24 and cfg["num_hidden_layers"] == 2 and cfg["head_dim"] == plan.original["head_dim"]
    assert cfg["intermediate_size"] == 40 and cfg["num_attention_heads"] == 2 and cfg["num_key_value_heads"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == count_parameters(model.config)["total"] == plan_parameters(plan, make_tiny_model(model_type, num_hidden_layers=3).config)
    if getattr(reloaded.config, "layer_types", None):
        assert len(reloaded.config.layer_types) == 2


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_generation_with_kv_cache_after_dropping_layers(model_type):
    model, scores = _scored(model_type, num_hidden_layers=3)
    apply_plan_(model, make_plan(scores, model.config, {"drop_layers": [0]}))
    ids = _ids(shape=(1, 6))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        # greedy decode with the cache equals argmax of full forwards
        seq = ids
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_slicing_one_tensor_at_a_time_equals_in_place_rewrite():
    model, scores = _scored("qwen2", num_hidden_layers=3)
    plan = make_plan(scores, model.config, SHRINK)
    streamed = {}
    for name, tensor in model.state_dict().items():
        result = slice_parameter(name, tensor, plan)
        if result is not None:
            streamed[result[0]] = result[1]
    fresh = AutoModelForCausalLM.from_config(plan.new_config(model.config)).eval()
    fresh.load_state_dict(streamed, strict=True)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, pruned_copy(model, plan)(ids).logits)


def test_dead_units_removed_change_nothing():
    """Neurons, KV groups and layers that contribute nothing can be pruned exactly."""
    model = make_tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.mlp.up_proj.weight[-8:] = 0.0  # 8 dead neurons
            layer.self_attn.v_proj.weight[8:] = 0.0  # KV group 1 (query heads 2, 3) outputs zero
        model.model.layers[1].self_attn.o_proj.weight.zero_()  # layer 1 is the identity
        model.model.layers[1].mlp.down_proj.weight.zero_()
    scores = score_model(model, [_ids(1)])
    plan = make_plan(scores, model.config, {"intermediate_size": 56, "num_attention_heads": 2,
                                            "num_key_value_heads": 1, "drop_layers": [1]})
    assert plan.kv_heads == ((0,), (0,)) and plan.heads == ((0, 1), (0, 1))
    assert all(n == tuple(range(56)) for n in plan.neurons)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(pruned_copy(model, plan)(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_gqa_ranks_heads_inside_groups():
    model = make_tiny_model("llama")  # 4 query heads, 2 KV heads: groups {0,1} and {2,3}
    _, scores = _scored("llama")
    scores.heads[:] = torch.tensor([0.9, 0.1, 0.5, 0.6])
    plan = make_plan(scores, model.config, {"num_attention_heads": 2})
    assert plan.heads[0] == (0, 3) and plan.kv_heads[0] == (0, 1)  # best head of each group
    plan = make_plan(scores, model.config, {"num_attention_heads": 2, "num_key_value_heads": 1})
    assert plan.kv_heads[0] == (1,) and plan.heads[0] == (2, 3)  # group {2,3} sums 1.1 > 1.0
    plan = make_plan(scores, model.config, {"num_attention_heads": 1, "num_key_value_heads": 1})
    assert plan.kv_heads[0] == (0,) and plan.heads[0] == (0,)


def test_gemma3_keeps_the_embedding_scale():
    model, scores = _scored("gemma3_text")
    original = make_tiny_model("gemma3_text")
    plan = make_plan(scores, model.config, {"hidden_size": 16, "norm_correction": False})
    apply_plan_(model, plan)
    embed = model.model.embed_tokens
    assert embed.embed_scale.item() == pytest.approx(16 ** 0.5)
    ratio = (16 / 32) ** 0.5
    ch = torch.tensor(plan.channels)
    for new, old in zip(model.model.layers, original.model.layers):
        for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
            torch.testing.assert_close(1 + getattr(new, name).weight, ratio * (1 + getattr(old, name).weight[ch]))
        torch.testing.assert_close(new.input_layernorm.weight, old.input_layernorm.weight[ch])
    # the residual stream entering layer 0 is the original (kept channels) times sqrt(16/32)
    ids = _ids()
    with torch.no_grad():
        h_new = model(ids, output_hidden_states=True).hidden_states[0]
        h_old = original(ids, output_hidden_states=True).hidden_states[0][..., ch]
    torch.testing.assert_close(h_new, h_old * ratio, rtol=1e-5, atol=1e-6)


def test_layer_metrics_choose_the_expected_layers():
    model, scores = _scored("llama", num_hidden_layers=4)
    scores.block_distance[:] = 0.5
    for i, v in enumerate([0.9, 0.1, 0.2, 0.8]):
        scores.block_distance[i, i + 1] = scores.block_distance[i + 1, i] = v
    scores.block_distance[2, 4] = 0.01  # block of layers 2-3 barely changes the stream
    scores.layer_loss = torch.tensor([3.0, 2.0, 0.1, 0.2])
    assert make_plan(scores, model.config, {"num_hidden_layers": 2, "layer_metric": "bi"}).layers == (0, 3)
    assert make_plan(scores, model.config, {"num_hidden_layers": 2, "layer_metric": "loss"}).layers == (0, 1)
    assert make_plan(scores, model.config, {"num_hidden_layers": 2, "layer_metric": "contiguous"}).layers == (0, 1)
    assert make_plan(scores, model.config, {"drop_layers": [3], "num_hidden_layers": 2}).layers == (0, 2)


@pytest.mark.parametrize("target, match", [
    ({"hidden_size": 64}, "target.hidden_size"),
    ({"num_attention_heads": 8}, "target.num_attention_heads"),
    ({"num_attention_heads": 3, "num_key_value_heads": 2}, "not divisible"),
    ({"num_attention_heads": 4, "num_key_value_heads": 1}, "per group"),
    ({"num_hidden_layers": 0}, "target.num_hidden_layers"),
    ({"drop_layers": [0, 1]}, "zero layers"),
    ({"drop_layers": [9]}, "target.drop_layers"),
])
def test_impossible_targets_are_one_line_errors(target, match):
    model, scores = _scored("llama")
    with pytest.raises(MinicompressError, match=match) as err:
        make_plan(scores, model.config, target)
    assert "\n" not in str(err.value)


def test_plan_is_json_serialisable_and_pure():
    model, scores = _scored("qwen3", num_hidden_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(scores, model.config, SHRINK)
    again = PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(MinicompressError, match="plan is for"):
        apply_plan_(make_tiny_model("qwen3"), plan)  # 2 layers, the plan wants 3


def test_scores_for_another_shape_are_refused():
    model, scores = _scored("llama")
    with pytest.raises(MinicompressError, match="--scores"):
        make_plan(scores, make_tiny_model("llama", intermediate_size=48).config, {})


def test_candidates_are_within_budget_and_search_picks_one():
    model, scores = _scored("llama", num_hidden_layers=4)
    total = count_parameters(model.config)["total"]
    cands = candidate_targets(model.config, 0.7, tolerance=0.05)
    assert cands and all(abs(c["params"] - 0.7 * total) <= 0.05 * 0.7 * total for c in cands)
    assert len({c["num_hidden_layers"] for c in cands}) > 1  # depth and width mixes are both tried
    best, table = search_architecture(model, scores, 0.7, [_ids(5, (2, 16))], space=SearchSpace(tolerance=0.05),
                                      finalists=3)
    plan = make_plan(scores, model.config, best)
    assert abs(plan_parameters(plan, model.config) - 0.7 * total) <= 0.05 * 0.7 * total
    finals = [r for r in table if "loss" in r]
    assert len(finals) == 3 and min(finals, key=lambda r: r["loss"])["hidden_size"] == best["hidden_size"]
    with pytest.raises(MinicompressError, match="target_params"):
        candidate_targets(model.config, 2 * total)


def _with_dead_channels(model_type, dead):
    """A model whose residual stream is exactly zero on channels ``dead``."""
    model = make_tiny_model(model_type)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0.0
        if not model.config.tie_word_embeddings:
            model.lm_head.weight[:, dead] = 0.0
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight[dead] = 0.0
            layer.mlp.down_proj.weight[dead] = 0.0
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_norm_correction_makes_removing_dead_channels_exact(model_type):
    dead = [3, 11, 20, 29]
    model = _with_dead_channels(model_type, dead)
    scores = score_model(model, [_ids(1)])
    assert set(scores.channels.argsort()[:4].tolist()) == set(dead)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        exact = pruned_copy(model, make_plan(scores, model.config, {"hidden_size": 28}))(ids).logits
        plain = pruned_copy(model, make_plan(scores, model.config, {"hidden_size": 28, "norm_correction": False}))(ids).logits
    torch.testing.assert_close(exact, ref, rtol=1e-4, atol=1e-4)
    assert (plain - ref).abs().max() > 1e-3  # without the correction every norm output shrinks


def test_hidden_size_must_divide_by_heads_where_transformers_checks_it(tmp_path):
    model, scores = _scored("llama")
    with pytest.raises(MinicompressError, match="divisible by num_attention_heads") as err:
        make_plan(scores, model.config, {"hidden_size": 30})  # 30 % 4 heads
    assert "28 or 32" in str(err.value) and "\n" not in str(err.value)
    make_plan(scores, model.config, {"hidden_size": 30}, require_valid_config=False)  # in-memory experiments
    # qwen3 has no such check: the shape is valid, saves and reloads
    qwen, qscores = _scored("qwen3")
    apply_plan_(qwen, make_plan(qscores, qwen.config, {"hidden_size": 30}))
    qwen.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, qwen(ids).logits)
    # the search never proposes a shape the config would reject
    big = make_tiny_model("llama", num_hidden_layers=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                          intermediate_size=192, head_dim=16)
    cands = candidate_targets(big.config, 0.6, tolerance=0.05)
    assert cands and all(c["hidden_size"] % c["num_attention_heads"] == 0 for c in cands)


def test_search_candidates_have_aligned_widths_and_both_layer_metrics():
    model, scores = _scored("llama", num_hidden_layers=4, hidden_size=128, intermediate_size=256, head_dim=32)
    for i, v in enumerate([0.9, 0.8, 0.7, 0.1]):  # Block Importance drops layer 3 first, then 2
        scores.block_distance[i, i + 1] = scores.block_distance[i + 1, i] = v
    scores.layer_loss = torch.tensor([3.0, 0.1, 2.0, 1.0])  # the loss metric drops layer 1 first, then 3
    cands = search_candidates(scores, model.config, 0.6, tolerance=0.05, width_multiple=32)
    assert cands and all(c["hidden_size"] % 32 == 0 and c["intermediate_size"] % 32 == 0 for c in cands)
    assert all(c["hidden_size"] % c["num_attention_heads"] == 0 for c in cands)  # transformers' llama rule
    assert any(c["num_hidden_layers"] == 4 and c["hidden_size"] < 128 for c in cands)  # width-only shapes
    shallow = [c for c in cands if c["num_hidden_layers"] < 4]
    assert {c["layer_metric"] for c in shallow} == {"bi", "loss"}
    assert {(c["num_hidden_layers"], c["layer_metric"], tuple(c["dropped_layers"])) for c in shallow} <= \
        {(3, "bi", (3,)), (3, "loss", (1,)), (2, "bi", (2, 3)), (2, "loss", (1, 3))}
    for cand in cands[::4]:  # every shape is a valid model of the closed-form size
        small = pruned_copy(model, make_plan(scores, model.config, cand))
        assert sum(p.numel() for p in small.parameters()) == cand["params"]
    plain = candidate_targets(model.config, 0.6, tolerance=0.05, width_multiple=1)
    assert any(c["intermediate_size"] % 32 or c["hidden_size"] % 32 for c in plain)  # 1: the finer plain grid
    assert candidate_targets(model.config, 0.6, tolerance=0.05, width_multiple=128) == plain  # widths < 4 x 128
    assert validate_target(model.config, {"target_params": 0.6, "width_multiple": 32})["candidates"] < len(plain)
    best, table = search_architecture(model, scores, 0.6, [_ids(5, (2, 16))], finalists=3,
                                      space=SearchSpace(layer_metric="loss", tolerance=0.05, width_multiple=32))
    assert len(table) == len(cands) and best == row_target(zero_shot_ranking(table)[0])
    assert best["layer_metric"] in ("bi", "loss") and len(zero_shot_ranking(table)) == 3
    scores.layer_loss = None  # scored without loss_samples: Block Importance only
    assert {c["layer_metric"] for c in search_candidates(scores, model.config, 0.6, tolerance=0.05,
                                                         width_multiple=32)} == {"bi"}
