"""``benchmarks/peers.py``: the LLM-Pruner-style Taylor scores and the TRL schedule it derives from ours."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("peers", None)
    import peers as module

    return module


def naive_taylor(model, batches):
    """|w * dL/dw| summed unit by unit with explicit index loops (the reference)."""
    model = copy.deepcopy(model)
    model.zero_grad()
    for batch in batches:
        (model(input_ids=batch, labels=batch).loss / len(batches)).backward()
    cfg = model.config
    hd, n_heads, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    group = n_heads // n_kv
    t = {name: (p.detach() * p.grad).abs() for name, p in model.named_parameters()}
    layers = cfg.num_hidden_layers
    heads = torch.zeros(layers, n_heads)
    neurons = torch.zeros(layers, cfg.intermediate_size)
    channels = torch.zeros(cfg.hidden_size)
    for i in range(layers):
        p = f"model.layers.{i}."
        for h in range(n_heads):
            rows = slice(h * hd, (h + 1) * hd)
            kv_rows = slice((h // group) * hd, (h // group + 1) * hd)
            heads[i, h] = (t[p + "self_attn.q_proj.weight"][rows].sum() + t[p + "self_attn.o_proj.weight"][:, rows].sum()
                           + (t[p + "self_attn.k_proj.weight"][kv_rows].sum()
                              + t[p + "self_attn.v_proj.weight"][kv_rows].sum()) / group)
        for j in range(cfg.intermediate_size):
            neurons[i, j] = (t[p + "mlp.gate_proj.weight"][j].sum() + t[p + "mlp.up_proj.weight"][j].sum()
                             + t[p + "mlp.down_proj.weight"][:, j].sum())
    for c in range(cfg.hidden_size):
        total = t["model.embed_tokens.weight"][:, c].sum() + t["model.norm.weight"][c]
        for i in range(layers):
            p = f"model.layers.{i}."
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                total = total + t[p + name + ".weight"][:, c].sum()
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                total = total + t[p + name + ".weight"][c].sum()
            total = total + t[p + "input_layernorm.weight"][c] + t[p + "post_attention_layernorm.weight"][c]
        channels[c] = total
    return heads, neurons, channels


def test_taylor_scores_match_a_naive_unit_by_unit_sum(peers, make_tiny_model):
    from minicompress.pruning.plan import make_plan, pruned_copy

    model = make_tiny_model("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=48, head_dim=8,
                            intermediate_size=40, num_hidden_layers=3)
    batches = [torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    like = SimpleNamespace(block_distance=torch.rand(4, 4))
    scores = peers.taylor_scores(model, batches, like)
    heads, neurons, channels = naive_taylor(model, batches)
    torch.testing.assert_close(scores.heads, heads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores.neurons, neurons, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores.channels, channels, rtol=1e-4, atol=1e-7)
    assert scores.block_distance is like.block_distance
    assert all(p.grad is None for p in model.parameters())  # gradients cleared
    target = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24}
    small = pruned_copy(model, make_plan(scores, model.config, target))
    assert (small.config.hidden_size, small.config.num_attention_heads, small.config.intermediate_size) == (32, 4, 24)
    # the channels kept are the highest-scored ones
    kept = set(make_plan(scores, model.config, target).channels)
    assert kept == set(channels.argsort(descending=True)[:32].tolist())


def test_trl_arguments_follow_recovers_schedule(peers, tmp_path):
    spec = {"recover": {}, "student": "s", "teacher": "t", "data": "d", "seed": 0, "seq_len": 512, "tokens": 262144}
    cfg = peers.recover_config(spec, tmp_path / "model")
    args = peers.trl_arguments(cfg, tmp_path / "trainer", bf16=True)
    # 64 steps of 8 x 512 tokens as 2 micro batches of 4; warmup a tenth of the steps; 8 checkpoints
    assert args["max_steps"] == 64 and args["per_device_train_batch_size"] == 4
    assert args["gradient_accumulation_steps"] == 2 and args["max_length"] == 512
    assert args["warmup_steps"] == 6 and args["save_steps"] == 8
    assert (args["learning_rate"], args["adam_beta1"], args["adam_beta2"], args["max_grad_norm"]) == (1e-3, 0.9, 0.95, 1.0)
    assert args["train_sampling_strategy"] == "sequential" and not args["gradient_checkpointing"]
    assert cfg.loss.kl_weight == 1.0 and cfg.loss.ce_weight == 0.0  # recover's defaults ("recover": {})
    small = peers.recover_config({**spec, "recover": {"global_batch_tokens": 512}, "seq_len": 64, "tokens": 4096},
                                 tmp_path / "m")
    args = peers.trl_arguments(small, tmp_path / "t", bf16=False)
    assert (args["max_steps"], args["gradient_accumulation_steps"], args["warmup_steps"]) == (8, 2, 1)


def test_chat_rows_split_each_row_at_the_prompt(peers, tiny_tokenizer):
    rows = [tiny_tokenizer("the cat was on the mat and it is", add_special_tokens=False)["input_ids"]] * 2
    out = peers.chat_rows(rows, tiny_tokenizer, 3)
    assert len(out) == 2
    user, assistant = out[0]["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    assert user["content"] == tiny_tokenizer.decode(rows[0][:3], skip_special_tokens=False)
    assert assistant["content"] == tiny_tokenizer.decode(rows[0][3:], skip_special_tokens=False)


@pytest.fixture
def peers_gkd(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("peers_gkd", None)
    import peers_gkd as module

    return module


def test_gkd_rows_and_their_probes(peers_gkd):
    rows = peers_gkd.rows_of(["gkd", "distillation"], [0.0, 0.25], [0.0, 0.5])
    assert rows["trl-gkd-fkl-l25"] == {"kind": "gkd", "lmbda": 0.25, "beta": 0.0}
    assert rows["trl-gkd-jsd0.5-l0"] == {"kind": "gkd", "lmbda": 0.0, "beta": 0.5}
    assert rows["trl-distill-jsd0.5-l100"] == {"kind": "distillation", "lmbda": 1.0, "beta": 0.5}
    assert len(rows) == 6
    with pytest.raises(ValueError, match="gkd or distillation"):
        peers_gkd.rows_of(["sft"], [0.0], [0.0])
    # GKD flips a coin per micro batch: probed off- and on-policy, weighted by lambda
    assert peers_gkd.probe_points(rows["trl-gkd-fkl-l25"]) == [(0.0, 0.75), (1.0, 0.25)]
    assert peers_gkd.probe_points(rows["trl-gkd-jsd0.5-l0"]) == [(0.0, 1.0)]
    assert peers_gkd.probe_points(rows["trl-distill-jsd0.5-l100"]) == [(1.0, 1.0)]
    assert peers_gkd.mean_step_seconds([9.0, 2.0, 4.0]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="probe-steps"):
        peers_gkd.mean_step_seconds([9.0])


def test_trl_counting_reads_both_batch_layouts(peers):
    class Base:
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 0.0

    clock = peers.new_clock()
    trainer = peers.counting(Base, clock)()
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    trainer.compute_loss(None, {"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1],
                                                                                               [1, 1, 1, 0]]),
                                "labels": labels})
    assert (clock["padded_tokens"], clock["real_tokens"], clock["loss_tokens"]) == (8, 7, 4)
    # DistillationTrainer: prompt and generated completion apart
    trainer.compute_loss(None, {"prompt_ids": torch.zeros(2, 3), "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
                                "completion_ids": torch.zeros(2, 2), "completion_mask": torch.tensor([[1, 1], [1, 0]])})
    assert (clock["padded_tokens"], clock["real_tokens"], clock["loss_tokens"]) == (18, 15, 7)
